"""The only module that calls torch.distributed collectives; it counts every one of them and its bytes.

Byte counts are what each rank sends, by the standard algorithms (ring all-reduce sends 2(n-1)/n of the
tensor; all-gather and reduce-scatter (n-1)/n of the full tensor; all-to-all (n-1)/n of the local one),
measured on the buffers actually sent, so padding for uneven shards is counted too.

Gloo has no kernels for int16, the unsigned types wider than a byte or the float8 types: ``wire_dtypes.py``
says what each goes on the wire as (a bitwise view, or a reduction in a type that holds every value exactly), so
every dtype torch has on CPU goes through every collective, exactly.

Uneven shards follow torch.chunk: every piece is padded to ceil(size / n) before a collective and the
result is cut back. Because torch.chunk pieces are full-size up to the last non-empty one, the valid rows of
a gathered buffer are always its first ``size`` rows.

Under torch.compile (a traced block) each c10d call becomes a functional collective copied into the same buffer
(``traced_collectives.py``), uncounted: a trace runs once, its graph many times.

Usage::

    with comm_mode() as comm:
        y = x.redistribute(mesh, [Replicate()])
    comm.count("all_gather")         # 1
    comm.bytes("all_gather", "tp")   # bytes this rank sent on mesh dim "tp"
"""

from __future__ import annotations

from types import MappingProxyType

import contextlib
import math
from collections import Counter

import torch
import torch.distributed as dist

from . import debug, explicit, traced_collectives
from .dispatcher import DISPATCHER
from .placements import chunk_bounds
from .wire_dtypes import divide as _divide, nbytes as _nbytes, pad_dim as _pad_dim, reducible, wire as _wire

__all__ = [
    "comm_mode", "CommCounter", "all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "scatter",
    "all_gather_flat", "reduce_scatter_flat", "all_to_all_splits", "AllToAllSplits", "every_rank_rows",
    "reduce",
]

# torch >= 2.12 renamed the tensor-in/tensor-out collectives; older releases have only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_C10D_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
             "product": dist.ReduceOp.PRODUCT}
_C10D_OPS = MappingProxyType(_C10D_OPS)  # read-only: a constant table


class CommCounter:
    """Counts of collectives, bytes sent by this rank and fallback ops, keyed by (collective, mesh dim name);
    ``by_op`` attributes each call to the aten op that issued it (its input moves or its declared communication).

    With ``comm_mode(per_module=True)`` each collective is also attributed to the innermost module running
    when it was issued and to forward or backward (``by_module``; ``report()`` prints the table)."""

    def __init__(self, tracker=None):
        self.counts: Counter = Counter()
        self.sent_bytes: Counter = Counter()
        self.fallbacks: Counter = Counter()
        self.by_op: Counter = Counter()  # (aten op being dispatched or None, collective, mesh dim) -> calls
        self.by_module: Counter = Counter()  # (module path, "forward"/"backward", collective, mesh dim) -> calls
        self.bytes_by_module: Counter = Counter()
        self._tracker = tracker

    def record(self, collective: str, mesh_dim_name: str, num_bytes: int, op=None) -> None:
        self.counts[collective, mesh_dim_name] += 1
        self.by_op[op, collective, mesh_dim_name] += 1
        self.sent_bytes[collective, mesh_dim_name] += int(num_bytes)
        if self._tracker is not None:
            key = (*self._tracker.current(), collective, mesh_dim_name)
            self.by_module[key] += 1
            self.bytes_by_module[key] += int(num_bytes)

    def count(self, collective: str | None = None, mesh_dim_name: str | None = None) -> int:
        return sum(v for k, v in self.counts.items() if _matches(k, collective, mesh_dim_name))

    def bytes(self, collective: str | None = None, mesh_dim_name: str | None = None) -> int:
        return sum(v for k, v in self.sent_bytes.items() if _matches(k, collective, mesh_dim_name))

    def report(self) -> str:
        """One line per (module, forward/backward, collective, mesh dim): calls and bytes this rank sent."""
        if self._tracker is None:
            raise ValueError("comm.report() needs per-module attribution: use `with comm_mode(per_module=True) as comm:`")
        rows = [("module", "phase", "collective", "mesh dim", "calls", "bytes sent")]
        rows += [(m, p, c, d, str(n), str(self.bytes_by_module[m, p, c, d])) for (m, p, c, d), n in sorted(self.by_module.items())]
        widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)

    def __repr__(self) -> str:
        rows = [f"{c}[{m}]: {n} calls, {self.sent_bytes[c, m]} B" for (c, m), n in sorted(self.counts.items())]
        rows += [f"fallback {op}: {n}" for op, n in sorted(self.fallbacks.items())]
        return "CommCounter(" + "; ".join(rows) + ")"


