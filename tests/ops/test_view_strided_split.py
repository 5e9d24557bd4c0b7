"""A StridedShard keeps its split through a split view whose output dim holds its inner factor
(ops/view_algebra._split_strided): (B*T) -> (B, T) of StridedShard(0, B*o) is StridedShard(1, o).

This is what lets a striped activation (token t on rank t mod n: StridedShard(1, T/n)) pass through a plain
``x @ W`` / ``nn.Linear``, which folds (B, T) into rows and splits them back, with no collective. Proven three
ways: every kept placement is exact on every rank (pure geometry, wide hypothesis space, no ranks); the
flatten-then-split round trip on real ranks moves nothing and equals one device; and a striped causal
attention block with nn.Linear projections runs with no all-gather and equals one device (outputs, input and
parameter gradients). Splits that cut the inner factor still gather (values right either way).
"""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dtensor_plus import Replicate, Shard, comm_mode, init_device_mesh
from dtensor_plus.layouts import context_parallel, striped_placement
from dtensor_plus.placements import StridedShard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.rules import decide
from dtensor_plus.testing.strategies import make_dtensor

aten = torch.ops.aten


def _divisors(k):
    return [d for d in range(1, k + 1) if k % d == 0]


@st.composite
def strided_splits(draw):
    """A flat dim of size outer * inner, StridedShard(0, outer) (zigzag or not) on n ranks, split into 2..3
    output dims whose sizes multiply to it (any factorisation, so the inner factor may or may not fit)."""
    n = draw(st.integers(2, 4))
    outer, inner = draw(st.integers(1, 6)), draw(st.integers(1, 9))
    zigzag = draw(st.booleans())
    size = outer * inner
    sizes, rest = [], size
    for _ in range(draw(st.integers(1, 2))):
        factor = draw(st.sampled_from(_divisors(rest)))
        sizes.append(factor)
        rest //= factor
    sizes.append(rest)
    sizes = [s for s in sizes if s > 1] or [size]  # size-1 dims are groups of their own, not part of the split
    return n, StridedShard(0, outer, zigzag), size, sizes


@settings(max_examples=200, deadline=None)
@given(case=strided_splits())
def test_every_kept_split_is_exact_on_every_rank(case):
    """Where the rule keeps a placement, each rank's rows viewed to its local output shape are exactly that
    placement's piece of the split global tensor; where it gathers, it gathers the input too."""
    n, placement, size, sizes = case
    (target,), (out,) = decide(aten.view.default, ((size, 2), (placement,)), [*sizes, 2], mesh_shape=(n,))
    out_p = out[0]
    if out_p.is_replicate():
        assert target == (Replicate(),)
        return
    assert target == (placement,)
    whole = torch.arange(size * 2).view(size, 2)
    for rank in range(n):
        local = placement.chunk(whole, n, rank)
        expected = out_p.chunk(whole.view(*sizes, 2), n, rank)
        torch.testing.assert_close(local.view(expected.shape), expected, rtol=0, atol=0)


def _piece(whole, placements, mesh_shape, coordinate):
    """One rank's local tensor: each mesh dim cuts the piece the earlier ones left (outer mesh dims first)."""
    for p, n, index in zip(placements, mesh_shape, coordinate):
        whole = p.chunk(whole, n, index) if p.is_shard() or p.is_strided_shard() else whole
    return whole


@settings(max_examples=100, deadline=None)
@given(dp=st.integers(2, 3), rows=st.integers(1, 2), outer=st.integers(1, 3), inner=st.integers(1, 7),
       n=st.integers(2, 3), zigzag=st.booleans(), data=st.data())
