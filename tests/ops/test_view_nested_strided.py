"""A dim split over several mesh dims (nested levels) keeps its split through folds and splits of views.

USP and the double ring place the sequence of (B, T, D) as Shard(1) on two mesh dims (ring, then Ulysses:
the second cuts the block the first left). nn.Linear folds (B, T) into rows and splits them back; with
B > 1 the view rules used to gather T there. Now the fold makes StridedShard(0, B) on both mesh dims (each
level reads its piece as (B, inner)) and the split gives back Shard(1) on both (ops/view_algebra.py). Proven:
every placement a view rule picks, for any shape, layout and view drawn (nested levels, dp blocks, uneven
and empty pieces), is exact on every mesh coordinate, and so is the view back; on 4 real ranks a
sequence-sharded nn.Linear with B = 2 moves nothing in forward and equals one device.
"""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dtensor_plus import Replicate, Shard, comm_mode, init_device_mesh
from dtensor_plus.placements import StridedShard
from dtensor_plus.redistribute import plan_redistribute
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.rules import decide
from dtensor_plus.testing.strategies import make_dtensor

aten = torch.ops.aten


def _piece(whole, placements, mesh_shape, coordinate):
    """One coordinate's local tensor: each mesh dim cuts the piece the earlier ones left (outer mesh dims first)."""
    for p, n, index in zip(placements, mesh_shape, coordinate):
        whole = p.chunk(whole, n, index) if p.is_shard() or p.is_strided_shard() else whole
    return whole


def _assert_exact(in_shape, target, out_shape, out, mesh_shape):
    """Each coordinate's piece of the input under ``target``, viewed locally, is its piece of the output."""
    whole = torch.arange(math.prod(in_shape)).view(in_shape)
    for coordinate in itertools.product(*(range(n) for n in mesh_shape)):
        expected = _piece(whole.view(out_shape), out, mesh_shape, coordinate)
        got = _piece(whole, target, mesh_shape, coordinate)
        assert got.numel() == expected.numel(), (coordinate, got.shape, expected.shape)
        torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=0, atol=0)


@st.composite
def views(draw):
    """(mesh shape, input shape, placements, output shape): 2-3 mesh dims, often several on one tensor dim
    (nested levels), sometimes a leading dp Shard(0); the view folds a run of adjacent dims or splits one."""
    mesh_shape = tuple(draw(st.lists(st.integers(2, 3), min_size=2, max_size=3)))
    shape = draw(st.lists(st.integers(1, 7), min_size=2, max_size=4))
    seq = draw(st.integers(1, len(shape) - 1))
    choices = [Replicate(), Shard(0)] + [Shard(d) for d in range(len(shape))] + [Shard(seq)] * 4  # mostly nested
    placements = tuple(draw(st.sampled_from(choices)) for _ in mesh_shape)
    if draw(st.booleans()):  # a fold of a run of dims
        start = draw(st.integers(0, len(shape) - 2))
        stop = draw(st.integers(start + 2, len(shape)))
        out_shape = shape[:start] + [math.prod(shape[start:stop])] + shape[stop:]
    else:  # a split of one dim into two factors
        d = draw(st.integers(0, len(shape) - 1))
        factor = draw(st.sampled_from([f for f in range(1, shape[d] + 1) if shape[d] % f == 0]))
        out_shape = shape[:d] + [factor, shape[d] // factor] + shape[d + 1 :]
    return mesh_shape, tuple(shape), placements, tuple(out_shape)


@settings(max_examples=100, deadline=None)
@given(case=views())
def test_every_view_placement_is_exact_there_and_back(case):
    _exact_there_and_back(case)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None)
@given(case=views())
def test_every_view_placement_is_exact_there_and_back_wide(case):
    _exact_there_and_back(case)


def _exact_there_and_back(case):
    mesh_shape, in_shape, placements, out_shape = case
    (target,), (out,) = decide(aten.view.default, (in_shape, placements), list(out_shape), mesh_shape=mesh_shape)
    _assert_exact(in_shape, target, out_shape, out, mesh_shape)
    (back_target,), (back,) = decide(aten.view.default, (out_shape, out), list(in_shape), mesh_shape=mesh_shape)
    _assert_exact(out_shape, back_target, in_shape, back, mesh_shape)