def _matches(key, collective, mesh_dim_name) -> bool:
    return (collective is None or key[0] == collective) and (mesh_dim_name is None or key[1] == mesh_dim_name)


@contextlib.contextmanager
def comm_mode(*, per_module: bool = False):
    """Count every collective (and fallback op) issued inside the block. Nests.

    ``per_module=True`` also attributes each collective to the module path and to forward or backward
    (module_tracking.py); ``comm.report()`` prints the table."""
    tracker = None
    if per_module:
        from .module_tracking import ModuleTracker

        tracker = ModuleTracker()
        tracker.__enter__()
    counter = CommCounter(tracker)
    DISPATCHER.comm_counters.append(counter)
    try:
        yield counter
    finally:
        DISPATCHER.comm_counters.remove(counter)
        if tracker is not None:
            tracker.__exit__(None, None, None)


def record_fallback(op_name: str) -> None:
    for counter in DISPATCHER.comm_counters:
        counter.fallbacks[op_name] += 1


def _record(collective: str, mesh, mesh_dim: int, num_bytes: float) -> None:
    if DISPATCHER.explicit_depth:  # auditing: an op's own collective raises here, before it runs, on every rank
        explicit.check_collective(collective, mesh.mesh_dim_name(mesh_dim))
    if DISPATCHER.comm_counters and not traced_collectives.is_traced():  # a trace runs once, not per call: uncounted
        name = mesh.mesh_dim_name(mesh_dim)
        # The op whose input moves or declared communication issue it (None outside any op: a layout's hook).
        op = DISPATCHER.op_stack[-1][0] if DISPATCHER.op_stack else None
        for counter in DISPATCHER.comm_counters:
            counter.record(collective, name, num_bytes, op)


def _run(collective: str, mesh, mesh_dim: int, fn, *args, **kwargs):
    """Run one c10d call; a failure (timeout, dead peer) names the collective, the mesh dim, its ranks and
    the ranks that did not report in. Returns what c10d returns (the work handle when ``async_op=True``).
    In the divergence-checking debug mode, first checks all ranks of the group are at the same call."""
    group = mesh.get_group(mesh_dim)
    if traced_collectives.is_traced(args[0]):  # torch.compile: the functional collective (no check, no handle)
        return traced_collectives.run_functional(fn, *args, group=group, **kwargs)
    try:
        if debug.divergence_checking():
            _check_same_call(collective, mesh, mesh_dim, group)
        return fn(*args, group=group, **kwargs)
    except debug.RankDivergenceError:
        raise
    except RuntimeError as error:
        raise _named_error(collective, mesh, mesh_dim, error) from error


def _check_same_call(collective: str, mesh, mesh_dim: int, group) -> None:
    ranks = list(mesh.row_ranks(mesh_dim))
    mine = debug.describe_call(collective, mesh.mesh_dim_name(mesh_dim), ranks)
    mine = mine.to(mesh.device_type) if mesh.device_type == "cuda" else mine
    gathered = mine.new_empty((len(ranks), mine.numel()))
    _all_gather_single(gathered.view(-1), mine, group=group)  # not counted: the check is not the program's
    debug.raise_if_diverged(gathered, ranks, mesh.get_rank())


def _named_error(collective: str, mesh, mesh_dim: int, error: Exception, group=None) -> RuntimeError:
    ranks, name = list(mesh.row_ranks(mesh_dim)), mesh.mesh_dim_name(mesh_dim)
    known = debug.failure_report(collective, name, ranks, mesh.get_rank(), group or mesh.get_group(mesh_dim))
    return RuntimeError(f"{collective} on mesh dim {name!r} (ranks {ranks}) failed on rank {mesh.get_rank()}{known}: {error}")


def _reducible(t: torch.Tensor, reduce_op: str):
    """``wire_dtypes.reducible`` with the c10d op to run."""
    wide, op, back = reducible(t, reduce_op)
    return wide, _C10D_OPS[op], back


