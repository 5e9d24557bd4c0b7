"""Debug switches (the one module they live in) and the diagnosis of a collective that failed.

**Rank divergence.** SPMD code is only right while every rank issues the same collectives in the same
order. A rank that takes another path (a decision made from its local shard shape, a data-dependent branch)
makes gloo abort on a size mismatch, hang, or, worst, pair two unrelated collectives of equal size and
return a wrong value. Inside ``with check_divergence():`` (or with ``DTENSOR_PLUS_CHECK_DIVERGENCE=1`` in the
environment) every collective is preceded by a small all-gather, on the same group, of what each rank is
about to do: the collective, the mesh dim, the op being dispatched with its input specs (global metadata,
equal on every rank of a correct program) and the order its inputs were made in (so ``a @ b`` on one rank and
``b @ a`` on another differ though their specs agree), and the group's call count. Any difference raises, on every rank
alike, an error naming the first rank that diverged and what each side was doing. It costs one extra tiny
collective per collective: a debug mode, off by default.

**A failed collective** (a dead peer, a timeout) raises an error naming the collective, the mesh dim and
its rank groups (``collectives._named_error``), plus what is known (``failure_report``): each survivor writes
what it was doing (the collective, the op being dispatched) to the job's store and waits a few seconds for its
peers', so the message says which ranks died or are stuck elsewhere, or, when every rank is alive, what each was
at, and points to ``check_divergence``. When the store itself is gone (its host died), it says so instead of
blaming every rank.
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import timedelta

import torch

from .dispatcher import DISPATCHER

_D = DISPATCHER

__all__ = ["check_divergence", "divergence_checking", "RankDivergenceError"]


class RankDivergenceError(RuntimeError):
    """The ranks of a group were about to issue different collectives (raised on every rank of the group)."""

_DESCRIPTION_BYTES = 512  # each rank's description travels as this many utf-8 bytes (cut, then padded)


def divergence_checking() -> bool:
    return _D.check_divergence


@contextlib.contextmanager
def check_divergence(enabled: bool = True):
    """Inside the block, check before every collective that all ranks of its group are at the same op with
    the same specs; raise on every rank, naming the first one that diverged, if not.

        with dtensor_plus.debug.check_divergence():
            loss = model(x).sum(); loss.backward()
    """
    previous = _D.check_divergence
    _D.check_divergence = enabled
    try:
        yield
    finally:
        _D.check_divergence = previous


def current_op() -> str:
    """The innermost op being dispatched (dispatch.py pushes (op, its DTensor inputs) on DISPATCHER.op_stack), with its inputs' specs and creation order (see ``_input_text``)."""
    if not _D.op_stack:
        return "outside any DTensor op"
    func, dtensors = _D.op_stack[-1]
    created = sorted({getattr(dt, "_created", -1) for dt in dtensors})
    return f"{func}({', '.join(_input_text(dt, created) for dt in dtensors)})"


def _input_text(dt, created: list[int]) -> str:
    """``#k`` is the input's place in the order the op's inputs were made (1 = made first). DTensors are made in
    the same order on every rank, so ``a @ b`` on one rank and ``b @ a`` on another read ``mm(#1, #2)`` and
    ``mm(#2, #1)`` though their specs are equal; an extra local op on one rank shifts no input's place."""
    spec = dt._spec
    placements = ", ".join(map(repr, spec.placements))
    order = f"#{created.index(getattr(dt, '_created', -1)) + 1} " if len(created) > 1 else ""  # one input: no order
    return f"{order}{tuple(spec.shape)} {spec.dtype} [{placements}]"


def _call_text(collective: str, mesh_dim_name: str, count: int | None) -> str:
    where = f" (call #{count} on this group)" if count is not None else ""
    return f"{collective} on mesh dim {mesh_dim_name!r}{where} in {current_op()}"


def describe_call(collective: str, mesh_dim_name: str, group_ranks: list[int]) -> torch.Tensor:
    """This rank's description of the collective it is about to issue, as fixed-size utf-8 bytes."""
    _D.calls_per_group[tuple(group_ranks)] += 1
    text = _call_text(collective, mesh_dim_name, _D.calls_per_group[tuple(group_ranks)])
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


