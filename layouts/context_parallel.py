"""``context_parallel()``: attention over a sequence sharded on a context-parallel mesh dim, never gathered.

Outside the block, scaled-dot-product attention on sequence-sharded q, k, v gathers the sequence
(ops/attention.py). Inside it, the attention ops (forward and backward) take one of these rules, installed
through ``rules.override_rule`` (scoped, nesting, one plan cache per rule set):

    kind        what moves on the cp mesh dim                          where
    "ring"      k/v blocks pass around the ring (n-1 shifts forward)   ops/ring_attention.py
    "ulysses"   all-to-all sequence-sharded -> head-sharded and back   ops/ulysses_attention.py
    "usp"       both, on two mesh dims (ring, ulysses)                 the two blocks nested
    "double_ring"  the ring on two mesh dims (outer, inner)             ops/double_ring_attention.py
    "loongtrain"   double ring x Ulysses (outer, inner, ulysses)        the two blocks nested

USP (unified sequence parallelism, Fang & Zhao 2024) is the two blocks nested: ``mesh_dim=("ring",
"ulysses")`` with q, k, v ``[Shard(2), Shard(2)]`` on them (the ring's mesh dim outer, Ulysses' inner).
Ulysses, entered second, takes the ring rule as the rule it falls back to: its all-to-alls on the inner
dim give ``[Shard(2), Shard(1)]`` (whole ring blocks of the sequence, heads split), the ring runs on the
outer dim with the heads local, and the output goes back to ``[Shard(2), Shard(2)]``. Nothing new runs.

LoongTrain (Gu et al. 2024): ``kind="double_ring"``, ``mesh_dim=("outer", "inner")``, q, k, v ``[Shard(2),
Shard(2)]``: the kv blocks circle the inner ring (fast links) m times, hopping once on the outer ring between
rounds, so only m-1 of the n-1 shifts cross slow links. ``kind="loongtrain"``, ``mesh_dim=("outer", "inner",
"ulysses")``, q, k, v Shard(2) on all three: its head-context 2-D attention, Ulysses on the innermost mesh dim
around the double ring, nested as USP nests Ulysses around the ring.

Calls whose q, k, v are not sharded on the sequence dim of that mesh dim keep the default rule, and every
other mesh dim keeps its default treatment (batch or heads sharded: local), so cp composes with dp and tp.

Example::

    mesh = init_device_mesh("cpu", (2, 4), mesh_dim_names=("dp", "cp"))
    q = distribute_tensor(q_whole, mesh, [Shard(0), Shard(2)])      # (B, H, T, D): batch on dp, seq on cp
    with context_parallel(mesh_dim="cp", kind="ring"):
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

Load-balanced causal attention (``load_balance=True`` or "zigzag"): place the sequence zigzag, rank r holding
pieces r and 2n-1-r of 2n, so every rank computes the same number of (q, kv) block pairs::

    x = distribute_tensor(x_BTD, mesh, [Shard(0), StridedShard(1, 1, zigzag=True)])   # or .redistribute(...)
    with context_parallel(mesh_dim="cp", load_balance=True):
        y = attention_block(x)          # views, linears and SDPA keep the zigzag; y.full_tensor() is in order

``load_balance="striped"`` (striped attention, Brandon et al. 2023): token t on rank t mod n, placed
``striped_placement(1, T, n)`` (= ``StridedShard(1, T // n)``); it needs n | T. ``load_balance="distflash"``
(DistFlashAttn, Li et al. 2023) keeps the plain Shard(2) layout and balances the schedule instead: a rank
idle in the plain causal ring attends another rank's queries to its own k/v (ops/distflash_attention.py).

Under torch.compile (tests/compile/test_compile_cp.py): enter the block *around* the compiled call::

    compiled = torch.compile(attention_block, fullgraph=True)
    with context_parallel(mesh_dim="cp", kind="ring"):
        compiled(x).sum().backward()    # one graph, no break; ring, load-balanced ring and Ulysses equal eager

AOTAutograd traces the forward and the backward while the block is in force, so both graphs hold the ring's
shifts (one functional all-to-all each, ``traced_collectives``) or Ulysses' all-to-alls. Striped and DistFlashAttn
load balance and USP train compiled equal to eager and one device too (tests/compile/test_compile_cp_schemes.py).
Counted, documented places where it does not hold:

- The double ring (and LoongTrain, which nests it) hangs compiled on 4 ranks (found, not yet diagnosed), as
  does examples/gpt.py's GPT under USP, and under the ring on 4 ranks with keep_attention recomputation, in
  benchmarks/compile_step.py (USP's attention layer alone, and the 1-layer GPT on a 2-rank ring, pass).

- ``context_parallel`` entered *inside* the compiled code is not traced: Dynamo cannot read the rule registry
  the block changes, so ``fullgraph=True`` raises ``Unsupported`` ("non-const keys in mappingproxy"); without
  it Dynamo runs the frame holding the ``with`` eagerly and compiles the modules called inside it (a skipped
  frame, not a counted graph break). Probed, not in the tests: outputs and gradient values equal eager's, but
  a parameter's gradient placement can differ (a bias's gradient Partial compiled, Replicate eager). Enter
  it around the compiled call.
- Dynamo does not guard on the rules in force: a compiled module first called inside the block and later
  outside it (or the reverse) reuses its first graph. The values are the same (every kind is exact), the
  traffic is the first call's.
- Ulysses' compiled backward holds 3 all-to-alls more than eager's: it recomputes the forward's head-sharded
  attention (q, k, v moved to heads and the kernel run again) instead of using what the forward saved; why
  AOTAutograd's partitioner does so is not yet found. Values are equal.
"""

