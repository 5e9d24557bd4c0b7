"""Checks that a Schedule can run: every action exactly once on the right rank, in an order that respects
the data dependencies, every send matched by a receive, and no deadlock.

The communication semantics are actions.py's: SEND_F(s, mb) on the rank of stage s pairs with RECV_F(s+1, mb)
on the rank of stage s+1; SEND_B(s, mb) on the rank of stage s pairs with RECV_B(s-1, mb) on the rank of
stage s-1. Sends never block; a receive blocks until its send was posted. ``validate`` raises ValueError
naming the rank, the action (and its index in the rank's list) and what is wrong.
"""

from __future__ import annotations

from .actions import Action, Kind, Schedule

_BACKWARDS = (Kind.B, Kind.BW)
# each communication kind -> the kind that matches it and where its stage sits relative to ours
_PARTNER = {
    Kind.SEND_F: (Kind.RECV_F, +1), Kind.RECV_F: (Kind.SEND_F, -1),
    Kind.SEND_B: (Kind.RECV_B, -1), Kind.RECV_B: (Kind.SEND_B, +1),
}


def validate(schedule: Schedule, *, in_order: bool = True) -> None:
    """Raise ValueError on the first problem found; return None for a schedule that can run.

    ``in_order`` (default) also requires each link's receives in the order of its sends (``check_fifo``),
    which transports that match messages by order need (NCCL); pass False for tag-matched ones.
    """
    if schedule.n_microbatches < 1:
        raise ValueError(f"{schedule.name}: n_microbatches={schedule.n_microbatches}, needs >= 1")
    for rank in range(schedule.num_ranks):
        _check_rank(schedule, rank)
    _check_complete(schedule)
    _check_matching(schedule)
    _check_no_deadlock(schedule)
    if in_order:
        check_fifo(schedule)


def peer(schedule: Schedule, a: Action) -> tuple[int, Action]:
    """The rank on the other end of communication action ``a`` and the action there that matches it."""
    kind, step = _PARTNER[a.kind]
    other = a.stage + step
    edge = schedule.is_last(a.stage) if step > 0 else schedule.is_first(a.stage)
    if not 0 <= other < schedule.num_stages or edge:
        raise ValueError(f"{schedule.name}: {a!r} talks to stage {other}, outside its pipeline's stages")
    return schedule.stage_to_rank[other], Action(kind, other, a.microbatch)


def _fail(schedule: Schedule, rank: int, index: int, a: Action, what: str):
    raise ValueError(f"{schedule.name}: rank {rank}, action #{index} {a!r}: {what}")


def _check_rank(schedule: Schedule, rank: int) -> None:
    """Per-rank checks: ownership, ranges, duplicates, order of dependencies, STEP last."""
    acts = schedule.actions[rank]
    last, m, where = schedule.num_stages - 1, schedule.n_microbatches, schedule.stage_to_rank
    partner = _overlap_partners(schedule, rank)
    seen: set[Action] = set()
    for i, a in enumerate(acts):
        if not isinstance(a, Action):
            raise TypeError(f"{schedule.name}: rank {rank}, action #{i} is {type(a).__name__}, not an Action")
        if a.kind is Kind.STEP:
            if i != len(acts) - 1:
                _fail(schedule, rank, i, a, f"STEP must be the rank's last action, {len(acts) - 1 - i} follow it")
            continue
        if not 0 <= a.stage <= last or not 0 <= a.microbatch < m:
            _fail(schedule, rank, i, a, f"stage must be in 0..{last} and microbatch in 0..{m - 1}")
        if not schedule.runs(a.stage, a.microbatch):
            _fail(schedule, rank, i, a, f"microbatch {a.microbatch} runs through pipeline "
                                        f"{schedule.pipeline_of(a.microbatch)}, stage {a.stage} is not in it")
        if where[a.stage] != rank:
            _fail(schedule, rank, i, a, f"stage {a.stage} lives on rank {where[a.stage]}")
        if a in seen:
            _fail(schedule, rank, i, a, "appears twice on this rank")
        before = seen
        if a in partner:  # the second of an overlapped pair runs beside the first: it may not need it
            first = partner[a]
            if i == 0 or acts[i - 1] != first:
                _fail(schedule, rank, i, a, f"overlapped with {first!r}, which must come right before it")
            before = seen - {first}
        problem = _missing_before(schedule, rank, a, before)
        if problem:
            _fail(schedule, rank, i, a, problem)
        seen.add(a)
    absent = [pair for second, first in partner.items() for pair in [(first, second)] if not {first, second} <= seen]
    if absent:
        raise ValueError(f"{schedule.name}: rank {rank}: overlapped pair {absent[0]!r} names an action the rank "
                         "does not run")
    if not acts or acts[-1].kind is not Kind.STEP:
        raise ValueError(f"{schedule.name}: rank {rank} does not end with STEP (its optimizer step)")


