"""Embedding rules (ops/embedding.py): lookup and dense backward against one device on real gloo ranks, for
Replicate, vocab-sharded (uneven and empty vocab shards), embedding-dim-sharded and Partial weights and any
layout of the indices; padding_idx and scale_grad_by_freq; the layouts and collective counts of the classics."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dtensor_plus import Partial, Replicate, Shard, comm_mode, init_device_mesh
from dtensor_plus.testing.rules import decide
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for, shapes

aten = torch.ops.aten
R = Replicate()
WORLD_SIZES = [2, 3, 4]

# ---------------------------------------------------------------- the rule as a pure function


def _decide(func, *args, **kwargs):
    inputs, outputs = decide(func, *args, **kwargs)
    return inputs, outputs[0]


def test_rule_layouts():
    emb, bwd = aten.embedding.default, aten.embedding_dense_backward.default
    idx = lambda *p: ((4, 6), p, torch.int64)  # noqa: E731
    assert _decide(emb, ((10, 8), (R,)), idx(Shard(1))) == ([(R,), (Shard(1),)], (Shard(1),))
    assert _decide(emb, ((10, 8), (Shard(0),)), idx(Shard(0))) == ([(Shard(0),), (R,)], (Partial(),))
    assert _decide(emb, ((10, 8), (Shard(1),)), idx(R)) == ([(Shard(1),), (R,)], (Shard(2),))
    # dp x tp: batch on dp, vocab on tp
    ins, out = _decide(emb, ((10, 8), (R, Shard(0))), idx(Shard(0), R), mesh_shape=(2, 2))
    assert ins == [(R, Shard(0)), (Shard(0), R)] and out == (Shard(0), Partial())
    grad = lambda *p: ((4, 6, 8), p)  # noqa: E731
    assert _decide(bwd, grad(R), idx(R), 10, -1, False) == ([(R,), (R,)], (Shard(0),))
    assert _decide(bwd, grad(Shard(0)), idx(Shard(0)), 10, -1, False) == ([(Shard(0),), (Shard(0),)], (Partial(),))
    assert _decide(bwd, grad(Shard(2)), idx(R), 10, -1, False) == ([(Shard(2),), (R,)], (Shard(1),))
    # scale_grad_by_freq counts over all indices: they stay whole
    assert _decide(bwd, grad(Shard(0)), idx(Shard(0)), 10, -1, True) == ([(R,), (R,)], (Shard(0),))


# ---------------------------------------------------------------- forward and backward on ranks


def check_embedding(mesh_shape, vocab, dim, index_shape, w_p, i_p, padding_idx, scale_grad_by_freq, seed):
    mesh = init_device_mesh("cpu", mesh_shape)
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
    indices = torch.randint(0, vocab, index_shape, generator=g)
    dw = make_dtensor(weight, mesh, w_p, requires_grad=True)
    di = make_dtensor(indices, mesh, i_p)
    with comm_mode() as comm:
        assert_spmd_equal(F.embedding, di, dw, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq,
                          atol=1e-12, rtol=1e-12)
    fell_back = [op for op in comm.fallbacks if "embedding" in op]
    assert not fell_back, f"embedding ops fell back: {fell_back}"


@st.composite
def embedding_cases(draw, world_size):
    mesh_shape = draw(mesh_shapes(world_size))
    vocab, dim = draw(st.integers(1, 9)), draw(st.integers(1, 5))
    index_shape = draw(shapes(min_ndim=0, max_ndim=2, max_size=6))
    weight_placement = st.sampled_from([R, R, Shard(0), Shard(0), Shard(1), Partial("sum"), Partial("avg")])
    w_p = draw(st.tuples(*[weight_placement] * len(mesh_shape)))
    i_p = draw(placements_for(len(index_shape), len(mesh_shape)))
    padding_idx = draw(st.none() | st.integers(-vocab, vocab - 1))
    return mesh_shape, vocab, dim, index_shape, w_p, i_p, padding_idx, draw(st.booleans()), draw(st.integers(0, 2**16))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=35)
@given(data=st.data())
def test_embedding_matches_one_device(world_size, data):
    run_on_ranks(world_size, check_embedding, *data.draw(embedding_cases(world_size)))


def check_vocab_parallel(world_size, vocab):
    """Megatron's vocab-parallel embedding: no collective before the output is used, a Shard(0) gradient."""
    mesh = init_device_mesh("cpu", (world_size,))
    g = torch.Generator().manual_seed(0)
    weight, indices = torch.randn(vocab, 4, generator=g), torch.randint(0, vocab, (3, 5), generator=g)
    dw, di = make_dtensor(weight, mesh, [Shard(0)]), make_dtensor(indices, mesh, [R])
    with comm_mode() as comm:
        out = F.embedding(di, dw)
    assert comm.count() == 0 and out.placements == (Partial(),)
    torch.testing.assert_close(out.full_tensor(), F.embedding(indices, weight), atol=0, rtol=0)
    grad = torch.randn(3, 5, 4, generator=g)
    with comm_mode() as comm:
        grad_weight = aten.embedding_dense_backward(make_dtensor(grad, mesh, [R]), di, vocab, 2, False)
    assert comm.count() == 0 and grad_weight.placements == (Shard(0),)
    expected = aten.embedding_dense_backward(grad, indices, vocab, 2, False)
    torch.testing.assert_close(grad_weight.full_tensor(), expected, atol=0, rtol=0)
    # data parallel: a Replicate weight and batch-sharded indices give a Partial(sum) gradient, no collective
    with comm_mode() as comm:
        grad_weight = aten.embedding_dense_backward(make_dtensor(grad, mesh, [Shard(0)]),
                                                    make_dtensor(indices, mesh, [Shard(0)]), vocab, -1, False)
    assert comm.count() == 0 and grad_weight.placements == (Partial(),)
    expected = aten.embedding_dense_backward(grad, indices, vocab, -1, False)
    torch.testing.assert_close(grad_weight.full_tensor(), expected)


@pytest.mark.parametrize("vocab", [7, 2])  # 7 rows on 3 ranks: 3, 3, 1; 2 rows: one rank owns none
def test_vocab_parallel_collectives(vocab):
    run_on_ranks(3, check_vocab_parallel, 3, vocab)
