"""Schedule generators and the validator: every generator's lists validate over (p, m, v); the validator
rejects each kind of broken list with a message naming the rank and the action.

No communication here: schedules are data, checked as data.
"""

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtensor_plus.layouts.pipeline.actions import Action, Kind, Schedule
from dtensor_plus.layouts.pipeline.schedules import SCHEDULES, one_f_one_b, with_communication
from dtensor_plus.layouts.pipeline.validate import check_fifo, validate

F, B, W, BW = Kind.F, Kind.B, Kind.W, Kind.BW


def make(name, p, m, v):
    if name == "interleaved_1f1b":
        return SCHEDULES[name](p=p, m=m * p, v=v)  # Megatron's condition m % p == 0
    return SCHEDULES[name](p=p, m=m)


@settings(max_examples=30)
@given(name=st.sampled_from(sorted(SCHEDULES)), p=st.integers(1, 5), m=st.integers(1, 9), v=st.integers(1, 3))
def test_every_generator_validates(name, p, m, v):
    s = make(name, p, m, v)
    validate(s)  # in_order=True: also order-matched transports (NCCL) can run it
    assert s.name == name and s.num_ranks == p
    expected_stages = {"interleaved_1f1b": v * p, "zb_v": 2 * p}.get(name, p)
    assert s.num_stages == expected_stages
    if name == "interleaved_1f1b":
        assert s.stage_to_rank == tuple(st_ % p for st_ in range(v * p))  # looped placement
    if name == "zb_v":
        assert all(set(s.stages_of(r)) == {r, 2 * p - 1 - r} for r in range(p))  # V placement
    split = name.startswith("zb")
    kinds = {a.kind for acts in s.actions for a in acts}
    assert (B in kinds and W in kinds and BW not in kinds) if split else (BW in kinds and B not in kinds)


@settings(max_examples=30)
@given(name=st.sampled_from(sorted(SCHEDULES)), p=st.integers(2, 4), m=st.integers(1, 5), data=st.data())
def test_deleting_any_action_is_rejected(name, p, m, data):
    s = make(name, p, m, 2)
    rank = data.draw(st.integers(0, p - 1))
    i = data.draw(st.integers(0, len(s.actions[rank]) - 1))
    with pytest.raises(ValueError, match=rf"{s.name}: "):
        validate(_with_rank(s, rank, s.actions[rank][:i] + s.actions[rank][i + 1:]))


def _with_rank(s, rank, acts):
    actions = list(s.actions)
    actions[rank] = tuple(acts)
    return dataclasses.replace(s, actions=tuple(actions))


def _parse(text):
    """'F0.1 SEND_F0.1 STEP' -> Actions: handy for writing small broken lists by hand."""
    out = []
    for tok in text.split():
        if tok == "STEP":
            out.append(Action(Kind.STEP))
            continue
        kind, stage, mb = re.fullmatch(r"([A-Z_]+?)(\d+)\.(\d+)", tok).groups()
        out.append(Action(Kind(kind), int(stage), int(mb)))
    return tuple(out)


def _two_ranks(rank0, rank1, m=1):
    return Schedule("hand", 2, m, (0, 1), (_parse(rank0), _parse(rank1)))


GOOD0 = "F0.0 SEND_F0.0 RECV_B0.0 BW0.0 STEP"
GOOD1 = "RECV_F1.0 F1.0 BW1.0 SEND_B1.0 STEP"


def test_hand_written_one_microbatch_is_valid_and_docstring_example_holds():
    validate(_two_ranks(GOOD0, GOOD1))
    assert one_f_one_b(p=2, m=2).actions[1] == _parse(
        "RECV_F1.0 F1.0 BW1.0 SEND_B1.0 RECV_F1.1 F1.1 BW1.1 SEND_B1.1 STEP")