def test_a_sequence_on_two_mesh_dims_folds_and_splits_without_gathering():
    """(B, T, D) with T on ring and Ulysses (any B, T: 5 or 3 rows on 2 x 2 leave uneven and empty pieces), with and
    without dp blocks of B in front; heads split off D leave the sequence alone."""
    for b, t in ((2, 8), (3, 5), (2, 3)):
        folded = StridedShard(0, b)
        sequence = (Shard(1), Shard(1))
        assert decide(aten.view.default, ((b, t, 12), sequence), [b * t, 12], mesh_shape=(2, 2)) == (
            [sequence], ((folded, folded),))
        assert decide(aten.view.default, ((b * t, 12), (folded, folded)), [b, t, 12], mesh_shape=(2, 2)) == (
            [(folded, folded)], (sequence,))
    with_dp = (Shard(0), Shard(1), Shard(1))
    per_block = StridedShard(0, 2)  # B = 4 in 2 dp blocks: each level reads its block as (2, inner)
    assert decide(aten.view.default, ((4, 6, 12), with_dp), [24, 12], mesh_shape=(2, 2, 2))[1] == (
        (Shard(0), per_block, per_block),)
    # three levels (LoongTrain's outer ring, inner ring, Ulysses)
    three = (StridedShard(0, 2),) * 3
    assert decide(aten.view.default, ((2, 9, 4), (Shard(1),) * 3), [18, 4], mesh_shape=(2, 2, 2))[1] == (three,)


def test_nested_strided_levels_are_gathered_innermost_first():
    """Each level cuts the piece the one outside it left, so only the innermost may be gathered (or made) in
    one step: gathering the outer one first would scramble the rows."""
    folded = StridedShard(0, 2)
    replicated = (Replicate(), Replicate())
    assert plan_redistribute((folded, folded), replicated, (2, 2), 48, 4) == ((1, Replicate()), (0, Replicate()))
    assert plan_redistribute(replicated, (folded, folded), (2, 2), 48, 4) == ((0, folded), (1, folded))
    # with dp blocks in front (Shard(0) outermost), the levels still go innermost first
    with_dp = (Shard(0), folded, folded)
    assert plan_redistribute(with_dp, (Shard(0), Replicate(), Replicate()), (2, 2, 2), 48, 4) == (
        (2, Replicate()), (1, Replicate()))


def _linear_on_two_levels(batch, seq, width):
    """nn.Linear on a (B, T, D) sequence split over ring x Ulysses: no collective in forward, equal to one
    device (output, input and parameter gradients)."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
    torch.manual_seed(0)
    linear = nn.Linear(width, width, dtype=torch.float64)
    weight = make_dtensor(linear.weight.detach(), mesh, [Replicate(), Replicate()], requires_grad=True)
    bias = make_dtensor(linear.bias.detach(), mesh, [Replicate(), Replicate()], requires_grad=True)
    whole = torch.randn(batch, seq, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = make_dtensor(whole, mesh, [Shard(1), Shard(1)], requires_grad=True)
    with comm_mode() as comm:
        y = torch.nn.functional.linear(x, weight, bias)
    assert comm.count() == 0 and not comm.fallbacks, comm.by_op
    assert y.placements == (Shard(1), Shard(1)), y.placements
    assert_spmd_equal(torch.nn.functional.linear, x, weight, bias)
    rows = x.reshape(batch * seq, width)  # the fold itself, there and back through redistribute
    assert rows.placements == (StridedShard(0, batch),) * 2, rows.placements
    torch.testing.assert_close(rows.full_tensor(), whole.reshape(batch * seq, width), rtol=0, atol=0)
    made = make_dtensor(whole.reshape(batch * seq, width), mesh, [Replicate(), Replicate()])
    made = made.redistribute(mesh, rows.placements)
    torch.testing.assert_close(made.to_local(), rows.to_local(), rtol=0, atol=0)


def _linears(cases):
    for case in cases:
        _linear_on_two_levels(*case)


def test_linear_on_a_sequence_split_twice_moves_nothing_and_equals_one_device():
    run_on_ranks(4, _linears, [(2, 6, 3), (3, 5, 2)])
