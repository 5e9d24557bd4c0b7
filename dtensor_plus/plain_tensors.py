"""Plain tensors that meet DTensors in one op: when they join as Replicate, and the check that makes it safe.

A plain ``torch.Tensor`` beside DTensors is taken as Replicate on their mesh, which is only right if every
rank holds the same values. Three cases:

- inside ``implicit_replication()``: the user vouches for it; it joins with no check (as torch's);
- inside backward: autograd's own formulas build it (zeros of the global shape for cummax's scatter, an
  arange for trace's index_fill) from global metadata, so it is the same on every rank; no check;
- anywhere else, a composite op (a masked_select inside ``torch.combinations``, the causal mask of sdpa's
  math path, the random samples ``fractional_max_pool2d`` draws) or user code built it. Every rank of the
  mesh compares a digest of it (one all-gather of a few int64 per mesh dim, counted): equal everywhere, it
  joins, with a one-time warning per op that names the cheaper fixes; different on some rank, the op raises
  on every rank alike, naming the argument and the first rank that differs. A rank-local tensor therefore
  never passes for a replicated one, and the verdict never splits the ranks.

The step counters of torch.optim's fused optimizers (``state_steps``) are kept per parameter and incremented
alike on every rank: they are trusted with no check (``_TRUSTED_ARGUMENTS``).

A 0-d plain tensor (a loss scale, a scalar computed from local data) is checked the same way, but stays a
plain 0-d tensor for the rules, which read it as a replicated scalar. A plain tensor that requires grad gets
its gradient back plain, the whole one-device value (``grad_layout.keep_plain_gradient``).
"""

from __future__ import annotations

import contextlib
import warnings
import zlib

import torch

from . import collectives, grad_layout, traced_checks, traced_collectives
from .dispatcher import DISPATCHER
from .dtensor import DTensor
from .placement_tuples import replicated
from .spec import DTensorSpec, TensorMeta

__all__ = ["implicit_replication", "join_as_replicate", "check_plain"]

_D = DISPATCHER


@contextlib.contextmanager
def implicit_replication():
    """Inside the block, a plain tensor that meets DTensors is taken as Replicate on their mesh with no
    cross-rank check: every rank must hold the same values (as torch's ``implicit_replication``). For the
    tensors a model builds inside its forward from replicated inputs (rotary cos/sin from position ids,
    masks), where the check outside the block would cost a small collective per op."""
    _D.implicit_replication += 1
    try:
        yield
    finally:
        _D.implicit_replication -= 1


def check_plain(func, args, kwargs):
    """Check every plain tensor among ``args``/``kwargs`` (0-d ones included) equal across the ranks of the
    DTensors' mesh unless trusted, and hook those that require grad to get a plain gradient. Returns the mesh."""
    found = [v for v in _flatten(list(args) + list(kwargs.values())) if isinstance(v, DTensor)]
    mesh = found[0]._spec.mesh
    plain = [(name, t) for name, t in _plain_arguments(args, kwargs) if name not in _trusted(func)]
    in_backward = torch._C._current_graph_task_id() != -1  # autograd's own formulas built it
    if mesh.get_coordinate() is None:  # a rank outside the mesh takes part in nothing
        return mesh
    if plain and not (_D.implicit_replication or in_backward):
        _check_same_on_every_rank(func, plain, mesh)
    if not in_backward and torch.is_grad_enabled():
        for _, t in plain:
            if t.requires_grad:
                grad_layout.keep_plain_gradient(t)
    return mesh


def join_as_replicate(func, args, kwargs):
    """``args``/``kwargs`` with every plain tensor of more than 0 dims made a Replicate DTensor on the mesh of
    the DTensors among them, after ``check_plain`` (see the module docstring)."""
    mesh = check_plain(func, args, kwargs)

    def lift(value):
        if type(value) is list or type(value) is tuple:
            return type(value)(lift(v) for v in value)
        if isinstance(value, DTensor) or not isinstance(value, torch.Tensor) or value.ndim == 0:
            return value
        return DTensor(value, DTensorSpec(mesh, replicated(mesh.ndim), TensorMeta.of(value)))

    return tuple(lift(a) for a in args), {k: lift(v) for k, v in kwargs.items()}


