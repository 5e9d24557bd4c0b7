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


# -- zigzag: the load-balanced sequence placement (StridedShard(dim, outer, zigzag=True)) -------------------


def _zigzag_rows(size, n, r):
    """Reference: the rows rank r holds, from torch.chunk itself (missing trailing chunks are empty)."""
    chunks = list(torch.arange(size).chunk(2 * n)) if size else []
    chunks += [torch.arange(0)] * (2 * n - len(chunks))
    return torch.cat([chunks[r], chunks[2 * n - 1 - r]])


def check_zigzag_round_trip(n, shape, dim, seed):
    """distribute_tensor (from one rank or all), Shard <-> zigzag and zigzag -> Replicate: each rank holds
    exactly chunks r and 2n-1-r of the dim, full_tensor is the natural order, the spec knows the local shape;
    (B, T, D) views through (B*T, D) and an elementwise op keep it without any collective."""
    mesh = dtp.init_device_mesh("cpu", (n,))
    r = mesh.get_local_rank(0)
    zigzag = StridedShard(dim, 1, zigzag=True)
    whole = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    mine = whole.index_select(dim, _zigzag_rows(shape[dim], n, r))
    for src in (0, None):
        x = dtp.distribute_tensor(whole, mesh, [zigzag], src_data_rank=src)
        assert torch.equal(x.to_local(), mine) and x._spec.local_shape_and_offset()[0] == tuple(mine.shape)
        assert torch.equal(x.full_tensor(), whole)
    sharded = make_dtensor(whole, mesh, [Shard(dim)], requires_grad=True)
    with dtp.comm_mode() as comm:
        x = sharded.redistribute(placements=[zigzag])
    assert comm.count() == comm.count("all_gather") == 1 and torch.equal(x.to_local(), mine), comm
    assert torch.equal(x.redistribute(placements=[Shard(dim)]).to_local(), sharded.to_local())
    x.sum().backward()  # the gradient goes back to Shard(dim)
    assert sharded.grad.placements == (Shard(dim),) and torch.equal(sharded.grad.full_tensor(), torch.ones(shape))
    if dim == 1 and whole.numel():  # an empty tensor keeps its layout only through unchanged shapes
        b, t, d = shape
        with dtp.comm_mode() as comm:
            flat = x.reshape(b * t, d) * 2
            back = flat.view(b, t, d)
        if b > 1 and t > 1:  # size-1 dims are views' own groups: the placement may land on another of them
            assert comm.count() == 0 and flat.placements == (StridedShard(0, b, zigzag=True),), (comm, flat.placements)
            assert back.placements == (zigzag,)
        assert torch.equal(back.full_tensor(), whole * 2)
        assert torch.equal(flat.full_tensor(), whole.reshape(b * t, d) * 2)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 4), b=st.integers(1, 3), t=st.integers(0, 13), d=st.integers(1, 3), dim=st.sampled_from([0, 1]),
       seed=st.integers(0, 99))
def test_zigzag_round_trip(n, b, t, d, dim, seed):
    """Uneven lengths and empty chunks (t < 2n) included."""
    shape = (t, b, d) if dim == 0 else (b, t, d)
    run_on_ranks(n, check_zigzag_round_trip, n, shape, dim, seed)


def test_zigzag_placement_value():
    assert repr(StridedShard(1, 1, zigzag=True)) == "StridedShard(dim=1, outer=1, zigzag=True)"
    assert StridedShard(1, 1, zigzag=True) != StridedShard(1, 1)
    from dtensor_plus.layouts.annotation import format_layout
    assert format_layout([StridedShard(1, 1, zigzag=True)], ["cp"], ndim=3) == "d0 (zigzag d1(cp)) d2"
    assert format_layout([StridedShard(0, 4, zigzag=True)], ["cp"], ndim=1) == "(4 zigzag d0(cp))"
    with pytest.raises(TypeError, match="zigzag"):
        StridedShard(0, 1, zigzag=1)
