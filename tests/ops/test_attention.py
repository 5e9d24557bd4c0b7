"""Scaled dot-product attention: batch- and head-sharded q, k, v (uneven and empty shards, GQA, masks, 1-D and
2-D meshes) equal one device, forward and backward, with no collective and no fallback; other layouts are
gathered where needed and still exact."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import dtensor_plus
from dtensor_plus import Partial, Replicate, Shard, comm_mode, init_device_mesh
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes

WORLD_SIZES = (2, 4)


def _whole(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _sdpa(causal, gqa, scale):
    def fn(q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa, scale=scale)
    return fn


def _attention(mesh_shape, shapes, placements, mask_shape, causal, seed, expect_local):
    mesh = init_device_mesh("cpu", mesh_shape)
    dtensor_plus.manual_seed(seed)  # the kernel is tagged random: without a seed, the first call broadcasts one
    (q_shape, kv_shape), (pq, pkv) = shapes, placements
    q = make_dtensor(_whole(q_shape, seed), mesh, pq, requires_grad=True)
    k = make_dtensor(_whole(kv_shape, seed + 1), mesh, pkv, requires_grad=True)
    v = make_dtensor(_whole(kv_shape, seed + 2), mesh, pkv, requires_grad=True)
    args = [q, k, v]
    if mask_shape is not None:
        batched = len(mask_shape) == 4 and mask_shape[0] > 1  # a (T, S) mask is replicated
        mask_placements = [Shard(0) if p == Shard(0) and batched else Replicate() for p in pq]
        args.append(make_dtensor(_whole(mask_shape, seed + 3), mesh, mask_placements))
    fn = _sdpa(causal, q_shape[1] != kv_shape[1], None if seed % 2 else 0.3)
    with comm_mode() as comm:
        out = fn(*args)
        out.sum().backward()
    assert not comm.fallbacks, comm
    if expect_local:
        assert comm.count() == 0, comm
        assert out.placements == tuple(pq), (out.placements, pq)
        assert q.grad.placements == tuple(pq) and k.grad.placements == tuple(pkv), (q.grad.placements, k.grad.placements)
    assert_spmd_equal(fn, *args)


@st.composite
def _case(draw, world_size):
    mesh_shape = draw(mesh_shapes(world_size))
    b, t, s, d = (draw(st.integers(1, 5)) for _ in range(4))
    groups = draw(st.sampled_from([1, 1, 2]))  # GQA: q heads per k/v head
    h_kv = draw(st.integers(1, 5))
    q_shape, kv_shape = (b, h_kv * groups, t, d), (b, h_kv, s if not draw(st.booleans()) else t, d)
    causal = draw(st.booleans()) and q_shape[2] == kv_shape[2]
    # Per mesh dim: batch, heads, or replicated; sharding a tensor dim on both mesh dims nests.
    modes = draw(st.lists(st.sampled_from([0, 1, None]), min_size=len(mesh_shape), max_size=len(mesh_shape)))
    head_shards = 1
    for n, m in zip(mesh_shape, modes):
        head_shards *= n if m == 1 else 1
    even_heads = groups == 1 or (q_shape[1] % head_shards == 0 and kv_shape[1] % head_shards == 0)
    pq = tuple(Replicate() if m is None else Shard(m) for m in modes)
    mask_shape = draw(st.sampled_from([None, None, (t, kv_shape[2]), (b, 1, t, kv_shape[2])]))
    if mask_shape is not None:
        causal = False  # torch refuses attn_mask together with is_causal
    return mesh_shape, (q_shape, kv_shape), (pq, pq), mask_shape, causal, even_heads


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=35, deadline=None)
@given(data=st.data())
def test_batch_and_head_sharded_attention(world_size, data):
    mesh_shape, shapes, placements, mask_shape, causal, even_heads = data.draw(_case(world_size))
    seed = data.draw(st.integers(0, 999))
    run_on_ranks(world_size, _attention, mesh_shape, shapes, placements, mask_shape, causal, seed, even_heads)


@pytest.mark.parametrize(
    "pq,pkv",
    [
        ((Shard(2),), (Shard(2),)),  # sequence sharded: gathered (context parallelism is another rule)
        ((Shard(3),), (Replicate(),)),  # head_dim sharded
        ((Partial(),), (Shard(0),)),  # Partial q is reduced; batch sharding of k/v is kept
        ((Replicate(),), (Shard(1),)),  # replicated q is sliced to follow k/v's heads
    ],
)
def test_other_layouts_are_exact(pq, pkv):
    run_on_ranks(2, _attention, (2,), ((3, 4, 5, 6), (3, 4, 5, 6)), (pq, pkv), None, True, 7, False)


def _gqa_uneven_heads_replicates():
    mesh = init_device_mesh("cpu", (2,))
    q = make_dtensor(_whole((2, 6, 4, 3), 0), mesh, [Shard(1)], requires_grad=True)
    k = make_dtensor(_whole((2, 3, 4, 3), 1), mesh, [Shard(1)], requires_grad=True)
    out = F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    assert out.placements == (Replicate(),), out.placements  # 3 k/v heads do not split in 2
    assert_spmd_equal(lambda a, b: F.scaled_dot_product_attention(a, b, b, enable_gqa=True), q, k)


def test_gqa_uneven_heads_replicates():
    run_on_ranks(2, _gqa_uneven_heads_replicates)


def _dropout_strict():
    mesh = init_device_mesh("cpu", (2,))
    whole = _whole((3, 2, 4, 5), 0)
    q = make_dtensor(whole, mesh, [Shard(0)], requires_grad=True)
    # dropout_p > 0 takes torch's math path on CPU (softmax + dropout ops), not the fused kernel.
    dtensor_plus.manual_seed(5, strict=True)
    try:
        out = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    finally:
        dtensor_plus.manual_seed(5)  # leave the rank's pool process in default mode for later tests
    torch.manual_seed(5)
    want = F.scaled_dot_product_attention(whole, whole, whole, dropout_p=0.5)
    torch.testing.assert_close(out.full_tensor(), want)


def test_dropout_matches_one_device_in_strict_mode():
    run_on_ranks(2, _dropout_strict)


def _no_dropout_strict():
    """The fused kernel is tagged random, but at dropout_p = 0 it draws nothing: strict mode must not gather
    its inputs (heads stay sharded, no collective)."""
    mesh = init_device_mesh("cpu", (2,))
    q = make_dtensor(_whole((2, 4, 3, 5), 1), mesh, [Shard(1)], requires_grad=True)
    dtensor_plus.manual_seed(5, strict=True)
    try:
        with comm_mode() as comm:
            out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    finally:
        dtensor_plus.manual_seed(5)
    return comm.count(), out.placements


def test_no_dropout_runs_sharded_in_strict_mode():
    assert run_on_ranks(2, _no_dropout_strict)[0] == (0, (Shard(1),))