from __future__ import annotations

import contextlib
import functools
import importlib

from dtensor_plus import rules
from dtensor_plus.ops.ring_attention import striped_placement

__all__ = ["context_parallel", "CONTEXT_PARALLEL_KINDS", "striped_placement"]

CONTEXT_PARALLEL_KINDS = ("ring", "ulysses", "usp", "double_ring", "loongtrain")
_LOAD_BALANCERS = (False, True, "zigzag", "striped", "distflash")  # ring_attention.LOAD_BALANCERS, distflash, off/on
_ULYSSES_MODULE = "dtensor_plus.ops.ulysses_attention"


@contextlib.contextmanager
def context_parallel(mesh_dim: int | str | tuple = "cp", kind: str = "ring", *, load_balance: bool | str = False):
    """Run scaled-dot-product attention on sequence-sharded q, k, v as ring, Ulysses, USP or LoongTrain attention.

    Args:
        mesh_dim: the context-parallel mesh dim of the q/k/v DTensors' mesh, by name or index; for "usp"
            a pair (ring mesh dim, Ulysses mesh dim), for "double_ring" (outer, inner), for "loongtrain"
            (outer, inner, Ulysses), in mesh order (the later ones inner).
        kind: "ring" (k/v blocks circulate, exact log-sum-exp merge), "ulysses" (all-to-all to heads),
            "usp" (Ulysses on the inner mesh dim inside a ring on the outer one), "double_ring" (the ring
            as an inner ring inside an outer one) or "loongtrain" (Ulysses inside the double ring).
        load_balance: (ring) causal attention runs on a balanced placement of q, k, v: True or "zigzag"
            (``StridedShard(2, 1, zigzag=True)``: equal work on every rank, any length) or "striped"
            (``striped_placement(2, T, n)``: token t on rank t mod n, n | T), or "distflash" (Shard(2) kept,
            idle ranks take far causal blocks: at most ceil((n+1)/2) blocks a rank). Place zigzag or striped
            inputs so up front (``distribute_tensor(x, mesh, [StridedShard(seq_dim, 1, zigzag=True)])`` or
            ``.redistribute`` to it): Shard(2) inputs are moved to it here (an all-gather each). The ring
            takes zigzag or striped inputs without this flag too; the flag only adds the move.

    Outputs (and gradients) stay sharded on the sequence dim as the inputs were: Shard(2) of (B, H, T, D), or
    zigzag, on ``mesh_dim``.
    """
    if not any(load_balance is choice or (isinstance(choice, str) and load_balance == choice)
               for choice in _LOAD_BALANCERS):
        raise ValueError(f"context_parallel(load_balance={load_balance!r}): use one of {_LOAD_BALANCERS}")
    if load_balance is not False and kind != "ring":
        raise ValueError(f"context_parallel(kind={kind!r}, load_balance={load_balance!r}): load balancing is a "
                         f"ring layout (Ulysses attention is balanced already; USP's Ulysses split sits inside "
                         f"the ring's, where a zigzag or striped sequence cannot); use kind='ring' or "
                         f"load_balance=False")
    if kind == "usp":
        ring_dim, ulysses_dim = _mesh_dims(mesh_dim, kind, "(ring mesh dim, ulysses mesh dim)")
        with context_parallel(ring_dim, "ring"), context_parallel(ulysses_dim, "ulysses"):
            yield
        return
    if kind == "double_ring":
        from dtensor_plus.ops.double_ring_attention import double_ring_rules
        with rules.override_rule(double_ring_rules(*_mesh_dims(mesh_dim, kind, "(outer mesh dim, inner mesh dim)")),
                                 asked_for=True):
            yield
        return
    if kind == "loongtrain":
        *ring_dims, ulysses_dim = _mesh_dims(mesh_dim, kind, "(outer mesh dim, inner mesh dim, ulysses mesh dim)")
        with context_parallel(tuple(ring_dims), "double_ring"), context_parallel(ulysses_dim, "ulysses"):
            yield
        return
    _check_mesh_dim(mesh_dim, kind)
    # the ring reads zigzag StridedShards itself; Ulysses sees any StridedShard gathered
    # Its collectives (k/v around the ring, Ulysses' all-to-alls) are asked for by name, even in explicit mode.
    with rules.override_rule(_rules_for(kind, mesh_dim, load_balance), strided="native" if kind == "ring" else None,
                             asked_for=True):
        yield


