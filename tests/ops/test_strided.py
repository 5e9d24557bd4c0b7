"""StridedShard: a Shard flattened behind unsharded dims stays sharded through views, batched matmuls,
permutes, elementwise ops and softmax, and every other op sees it gathered, so values are always right.

The case it exists for: matmul attention on (B, H, T, K) tensors with heads split on tp (and batch on dp)
runs forward and backward without a collective, as ``torch.matmul`` flattens (B, H) for ``bmm``.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Replicate, Shard
from dtensor_plus.placements import StridedShard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor


def matmul_attention(q, k, v):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return scores.softmax(-1) @ v


def check_attention(mesh_shape, B, H, T, K, seed):
    """Heads on the last mesh dim, batch on the first of a 2-d mesh: outputs and grads equal one device;
    no collective at all when dp cuts B evenly and there are heads to flatten (a size-1 H is dropped by the
    view, not flattened; both only cost a gather, never a wrong value)."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    placements = [Shard(1)] if len(mesh_shape) == 1 else [Shard(0), Shard(1)]
    gen = torch.Generator().manual_seed(seed)
    qkv = [make_dtensor(torch.randn(B, H, T, K, generator=gen), mesh, placements, requires_grad=True) for _ in range(3)]
    assert_spmd_equal(matmul_attention, *qkv)
    with dtp.comm_mode() as comm:
        out = matmul_attention(*qkv)
        torch.autograd.grad(out, qkv, torch.ones_like(out))
    assert not comm.fallbacks, comm.fallbacks
    if H > 1 and (len(mesh_shape) == 1 or B % mesh_shape[0] == 0):
        assert out.placements == tuple(placements)
        assert comm.count() == 0, comm


@pytest.mark.parametrize("mesh_shape", [(2,), (3,), (2, 2)])
@settings(max_examples=8, deadline=None)
@given(B=st.integers(1, 4), H=st.integers(1, 5), T=st.integers(1, 4), K=st.integers(1, 3), seed=st.integers(0, 99))
def test_matmul_attention_keeps_heads_sharded(mesh_shape, B, H, T, K, seed):
    run_on_ranks(math.prod(mesh_shape), check_attention, mesh_shape, B, H, T, K, seed)


def check_round_trip(shape, dim, seed):
    """Flattening the dims up to a sharded one gives a StridedShard whose full_tensor is the global view;
    ops without a StridedShard rule (cumsum along it, a slice) see it gathered and are right."""
    mesh = dtp.init_device_mesh("cpu", (3,))
    whole = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x = make_dtensor(whole, mesh, [Shard(dim)])
    flat = x.flatten(0, dim)
    assert flat.placements == (StridedShard(0, math.prod(shape[:dim])),)
    torch.testing.assert_close(flat.full_tensor(), whole.flatten(0, dim), rtol=0, atol=0)
    torch.testing.assert_close(flat.cumsum(0).full_tensor(), whole.flatten(0, dim).cumsum(0))
    torch.testing.assert_close(flat[1:].full_tensor(), whole.flatten(0, dim)[1:], rtol=0, atol=0)
    torch.testing.assert_close((flat * 2).view(shape).full_tensor(), whole * 2, rtol=0, atol=0)
    back = flat.redistribute(placements=[Replicate()]).redistribute(placements=[StridedShard(0, math.prod(shape[:dim]))])
    torch.testing.assert_close(back.view(shape).full_tensor(), whole, rtol=0, atol=0)
    assert back.view(shape).placements == (Shard(dim),)
    for src in (0, None):  # a StridedShard can be distributed directly, from one rank or from all
        made = dtp.distribute_tensor(whole.flatten(0, dim), mesh, [StridedShard(0, math.prod(shape[:dim]))], src_data_rank=src)
        torch.testing.assert_close(made.full_tensor(), whole.flatten(0, dim), rtol=0, atol=0)


@pytest.mark.parametrize("shape,dim", [((2, 5, 3), 1), ((3, 2, 4, 2), 2), ((1, 3, 7), 2)])
def test_strided_round_trip_and_gathered_ops(shape, dim):
    run_on_ranks(3, check_round_trip, shape, dim, 0)


def check_sequence_sharded_cross_entropy(mesh_shape, B, T, V, seed):
    """A GPT's loss under context parallelism: (B, T, V) logits with T sharded, flattened to (B*T, V) rows:
    cross-entropy reads the StridedShard rows in place (no gather of logits or targets), inside and outside
    loss_parallel, and on a (cp, tp) mesh with the vocabulary sharded too."""
    import torch.nn.functional as F

    from dtensor_plus.layouts import loss_parallel

    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    vocab = [Shard(2)] if len(mesh_shape) == 2 else []
    x = make_dtensor(logits, mesh, [Shard(1)] + vocab, requires_grad=True)
    t = make_dtensor(targets, mesh, [Shard(1)] + [Replicate()] * len(vocab))

    def loss(x, t):
        return F.cross_entropy(x.flatten(0, 1), t.flatten(0, 1))

    with loss_parallel():
        assert_spmd_equal(loss, x, t)
        with dtp.comm_mode() as comm:
            loss(x, t).backward()
    if not vocab:
        assert_spmd_equal(loss, x, t)
    assert comm.count("all_gather") == 0 and not comm.fallbacks, comm


@pytest.mark.parametrize("mesh_shape", [(2,), (2, 2)])
def test_sequence_sharded_cross_entropy(mesh_shape):
    run_on_ranks(math.prod(mesh_shape), check_sequence_sharded_cross_entropy, mesh_shape, 2, 6, 8, 0)
