"""USP (unified sequence parallelism, Fang & Zhao 2024): ``context_parallel(("ring", "ulysses"), kind="usp")`` on a
2 x 2 context mesh equals one device (outputs, q/k/v gradients; causal and not; GQA; lengths and head counts
the mesh does not divide), with exactly USP's traffic: 4 all-to-alls forward and 8 backward on the Ulysses
mesh dim (the rule path; the padded all-to-all bytes), and the ring's n-1 / 2(n-1) shifts of the head-split
k/v blocks on the ring mesh dim. A whole attention block on a (B, T, C) activation sequence-sharded on both
mesh dims runs it with nothing else moving forward. Bad arguments raise naming the fix."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import dtensor_plus
from dtensor_plus import Replicate, Shard, comm_mode, init_device_mesh
from dtensor_plus.layouts import context_parallel
from dtensor_plus.placements import chunk_bounds
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor

SEQ_SEQ = [Shard(2), Shard(2)]  # the sequence split on the ring mesh dim, each block split again on Ulysses'


def _whole(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _usp_bytes(shape_q, kv_heads, mesh):
    """Per rank: USP's forward all-to-alls (q, k, v in, out back on Ulysses' dim, each u-1 padded pieces of
    this ring block); the ring's shifts of (k, v) blocks (this rank's kv heads, whole ring blocks) forward,
    and backward those again plus the (dk, dv) accumulators (the blocks of steps 1..n-1)."""
    b, heads, seq, d = shape_q
    n, u = mesh.size("ring"), mesh.size("ulysses")
    ring_rank, ulysses_rank = mesh.get_local_rank("ring"), mesh.get_local_rank("ulysses")
    block = chunk_bounds(seq, n, ring_rank)[1]
    piece = b * -(-block // u) * d * 4
    all_to_all = (u - 1) * piece * (2 * -(-heads // u) + 2 * -(-kv_heads // u))
    local_kv_heads = chunk_bounds(kv_heads, u, ulysses_rank)[1]
    row_bytes = 2 * b * local_kv_heads * d * 4  # one sequence position of k and v
    kv = sum(chunk_bounds(seq, n, (ring_rank - step) % n)[1] for step in range(n - 1)) * row_bytes
    grads = sum(chunk_bounds(seq, n, (ring_rank - step) % n)[1] for step in range(1, n)) * row_bytes
    return all_to_all, kv, kv + grads


def _usp(q_shape, kv_heads, causal, seed):
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
    dtensor_plus.manual_seed(seed)
    kv_shape = (q_shape[0], kv_heads) + tuple(q_shape[2:])
    q, k, v = (make_dtensor(_whole(shape, seed + i), mesh, SEQ_SEQ, requires_grad=True)
               for i, shape in enumerate((q_shape, kv_shape, kv_shape)))

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=kv_heads != q_shape[1])

    seen = [t.view_as(t) for t in (q, k, v)]
    with context_parallel(("ring", "ulysses"), kind="usp"):
        with comm_mode() as forward:
            out = fn(*seen)
        with comm_mode() as backward:
            dq, dk, dv = torch.autograd.grad(out, seen, out.detach() * 0 + 1)
        assert_spmd_equal(fn, q, k, v)
    assert out.placements == dq.placements == dk.placements == tuple(SEQ_SEQ), (out.placements, dk.placements)
    all_to_all, ring, ring_backward = _usp_bytes(q_shape, kv_heads, mesh)
    assert forward.count() == 5 and not forward.fallbacks, forward
    assert forward.count("all_to_all", "ulysses") == 4 and forward.count("ring_shift", "ring") == 1, forward
    assert forward.bytes("all_to_all", "ulysses") == all_to_all and forward.bytes("ring_shift", "ring") == ring
    # the rule path moves q, k, v, out and grad_out again in backward (ops/ulysses_attention.py says why)
    assert backward.count() == 10 and backward.count("all_to_all", "ulysses") == 8, backward
    assert backward.count("ring_shift", "ring") == 2 and backward.bytes("ring_shift", "ring") == ring_backward


@pytest.mark.parametrize("q_shape, kv_heads, causal", [
    ((2, 4, 8, 4), 2, True),     # GQA, everything divides
    ((1, 3, 7, 4), 3, False),    # 3 heads on 2 Ulysses ranks, 7 tokens on 2 x 2
    ((2, 4, 5, 2), 2, True),     # GQA, 5 tokens: ring blocks 3 and 2, split again 2+1 and 1+1
])
def test_usp_equals_one_device(q_shape, kv_heads, causal):
    run_on_ranks(4, _usp, q_shape, kv_heads, causal, 3)


def _usp_attention_block_and_fallbacks():
    """(B, T, C) sequence-sharded on both mesh dims through projections, head views, causal USP attention and
    the output projection: one device's output and every gradient; only USP's collectives in forward. A mesh
    whose Ulysses dim is outer, or kv heads Ulysses cannot split, fall back to gathering, exact, with a warning."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
    dtensor_plus.manual_seed(0)
    x = make_dtensor(_whole((2, 7, 8), 0, torch.float64), mesh, [Shard(1), Shard(1)], requires_grad=True)
    w_qkv, w_out = (make_dtensor(_whole(shape, i + 1, torch.float64), mesh, [Replicate(), Replicate()],
                                 requires_grad=True) for i, shape in enumerate(((8, 24), (8, 8))))

    def block(x, w_qkv, w_out):
        b, t, c = x.shape
        q, k, v = (x @ w_qkv).split(c, dim=-1)  # the matmul folds (B, T) into rows: no gather (view_algebra)
        q, k, v = (y.view(b, t, 2, c // 2).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(b, t, c) @ w_out

    with context_parallel(("ring", "ulysses"), kind="usp"):
        with comm_mode() as comm:
            y = block(x, w_qkv, w_out)
        assert comm.count() == 5 and comm.count("ring_shift", "ring") == 1 and not comm.fallbacks, comm
        assert y.placements == (Shard(1), Shard(1)), y.placements
        assert_spmd_equal(block, x, w_qkv, w_out)
    q = make_dtensor(_whole((1, 4, 6, 2), 0), mesh, SEQ_SEQ, requires_grad=True)
    kv = make_dtensor(_whole((1, 1, 6, 2), 1), mesh, SEQ_SEQ, requires_grad=True)
    for dims, k in ((("ulysses", "ring"), q), (("ring", "ulysses"), kv)):  # Ulysses outer; one kv head on 2
        with context_parallel(dims, kind="usp"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert_spmd_equal(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                              enable_gqa=True), q, k, k)
        assert any("gathering the sequence instead" in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_usp_attention_block_and_fallbacks():
    run_on_ranks(4, _usp_attention_block_and_fallbacks)


def test_usp_bad_arguments():
    with pytest.raises(TypeError, match="mesh_dim=\\(ring mesh dim, ulysses mesh dim\\)"):
        with context_parallel("cp", kind="usp"):
            pass
    with pytest.raises(TypeError, match="kind='usp'"):
        with context_parallel(("ring", "ulysses"), kind="ring"):
            pass
    with pytest.raises(ValueError, match="load_balance"):
        with context_parallel(("ring", "ulysses"), kind="usp", load_balance="zigzag"):
            pass
