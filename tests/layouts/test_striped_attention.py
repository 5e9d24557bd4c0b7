"""Striped attention (Brandon et al. 2023): the second load balancer of the causal ring, token t on rank t mod n
(``striped_placement``). Equal to one device, forward and backward (causal and not, GQA, one token per rank,
cp 2..4, beside dp or tp), with exactly the ring's traffic; per-rank work as the paper counts it (every rank
within n-1 rows of scores of the others, the causal triangle covered once); lengths n does not divide raise
naming the fix; a whole attention block on a striped activation never gathers."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import dtensor_plus
from dtensor_plus import Replicate, Shard, comm_mode, init_device_mesh
from dtensor_plus.layouts import context_parallel
from dtensor_plus.layouts import striped_placement
from dtensor_plus.ops.ring_attention import RingGeometry
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor


def _whole(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _sdpa(causal, gqa):
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return fn


def _striped_ring(mesh_shape, names, q_shape, kv_heads, other, causal, seed):
    """Striped q, k, v on "cp" (another mesh dim sharding batch or heads, or none): one device's outputs and
    q/k/v gradients; n-1 shifts forward, 2(n-1) backward, each of this rank's T/n-row k/v blocks."""
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    n, seq = mesh.size("cp"), q_shape[2]
    placements = [striped_placement(2, seq, n)] if other is None else [other, striped_placement(2, seq, n)]
    dtensor_plus.manual_seed(seed)
    kv_shape = (q_shape[0], kv_heads) + tuple(q_shape[2:])
    q, k, v = (make_dtensor(_whole(shape, seed + i), mesh, placements, requires_grad=True)
               for i, shape in enumerate((q_shape, kv_shape, kv_shape)))
    fn = _sdpa(causal, kv_heads != q_shape[1])
    seen = [t.view_as(t) for t in (q, k, v)]  # activations: their gradients stay striped
    with context_parallel(mesh_dim="cp"):
        with comm_mode() as forward:
            out = fn(*seen)
        with comm_mode() as backward:
            dq, dk, _ = torch.autograd.grad(out, seen, out.detach() * 0 + 1)
        assert_spmd_equal(fn, q, k, v)
    assert out.placements == dq.placements == dk.placements == tuple(placements), (out.placements, dk.placements)
    block_bytes = 2 * dk.to_local().numel() * dk.element_size()  # k and v: every rank's block is T/n rows
    assert forward.count() == forward.count("ring_shift", "cp") == n - 1, forward
    assert backward.count() == backward.count("ring_shift", "cp") == 2 * (n - 1), backward
    assert forward.bytes() == (n - 1) * block_bytes and backward.bytes() == 2 * (n - 1) * block_bytes


