"""testing.compiling's per-group check of compiled graphs' collectives (no ranks: graph code as AOTAutograd
prints it): it finds each collective's group, keeps program order, and flags a rank that dropped one."""

import types

import pytest

from dtensor_plus.testing.compiling import collective_sequences, mismatched_collectives

_ROOT = """
    all_to_all_single = torch.ops._c10d_functional.all_to_all_single.default(view_1, [18, 18], [18, 0], '3')
    wait_tensor_1 = torch.ops._c10d_functional.wait_tensor.default(all_to_all_single);  all_to_all_single = None
    all_reduce = torch.ops._c10d_functional.all_reduce.default(clone_3, 'sum', '3')
    broadcast = torch.ops._c10d_functional.broadcast.default(x, 1, '4')
"""
_NON_ROOT_DROPPED = "\n".join(line for line in _ROOT.splitlines() if "all_to_all" not in line)
_GROUPS = [types.SimpleNamespace(group_name="3"), types.SimpleNamespace(group_name="4")]


def test_sequences_by_group_in_order_and_a_dropped_collective_is_flagged():
    root = collective_sequences([_ROOT], _GROUPS)
    assert root == {"3": ["all_to_all_single", "all_reduce"], "4": ["broadcast"]}
    assert mismatched_collectives([root, collective_sequences([_ROOT], _GROUPS)]) == []
    problems = mismatched_collectives([root, collective_sequences([_NON_ROOT_DROPPED], _GROUPS)])
    assert len(problems) == 1 and problems[0].startswith("group '3'")


def test_a_collective_on_an_unnamed_group_raises():
    with pytest.raises(ValueError, match="pass every process group"):
        collective_sequences([_ROOT], _GROUPS[:1])