# -- what is known after a failure ------------------------------------------------------------------------------

_CHECK_HINT = ("; to find where the ranks parted, rerun under `with dtensor_plus.debug.check_divergence():` (or "
               "DTENSOR_PLUS_CHECK_DIVERGENCE=1), which stops at the first collective the ranks disagree on and names "
               "each rank's op")


def _report_wait_s() -> float:
    return float(os.environ.get("DTENSOR_PLUS_REPORT_WAIT_S", "3"))


def failure_report(collective: str, mesh_dim_name: str, group_ranks: list[int], my_rank: int, group=None) -> str:
    """After a collective on ``group_ranks`` failed (a timeout, a dead peer): what this rank can tell, as text to
    append to the error. Each survivor writes what it was doing to the job's store and waits a few seconds
    (``DTENSOR_PLUS_REPORT_WAIT_S``, default 3) for its peers' reports, so the message names the ranks that are
    dead or stuck elsewhere, or, when all are alive, what each was at (different collectives: they diverged)."""
    import torch.distributed as dist

    mine = _call_text(collective, mesh_dim_name, _sequence_number(group))
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # no default group: nobody to ask
        return f"; this rank was at {mine}"
    key = ",".join(map(str, group_ranks))
    _D.failures_per_group[key] += 1
    prefix = f"dtensor_plus/failure/{key}/{_D.failures_per_group[key]}"
    reports = _exchange(store, prefix, group_ranks, my_rank, mine)
    if reports is None:
        return (f"; the job's store{_store_address(store)} cannot be reached, so which ranks are alive is unknown: "
                f"the process hosting it (rank 0 under torchrun) has most likely died; this rank was at {mine}")
    missing = [r for r in group_ranks if r not in reports]
    hint = "" if divergence_checking() else _CHECK_HINT
    if missing:
        seen = "; ".join(f"rank {r} was at {t}" for r, t in reports.items())
        return (f"; ranks {missing} of the group did not report in within {_report_wait_s():g} s (dead, or stuck in "
                f"another call); {seen}{hint}")
    if len(set(reports.values())) > 1:
        seen = "; ".join(f"rank {r} at {t}" for r, t in reports.items())
        return (f"; every rank of the group is alive but the ranks diverged (each issued a different collective): "
                f"{seen}{hint}")
    return (f"; every rank of the group is alive and failed at the same call, {mine} (a peer too slow for the "
            f"timeout, DTENSOR_PLUS_TIMEOUT_S, or ranks that diverged earlier on a call that paired){hint}")


def _exchange(store, prefix: str, group_ranks: list[int], my_rank: int, mine: str) -> dict[int, str] | None:
    """Each rank of the group that reports within the wait -> its description; None when the store is gone."""
    try:
        store.set(f"{prefix}/{my_rank}", mine)
        store.get(f"{prefix}/{my_rank}")  # a dead store host can make set fail silently: read it back
    except Exception:
        return None
    reports = {}
    deadline = time.monotonic() + _report_wait_s()  # one wait for the whole group, not one per rank
    for rank in group_ranks:
        try:
            store.wait([f"{prefix}/{rank}"], timedelta(seconds=max(0.01, deadline - time.monotonic())))
            reports[rank] = store.get(f"{prefix}/{rank}").decode(errors="replace")
        except Exception:  # timed out: this rank never reported
            pass
    return reports


def _sequence_number(group) -> int | None:
    """The group's collective count on this rank (c10d's own), when the backend keeps one."""
    try:
        return int(group._get_sequence_number_for_group())
    except Exception:
        return None


def _store_address(store) -> str:
    while hasattr(store, "underlying_store"):  # PrefixStore around the TCPStore
        store = store.underlying_store
    host, port = getattr(store, "host", None), getattr(store, "port", None)
    return f" at {host}:{port}" if host is not None else ""
