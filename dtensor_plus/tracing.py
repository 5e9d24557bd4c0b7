"""What torch.compile needs from the core: meshes and placements as compile-time constants, and the DTensor front
doors (``from_local``, ``to_local``, ``redistribute``, ``full_tensor``) as calls Dynamo records without reading.

How a compiled DTensor program is traced (docs/architecture.md, "Under torch.compile"):

- **Dynamo** reads the user's Python. A DTensor is a traceable wrapper subclass (``DTensor.__tensor_flatten__``:
  the block inside, the spec as constant context), so Dynamo fakes its block and guards on its spec by
  equality. Meshes and placements are registered here as opaque *value* types: Dynamo guards on them by
  ``__eq__``, reads the members listed below on the real object at trace time (``mesh.size(0)``,
  ``p.is_shard()``), and writes them into graphs by ``__fx_repr__``. So a layout's hook that compares meshes
  and builds placements traces without a graph break.
- The front doors run our Python (normalising placements, the planner, autograd Functions): Dynamo does not
  read them but records each call (``torch._dynamo.nonstrict_trace``), and **AOTAutograd** runs them, like
  every aten op on a DTensor (``__torch_dispatch__``, the dispatcher and its caches), on fake blocks. What it
  records is the local aten ops and the collectives, the latter as functional collectives
  (``traced_collectives.py``).

Importing torch._dynamo costs seconds, and a program that never compiles should not pay it: the front doors
are marked when torch._dynamo is imported (``after_dynamo_import``), not when dtensor_plus is.
"""

from __future__ import annotations

import importlib.machinery
import sys

from torch._library.opaque_object import MemberType, register_opaque_type

from .mesh import DeviceMesh
from .placements import Partial, Replicate, Shard, StridedShard

__all__ = ["after_dynamo_import", "constant_when_traced", "nonstrict"]


# -- meshes and placements: constants of a compiled program -------------------------------------------------------

# Members Dynamo evaluates on the real object at trace time (metadata only: nothing here takes a tensor).
_PLACEMENT_MEMBERS = ("is_shard", "is_replicate", "is_partial", "is_strided_shard", "normalized", "dim", "reduce_op",
                      "outer", "zigzag", "with_dim", "pieces", "local_size", "__eq__", "__ne__", "__hash__", "__repr__")
_MESH_MEMBERS = ("size", "get_local_rank", "get_coordinate", "get_rank", "mesh_dim_index", "mesh_dim_name",
                 "row_ranks", "rows", "coordinate_of", "get_group", "ndim", "shape", "mesh_dim_names", "device_type",
                 "backend", "_root", "_root_dims", "__eq__", "__ne__", "__hash__", "__getitem__", "flatten", "__repr__")

for _cls in (Shard, Replicate, Partial, StridedShard):
    register_opaque_type(_cls, typ="value", members={m: MemberType.USE_REAL for m in _PLACEMENT_MEMBERS if hasattr(_cls, m)})
register_opaque_type(DeviceMesh, typ="value", members={m: MemberType.USE_REAL for m in _MESH_MEMBERS})


# -- front doors: recorded by Dynamo, traced by AOTAutograd ----------------------------------------------------------

def nonstrict(fn):
    """``fn`` marked for Dynamo to record as one call and AOTAutograd to trace through (torch._dynamo must be
    imported: call it from an ``after_dynamo_import`` callback)."""
    return sys.modules["torch._dynamo"].nonstrict_trace(fn)


def constant_when_traced(fn):
    """``fn``, a question about Python state Dynamo cannot read (which rules are in force: the registry's
    mappings are keyed by op objects), answered when Dynamo traces a call to it and its answer kept in the
    graph as a constant (``torch._dynamo.assume_constant_result``), not a graph break. Dynamo does not guard
    on the answer: a graph made where it held is reused where it would not. Returns ``fn`` itself, marked
    once torch._dynamo is imported."""
    after_dynamo_import(lambda: sys.modules["torch._dynamo"].assume_constant_result(fn))
    return fn


def after_dynamo_import(callback) -> None:
    """Run ``callback`` once torch._dynamo is imported: now if it is, else right after its import."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None and hasattr(dynamo, "nonstrict_trace"):
        callback()
        return
    # One finder holds every pending callback: with one finder each, the first to find the module would load
    # it and the others would never be asked (the front doors left unmarked when a layout registered later).
    waiting = next((f for f in sys.meta_path if isinstance(f, _AfterImport) and f.name == "torch._dynamo"), None)
    if waiting is None:
        waiting = _AfterImport("torch._dynamo")
        sys.meta_path.insert(0, waiting)
    waiting.callbacks.append(callback)


class _AfterImport:
    """A meta-path finder that finds nothing itself: it lets the normal finder load ``name`` and runs its
    ``callbacks``, in the order added, after the module's code has run (Python has no post-import hook)."""

    def __init__(self, name: str):
        self.name, self.callbacks = name, []

    def find_spec(self, name, path, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)  # once
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run_module, callbacks = spec.loader.exec_module, self.callbacks

        def exec_module(module):
            run_module(module)
            for callback in callbacks:
                callback()

        spec.loader.exec_module = exec_module
        return spec
