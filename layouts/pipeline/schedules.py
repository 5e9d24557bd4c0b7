"""Pipeline schedule generators: for p ranks and m microbatches, each rank's ordered action list.

Every generator first writes the compute order (F, B, W, BW) of each rank, the part that *is* the schedule,
then ``with_communication`` inserts the SEND/RECV pairs the placement implies and a STEP at the end of
every rank. Nothing here runs anything: ``validate.py`` checks the lists, ``simulate.py`` times them and
the executor runs them. Stages are numbered globally in model order; ``stage_to_rank`` says where each lives.

    >>> from dtensor_plus.layouts.pipeline.schedules import SCHEDULES
    >>> SCHEDULES["1f1b"](p=2, m=2).actions[1]
    (RECV_F1.0, F1.0, BW1.0, SEND_B1.0, RECV_F1.1, F1.1, BW1.1, SEND_B1.1, STEP)
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Sequence

from dtensor_plus.renamed import renamed_keywords

from .actions import Action, Kind, Schedule
from .list_schedule import list_schedule
from .validate import peer

F, B, W, BW = Kind.F, Kind.B, Kind.W, Kind.BW


def _check_counts(name: str, p: int, m: int, v: int = 1) -> None:
    for label, value in (("p (pipeline ranks)", p), ("m (microbatches)", m), ("v (stages per rank)", v)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {label} must be an int >= 1, got {value!r}")


@renamed_keywords(num_microbatches="n_microbatches")
def with_communication(
    name: str, n_microbatches: int, stage_to_rank: Sequence[int], compute: Sequence[Sequence[Action]], *,
    overlapped: Sequence[tuple[Action, Action]] = (), num_pipelines: int = 1, sequence_chunks: int = 1,
) -> Schedule:
    """Turn compute-only per-rank lists into a Schedule: SEND/RECV around every cross-rank edge, STEP last.

    A receive goes right before the action that consumes it (F needs its input activation, B/BW the gradient
    of its output) and a send right after the action that produces it, so a rank blocks only when it truly
    needs data; then receives move earlier where needed to follow their link's send order (see
    ``_receive_in_send_order``). Edges between two stages on one rank (ZB-V's turn) need no messages.
    An ``overlapped`` pair (adjacent in its rank's compute list) gets both receives before it and both sends
    after it, so the two run side by side. ``num_pipelines`` and ``sequence_chunks``: see ``Schedule``.
    The result is not validated here: ``validate`` it when the compute lists come from elsewhere.
    """
    stage_to_rank = tuple(stage_to_rank)
    per_pipeline = len(stage_to_rank) // max(num_pipelines, 1)
    second_of = dict(overlapped)

    def messages(a: Action, rank: int) -> tuple[list[Action], list[Action]]:
        """The receives ``a`` needs before it and the sends it makes after it."""
        s, mb = a.stage, a.microbatch
        first, last = s % per_pipeline == 0, s % per_pipeline == per_pipeline - 1
        if a.kind is F:
            return ([Action(Kind.RECV_F, s, mb)] if not first and stage_to_rank[s - 1] != rank else [],
                    [Action(Kind.SEND_F, s, mb)] if not last and stage_to_rank[s + 1] != rank else [])
        if a.kind in (B, BW):
            return ([Action(Kind.RECV_B, s, mb)] if not last and stage_to_rank[s + 1] != rank else [],
                    [Action(Kind.SEND_B, s, mb)] if not first and stage_to_rank[s - 1] != rank else [])
        return [], []

    actions = []
    for rank, compute_list in enumerate(compute):
        out: list[Action] = []
        for i, a in enumerate(compute_list):
            if not a.kind.is_compute:
                raise ValueError(f"{name}: rank {rank}'s compute list holds {a!r}; give only F, B, W and BW, "
                                 "communication and STEP are inserted here")
            if i > 0 and second_of.get(compute_list[i - 1]) == a:
                continue  # placed with the first of its pair
            group = [a, second_of[a]] if a in second_of else [a]
            recvs, sends = zip(*(messages(x, rank) for x in group))
            out += [r for rs in recvs for r in rs] + group + [x for xs in sends for x in xs]
        out.append(Action(Kind.STEP))
        actions.append(tuple(out))
    schedule = Schedule(name, len(compute), n_microbatches, stage_to_rank, tuple(actions), frozenset(overlapped),
                        num_pipelines, sequence_chunks)
    return _receive_in_send_order(schedule)


def _receive_in_send_order(schedule: Schedule) -> Schedule:
    """Move receives earlier so that, between two ranks, messages are received in the order they are sent.

    Transports that match point-to-point messages by order (NCCL) need this when one link carries two
    streams (ZB-V: activations down and gradients up the V's arms share rank r -> r+1). Receiving a message
    sent *before* the one the rank waits for never waits longer: the sender posted it first.
    """
    queues: dict[tuple[int, int], deque[Action]] = {}  # (sender, receiver) -> receives in send order
    for src, acts in enumerate(schedule.actions):
        for a in acts:
            if a.kind in (Kind.SEND_F, Kind.SEND_B):
                dst, recv = peer(schedule, a)
                queues.setdefault((src, dst), deque()).append(recv)
    actions = []
    for dst, acts in enumerate(schedule.actions):
        out: list[Action] = []
        received: set[Action] = set()
        for a in acts:
            if a.kind not in (Kind.RECV_F, Kind.RECV_B):
                out.append(a)
            elif a not in received:
                queue = queues.get((peer(schedule, a)[0], dst), deque())
                if a not in queue:  # never sent: leave it for validate() to report
                    out.append(a)
                    continue
                while a not in received:  # everything sent before a on this link, then a
                    received.add(queue[0])
                    out.append(queue.popleft())
        actions.append(tuple(out))
    return dataclasses.replace(schedule, actions=tuple(actions))


def gpipe(p: int, m: int) -> Schedule:
    """GPipe (Huang et al., NeurIPS 2019): every rank runs all m forwards, then all m backwards.

    Placement: stage r on rank r. Bubble (p-1)/(m+p-1); rank 0 holds all m microbatches' activations.
    """
    _check_counts("gpipe", p, m)
    compute = [[Action(F, r, mb) for mb in range(m)] + [Action(BW, r, mb) for mb in range(m)] for r in range(p)]
    return with_communication("gpipe", m, range(p), compute)


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B (PipeDream-Flush: Narayanan et al., ICML 2021; DAPPLE): warm up, then alternate one F, one BW.

    Placement: stage r on rank r. Rank r runs p-1-r warm-up forwards, then F/BW pairs, then drains the
    remaining backwards. Same bubble as GPipe, (p-1)/(m+p-1), but at most p microbatches in flight on rank 0.
    """
    _check_counts("1f1b", p, m)
    compute = []
    for r in range(p):
        warmup = min(p - 1 - r, m)
        order = [Action(F, r, mb) for mb in range(warmup)]
        for i in range(m - warmup):
            order += [Action(F, r, warmup + i), Action(BW, r, i)]
        order += [Action(BW, r, mb) for mb in range(m - warmup, m)]
        compute.append(order)
    return with_communication("1f1b", m, range(p), compute)


def interleaved_1f1b(p: int, m: int, v: int = 2) -> Schedule:
    """Interleaved 1F1B (Megatron-LM, Narayanan et al., SC 2021): v model chunks per rank, 1F1B over chunks.

    Placement: looped, stage s on rank s % p, so rank r holds stages r, r+p, ..., r+(v-1)p. Microbatches go
    through in groups of p: the group's forwards on chunk 0, then chunk 1, ...; backwards mirror this from
    the last chunk. Bubble (p-1)/(v*m+p-1). Requires m % p == 0 (Megatron's condition): the order walks
    whole groups of p microbatches through each chunk, and a partial last group has no such walk.
    """
    _check_counts("interleaved_1f1b", p, m, v)
    if m % p:
        raise ValueError(
            f"interleaved_1f1b: m={m} microbatches must be a multiple of p={p} ranks; use m={(m // p + 1) * p}"
        )
    num_chunks = v * m  # (chunk, microbatch) units per rank

    def unit(k: int, rank: int, backward: bool) -> Action:
        group, within = divmod(k, p * v)
        chunk = within // p
        if backward:
            chunk = v - 1 - chunk
        mb = group * p + within % p
        return Action(BW if backward else F, chunk * p + rank, mb)

    compute = []
    for r in range(p):
        # Megatron's warm-up: enough forwards that the first backward of the last chunk can start
        warmup = min((p - 1 - r) * 2 + (v - 1) * p, num_chunks)
        order = [unit(k, r, False) for k in range(warmup)]
        for i in range(num_chunks - warmup):
            order += [unit(warmup + i, r, False), unit(i, r, True)]
        order += [unit(k, r, True) for k in range(num_chunks - warmup, num_chunks)]
        compute.append(order)
    return with_communication("interleaved_1f1b", m, [s % p for s in range(v * p)], compute)


def zb_h1(p: int, m: int) -> Schedule:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024): 1F1B with backward split into B and W.

    Placement: stage r on rank r. F and B follow 1F1B (p-r forwards before the first B); each W is delayed
    by r backwards, so the later ranks, which would idle at the end of 1F1B, keep their W's to fill it.
    In-flight (F run, W not yet) stays <= p like 1F1B's memory. With T_F = T_B = T_W and m >= p each rank
    idles (p-1)(T_F + T_B - T_W), a third of 1F1B's (p-1)(T_F + T_B + T_W).
    """
    _check_counts("zb_h1", p, m)
    compute = []
    for r in range(p):
        warmup = min(p - r, m)
        order = [Action(F, r, mb) for mb in range(warmup)]
        next_f, next_w = warmup, 0
        for mb in range(m):
            order.append(Action(B, r, mb))
            if next_f < m:
                order.append(Action(F, r, next_f))
                next_f += 1
            if mb - r >= 0:  # W of the microbatch r backwards ago
                order.append(Action(W, r, mb - r))
                next_w = mb - r + 1
        order += [Action(W, r, mb) for mb in range(next_w, m)]
        compute.append(order)
    return with_communication("zb_h1", m, range(p), compute)


def zb_v(p: int, m: int) -> Schedule:
    """ZB-V (Qi et al., "Pipeline Parallelism with Controllable Memory", 2024): zero bubble on a V placement.

    Placement: V shape, 2p stages, rank r holds stages r and 2p-1-r, so rank 0 holds both the first
    and the last stage and the turn p-1 -> p stays on rank p-1. Each stage is half a 1F1B stage; with
    T_F = T_B = T_W the only idle left is the last rank's p-1 warm-up slots, bubble (p-1)/(6m+p-1), for
    m == p and m >= p+2 (checked by the tests; one slot more at m == p+1, more below m == p).
    The order comes from unit-cost list scheduling in the spirit of the papers' greedy scheduler (B first,
    F under a memory limit, W into the gaps), see ``list_schedule.py``;
    a rank keeps at most 2p (stage, microbatch) activations, i.e. p full microbatches as in 1F1B.
    """
    _check_counts("zb_v", p, m)
    stage_to_rank = [s if s < p else 2 * p - 1 - s for s in range(2 * p)]
    return with_communication("zb_v", m, stage_to_rank, list_schedule(stage_to_rank, m, max_in_flight=2 * p))


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved_1f1b": interleaved_1f1b,
    "zb_h1": zb_h1,
    "zb_v": zb_v,
}
