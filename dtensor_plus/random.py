"""Random numbers that stay consistent across ranks.

Default mode: each random op draws from a generator seeded by (seed, op counter, shard index), where the
shard index numbers the blocks of the output along the mesh dims that shard it. So Replicate outputs are
equal on every rank, Shard outputs differ between shards, and runs with the same ``manual_seed`` repeat.
Every rank of a mesh runs the same ops (SPMD), so the op counters agree without communication.

Strict mode (``manual_seed(s, strict=True)``): each random op runs on the whole tensor with torch's own
generator, seeded alike on every rank, and each rank keeps its block, so every shard equals the same slice
of the single-device tensor drawn after ``torch.manual_seed(s)``. It costs a gather of the op's inputs; use
it to check dropout-bearing training against one device.
"""

from __future__ import annotations

import contextlib

import torch

from . import collectives

__all__ = ["manual_seed", "is_strict", "rng_for", "draws", "get_rng_state", "set_rng_state"]

_aten = torch.ops.aten
# Ops tagged nondeterministic_seeded that draw nothing at dropout_p == 0 (position of dropout_p): attention.
# Strict mode would otherwise gather their inputs for nothing, and the sharded rules (heads, batch, the
# sequence under context parallelism) would never run in a dropout-checked training run.
_DROPOUT_P_AT = {
    _aten._scaled_dot_product_flash_attention_for_cpu.default: 3,
    _aten._scaled_dot_product_flash_attention.default: 3,
    _aten._scaled_dot_product_efficient_attention.default: 5,
}


def draws(func, args, kwargs) -> bool:
    """Does this call of a nondeterministic_seeded op draw random numbers? (Checked per call: the dispatch
    cache key holds a float argument's type, not its value.)"""
    at = _DROPOUT_P_AT.get(func)
    if at is None:
        return True
    dropout_p = args[at] if len(args) > at else kwargs.get("dropout_p", 0.0)
    return dropout_p > 0


class _RNGState:
    seed: int | None = None
    counter: int = 0
    strict: bool = False


_STATE = _RNGState()
_MASK64 = (1 << 64) - 1


def manual_seed(seed: int, *, strict: bool = False) -> None:
    """Seed dtensor_plus's random ops (and torch's generator) identically on every rank.

    Args:
        seed: the same integer on every rank.
        strict: draw every random op as one device would (see the module docstring).
    """
    if not isinstance(seed, int):
        raise TypeError(f"manual_seed needs an int, got {seed!r}")
    torch.manual_seed(seed)
    _STATE.seed, _STATE.counter, _STATE.strict = seed, 0, strict


def is_strict() -> bool:
    return _STATE.strict


def get_rng_state() -> dict:
    """Everything that decides the next draws, for a checkpoint: the seed, the op counter, the mode and torch's
    generator state (a plain uint8 tensor, the same on every rank after ``manual_seed``). A resumed run that
    calls ``set_rng_state`` draws exactly what the uninterrupted run would have drawn."""
    return {"seed": _STATE.seed, "counter": _STATE.counter, "strict": _STATE.strict, "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    """Restore what ``get_rng_state`` returned (possibly loaded from a checkpoint)."""
    missing = {"seed", "counter", "strict", "torch"} - set(state)
    if missing:
        raise ValueError(f"set_rng_state: the state lacks {sorted(missing)}; pass what get_rng_state() returned")
    _STATE.seed, _STATE.counter, _STATE.strict = state["seed"], int(state["counter"]), bool(state["strict"])
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
    if _STATE.seed is None:
        value = torch.tensor([torch.initial_seed() & ((1 << 62) - 1)], dtype=torch.int64)
        if mesh.device_type == "cuda":
            value = value.cuda()
        for mesh_dim in range(mesh.ndim):
            collectives.broadcast(value, mesh, mesh_dim, 0)
        _STATE.seed = int(value.item())
    return _STATE.seed


@contextlib.contextmanager
def rng_for(out_specs):
    """Draw the local part of a random op's output from this shard's own stream."""
    spec = out_specs[0]
    mesh, coordinate = spec.mesh, spec.mesh.get_coordinate()
    shard_index = 0
    for mesh_dim, placement in enumerate(spec.placements):
        if placement.is_shard() or placement.is_strided_shard():
            shard_index = shard_index * mesh.shape[mesh_dim] + coordinate[mesh_dim]
    seed = _mix(_base_seed(mesh), _STATE.counter, shard_index)
    _STATE.counter += 1
    devices = [torch.cuda.current_device()] if mesh.device_type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
