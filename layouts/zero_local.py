"""ZeRO-3's forward on each rank's own rows: no DTensor dispatch on the dp mesh dim (``fully_shard``'s
``local_compute``), as FSDP2 computes on plain tensors.

Why: inside a ``fully_shard`` module the parameters are gathered whole and the activations are only
batch-sharded on dp, so every op's rule there answers "Shard(0) stays Shard(0), nothing moves": dispatching each
op through DTensor decides nothing and costs a key, a cache lookup and a wrap per op. So the outermost
``fully_shard`` module's forward drops the dp mesh dim at its boundary and puts it back on its outputs
(``replicate``'s local compute, layouts/data_local.py, whose boundary Functions and checks this reuses):

    inputs      a DTensor Shard(0) on dp becomes this rank's rows (Replicate on dp: the whole), as a plain tensor;
    parameters  each unit's all-gather gives plain whole tensors, bound to the modules (zero_stage3.py); their
                gradients are this rank's rows' contributions, Partial(sum) on dp, which the unit's one flat
                reduce-scatter sums onto the shards exactly as on the DTensor path;
    buffers     a DTensor buffer (Replicate on dp: a causal mask) is bound to its local block for the forward;
    outputs     every tensor output is wrapped back: Shard(0) on dp with the global batch size from the inputs'
                specs, so a loss computed on it is the exact mean over the global batch, uneven batches included.

Only on a 1-D dp mesh (on (dp, tp) the tp rules still have to decide: the DTensor path runs). The DTensor path
also runs (exact as one device) when the view could not be exact or is not known to be: under
``torch.compile`` (the compiled graph pays dispatch once, while tracing), under
``manual_seed(..., strict=True)``, when no input is a DTensor Shard(0) on dp or an input is a plain tensor with
dims, when a parameter of the module is not a ``fully_shard`` shard, a DTensor buffer is not Replicate on dp,
or a module is marked ``DTENSOR_PATH`` (MoE). An output tensor that is not batch rows (a loss computed inside
forward, as Hugging Face models do with ``labels=``) cannot be put back exactly: as under ``replicate``, that
call's local outputs are dropped, the forward runs again on the DTensor path and the module is marked
``DTENSOR_PATH`` from then on (one warning says so). Dropout draws per dp rank, as under ``replicate``.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from dtensor_plus.dispatcher import DISPATCHER
from dtensor_plus.dtensor import DTensor

from .data_local import DTENSOR_PATH, LocalCompute, _DropDp

__all__ = ["LocalBoundary", "SHARDED_FOR"]

# On a sharded Parameter: who holds it, in words ("Linear's weight"); set by zero_stage3.py's units.
SHARDED_FOR = "_dtp_sharded_for"


class LocalBoundary:
    """The outermost unit's forward boundary for local compute (module docstring)."""

    def __init__(self, mesh, dp_mesh_dim: int):
        self.mesh, self.k = mesh, dp_mesh_dim
        self.rows = LocalCompute(mesh, dp_mesh_dim)  # its batch check, output wrap and per-rank RNG
        self.buffers: list | None = None
        self.call: tuple | None = None  # the (args, kwargs) the forward in progress was called with

    def enter(self, module, args, kwargs):
        """(args, kwargs) on this rank's rows, or None when this forward takes the DTensor path."""
        if self.mesh.ndim != 1 or DISPATCHER.rng_strict or torch.compiler.is_compiling():
            return None
        flat, tree = tree_flatten((args, kwargs))
        batch = self.rows._batch(flat)
        buffers = self._buffers(module) if batch is not None else None
        if buffers is None:
            return None
        self.rows.batch, self.buffers, self.call = batch, buffers, (args, kwargs)
        for owner, name, t in buffers:
            owner.__dict__[name] = t._local_tensor
        self.rows._fork_rng()
        local = [_DropDp.apply(t, None, self.k) if isinstance(t, DTensor) else t for t in flat]
        return tree_unflatten(local, tree)

    def exit(self, module, out):
        """``out`` back on the whole mesh (Shard(0) on dp, the global batch's rows)."""
        for owner, name, _ in self.buffers:
            owner.__dict__.pop(name, None)
        self.buffers = None
        self.rows._restore_rng()
        (args, kwargs), self.call = self.call, None
        flat, tree = tree_flatten(out)
        rows = self.rows.batch[1]
        if any(isinstance(t, torch.Tensor) and (t.ndim == 0 or t.shape[0] != rows) for t in flat):
            return self._rerun_on_dtensors(module, args, kwargs, flat, rows)
        return tree_unflatten([self.rows._wrap(t) if isinstance(t, torch.Tensor) else t for t in flat], tree)

    def _rerun_on_dtensors(self, module, args, kwargs, flat, rows):
        """Outputs that are not this rank's rows (a loss computed inside forward: a mean over this rank's rows
        only) cannot be put back exactly: drop them, mark the module, run it again on the DTensor path (whose every
        op sees the global batch). The units' state allows it: this forward's gathers are released, and its
        graph, never backpropagated, is freed with its outputs."""
        shapes = [tuple(t.shape) for t in flat if isinstance(t, torch.Tensor)]
        warnings.warn(
            f"fully_shard(local_compute=True): {type(module).__name__} returned tensors of shapes {shapes}, not all "
            f"this rank's {rows} batch rows (a loss computed inside forward?), which the local path cannot put back "
            f"exactly; this module runs on the DTensor path from now on (exact, slower). Compute the loss outside the "
            f"module on the returned batch to keep the fast path, or pass fully_shard(..., local_compute=False) to "
            f"say so up front", stacklevel=3)
        module.__dict__[DTENSOR_PATH] = True
        return module(*args, **kwargs)

    def _buffers(self, module):
        """(owner, name, DTensor) of every DTensor buffer, or None when a module of the tree cannot run locally:
        a parameter that is not a fully_shard shard, a DTensor buffer not Replicate on dp, a DTENSOR_PATH mark."""
        buffers = []
        for owner in module.modules():
            if owner.__dict__.get(DTENSOR_PATH) or getattr(type(owner), DTENSOR_PATH, False):
                return None
            for p in owner._parameters.values():
                if p is not None and SHARDED_FOR not in p.__dict__:
                    return None
            for name, t in owner._buffers.items():
                if isinstance(t, DTensor):
                    if t._spec.mesh != self.mesh or not t._spec.placements[self.k].is_replicate():
                        return None
                    buffers.append((owner, name, t))
        return buffers
