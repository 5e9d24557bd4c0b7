"""Collectives under torch.compile: the c10d calls of ``collectives.py`` as functional collectives.

``collectives.py`` fills buffers in place with c10d calls (``dist.all_reduce(out)``...). A tracer cannot use
those: Dynamo and AOTAutograd see a mutation of a buffer through an opaque process-group object, and the
graph they make neither equals eager nor lets Inductor schedule the collective. Under tracing each call goes
instead through PyTorch's functional collectives (``torch.ops._c10d_functional``: a new tensor out, then
``wait_tensor``), on the same process group (by its registered name), and the result is copied into the
buffer the caller passed, so every collective of ``collectives.py`` keeps its padding, wire dtypes and
bookkeeping unchanged, and AOTAutograd's functionalization turns that copy into plain data flow.

Every rank must keep every collective, in program order, though ranks' graphs differ (a reduce's non-root
does not read its result, a rank skips a causal block). Torch's graph passes assume SPMD graphs: AOTAutograd's
default partitioner drops an unread functional collective, its CSE merges two identical ones (a backward ring
shift with a forward one). So each result goes to an ordered effectful no-op (``_collective_done``: an effect
token carries it to a graph output on every rank), and each ring shift's send buffer holds a piece CSE never
merges (``_ring_shift``). ``testing.compiling.mismatched_collectives`` checks compiled graphs for this.

``is_traced(t)``: whether ``t`` is being traced (Dynamo is compiling, or ``t`` is a fake or functional
tensor of AOTAutograd's trace) rather than run; the eager path never comes here.
"""

from __future__ import annotations

import contextlib
from types import MappingProxyType

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

__all__ = ["is_traced", "run_functional"]

_functional = torch.ops._c10d_functional
_PROXY_MODE = torch._C._TorchDispatchModeKey.PROXY
_FAKE_MODE = torch._C._TorchDispatchModeKey.FAKE

# c10d reduce ops by the names the functional collectives take (gloo has no AVG: collectives.py sums, then divides)
_REDUCE_NAMES = MappingProxyType({dist.ReduceOp.SUM: "sum", dist.ReduceOp.MAX: "max", dist.ReduceOp.MIN: "min",
                                   dist.ReduceOp.PRODUCT: "product"})


def is_traced(t: torch.Tensor | None = None) -> bool:
    """Is ``t`` a value of a trace (AOTAutograd's fake or functional tensors), or is a trace running (Dynamo
    compiling, a fake-tensor or make_fx mode entered)? Cheap: a few attribute tests on the eager path."""
    return (isinstance(t, (FakeTensor, FunctionalTensor)) or torch.compiler.is_compiling()
            or torch._C._get_dispatch_mode(_FAKE_MODE) is not None or torch._C._get_dispatch_mode(_PROXY_MODE) is not None)


def run_functional(fn, *args, group, **kwargs):
    """What the c10d call ``fn(*args, group=group, **kwargs)`` does to its output buffer, done by a functional
    collective and a copy into the buffer. ``fn`` is one of the calls ``collectives.py`` makes; returns None
    (no work handle: a traced collective completes, for the program, at its ``wait_tensor``)."""
    kwargs.pop("async_op", None)  # the compiler schedules it; the value is the same
    _mark_waits_kept()
    with _pinned_to_backward():
        _run_functional(fn, *args, group=group, **kwargs)
    return None