def _flatten(values) -> list:
    out = []
    for v in values:
        out += _flatten(v) if type(v) is list or type(v) is tuple else [v]
    return out


# Plain tensors some ops take that are the same on every rank by construction: the per-parameter step counters
# torch.optim's fused optimizers keep and increment alike on every rank (checking them would cost a collective
# per optimizer step).
_TRUSTED_ARGUMENTS = ("state_steps",)


def _trusted(func) -> set[str]:
    """The names (as _plain_arguments gives them) of ``func``'s arguments in _TRUSTED_ARGUMENTS."""
    return {f"argument {i}" for i, a in enumerate(func._schema.arguments) if a.name in _TRUSTED_ARGUMENTS} | \
        {f"argument {a.name!r}" for a in func._schema.arguments if a.name in _TRUSTED_ARGUMENTS}


def _plain_arguments(args, kwargs) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every plain tensor, in argument order."""
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [(f"argument {k!r}", v) for k, v in kwargs.items()]
    return [(name, v) for name, value in named for v in _flatten([value])
            if isinstance(v, torch.Tensor) and not isinstance(v, DTensor)]


def _digest(t: torch.Tensor) -> list[int]:
    """Shape, dtype and contents of ``t`` as two crc32 values (exact bytes, so -0.0 != 0.0 and NaNs match)."""
    data = torch.empty(t.shape, dtype=t.dtype).copy_(t.detach())  # dense row-major, whatever t's strides
    header = f"{tuple(data.shape)} {data.dtype}".encode()
    raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return [zlib.crc32(header), zlib.crc32(raw)]


def _check_same_on_every_rank(func, plain, mesh) -> None:
    """Raise on every rank of ``mesh`` alike unless each plain tensor is the same on all of them (under
    torch.compile: the same check in the graph, failing at run time; traced_checks.py)."""
    if any(traced_collectives.is_traced(t) for _, t in plain):
        _assert_same_in_graph(func, plain, mesh)
    else:
        _raise_unless_same(func, plain, mesh)
    if func not in _D.warned:
        _D.warned.add(func)
        warnings.warn(
            f"{func}: a plain torch.Tensor met DTensors and joined as Replicate after a cross-rank check of its "
            f"values (one small all-gather per call). If you built it, make it a DTensor, or build it inside "
            f"dtensor_plus.implicit_replication() to skip the check; if a torch composite op built it, this "
            f"message is only about speed.",
            stacklevel=4,
        )


def _raise_unless_same(func, plain, mesh) -> None:
    mine = torch.tensor([x for _, t in plain for x in _digest(t)], dtype=torch.int64)
    everyone, ranks = collectives.every_rank_rows(mine, mesh)
    for row, rank in zip(everyone, ranks):
        if not torch.equal(row, everyone[0]):
            which = next(i for i in range(len(plain)) if not torch.equal(row[2 * i: 2 * i + 2], everyone[0][2 * i: 2 * i + 2]))
            name, t = plain[which]
            what = "values" if row[2 * which] == everyone[0][2 * which] else "shape or dtype"
            raise ValueError(
                f"{func}: {name} is a plain torch.Tensor of shape {tuple(t.shape)} and dtype {t.dtype} mixed with "
                f"DTensors, and its {what} differ between ranks (rank {rank} holds other {what} than rank {ranks[0]}), so it "
                f"cannot be taken as Replicate; make it a DTensor first (distribute_tensor(t, mesh, placements) "
                f"or DTensor.from_local with its real placements)"
            )


def _assert_same_in_graph(func, plain, mesh) -> None:
    names = ", ".join(f"{name} (shape {tuple(t.shape)}, {t.dtype})" for name, t in plain)
    traced_checks.assert_same_on_every_rank(
        torch.cat([traced_checks.digest(t) for _, t in plain]), mesh,
        f"{func}: a plain torch.Tensor mixed with DTensors differs between ranks ({names}), so it cannot be taken "
        f"as Replicate; make it a DTensor first (distribute_tensor(t, mesh, placements) or DTensor.from_local "
        f"with its real placements)")
