"""Slices of a sequence laid out as a StridedShard (zigzag or striped) equal one device, forward and backward.

The GPT adds ``pos_emb[:T]`` (a replicated table) to a zigzag-sharded (B, T, D) activation. Its backward sums
the strided gradient over B and zero-fills it into the table's rows (``slice_backward``), whose rule meets
the StridedShard as a Shard (dtensor_plus/strided.py). Where T is the table's whole length, the slice keeps the
placement, and its local op used to cut the block at Shard's offsets: on lengths the mesh does not divide,
a zigzag block is longer or shorter than Shard's ("output with shape [1, 12] doesn't match the broadcast
shape [2, 12]"), and a forward slice silently cut rows. Any table length, offset, and a slice of the strided
dim itself (whole or part) are drawn here, on 3 ranks (nothing divides), each checked against one device:
outputs, the input's gradient and the table's gradient.
"""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtensor_plus import Replicate, init_device_mesh, strided
from dtensor_plus.placements import StridedShard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.rules import OpSchema, rule_for
from dtensor_plus.spec import DTensorSpec
from dtensor_plus.testing.rules import MeshShape, spec
from dtensor_plus.testing.strategies import make_dtensor

aten = torch.ops.aten
RANKS = 3


@st.composite
def cases(draw):
    """(batch, seq, width, outer, zigzag, table length, table offset, (start, end) of the sequence slice)."""
    seq = draw(st.integers(1, 9))
    outer = draw(st.sampled_from([d for d in (1, 2, 3) if seq % d == 0]))
    extra = draw(st.integers(0, 2))
    start = draw(st.integers(-seq, seq))
    end = draw(st.one_of(st.none(), st.integers(-seq, seq + 1)))
    return (draw(st.integers(1, 2)), seq, draw(st.integers(1, 3)), outer, draw(st.booleans()), seq + extra,
            draw(st.integers(0, extra)), (start, end))


def _pattern(x, table, offset, cut):
    """The GPT's position embedding (a slice of a table, broadcast over the batch), then a slice of the
    sequence itself."""
    seq = x.shape[1]
    y = x + table[offset : offset + seq]
    return y[:, cut[0] : cut[1]] * 2


def _check_cases(ranks, case_list):
    mesh = init_device_mesh("cpu", (ranks,), mesh_dim_names=("cp",))
    for index, (batch, seq, width, outer, zigzag, length, offset, cut) in enumerate(case_list):
        g = torch.Generator().manual_seed(index)
        x = make_dtensor(torch.randn(batch, seq, width, generator=g, dtype=torch.float64), mesh,
                         [StridedShard(1, outer, zigzag)], requires_grad=True)
        table = make_dtensor(torch.randn(length, width, generator=g, dtype=torch.float64), mesh, [Replicate()],
                             requires_grad=True)
        assert_spmd_equal(_pattern, x, table, offset, cut)


def test_slices_of_a_strided_sequence_equal_one_device_sampled():
    """The default run's sample of the table below, in one call: the GPT's own pattern (T = 7 zigzag, its
    table of 7, whole), a table longer than T at an offset, part of a zigzag sequence, a whole striped one."""
    run_on_ranks(RANKS, _check_cases, RANKS, [(2, 7, 3, 1, True, 7, 0, (0, None)), (1, 5, 2, 1, True, 7, 1, (1, -1)),
                                              (2, 6, 2, 2, False, 6, 0, (-6, 7)), (1, 4, 1, 1, False, 5, 1, (0, 3))])


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(case_list=st.lists(cases(), min_size=4, max_size=4))
def test_slices_of_a_strided_sequence_equal_one_device(case_list):
    run_on_ranks(RANKS, _check_cases, RANKS, case_list)


@pytest.mark.slow
def test_the_gpt_case_on_4_ranks():
    """The failing shape itself: T = 7 (not a multiple of 2 * 4), table of 7, 12 wide."""
    run_on_ranks(4, _check_cases, 4, [(2, 7, 12, 1, True, 7, 0, (0, None))])


def _decided(func, args, out_shape):
    """(input placements, output placements) as the dispatcher decides them for StridedShard inputs."""
    mesh = MeshShape((4,))
    args = tuple(spec(mesh, *a) if isinstance(a, tuple) else a for a in args)
    schema = OpSchema(func, args, {}, tuple(a for a in args if isinstance(a, DTensorSpec)))
    sharding = strided.decide(rule_for(func), schema, [SimpleNamespace(shape=out_shape)])
    return sharding.inputs_for(schema)[0], sharding.outputs[0]


def test_a_whole_slice_keeps_the_strided_placement():
    """What makes the local op matter: a whole slice keeps the zigzag (no collective), a part of it gathers."""
    zigzag = (StridedShard(0, 1, zigzag=True),)
    assert _decided(aten.slice_backward.default, (((7, 12), zigzag), [7, 12], 0, 0, 7, 1), (7, 12)) == (zigzag,) * 2
    assert _decided(aten.slice.Tensor, (((7, 12), zigzag), 0, 0, 7), (7, 12)) == (zigzag,) * 2
    gathered = (Replicate(),)
    assert _decided(aten.slice_backward.default, (((6, 12), zigzag), [7, 12], 0, 0, 6, 1), (7, 12)) == (gathered,) * 2
    assert _decided(aten.slice.Tensor, (((7, 12), zigzag), 0, 1, 7), (6, 12)) == (gathered,) * 2