def _overlap_partners(schedule: Schedule, rank: int) -> dict[Action, Action]:
    """second -> first for this rank's overlapped pairs, after checking each pair is two compute actions of this
    rank, one forward and one backward."""
    partner = {}
    for first, second in sorted(schedule.overlapped, key=repr):
        if schedule.stage_to_rank[first.stage] != rank:
            continue
        kinds = {first.kind, second.kind}
        if schedule.stage_to_rank[second.stage] != rank or Kind.F not in kinds or not kinds & set(_BACKWARDS):
            raise ValueError(f"{schedule.name}: overlapped pair ({first!r}, {second!r}) must be a forward and a "
                             f"backward (B or BW) of one rank")
        partner[second] = first
    return partner


def _missing_before(schedule: Schedule, rank: int, a: Action, seen: set[Action]) -> str | None:
    """What ``a`` needs earlier on this rank and did not find, or None."""
    s, mb, where = a.stage, a.microbatch, schedule.stage_to_rank
    first, last = schedule.is_first(s), schedule.is_last(s)
    chunk, k_chunks = mb % schedule.sequence_chunks, schedule.sequence_chunks

    def ran_backward(stage, microbatch=mb):
        return Action(Kind.B, stage, microbatch) in seen or Action(Kind.BW, stage, microbatch) in seen

    k = a.kind
    if k is Kind.F and chunk > 0 and Action(Kind.F, s, mb - 1) not in seen:
        return f"F{s}.{mb - 1} (the earlier sequence chunk: its keys and values) must run before it"
    if k in _BACKWARDS and chunk < k_chunks - 1 and not ran_backward(s, mb + 1):
        return f"the backward of stage {s} for {mb + 1} (the later sequence chunk, which sends gradient into " \
               f"this chunk's keys and values) must run before it"
    if k is Kind.F and not first:
        if where[s - 1] == rank and Action(Kind.F, s - 1, mb) not in seen:
            return f"F{s - 1}.{mb} (same rank) must run before it"
        if where[s - 1] != rank and Action(Kind.RECV_F, s, mb) not in seen:
            return f"needs RECV_F{s}.{mb} before it (its input comes from stage {s - 1} on rank {where[s - 1]})"
    if k in _BACKWARDS:
        if Action(Kind.F, s, mb) not in seen:
            return f"F{s}.{mb} must run before its backward"
        if ran_backward(s):
            return f"stage {s} microbatch {mb} already ran its backward"
        if not last and where[s + 1] == rank and not ran_backward(s + 1):
            return f"the backward of stage {s + 1} (same rank) must run before it"
        if not last and where[s + 1] != rank and Action(Kind.RECV_B, s, mb) not in seen:
            return f"needs RECV_B{s}.{mb} before it (its output gradient comes from rank {where[s + 1]})"
    if k is Kind.W and Action(Kind.B, s, mb) not in seen:
        return f"needs B{s}.{mb} before it (a W follows its B; BW already includes W)"
    if k in (Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B):
        down = k in (Kind.SEND_F, Kind.RECV_B)
        other = s + (1 if down else -1)
        if last if down else first:
            return f"stage {s} has no stage {other} to talk to (the end of its pipeline)"
        if where[other] == rank:
            return f"stages {s} and {other} are both on rank {rank}: no communication between them"
    if k is Kind.SEND_F and Action(Kind.F, s, mb) not in seen:
        return f"sends the output of F{s}.{mb}, which has not run yet"
    if k is Kind.SEND_B and not ran_backward(s):
        return f"sends the input gradient of stage {s} microbatch {mb}, whose backward has not run yet"
    return None