def _run_functional(fn, *args, group, **kwargs) -> None:
    name, size = group.group_name, dist.get_world_size(group)
    if fn is dist.all_reduce:
        (out,) = args
        out.copy_(_wait(_functional.all_reduce(out, _reduce_name(kwargs), name)))
    elif fn is dist.broadcast:
        (out,) = args
        src = dist.get_group_rank(group, kwargs["src"])  # the functional op takes the rank within the group
        out.copy_(_wait(_functional.broadcast(out, src, name)))
    elif fn is dist.all_to_all_single:
        out, send = args
        send_splits = kwargs.get("input_split_sizes") or [send.shape[0] // size] * size
        recv_splits = kwargs.get("output_split_sizes") or [out.shape[0] // size] * size
        out.copy_(_wait(_functional.all_to_all_single(send, list(recv_splits), list(send_splits), name)))
    elif fn is dist.scatter:  # no functional scatter: the source's pieces are broadcast, each rank keeps its own
        out, pieces = args
        src = dist.get_group_rank(group, kwargs["src"])
        whole = torch.cat(pieces) if pieces is not None else out.new_empty((size * out.shape[0],) + out.shape[1:])
        rows = _wait(_functional.broadcast(whole, src, name))
        out.copy_(rows.narrow(0, dist.get_rank(group) * out.shape[0], out.shape[0]))
    elif getattr(fn, "__name__", "") in ("all_gather_single", "all_gather_into_tensor"):
        out, piece = args  # both flat or both stacked along dim 0, as collectives.py lays them out
        out.copy_(_wait(_functional.all_gather_into_tensor(piece, size, name)).view(out.shape))
    elif getattr(fn, "__name__", "") in ("reduce_scatter_single", "reduce_scatter_tensor"):
        out, full = args
        out.copy_(_wait(_functional.reduce_scatter_tensor(full, _reduce_name(kwargs), size, name)).view(out.shape))
    elif fn is dist.reduce:
        (out,) = args
        _reduce(out, dist.get_group_rank(group, kwargs["dst"]), _reduce_name(kwargs), group=group)
    elif getattr(fn, "__name__", "") == "_batch_ring_shift":  # point_to_point's ring shift
        _ring_shift(*args, group=group)
    else:
        raise NotImplementedError(f"{getattr(fn, '__name__', fn)} has no functional form for torch.compile yet")


def _ring_shift(sends, recvs, next_peer: int, prev_peer: int, tag: int, *, group) -> None:
    """point_to_point's ring shift (to ``next_peer``, from ``prev_peer``: ranks within ``group``) as one
    functional all-to-all per dtype whose split sizes are zero except toward those two peers, as torch's own
    ``permute_tensor`` does. Not ``batch_p2p_ops``: AOTAutograd's partitioner neither saves nor pins a
    multi-output collective, so it recomputes a forward shift in the backward graph (traffic eager does not
    have). One exchange per call, so ``tag`` (which keeps two eager shifts in flight apart) is not needed.

    A rank's graph holds only its own compute, and its send is what the next rank reads: the shift must stay
    in every rank's graph whether or not that rank reads what it gets (``_wait``'s effect keeps it), and must
    not merge with another shift of the same blocks (the empty piece below)."""
    size = dist.get_world_size(group)
    by_dtype = {}
    for i, send in enumerate(sends):
        by_dtype.setdefault(send.dtype, []).append(i)
    for indices in by_dtype.values():
        # the empty piece keeps two shifts of the same blocks apart: AOTAutograd's CSE merges identical
        # collectives (it never merges an aten.empty), and whether a backward shift's blocks equal a forward
        # shift's (a zero gradient share of a skipped causal block) differs between ranks: merged on one rank
        # only, its peers' shift waits for a send that never comes (the compiled double ring hung so)
        first = sends[indices[0]]
        flat = torch.cat([*(sends[i].reshape(-1) for i in indices), torch.empty(0, dtype=first.dtype, device=first.device)])
        recv_numels = [recvs[i].numel() for i in indices]
        send_splits, recv_splits = [0] * size, [0] * size
        send_splits[next_peer], recv_splits[prev_peer] = flat.numel(), sum(recv_numels)
        got = _wait(_functional.all_to_all_single(flat, recv_splits, send_splits, group.group_name))
        for i, piece in zip(indices, got.split(recv_numels)):
            recvs[i].copy_(piece.view(recvs[i].shape))


def _reduce(out, dst: int, op: str, *, group) -> None:
    """c10d's reduce onto ``dst`` (a rank within ``group``) as one functional all-to-all in which every rank
    sends its tensor to ``dst`` alone, which combines them: eager's bytes (every non-root sends once), not an
    all-reduce's. Only ``dst``'s buffer is written (c10d leaves the others' unspecified; collectives.reduce
    returns None there)."""
    size = dist.get_world_size(group)
    send_splits, recv_splits = [0] * size, [0] * size
    send_splits[dst] = out.numel()
    if dist.get_rank(group) == dst:
        recv_splits = [out.numel()] * size
    got = _wait(_functional.all_to_all_single(out.reshape(-1), recv_splits, send_splits, group.group_name))
    if dist.get_rank(group) == dst:
        pieces = got.view(size, *out.shape)
        combine = {"sum": torch.sum, "product": torch.prod, "max": torch.amax, "min": torch.amin}[op]
        out.copy_(combine(pieces, dim=0))


def _mark_waits_kept() -> None:
    """Import torch's functional-collectives module (once, on the first traced collective: it takes ~0.1 s),
    which marks ``wait_tensor`` side-effectful for FX's own dead-code elimination (Dynamo's graphs; the
    partitioners' is what ``_collective_done``'s effect covers)."""
    import torch.distributed._functional_collectives  # noqa: F401


def _pinned_to_backward():
    """While AOTAutograd traces the backward: tag what is recorded "must be in backward". A backward collective
    whose inputs the forward also has (ring attention's k/v shift, a zero gradient share on a rank that skips
    a causal block) is otherwise copied into the forward graph too: traffic eager does not have, and, where
    ranks' graphs differ, one rank's collective in its forward meeting another's in its backward (a hang)."""
    import torch.fx.traceback as fx_traceback

    if not fx_traceback.has_preserved_node_meta() or fx_traceback.current_meta.get("partitioner_tag") != "is_backward":
        return contextlib.nullcontext()
    from torch._functorch._aot_autograd.graph_capture_wrappers import set_partitioner_tag_must_be_in_backward

    return set_partitioner_tag_must_be_in_backward()


def _reduce_name(kwargs) -> str:
    return _REDUCE_NAMES[kwargs.get("op", dist.ReduceOp.SUM)]


def _wait(t: torch.Tensor) -> torch.Tensor:
    """The collective's result, made an ordered effect of the program (see ``_kept``)."""
    done = _functional.wait_tensor(t)
    torch.ops.dtensor_plus.collective_done(done)
    return done


@torch.library.custom_op("dtensor_plus::collective_done", mutates_args=())
def _collective_done(done: torch.Tensor) -> None:
    """Nothing at run time. Registered as an ORDERED effect below, so AOTAutograd threads an effect token
    through every call (``with_effects``) and returns the last token from each graph: a traced collective's
    result thus reaches a graph output on every rank, whatever it feeds. Without it a rank that does not read
    a collective's result (a reduce's non-root, a ring block it skips) has it removed by a partitioner's dead
    code elimination (AOTAutograd's default partitioner drops every unread ``_c10d_functional`` node, assuming
    all ranks run the same graph), and its peers' matching collective then pairs with the next one: wrong
    values or a hang. The token chain also keeps the collectives' waits in program order."""


@_collective_done.register_fake
def _(done: torch.Tensor) -> None:
    return None


_collective_done.register_effect(torch.library.EffectType.ORDERED)
