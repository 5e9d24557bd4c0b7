"""V-placed schedules from the papers: DualPipeV (DeepSeek-V3) and the controllable-memory V-Half and V-Min.

All three put 2p stages on p ranks in a V: rank r holds stage r (the way down) and stage 2p-1-r (the way back),
so rank 0 holds the first and the last stage and the turn p-1 -> p stays on rank p-1. Each stage is half a
1F1B stage; activations are counted in these half-stage units (``peak_in_flight``), so 1F1B's p microbatches
on its first rank are 2p units here.

    >>> from dtensor_plus.layouts.pipeline.schedules_v import dualpipe_v
    >>> sorted(map(repr, dualpipe_v(p=2, m=4).overlapped))[0]
    '(F0.3, BW3.1)'
"""

from __future__ import annotations

from .actions import Action, Kind, Schedule
from .building_block import block_times, repeat_block
from .schedules import _check_counts, with_communication

F, B, W, BW = Kind.F, Kind.B, Kind.W, Kind.BW

__all__ = ["dualpipe_v", "v_half", "v_min", "v_placement"]


def v_placement(p: int) -> list[int]:
    """stage -> rank for 2p stages in a V."""
    return [s if s < p else 2 * p - 1 - s for s in range(2 * p)]


def dualpipe_v(p: int, m: int) -> Schedule:
    """DualPipeV (DeepSeek-V3 report; DualPipe cut in half so it needs no second copy of the weights).

    Each rank walks eight phases (DeepSeek's open-source order): forwards on its down stage (1), down and up
    forwards (2), B-W-F on the up stage (3), the steady state of overlapped pairs "F down with BW up, then F up
    with BW down" (4, the last rank's very first pair left unoverlapped), BW up beside overlapped "F up with BW
    down" (5), the last backwards, the second half of them split into B and W (6, 7), and the W's left (8).
    Overlapped pairs are in ``Schedule.overlapped``: with F = B = W = 1 and pairs of duration F&B, every rank
    idles (p-1)(F&B + B_full - 3W) (DeepSeek's (PP/2-1)(F&B+B-3W) with PP = 2p stages); peak activations 2p+1
    half stages (DeepSeek's PP+1). Needs m >= 2p microbatches.
    """
    _check_counts("dualpipe_v", p, m)
    if m < 2 * p:
        raise ValueError(f"dualpipe_v: m={m} microbatches must be at least 2p={2 * p} (the steady state needs "
                         f"every rank's forwards of both stages in flight); use m >= {2 * p}")
    compute, pairs = [], []
    for r in range(p):
        down, up = r, 2 * p - 1 - r
        order: list[Action] = []
        next_f = {down: 0, up: 0}
        next_b = {down: 0, up: 0}
        pending_w: list[Action] = []

        def forward(s):
            order.append(Action(F, s, next_f[s]))
            next_f[s] += 1
            return order[-1]

        def backward(s, split=False):
            order.append(Action(B if split else BW, s, next_b[s]))
            next_b[s] += 1
            if split:
                pending_w.append(Action(W, s, order[-1].microbatch))
            return order[-1]

        def weight():
            if pending_w:
                order.append(pending_w.pop(0))

        def overlapped(f_stage, b_stage):
            pairs.append((forward(f_stage), backward(b_stage)))

        for _ in range(2 * (p - r - 1)):  # 1: down forwards
            forward(down)
        for _ in range(r + 1):  # 2: down and up forwards
            forward(down)
            forward(up)
        for _ in range(p - r - 1):  # 3: B, W, F on the up stage (zero bubble)
            backward(up, split=True)
            weight()
            forward(up)
        for i in range(m - 2 * p + r + 1):  # 4: the steady state
            if i == 0 and r == p - 1:  # not overlapped: the turn's first backward waits on this forward
                forward(down)
                backward(up)
            else:
                overlapped(down, up)
            overlapped(up, down)
        for _ in range(p - r - 1):  # 5
            backward(up)
            overlapped(up, down)
        split = False
        for i in range(r + 1):  # 6: the last backwards; the second half split into B and W
            split = split or (i == (r + 1) // 2 and r % 2 == 1)
            backward(up, split)
            split = split or (i == (r + 1) // 2 and r % 2 == 0)
            backward(down, split)
        for _ in range(p - r - 1):  # 7
            weight()
            backward(down, split)
        while pending_w:  # 8
            weight()
        compute.append(order)
    return with_communication("dualpipe_v", m, v_placement(p), compute, overlapped=pairs)


def _v_block(name: str, p: int, m: int, way_back_forward_gap: int) -> Schedule:
    """The V placement's building block (``building_block.py``) repeated m times: every forward and backward
    one slot after the one before it, except the forwards on the way back (stages p..2p-1), which come
    ``way_back_forward_gap`` slots apart: that gap is the one knob between V-Min (1) and V-Half (2)."""
    _check_counts(name, p, m)
    stage_to_rank = v_placement(p)
    forward_gaps = [1] * p + [way_back_forward_gap] * p
    block = block_times(stage_to_rank, forward_gaps, backward_gaps=[1] * (2 * p))
    return with_communication(name, m, stage_to_rank, repeat_block(stage_to_rank, m, block))


def v_half(p: int, m: int) -> Schedule:
    """V-Half (Qi et al. 2024, "Pipeline Parallelism with Controllable Memory"): peak activations (held F to W)
    2 * ((p+2)//2) half stages, i.e. the paper's (p+2)//2 microbatches, half of 1F1B's p, for m >= p.

    The paper's bubble is ~p/(2m) with T_F = T_B = T_W, an idle of about (p/2)(T_F+T_B+T_W) = 3p half-stage slots
    per rank; this block idles exactly 3p + p//2 - 4 slots for m >= p, p >= 2 (``bubble_formula``): at or below
    the paper's figure for p <= 9, p/2 - 4 slots above it beyond."""
    return _v_block("v_half", p, m, way_back_forward_gap=2)


def v_min(p: int, m: int) -> Schedule:
    """V-Min (same paper): peak activations 2 * ((p+4)//3) half stages, the paper's (p+4)//3 microbatches, a third
    of 1F1B's, for m >= p; every forward and backward back to back.

    The paper's bubble is ~2p/(3m) with T_F = T_B = T_W, an idle of about (2p/3)(T_F+T_B+T_W) = 4p half-stage slots
    per rank; this block idles exactly 4p - 5 slots (4p - 3 when 3 divides p > 3: two of a rank's actions would take
    the same slot modulo T=6 and one moves) for p >= 2, m >= 2 (``bubble_formula``)."""
    return _v_block("v_min", p, m, way_back_forward_gap=1)