def _check_complete(schedule: Schedule) -> None:
    """Each (stage, microbatch): one F and one backward (BW, or B and W) on its rank. Duplicates and order
    were caught per rank, so only the missing ones remain to name."""
    on_rank = [set(acts) for acts in schedule.actions]
    for s in range(schedule.num_stages):
        rank = schedule.stage_to_rank[s]
        have = on_rank[rank]
        for mb in range(schedule.n_microbatches):
            if not schedule.runs(s, mb):
                continue

            def has(kind):
                return Action(kind, s, mb) in have

            if not has(Kind.F):
                raise ValueError(f"{schedule.name}: rank {rank} never runs F{s}.{mb}")
            if has(Kind.BW) and (has(Kind.B) or has(Kind.W)):
                raise ValueError(f"{schedule.name}: rank {rank} runs BW{s}.{mb} and also B or W for it")
            if not has(Kind.BW) and not (has(Kind.B) and has(Kind.W)):
                missing = "B and W, or BW" if not has(Kind.B) else "W (after its B)"
                raise ValueError(f"{schedule.name}: rank {rank} never runs {missing} for stage {s} microbatch {mb}")


def _check_matching(schedule: Schedule) -> None:
    """Every send has its receive on the peer rank and every receive its send."""
    on_rank = [set(acts) for acts in schedule.actions]
    for rank, acts in enumerate(schedule.actions):
        for i, a in enumerate(acts):
            if not a.kind.is_comm:
                continue
            other_rank, match = peer(schedule, a)
            if match not in on_rank[other_rank]:
                what = "receive" if a.kind in (Kind.SEND_F, Kind.SEND_B) else "send"
                _fail(schedule, rank, i, a, f"no matching {what} {match!r} on rank {other_rank}")


def _check_no_deadlock(schedule: Schedule) -> None:
    """Replay with non-blocking sends and blocking receives; if every unfinished rank waits on a receive
    whose send is not posted, name each waiting rank, its receive and what the sender is stuck on."""
    pos = [0] * schedule.num_ranks
    posted: set[tuple[int, Action]] = set()  # (receiving rank, the RECV it satisfies)
    progress = True
    while progress:
        progress = False
        for rank, acts in enumerate(schedule.actions):
            while pos[rank] < len(acts):
                a = acts[pos[rank]]
                if a.kind in (Kind.RECV_F, Kind.RECV_B) and (rank, a) not in posted:
                    break
                if a.kind in (Kind.SEND_F, Kind.SEND_B):
                    posted.add(peer(schedule, a))
                pos[rank] += 1
                progress = True
    stuck = [r for r in range(schedule.num_ranks) if pos[r] < len(schedule.actions[r])]
    if stuck:
        lines = []
        for r in stuck:
            a = schedule.actions[r][pos[r]]
            sender, send = peer(schedule, a)
            blocked = schedule.actions[sender][pos[sender]] if pos[sender] < len(schedule.actions[sender]) else None
            lines.append(f"rank {r} waits at #{pos[r]} {a!r} for {send!r} from rank {sender}, "
                         f"which is blocked at {blocked!r}")
        raise ValueError(f"{schedule.name}: deadlock: " + "; ".join(lines))


def check_fifo(schedule: Schedule) -> None:
    """Stricter, for transports that match messages by order rather than by tag (NCCL p2p): between each
    ordered pair of ranks, the receiver posts its receives in the order the sender posts its sends."""
    sent: dict[tuple[int, int], list[Action]] = {}
    received: dict[tuple[int, int], list[Action]] = {}
    for rank, acts in enumerate(schedule.actions):
        for a in acts:
            if a.kind in (Kind.SEND_F, Kind.SEND_B):
                other, match = peer(schedule, a)
                sent.setdefault((rank, other), []).append(match)
            elif a.kind in (Kind.RECV_F, Kind.RECV_B):
                other, _ = peer(schedule, a)
                received.setdefault((other, rank), []).append(a)
    for (src, dst), sends in sent.items():
        recvs = received.get((src, dst), [])
        for j, (want, got) in enumerate(zip(sends, recvs)):
            if want != got:
                raise ValueError(
                    f"{schedule.name}: message #{j} from rank {src} to rank {dst}: rank {src} sends what "
                    f"{want!r} expects but rank {dst} posts {got!r} at that point; order-matched transports "
                    f"would mix them up")
