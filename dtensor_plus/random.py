"""Random numbers that stay consistent across ranks.

Default mode: each random op draws from a generator seeded by (seed, op counter, shard index), where the
shard index numbers the blocks of the output along the mesh dims that shard it. So Replicate outputs are
equal on every rank, Shard outputs differ between shards, and runs with the same ``manual_seed`` repeat.
Every rank of a mesh runs the same ops (SPMD), so the op counters agree without communication.

Strict mode (``manual_seed(s, strict=True)``): each random op runs on the whole tensor with torch's own
generator, seeded alike on every rank, and each rank keeps its block, so every shard equals the same slice
of the single-device tensor drawn after ``torch.manual_seed(s)``. It costs a gather of the op's inputs; use
it to check dropout-bearing training against one device.

Under torch.compile every random op takes the strict path. A graph cannot re-seed torch's generator per op at
run time: the per-shard seed default mode computes from the op counter would be fixed into the graph at trace
time, and every step would draw the same masks. Drawn whole with torch's generator and sliced, the graph keeps
at run time what default mode promises (Replicate outputs equal on every rank, shards independent, each rank's
generator advanced alike, uneven shards included) and under ``aot_eager`` it draws what eager strict mode draws.
It costs gathering the op's inputs, as strict mode does.
"""

from __future__ import annotations

import contextlib

import torch

from . import collectives, traced_collectives
from .dispatcher import DISPATCHER
from .placement_tuples import replicated
from .call_plan import substitute
from .redistribute import redistribute_local

__all__ = ["manual_seed", "is_strict", "rng_for", "seeded", "get_rng_state", "set_rng_state"]

_D = DISPATCHER
_MASK64 = (1 << 64) - 1


def seeded(record, plan):
    """The combinator for ops that draw random numbers (tagged nondeterministic_seeded): ``plan`` run with each
    shard drawing its own stream, or, in strict mode, the single-device draw sliced."""
    return SeededPlan(record, plan) if record.random else plan


class SeededPlan:
    __slots__ = ("record", "plan", "out_specs")

    def __init__(self, record, plan):
        self.record, self.plan, self.out_specs = record, plan, plan.out_specs

    def run(self, args, kwargs, dtensors):
        plan = self.plan
        if not self.record.draws(args, kwargs):
            return plan.run(args, kwargs, dtensors)
        traced = traced_collectives.is_traced(dtensors[0]._local_tensor if dtensors else None)
        if not (_D.rng_strict or traced):  # under tracing: strict (module docstring)
            with rng_for(plan.out_specs):
                return plan.run(args, kwargs, dtensors)
        # Strict: every rank runs the op on whole inputs with torch's own generator (seeded alike by
        # manual_seed), exactly as one device would, then keeps its slice of each output.
        local_args, _ = plan.localize(args, kwargs, dtensors)
        it = iter([redistribute_local(dt._local_tensor, dt._spec, replicated(dt._spec.mesh.ndim)) for dt in dtensors])
        full_args = substitute(args, it)
        full_kwargs = {k: substitute(v, it) for k, v in (kwargs or {}).items()}
        out = plan.func(*full_args, **full_kwargs)
        if plan.inplace:  # the op drew into a whole copy of self: keep this rank's block of it
            local_args[0].copy_(_slice(out, plan.out_specs[0]))
            return plan.finish(local_args[0], args, kwargs, dtensors)
        if isinstance(out, torch.Tensor):
            return plan.finish(_slice(out, plan.out_specs[0]), args, kwargs, dtensors)
        return plan.finish(type(out)(_slice(o, s) for o, s in zip(out, plan.out_specs)), args, kwargs, dtensors)


def _slice(full, spec):
    whole = spec.with_placements(replicated(spec.mesh.ndim))
    return redistribute_local(full, whole, spec.placements)


def manual_seed(seed: int, *, strict: bool = False) -> None:
    """Seed dtensor_plus's random ops (and torch's generator) identically on every rank.

    Args:
        seed: the same integer on every rank.
        strict: draw every random op as one device would (see the module docstring).
    """
    if not isinstance(seed, int):
        raise TypeError(f"manual_seed needs an int, got {seed!r}")
    torch.manual_seed(seed)
    _D.rng_seed, _D.rng_counter, _D.rng_strict = seed, 0, strict


def is_strict() -> bool:
    return _D.rng_strict


def get_rng_state() -> dict:
    """Everything that decides the next draws, for a checkpoint: the seed, the op counter, the mode and torch's
    generator state (a plain uint8 tensor, the same on every rank after ``manual_seed``). A resumed run that
    calls ``set_rng_state`` draws exactly what the uninterrupted run would have drawn."""
    return {"seed": _D.rng_seed, "counter": _D.rng_counter, "strict": _D.rng_strict, "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    """Restore what ``get_rng_state`` returned (possibly loaded from a checkpoint)."""
    missing = {"seed", "counter", "strict", "torch"} - set(state)
    if missing:
        raise ValueError(f"set_rng_state: the state lacks {sorted(missing)}; pass what get_rng_state() returned")
    _D.rng_seed, _D.rng_counter, _D.rng_strict = state["seed"], int(state["counter"]), bool(state["strict"])
    torch.set_rng_state(state["torch"])


def _mix(*values: int) -> int:
    """A 63-bit seed from several ints (splitmix64 steps), so nearby inputs give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & _MASK64
    return x >> 1


def _base_seed(mesh) -> int:
    """The seed; without manual_seed, the one rank (0, ..., 0) of the mesh has, broadcast once."""
    if _D.rng_seed is None:
        value = torch.tensor([torch.initial_seed() & ((1 << 62) - 1)], dtype=torch.int64)
        if mesh.device_type == "cuda":
            value = value.cuda()
        for mesh_dim in range(mesh.ndim):
            collectives.broadcast(value, mesh, mesh_dim, 0)
        _D.rng_seed = int(value.item())
    return _D.rng_seed


@contextlib.contextmanager
def rng_for(out_specs):
    """Draw the local part of a random op's output from this shard's own stream."""
    spec = out_specs[0]
    mesh, coordinate = spec.mesh, spec.mesh.get_coordinate()
    shard_index = 0
    for mesh_dim, placement in enumerate(spec.placements):
        if placement.is_shard() or placement.is_strided_shard():
            shard_index = shard_index * mesh.shape[mesh_dim] + coordinate[mesh_dim]
    seed = _mix(_base_seed(mesh), _D.rng_counter, shard_index)
    _D.rng_counter += 1
    devices = [torch.cuda.current_device()] if mesh.device_type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