def test_split_inside_batch_blocks_is_exact(dp, rows, outer, inner, n, zigzag, data):
    """Batch on dp (whole blocks), the strided rows on the next mesh dim, split in two at any factor: the
    inner factor in the second output dim or inside the first (then inside its dp blocks). Whatever the rule
    picks, each coordinate's piece of its input target, viewed locally, is exactly its piece of the output."""
    size = dp * rows * outer * inner
    trailing = data.draw(st.sampled_from([t for t in _divisors(size) if 1 < t < size] or [size]))
    sizes = [size // trailing, trailing] if trailing < size else [size]
    placements = (Shard(0), StridedShard(0, rows * outer, zigzag))
    (target,), (out,) = decide(aten.view.default, ((size,), placements), sizes, mesh_shape=(dp, n))
    assert target[1] in (placements[1], Replicate()) and (target[1] == Replicate()) == out[1].is_replicate()
    whole = torch.arange(size)
    for coordinate in itertools.product(range(dp), range(n)):
        expected = _piece(whole.view(*sizes), out, (dp, n), coordinate)
        got = _piece(whole, target, (dp, n), coordinate).view(expected.shape)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_split_keeps_exactly_where_the_inner_factor_fits():
    striped = StridedShard(0, 2 * 3)  # (B=2, T=12) striped on 4 ranks, flattened: outer B * T/n
    assert decide(aten.view.default, ((24, 5), (striped,)), [2, 12, 5])[1] == ((StridedShard(1, 3),),)
    assert decide(aten.view.default, ((24, 5), (striped,)), [6, 4, 5])[1] == ((Shard(1),),)  # groups end
    # inner 4 over 4 ranks: (8, 3) and (2, 2, 6) put the inner factor across two dims: gathered, as before
    assert decide(aten.view.default, ((24, 5), (striped,)), [2, 2, 6, 5])[1] == ((Replicate(),),)
    assert decide(aten.view.default, ((24, 5), (striped,)), [8, 3, 5])[1] == ((Replicate(),),)
    # dp cuts (24) into 2 blocks of (outer 2, inner 6); (12, 2) holds the inner 6 as 3 rows of 2 in each block
    nested = (Shard(0), StridedShard(0, 2))
    assert decide(aten.view.default, ((24,), nested), [12, 2], mesh_shape=(2, 3))[1] == (nested,)
    zigzag = StridedShard(0, 2 * 2, zigzag=True)  # inner 6 in 4 zigzag pieces of a (4*6)
    assert decide(aten.view.default, ((24,), (zigzag,)), [2, 12])[1] == ((StridedShard(1, 2, zigzag=True),),)


def _layout(p):
    """StridedShard(d, 1) and Shard(d) hold the same rows: one name for both."""
    return Shard(p.dim) if p.is_strided_shard() and p.outer == 1 and not p.zigzag else p


def _round_trip(n, batch, seq, outer, width, zigzag, seed):
    """(B, T, D) with T strided, flattened to rows and split back (a linear layer's two views): no collective,
    the placement back where it was, every value equal to one device's view."""
    mesh = init_device_mesh("cpu", (n,))
    placement = StridedShard(1, outer, zigzag)
    whole = torch.randn(batch, seq, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = make_dtensor(whole, mesh, [placement], requires_grad=True)
    with comm_mode() as comm:
        rows = x.reshape(batch * seq, width)
        back = rows.view(batch, seq, width)
    assert comm.count() == 0, comm.by_op
    assert rows.placements == (StridedShard(0, batch * outer, zigzag),), rows.placements
    assert _layout(back.placements[0]) == _layout(placement), back.placements
    torch.testing.assert_close(rows.full_tensor(), whole.reshape(batch * seq, width), rtol=0, atol=0)
    torch.testing.assert_close(back.full_tensor(), whole, rtol=0, atol=0)
    assert_spmd_equal(lambda t: (t.reshape(batch * seq, width) * 2).view(batch, seq, width), x)


def _round_trips(n, cases):
    for case in cases:
        _round_trip(n, *case)


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3])
@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 3), inner=st.integers(2, 7), outer=st.integers(1, 3), width=st.integers(1, 3),
       zigzag=st.booleans(), seed=st.integers(0, 99))
def test_flatten_split_round_trip_moves_nothing(n, batch, inner, outer, width, zigzag, seed):
    """T = outer * inner with the inner factor any length (uneven and empty pieces included; T >= 2, as a
    sequence of one token is all size-1 dims, which views pair off by position)."""
    run_on_ranks(n, _round_trip, n, batch, outer * inner, outer, width, zigzag, seed)


def test_flatten_split_round_trip_moves_nothing_sampled():
    """The default run's sample of the table above, on 2 ranks in one call: striped (inner = n), uneven
    inner (5 rows on 2 ranks; zigzag's 4 pieces of 3 leave one empty), one batch row, outer 1."""
    cases = [(2, 12, 6, 3, False, 0), (3, 10, 2, 2, False, 1), (2, 6, 2, 1, True, 2), (1, 6, 3, 2, False, 3),
             (2, 5, 1, 2, True, 4)]  # (batch, seq, outer, width, zigzag, seed)
    run_on_ranks(2, _round_trips, 2, cases)

class StripedBlock(nn.Module):
    """Causal self-attention with q/k/v/o as plain nn.Linear layers (bias on): each folds (B, T) into rows."""

    def __init__(self, channels, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(channels, channels, dtype=torch.float64) for _ in range(4))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (proj(x).view(b, t, self.heads, c // self.heads).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, c))


def _striped_linear_block(n, heads):
    mesh = init_device_mesh("cpu", (n,), mesh_dim_names=("cp",))
    seq, channels = 3 * n, 2 * heads
    torch.manual_seed(0)
    single = StripedBlock(channels, heads)
    model = copy.deepcopy(single)
    for module in (model.q, model.k, model.v, model.o):
        for name, p in list(module.named_parameters()):
            setattr(module, name, nn.Parameter(make_dtensor(p.detach(), mesh, [Replicate()])))
    whole = torch.randn(2, seq, channels, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = make_dtensor(whole, mesh, [striped_placement(1, seq, n)], requires_grad=True)
    single_x = whole.clone().requires_grad_()
    weights = torch.randn(2, seq, channels, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with context_parallel(mesh_dim="cp", load_balance="striped"):
        with comm_mode() as comm:
            y = model(x)
        assert comm.count("all_gather") == 0 and not comm.fallbacks, comm.by_op
        assert comm.count() == comm.count("ring_shift", "cp") == n - 1, comm.by_op
        assert y.placements == (striped_placement(1, seq, n),), y.placements
        with comm_mode() as comm:
            (y * make_dtensor(weights, mesh, [striped_placement(1, seq, n)])).sum().backward()
        assert comm.count("all_gather") == 0, comm.by_op
    (single(single_x) * weights).sum().backward()
    torch.testing.assert_close(y.full_tensor(), single(whole))
    assert x.grad.placements == (striped_placement(1, seq, n),), x.grad.placements
    torch.testing.assert_close(x.grad.full_tensor(), single_x.grad)
    for (name, got), (_, expected) in zip(model.named_parameters(), single.named_parameters()):
        torch.testing.assert_close(got.grad.full_tensor(), expected.grad, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("n, heads", [(2, 3), pytest.param(4, 2, marks=pytest.mark.slow)])
def test_striped_attention_with_linear_layers_never_gathers(n, heads):
    run_on_ranks(n, _striped_linear_block, n, heads)
