"""Debug switches (the one module they live in) and the diagnosis of a collective that failed.

**Rank divergence.** SPMD code is only right while every rank issues the same collectives in the same
order. A rank that takes another path (a decision made from its local shard shape, a data-dependent branch)
makes gloo abort on a size mismatch, hang, or, worst, pair two unrelated collectives of equal size and
return a wrong value. Inside ``with check_divergence():`` (or with ``DTENSOR_PLUS_CHECK_DIVERGENCE=1`` in the
environment) every collective is preceded by a small all-gather, on the same group, of what each rank is
about to do: the collective, the mesh dim, the op being dispatched with its input specs (global metadata,
equal on every rank of a correct program) and the group's call count. Any difference raises, on every rank
alike, an error naming the first rank that diverged and what each side was doing. It costs one extra tiny
collective per collective: a debug mode, off by default.

**A failed collective** (a dead peer, a timeout) raises an error naming the collective, the mesh dim and
its rank groups (``collectives._named_error``), plus the ranks of the group that did not report in
(``missing_ranks``): each survivor writes a key to the job's store and waits a few seconds for its peers'
keys, so the message says which ranks died or are stuck elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from datetime import timedelta

import torch

__all__ = ["check_divergence", "divergence_checking", "at_op", "RankDivergenceError"]


class RankDivergenceError(RuntimeError):
    """The ranks of a group were about to issue different collectives (raised on every rank of the group)."""

_CHECK = [os.environ.get("DTENSOR_PLUS_CHECK_DIVERGENCE", "") not in ("", "0")]
_OP_STACK: list[str] = []  # what is being dispatched, innermost last (filled only while checking)
_CALLS: Counter = Counter()  # collectives issued per group while checking: the position in the program
_DESCRIPTION_BYTES = 512  # each rank's description travels as this many utf-8 bytes (cut, then padded)


def divergence_checking() -> bool:
    return _CHECK[0]


@contextlib.contextmanager
def check_divergence(enabled: bool = True):
    """Inside the block, check before every collective that all ranks of its group are at the same op with
    the same specs; raise on every rank, naming the first one that diverged, if not.

        with dtensor_plus.debug.check_divergence():
            loss = model(x).sum(); loss.backward()
    """
    previous = _CHECK[0]
    _CHECK[0] = enabled
    try:
        yield
    finally:
        _CHECK[0] = previous


@contextlib.contextmanager
def at_op(func, specs):
    """Record that ``func`` on inputs of ``specs`` is being dispatched (for divergence reports)."""
    _OP_STACK.append(f"{func}({', '.join(map(_spec_text, specs))})")
    try:
        yield
    finally:
        _OP_STACK.pop()


def _spec_text(spec) -> str:
    placements = ", ".join(map(repr, spec.placements))
    return f"{tuple(spec.shape)} {spec.dtype} [{placements}]"


def describe_call(collective: str, mesh_dim_name: str, group_ranks: list[int]) -> torch.Tensor:
    """This rank's description of the collective it is about to issue, as fixed-size utf-8 bytes."""
    _CALLS[tuple(group_ranks)] += 1
    where = _OP_STACK[-1] if _OP_STACK else "outside any DTensor op"
    text = f"{collective} on mesh dim {mesh_dim_name!r} (call #{_CALLS[tuple(group_ranks)]} on this group) in {where}"
    raw = text.encode()[:_DESCRIPTION_BYTES]
    data = torch.zeros(_DESCRIPTION_BYTES, dtype=torch.uint8)
    data[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return data


def raise_if_diverged(gathered: torch.Tensor, group_ranks: list[int], my_rank: int) -> None:
    """``gathered``: (n, _DESCRIPTION_BYTES) descriptions of the group's ranks, in group order."""
    texts = [bytes(row.tolist()).rstrip(b"\0").decode(errors="replace") for row in gathered.cpu()]
    if all(t == texts[0] for t in texts):
        return
    first = next(i for i, t in enumerate(texts) if t != texts[0])
    lines = [f"  rank {r}: {t}" for r, t in zip(group_ranks, texts)]
    raise RankDivergenceError(
        f"ranks diverged: rank {group_ranks[first]} is not at the collective rank {group_ranks[0]} is at "
        f"(seen on rank {my_rank}); every rank must issue the same collectives in the same order. Each rank of "
        f"the group is at:\n" + "\n".join(lines) + "\nLook for a branch on local data or local shard shapes "
        "before this point."
    )


# -- who is missing after a failure ---------------------------------------------------------------------------

_REPORT_WAIT_S = float(os.environ.get("DTENSOR_PLUS_REPORT_WAIT_S", "3"))
_FAILURES = Counter()  # failures seen per group, so each one gets fresh store keys


def missing_ranks(group_ranks: list[int], my_rank: int) -> list[int] | None:
    """After a collective on ``group_ranks`` failed: the ranks of the group that did not report in within a
    few seconds (dead, or stuck in another call); None when the job has no store to ask."""
    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # no default group, or a store that cannot be reached any more
        return None
    key = ",".join(map(str, group_ranks))
    _FAILURES[key] += 1
    prefix = f"dtensor_plus/failure/{key}/{_FAILURES[key]}"
    deadline = time.monotonic() + _REPORT_WAIT_S  # one wait for the whole group, not one per rank
    try:
        store.set(f"{prefix}/{my_rank}", "alive")
        missing = []
        for rank in group_ranks:
            try:
                store.wait([f"{prefix}/{rank}"], timedelta(seconds=max(0.01, deadline - time.monotonic())))
            except Exception:  # timed out: this rank never reported
                missing.append(rank)
        return missing
    except Exception:  # the store itself is gone (its host rank died)
        return None