def _check_mesh_dim(mesh_dim, kind: str) -> None:
    if isinstance(mesh_dim, bool) or not isinstance(mesh_dim, (int, str)):
        usp = " (tuples of them are for kind='usp', 'double_ring', 'loongtrain')" if isinstance(mesh_dim, tuple) else ""
        raise TypeError(f"context_parallel(mesh_dim=..., kind={kind!r}) takes a mesh dim name or index{usp}, "
                        f"got {mesh_dim!r}")


def _mesh_dims(mesh_dim, kind: str, wanted: str) -> tuple:
    """The tuple of mesh dims a multi-dim kind takes, checked: as many as ``wanted`` names, all different."""
    count = wanted.count(",") + 1
    if not isinstance(mesh_dim, tuple) or len(mesh_dim) != count or len(set(mesh_dim)) != count:
        raise TypeError(f"context_parallel(kind={kind!r}) takes mesh_dim={wanted}, {count} different names or "
                        f"indices in mesh order (the later ones inner); got {mesh_dim!r}")
    for one in mesh_dim:
        _check_mesh_dim(one, kind)
    return mesh_dim


def _rules_for(kind: str, mesh_dim: int | str, load_balance: bool | str = False) -> dict:
    if kind == "ring" and load_balance == "distflash":
        from dtensor_plus.ops.distflash_attention import distflash_rules
        return distflash_rules(mesh_dim)
    if kind == "ring":
        from dtensor_plus.ops.ring_attention import ring_rules
        return ring_rules(mesh_dim, load_balance)  # resolves a name against each call's mesh itself
    if kind == "ulysses":
        make_rules = _ulysses_rules_maker()
        return make_rules(mesh_dim) if isinstance(mesh_dim, int) else _resolving_names(make_rules, mesh_dim)
    raise ValueError(f"context_parallel(kind={kind!r}): use one of {CONTEXT_PARALLEL_KINDS}")


def _ulysses_rules_maker():
    try:
        module = importlib.import_module(_ULYSSES_MODULE)
    except ModuleNotFoundError as error:
        if error.name != _ULYSSES_MODULE:
            raise
        raise NotImplementedError(
            f"context_parallel(kind='ulysses') needs {_ULYSSES_MODULE} (ops/ulysses_attention.py), which is not "
            f"there yet; use kind='ring'") from None
    return module.ulysses_rules


# ulysses_rules takes a mesh dim index and captures the rules in force when it is called, so a name (known
# only against a call's mesh) is resolved at planning time among rules built here, on entry, per index.
_MAX_MESH_NDIM = 8


def _resolving_names(make_rules, mesh_dim_name: str) -> dict:
    per_index = [make_rules(index) for index in range(_MAX_MESH_NDIM)]
    # Positional partial arguments: the registry compares partials by their function and arguments, so
    # entering the block again gives the same rule set (and the same plan cache).
    return {op: functools.partial(_resolve_name, mesh_dim_name, *(rules_[op] for rules_ in per_index))
            for op in per_index[0]}


def _resolve_name(mesh_dim_name: str, *rules_then_op):
    *rules_by_index, op = rules_then_op
    index = op.mesh.mesh_dim_index(mesh_dim_name)  # raises ValueError naming the mesh's dims
    if index >= len(rules_by_index):
        raise ValueError(f"context_parallel supports meshes of up to {_MAX_MESH_NDIM} dims by name; pass the index")
    return rules_by_index[index](op)
