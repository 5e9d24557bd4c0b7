"""LoongTrain's double ring (ops/double_ring_attention.py): ``context_parallel(("outer", "inner"),
kind="double_ring")`` equals one device, forward and backward (causal and not, GQA, lengths the mesh does
not divide, empty blocks), with exactly m(w-1) inner and m-1 outer shifts forward (twice each backward) and
their bytes; ``kind="loongtrain"`` adds Ulysses on a third mesh dim (8 ranks: slow). Bad layouts raise."""

import pytest
import torch
import torch.nn.functional as F

import dtensor_plus
from dtensor_plus import Shard, comm_mode, init_device_mesh
from dtensor_plus.layouts import context_parallel
from dtensor_plus.placements import chunk_bounds
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor


def _whole(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _block_length(seq, m, w, outer, inner):
    return chunk_bounds(chunk_bounds(seq, m, outer)[1], w, inner)[1]


def _shifted_rows(seq, m, w, o, i):
    """Sequence rows of the k/v blocks this rank sends: forward (inner, outer) and backward's (dk, dv)
    accumulators (inner, outer), as the double ring's rounds pass them."""
    inner_kv = sum(_block_length(seq, m, w, (o - r) % m, (i - step) % w) for r in range(m) for step in range(w - 1))
    inner_grads = sum(_block_length(seq, m, w, (o - r) % m, (i - step) % w) for r in range(m) for step in range(1, w))
    outer_kv = sum(_block_length(seq, m, w, (o - r) % m, i) for r in range(m - 1))
    outer_grads = sum(_block_length(seq, m, w, (o - r) % m, i) for r in range(1, m))
    return inner_kv, outer_kv, inner_grads, outer_grads


def _double_ring(mesh_shape, names, q_shape, kv_heads, causal, seed, kind="double_ring"):
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    dtensor_plus.manual_seed(seed)
    placements = [Shard(2)] * len(mesh_shape)
    kv_shape = (q_shape[0], kv_heads) + tuple(q_shape[2:])
    q, k, v = (make_dtensor(_whole(shape, seed + i), mesh, placements, requires_grad=True)
               for i, shape in enumerate((q_shape, kv_shape, kv_shape)))

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=kv_heads != q_shape[1])

    seen = [t.view_as(t) for t in (q, k, v)]
    with context_parallel(names, kind=kind):
        with comm_mode() as forward:
            out = fn(*seen)
        with comm_mode() as backward:
            dq, dk, _ = torch.autograd.grad(out, seen, out.detach() * 0 + 1)
        assert_spmd_equal(fn, q, k, v)
    assert out.placements == dq.placements == dk.placements == tuple(placements)
    m, w = mesh.size("outer"), mesh.size("inner")
    assert not forward.fallbacks and not backward.fallbacks
    assert forward.count("ring_shift", "inner") == m * (w - 1) and forward.count("ring_shift", "outer") == m - 1
    assert backward.count("ring_shift", "inner") == 2 * m * (w - 1), backward
    assert backward.count("ring_shift", "outer") == 2 * (m - 1), backward
    if kind == "double_ring":
        assert forward.count() == m * w - 1 and backward.count() == 2 * (m * w - 1), (forward, backward)
        row_bytes = 2 * q_shape[0] * kv_heads * q_shape[3] * 4  # one position of k and v, every head local
        inner_kv, outer_kv, inner_grads, outer_grads = _shifted_rows(
            q_shape[2], m, w, mesh.get_local_rank("outer"), mesh.get_local_rank("inner"))
        assert forward.bytes("ring_shift", "inner") == inner_kv * row_bytes, forward
        assert forward.bytes("ring_shift", "outer") == outer_kv * row_bytes, forward
        assert backward.bytes("ring_shift", "inner") == (inner_kv + inner_grads) * row_bytes, backward
        assert backward.bytes("ring_shift", "outer") == (outer_kv + outer_grads) * row_bytes, backward
    else:
        assert forward.count("all_to_all", "ulysses") == 4 and forward.count() == 4 + m * w - 1, forward


@pytest.mark.parametrize("q_shape, kv_heads, causal", [
    ((2, 4, 8, 4), 2, True),    # GQA, every block 2 rows
    ((1, 3, 7, 4), 3, True),    # uneven: outer chunks 4 and 3, inner blocks 2+2 and 2+1
    ((1, 2, 3, 4), 1, False),   # 3 rows on 4 ranks: an empty block; GQA
])
def test_double_ring_equals_one_device(q_shape, kv_heads, causal):
    run_on_ranks(4, _double_ring, (2, 2), ("outer", "inner"), q_shape, kv_heads, causal, 7)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(2, 4), (4, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_double_ring_on_8_ranks(mesh_shape, causal):
    run_on_ranks(8, _double_ring, mesh_shape, ("outer", "inner"), (1, 4, 11, 2), 2, causal, 3)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_loongtrain_head_context_attention(causal):
    """Double ring on (outer, inner) x Ulysses on the innermost mesh dim: 2 x 2 x 2."""
    run_on_ranks(8, _double_ring, (2, 2, 2), ("outer", "inner", "ulysses"), (1, 4, 13, 2), 2, causal, 5, "loongtrain")


def _wrong_order():
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("outer", "inner"))
    q = make_dtensor(_whole((1, 2, 4, 2), 0), mesh, [Shard(2), Shard(2)])
    with pytest.raises(ValueError, match="must come before the inner"):
        with context_parallel(("inner", "outer"), kind="double_ring"):
            F.scaled_dot_product_attention(q, q, q)


def test_bad_layouts_raise():
    run_on_ranks(4, _wrong_order)
    with pytest.raises(TypeError, match="outer mesh dim, inner mesh dim"):
        with context_parallel("cp", kind="double_ring"):
            pass
    with pytest.raises(TypeError, match="ulysses mesh dim"):
        with context_parallel(("a", "b"), kind="loongtrain"):
            pass