@pytest.mark.parametrize("rank0, rank1, message", [
    # missing receive: rank 1 runs F1.0 without its input
    (GOOD0, "F1.0 BW1.0 SEND_B1.0 STEP", r"rank 1, action #0 F1\.0: needs RECV_F1\.0 before it"),
    # missing send: rank 1 waits for an activation rank 0 never sends
    ("F0.0 RECV_B0.0 BW0.0 STEP", GOOD1, r"rank 1, action #0 RECV_F1\.0: no matching send SEND_F0\.0 on rank 0"),
    # wrong order: backward before forward; send before its data exists
    ("SEND_F0.0 F0.0 RECV_B0.0 BW0.0 STEP", GOOD1, r"rank 0, action #0 SEND_F0\.0: sends the output of F0\.0"),
    ("RECV_B0.0 BW0.0 F0.0 SEND_F0.0 STEP", GOOD1, r"rank 0, action #1 BW0\.0: F0\.0 must run before"),
    # deadlock: rank 0 waits for the gradient before sending the activation that produces it
    ("F0.0 RECV_B0.0 SEND_F0.0 BW0.0 STEP", GOOD1,
     r"deadlock: rank 0 waits at #1 RECV_B0\.0 for SEND_B1\.0 from rank 1, which is blocked at RECV_F1\.0"),
    # a stage on the wrong rank, a duplicate, a missing backward, STEP misplaced or missing
    (GOOD0, "RECV_F1.0 F1.0 F0.0 BW1.0 SEND_B1.0 STEP", r"rank 1, action #2 F0\.0: stage 0 lives on rank 0"),
    (GOOD0, "RECV_F1.0 F1.0 F1.0 BW1.0 SEND_B1.0 STEP", r"rank 1, action #2 F1\.0: appears twice"),
    ("F0.0 SEND_F0.0 RECV_B0.0 STEP", GOOD1, r"rank 0 never runs B and W, or BW for stage 0 microbatch 0"),
    ("F0.0 SEND_F0.0 STEP RECV_B0.0 BW0.0", GOOD1, r"rank 0, action #2 STEP: STEP must be the rank's last"),
    ("F0.0 SEND_F0.0 RECV_B0.0 BW0.0", GOOD1, r"rank 0 does not end with STEP"),
    # split backward: W without its B, and BW mixed with B
    ("F0.0 SEND_F0.0 RECV_B0.0 W0.0 B0.0 STEP", GOOD1, r"rank 0, action #3 W0\.0: needs B0\.0 before it"),
    ("F0.0 SEND_F0.0 RECV_B0.0 B0.0 BW0.0 STEP", GOOD1, r"rank 0, action #4 BW0\.0: .*already ran its backward"),
    # microbatch out of range
    ("F0.3 " + GOOD0, GOOD1, r"rank 0, action #0 F0\.3: stage must be in 0\.\.1 and microbatch in 0\.\.0"),
])
def test_validator_rejects_broken_lists(rank0, rank1, message):
    with pytest.raises(ValueError, match=message):
        validate(_two_ranks(rank0, rank1))


def test_communication_between_stages_of_one_rank_is_rejected():
    # ZB-V's turn: stages 1 and 2 both live on rank 1 (p=2), so no SEND_F1 there
    s = SCHEDULES["zb_v"](p=2, m=1)
    acts = list(s.actions[1])
    i = acts.index(Action(F, 1, 0))
    acts.insert(i + 1, Action(Kind.SEND_F, 1, 0))
    with pytest.raises(ValueError, match=r"rank 1, action #\d+ SEND_F1\.0: stages 1 and 2 are both on rank 1"):
        validate(_with_rank(s, 1, acts))


def test_receive_order_is_checked_only_when_asked():
    # rank 1 posts its receives in the other order than rank 0 sends: fine with tags, not for NCCL
    s = _two_ranks("F0.0 SEND_F0.0 F0.1 SEND_F0.1 RECV_B0.0 BW0.0 RECV_B0.1 BW0.1 STEP",
                   "RECV_F1.1 RECV_F1.0 F1.0 BW1.0 SEND_B1.0 F1.1 BW1.1 SEND_B1.1 STEP", m=2)
    validate(s, in_order=False)
    with pytest.raises(ValueError, match=r"message #0 from rank 0 to rank 1: .*RECV_F1\.0.*posts RECV_F1\.1"):
        validate(s)
    with pytest.raises(ValueError, match="order-matched"):
        check_fifo(s)


def test_with_communication_receives_in_send_order():
    # rank 1 consumes microbatch 1 first: its receive of microbatch 0 moves before it, in send order
    compute = [[Action(F, 0, 0), Action(F, 0, 1), Action(BW, 0, 0), Action(BW, 0, 1)],
               [Action(F, 1, 1), Action(BW, 1, 1), Action(F, 1, 0), Action(BW, 1, 0)]]
    s = with_communication("swap", 2, (0, 1), compute)
    assert s.actions[1][:3] == _parse("RECV_F1.0 RECV_F1.1 F1.1")
    validate(s)


@pytest.mark.parametrize("call, message", [
    (lambda: SCHEDULES["interleaved_1f1b"](p=4, m=6, v=2), r"m=6 microbatches must be a multiple of p=4.*m=8"),
    (lambda: SCHEDULES["1f1b"](p=0, m=4), r"p \(pipeline ranks\) must be an int >= 1, got 0"),
    (lambda: SCHEDULES["zb_v"](p=2, m=0), r"m \(microbatches\) must be an int >= 1, got 0"),
    (lambda: SCHEDULES["interleaved_1f1b"](p=2, m=2, v=0), r"v \(stages per rank\) must be an int >= 1"),
])
def test_generators_reject_bad_sizes(call, message):
    with pytest.raises(ValueError, match=message):
        call()