@pytest.mark.parametrize("cp, seq", [(2, 6), (3, 3), (4, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_striped_ring_equals_one_device(cp, seq, causal):
    """seq 3 on cp 3: one token per rank (the shifted diagonal is empty); GQA, 3 q heads per kv head."""
    run_on_ranks(cp, _striped_ring, (cp,), ("cp",), (2, 3, seq, 4), 1, None, causal, cp)


_MESHES = [((2,), ("cp",), None), ((3,), ("cp",), None), ((2, 2), ("dp", "cp"), Shard(0)),
           ((2, 2), ("tp", "cp"), Shard(1))]


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_striped_ring_shapes(data):
    """Batch, heads and GQA groups, T/n (1..3 tokens per rank), causal or not, dp or tp beside cp."""
    mesh_shape, names, other = data.draw(st.sampled_from(_MESHES))
    kv_heads = data.draw(st.integers(1, 2)) * (2 if other == Shard(1) else 1)  # tp splits kv heads evenly
    groups = data.draw(st.sampled_from([1, 2]))
    n = mesh_shape[-1]
    q_shape = (data.draw(st.integers(1, 3)), kv_heads * groups, n * data.draw(st.integers(1, 3)), 2)
    run_on_ranks(math.prod(mesh_shape), _striped_ring, mesh_shape, names, q_shape, kv_heads, other,
                 data.draw(st.booleans()), data.draw(st.integers(0, 999)))


def _scores(pairs, causal=True):
    """Attention scores a list of (q rows, kv rows, kind) computes: a full pair q x kv, a causal one q(q+1)/2."""
    total = 0
    for q_rows, kv_rows, kind in pairs:
        t, s = q_rows.stop - q_rows.start, kv_rows.stop - kv_rows.start
        total += t * (t + 1) // 2 if kind == "diagonal" else t * s
    return total


@pytest.mark.parametrize("n, tokens_per_rank", [(2, 4), (4, 8), (8, 16)])
def test_striped_work_per_rank(n, tokens_per_rank):
    """The paper's balance, from the geometry the kernels run: rank i computes (i+1) causal diagonals of T/n
    rows and n-1-i shifted ones of T/n - 1 rows, one kernel call per step; together the causal triangle once.
    Plain blocks: the last rank n times the first rank's blocks."""
    seq = n * tokens_per_rank
    length = tokens_per_rank

    class Mesh:  # RingGeometry asks the mesh only its size and this rank's index
        def __init__(self, index):
            self.index = index

        def size(self, mesh_dim):
            return n

        def get_local_rank(self, mesh_dim):
            return self.index

    work = []
    for rank in range(n):
        ring = RingGeometry(Mesh(rank), 0, seq, seq, True, striped=True)
        assert all(len(ring.pairs(step)) == 1 for step in range(n))  # one kernel call per step
        work.append(sum(_scores(ring.pairs(step)) for step in range(n)))
    assert work == [(i + 1) * length * (length + 1) // 2 + (n - 1 - i) * length * (length - 1) // 2
                    for i in range(n)], work
    assert sum(work) == seq * (seq + 1) // 2 and max(work) - min(work) == (n - 1) * length
    plain = [sum(_scores(RingGeometry(Mesh(rank), 0, seq, seq, True).pairs(step)) for step in range(n))
             for rank in range(n)]
    assert max(plain) / min(plain) >= n and max(work) / min(work) < 1 + 2 / length


def _load_balance_and_errors():
    """load_balance="striped" moves causal Shard(2) inputs (an all-gather each) and leaves non-causal calls
    alone; a length the ring does not divide raises naming the fix."""
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
    dtensor_plus.manual_seed(0)
    q, k, v = (make_dtensor(_whole((1, 2, 6, 4), i), mesh, [Shard(2)], requires_grad=True) for i in range(3))
    with context_parallel(mesh_dim="cp", load_balance="striped"):
        with comm_mode() as comm:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert out.placements == (striped_placement(2, 6, 2),), out.placements
        assert comm.count("all_gather", "cp") == 3 and comm.count("ring_shift", "cp") == 1, comm
        assert F.scaled_dot_product_attention(q, k, v).placements == (Shard(2),)
        assert_spmd_equal(_sdpa(True, False), q, k, v)
        odd = make_dtensor(_whole((1, 2, 5, 4), 0), mesh, [Shard(2)])
        with pytest.raises(ValueError, match="multiple of the ring's 2 ranks.*zigzag"):
            F.scaled_dot_product_attention(odd, odd, odd, is_causal=True)


def test_load_balance_striped_and_errors():
    run_on_ranks(2, _load_balance_and_errors)
    with pytest.raises(ValueError, match="load_balance"):
        with context_parallel(load_balance="stripes"):
            pass
    with pytest.raises(ValueError, match="positive multiple"):
        striped_placement(1, 7, 2)


def _striped_attention_block(cp):
    """A striped (B, T, C) activation through plain ``x @ W`` projections (a fold of (B, T) into rows and back:
    the view rules keep the stripes, ops/view_algebra._split_strided), head views, causal SDPA and the output
    projection: the ring's shifts are the only communication forward and backward; output and gradients striped."""
    mesh = init_device_mesh("cpu", (cp,), mesh_dim_names=("cp",))
    dtensor_plus.manual_seed(0)
    seq = 3 * cp
    x = make_dtensor(_whole((2, seq, 8), 0, torch.float64), mesh, [striped_placement(1, seq, cp)], requires_grad=True)
    w_qkv, w_out = (make_dtensor(_whole(shape, i + 1, torch.float64), mesh, [Replicate()], requires_grad=True)
                    for i, shape in enumerate(((8, 24), (8, 8))))

    def block(x, w_qkv, w_out):
        b, t, c = x.shape
        q, k, v = (x @ w_qkv).split(c, dim=-1)
        q, k, v = (y.view(b, t, 2, c // 2).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(b, t, c) @ w_out

    with context_parallel(mesh_dim="cp", load_balance="striped"):
        with comm_mode() as comm:
            y = block(x, w_qkv, w_out)
        assert comm.count() == comm.count("ring_shift", "cp") == cp - 1 and not comm.fallbacks, comm.by_op
        assert y.placements == (striped_placement(1, seq, cp),), y.placements
        with comm_mode() as comm:
            y.backward(y.detach() * 0 + 1)
        assert comm.count("all_gather") == 0 and comm.count("ring_shift", "cp") == 2 * (cp - 1), comm
        assert x.grad.placements == (striped_placement(1, seq, cp),), x.grad.placements
        assert_spmd_equal(block, x, w_qkv, w_out)


@pytest.mark.parametrize("cp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_striped_attention_block_never_gathers(cp):
    run_on_ranks(cp, _striped_attention_block, cp)