def all_reduce(t: torch.Tensor, mesh, mesh_dim: int, reduce_op: str, *, async_op: bool = False,
               in_place: bool = False):
    """Reduce equal-shape tensors over ``mesh_dim``; returns a new tensor. avg is sum then divide (gloo has no AVG).
    With ``async_op`` it returns a ``PendingCollective`` whose ``wait()`` gives the tensor. ``in_place``: the
    result is written into ``t`` and ``t`` returned (a flat gradient bucket whose views are the gradients: no
    copy out and back); ``t`` must not be read or written until then. A contiguous ``t`` that c10d moves as it
    is is reduced where it lies; another (a dtype gloo lacks, a strided view) through a copy, written back."""
    n = mesh.size(mesh_dim)
    wide, op, back = _reducible(t, reduce_op)
    # c10d reduces in place: into t itself only when asked to
    out = wide if in_place and wide is t and t.is_contiguous() else wide.clone(memory_format=torch.contiguous_format)
    _record("all_reduce", mesh, mesh_dim, 2 * (n - 1) * _nbytes(out) // n)
    work = _run("all_reduce", mesh, mesh_dim, dist.all_reduce, out, op=op, async_op=async_op)

    def finish() -> torch.Tensor:
        result = back(_divide(out, n) if reduce_op == "avg" else out)
        if in_place and result is not t:
            return t.copy_(result)
        return result

    return PendingCollective("all_reduce", mesh, mesh_dim, work, finish) if async_op else finish()


def all_gather(t: torch.Tensor, mesh, mesh_dim: int, dim: int, size: int) -> torch.Tensor:
    """Concatenate the torch.chunk pieces of a ``size``-long tensor dim ``dim`` held along ``mesh_dim``."""
    n = mesh.size(mesh_dim)
    chunk = -(-size // n)
    piece = _wire(_pad_dim(t, dim, chunk).movedim(dim, 0).contiguous())
    out = piece.new_empty((n * chunk,) + piece.shape[1:])
    _record("all_gather", mesh, mesh_dim, (n - 1) * _nbytes(piece))
    _run("all_gather", mesh, mesh_dim, _all_gather_single, out, piece)
    return out[:size].view(t.dtype).movedim(0, dim).contiguous()


def reduce_scatter(t: torch.Tensor, mesh, mesh_dim: int, dim: int, reduce_op: str) -> torch.Tensor:
    """Reduce full tensors over ``mesh_dim`` and keep this rank's torch.chunk piece of tensor dim ``dim``."""
    n, index = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    size = t.shape[dim]
    chunk = -(-size // n)
    full, op, back = _reducible(_pad_dim(t, dim, n * chunk).movedim(dim, 0).contiguous(), reduce_op)
    out = full.new_empty((chunk,) + full.shape[1:])
    _record("reduce_scatter", mesh, mesh_dim, (n - 1) * _nbytes(full) // n)
    _run("reduce_scatter", mesh, mesh_dim, _reduce_scatter_single, out, full, op=op)
    out = back(_divide(out, n) if reduce_op == "avg" else out)
    return out[: chunk_bounds(size, n, index)[1]].movedim(0, dim).contiguous()


def all_to_all(t: torch.Tensor, mesh, mesh_dim: int, gather_dim: int, gather_size: int, scatter_dim: int) -> torch.Tensor:
    """Re-shard along ``mesh_dim`` from tensor dim ``gather_dim`` (``gather_size`` long in all) to ``scatter_dim``.

    Each rank sends piece j of its scatter_dim to rank j and concatenates what it receives along gather_dim.
    """
    n, index = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    scatter_size = t.shape[scatter_dim]
    gather_chunk, scatter_chunk = -(-gather_size // n), -(-scatter_size // n)
    x = _pad_dim(_pad_dim(t, gather_dim, gather_chunk), scatter_dim, n * scatter_chunk)
    send = _wire(x.unflatten(scatter_dim, (n, scatter_chunk)).movedim(scatter_dim, 0).contiguous())
    recv = torch.empty_like(send)
    _record("all_to_all", mesh, mesh_dim, (n - 1) * _nbytes(send) // n)
    _run("all_to_all", mesh, mesh_dim, dist.all_to_all_single, recv, send)
    gathered = recv.view(t.dtype).movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)
    mine = chunk_bounds(scatter_size, n, index)[1]
    return gathered.narrow(gather_dim, 0, gather_size).narrow(scatter_dim, 0, mine).contiguous()


def all_to_all_splits(t: torch.Tensor, mesh, mesh_dim: int, send_splits, recv_splits, *, async_op: bool = False):
    """Variable-size all-to-all along ``mesh_dim`` (no padding): this rank sends rows
    ``[sum(send_splits[:j]), sum(send_splits[:j+1]))`` of ``t`` to local rank j and returns the rows it receives,
    concatenated in source-rank order (``recv_splits[j]`` rows from rank j). Every rank must know what it
    receives (exchange the counts first, e.g. with an equal-split call of this function).

    Bytes: the rows this rank sends to the other ranks (its own piece stays home), so for even splits exactly
    the (n-1)/n x local size of ``all_to_all``. ``async_op=True`` returns a ``PendingCollective`` whose ``wait()``
    gives the received rows (MoE dispatch pipelined with expert compute, layouts/moe_pipelined.py).
    """
    n, index = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    send_splits, recv_splits = [int(s) for s in send_splits], [int(s) for s in recv_splits]
    if len(send_splits) != n or len(recv_splits) != n or sum(send_splits) != t.shape[0]:
        raise ValueError(
            f"all_to_all_splits on a mesh dim of {n} ranks needs {n} send and {n} recv splits, the send ones "
            f"summing to the {t.shape[0]} rows sent; got send {send_splits}, recv {recv_splits}"
        )
    send = _wire(t.detach().contiguous())
    out = send.new_empty((sum(recv_splits),) + tuple(send.shape[1:]))
    row_bytes = math.prod(send.shape[1:]) * send.element_size()
    _record("all_to_all", mesh, mesh_dim, (sum(send_splits) - send_splits[index]) * row_bytes)
    work = _run("all_to_all", mesh, mesh_dim, dist.all_to_all_single, out, send,
                output_split_sizes=recv_splits, input_split_sizes=send_splits, async_op=async_op)
    if not async_op:
        return out.view(t.dtype)

    def finish(_sending=send):  # holds the send buffer until the transfer is waited for
        return out.view(t.dtype)

    return PendingCollective("all_to_all", mesh, mesh_dim, work, finish)


class AllToAllSplits(torch.autograd.Function):
    """forward: ``all_to_all_splits`` with (send_splits, recv_splits) on ``mesh_dim`` / backward: the inverse
    all-to-all, (recv_splits, send_splits): each received row's gradient goes back to the rank that sent it.

        y = AllToAllSplits.apply(x, mesh, mesh_dim, send_splits, recv_splits)
    """

    @staticmethod
    def forward(ctx, t, mesh, mesh_dim, send_splits, recv_splits):
        ctx.mesh, ctx.mesh_dim, ctx.send_splits, ctx.recv_splits = mesh, mesh_dim, send_splits, recv_splits
        return all_to_all_splits(t, mesh, mesh_dim, send_splits, recv_splits)

    @staticmethod
    def backward(ctx, grad):
        back = all_to_all_splits(grad, ctx.mesh, ctx.mesh_dim, ctx.recv_splits, ctx.send_splits)
        return back, None, None, None, None


def broadcast(t: torch.Tensor, mesh, mesh_dim: int, src_index: int = 0) -> torch.Tensor:
    """The tensor of the rank at index ``src_index`` along ``mesh_dim``, on every rank of that dim (in place)."""
    _record("broadcast", mesh, mesh_dim, _nbytes(t) if mesh.get_local_rank(mesh_dim) == src_index else 0)
    src = mesh.row_ranks(mesh_dim)[src_index]
    _run("broadcast", mesh, mesh_dim, dist.broadcast, _wire(t), src=src)  # a view: t receives in place
    return t


def scatter(t: torch.Tensor, mesh, mesh_dim: int, dim: int, src_index: int = 0) -> torch.Tensor:
    """Each rank along ``mesh_dim`` gets its torch.chunk piece of tensor dim ``dim`` of the tensor held by the
    rank at index ``src_index`` (the others' ``t`` gives only the shape)."""
    n, index = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    size = t.shape[dim]
    chunk = -(-size // n)
    full = _wire(_pad_dim(t, dim, n * chunk).movedim(dim, 0))
    out = full.new_empty((chunk,) + full.shape[1:])
    is_src = index == src_index
    pieces = [full.narrow(0, i * chunk, chunk).contiguous() for i in range(n)] if is_src else None
    src = mesh.row_ranks(mesh_dim)[src_index]
    _record("scatter", mesh, mesh_dim, (n - 1) * _nbytes(out) if is_src else 0)
    _run("scatter", mesh, mesh_dim, dist.scatter, out, pieces, src=src)
    return out[: chunk_bounds(size, n, index)[1]].view(t.dtype).movedim(0, dim).contiguous()


def all_gather_sizes(values: list[int], mesh, mesh_dim: int) -> torch.Tensor:
    """Every rank's list of ints along ``mesh_dim`` as an (n, len) tensor (used for metadata checks)."""
    mine = torch.tensor(values, dtype=torch.int64)
    if mesh.device_type == "cuda":
        mine = mine.cuda()
    out = mine.new_empty((mesh.size(mesh_dim) * len(values),))
    _record("all_gather", mesh, mesh_dim, (mesh.size(mesh_dim) - 1) * _nbytes(mine))
    _run("all_gather", mesh, mesh_dim, _all_gather_single, out, mine)
    return out.view(mesh.size(mesh_dim), len(values)).cpu()


# -- bucketed (flat) collectives: several tensors, one buffer, one c10d call -------------------------------------


class PendingCollective:
    """An issued asynchronous collective; ``wait()`` blocks until it is done and returns its result."""

    def __init__(self, collective: str, mesh, mesh_dim: int, work, finish):
        self._collective, self._mesh, self._mesh_dim, self._work, self._finish = collective, mesh, mesh_dim, work, finish

    def wait(self):
        if self._work is not None:
            try:
                self._work.wait()
            except RuntimeError as error:
                raise _named_error(self._collective, self._mesh, self._mesh_dim, error) from error
            self._work = None
        return self._finish()


def all_gather_flat(tensors, mesh, mesh_dim: int, dims, sizes, *, async_op: bool = False):
    """``all_gather`` of several same-dtype tensors in ONE collective: each one's torch.chunk piece of tensor
    dim ``dims[i]`` (``sizes[i]`` long in all) is padded to ``ceil(size / n)`` (as ``all_gather`` pads it),
    the pieces are packed into one flat buffer, gathered, and cut back into whole tensors (one copy each).
    Bytes: exactly the sum of the per-tensor ``all_gather`` bytes. With ``async_op`` it returns a
    ``PendingCollective`` whose ``wait()`` gives the list."""
    n = mesh.size(mesh_dim)
    pieces = [_pad_dim(t, d, -(-size // n)).movedim(d, 0) for t, d, size in zip(tensors, dims, sizes)]
    _check_one_dtype(pieces, "all_gather_flat")
    flat = torch.cat([p.reshape(-1) for p in pieces]) if pieces else torch.empty(0)
    out = _wire(flat).new_empty((n * flat.numel(),))  # c10d wants the output flat too; row r is rank r's buffer
    work = None
    if flat.numel():  # sizes are global metadata: every rank skips an empty bucket alike
        _record("all_gather", mesh, mesh_dim, (n - 1) * _nbytes(flat))
        work = _run("all_gather", mesh, mesh_dim, _all_gather_single, out, _wire(flat), async_op=async_op)

    def finish() -> list[torch.Tensor]:
        wholes, offset, rows = [], 0, out.view(flat.dtype).view(n, flat.numel())
        for piece, d, size in zip(pieces, dims, sizes):
            block = rows[:, offset : offset + piece.numel()].reshape((n * piece.shape[0],) + piece.shape[1:])
            wholes.append(block[:size].movedim(0, d).contiguous())
            offset += piece.numel()
        return wholes

    if async_op:
        return PendingCollective("all_gather", mesh, mesh_dim, work, finish)
    return finish()  # a synchronous c10d call has completed on return


def reduce_scatter_flat(tensors, mesh, mesh_dim: int, dims, reduce_ops, *, async_op: bool = False):
    """``reduce_scatter`` of several same-dtype full tensors in ONE collective: each is padded on tensor dim
    ``dims[i]`` to n x ceil(size / n) (as ``reduce_scatter`` pads it) and laid out rank-major, so the flat
    buffer's row r holds every tensor's chunk r. Returns this rank's (unpadded) chunk of each tensor.
    ``reduce_ops``: one op for all, or one per tensor; sum and avg share a bucket (avg divides afterwards).
    Bytes: exactly the sum of the per-tensor ``reduce_scatter`` bytes. With ``async_op`` it returns a
    ``PendingCollective`` whose ``wait()`` gives the list (ZeRO-3 overlaps it with the rest of backward)."""
    n, index = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    ops = [reduce_ops] * len(tensors) if isinstance(reduce_ops, str) else list(reduce_ops)
    c10d_ops = {_C10D_OPS[op] for op in ops}
    assert len(c10d_ops) <= 1, f"reduce_scatter_flat: one c10d reduction per bucket, got {ops}"
    rows, chunks = [], []
    for t, d in zip(tensors, dims):
        chunk = -(-t.shape[d] // n)
        full = _pad_dim(t, d, n * chunk).movedim(d, 0)
        chunks.append((chunk, full.shape[1:], chunk_bounds(t.shape[d], n, index)[1]))
        rows.append(full.reshape(n, chunk * math.prod(full.shape[1:])))
    _check_one_dtype(rows, "reduce_scatter_flat")
    flat = torch.cat(rows, dim=1) if rows else torch.empty(n, 0)
    wide, c10d_op, back = _reducible(flat, ops[0] if ops else "sum")  # sum and avg reduce alike
    out = wide.new_empty((flat.shape[1],))
    work = None
    if flat.numel():
        _record("reduce_scatter", mesh, mesh_dim, (n - 1) * _nbytes(wide) // n)
        work = _run("reduce_scatter", mesh, mesh_dim, _reduce_scatter_single, out, wide.reshape(-1), op=c10d_op,
                    async_op=async_op)

    def finish() -> list[torch.Tensor]:
        mine, offset = [], 0
        for (chunk, rest, length), d, op in zip(chunks, dims, ops):
            numel = chunk * math.prod(rest)
            piece = out[offset : offset + numel].view((chunk,) + tuple(rest))[:length].movedim(0, d)
            mine.append(back(_divide(piece, n) if op == "avg" else piece.contiguous()))
            offset += numel
        return mine

    if async_op:
        return PendingCollective("reduce_scatter", mesh, mesh_dim, work, finish)
    return finish()  # a synchronous c10d call has completed on return


def _check_one_dtype(tensors, who: str) -> None:
    dtypes = {t.dtype for t in tensors}
    assert len(dtypes) <= 1, f"{who} packs one dtype per buffer, got {sorted(map(str, dtypes))}"


# -- every rank's row ----------------------------------------------------------------------------------------


def every_rank_rows(row: torch.Tensor, mesh) -> tuple[torch.Tensor, list[int]]:
    """Every rank's ``row`` (a 1-d int64 tensor of one length on all ranks) on every rank of ``mesh``, as a
    (ranks, len(row)) table, and the global ranks in its row order: one all-gather per mesh dim."""
    everyone = row.to(mesh.device_type) if mesh.device_type == "cuda" else row
    for mesh_dim in range(mesh.ndim):  # gathering along each dim in turn leaves every rank with all rows
        everyone = all_gather(everyone.unsqueeze(0), mesh, mesh_dim, 0, mesh.size(mesh_dim))
    return everyone.reshape(-1, row.numel()).cpu(), _gather_order(mesh)


def _gather_order(mesh) -> list[int]:
    """Global ranks in the order the successive all-gathers stack them: the last mesh dim outermost."""
    # the mesh's numpy ranks, not its tensor: a tensor op there would run under a compiler's fake mode
    return mesh._ranks.transpose(*reversed(range(mesh.ndim))).reshape(-1).tolist()


# -- reduce to one rank (SUMMA's partial products, ops/summa.py) ------------------------------------------------


def reduce(t: torch.Tensor, mesh, mesh_dim: int, dst_index: int, reduce_op: str = "sum") -> torch.Tensor:
    """Reduce equal-shape tensors over ``mesh_dim`` onto the rank at index ``dst_index``: returns the reduced
    tensor there and None elsewhere. Bytes: every rank but the destination sends its tensor once (a tree or
    chain reduce), the destination sends nothing."""
    n, index = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    wide, op, back = _reducible(t, reduce_op)
    out = wide.clone(memory_format=torch.contiguous_format)
    _record("reduce", mesh, mesh_dim, 0 if index == dst_index else _nbytes(out))
    _run("reduce", mesh, mesh_dim, dist.reduce, out, dst=mesh.row_ranks(mesh_dim)[dst_index], op=op)
    if index != dst_index:
        return None
    return back(_divide(out, n) if reduce_op == "avg" else out)
