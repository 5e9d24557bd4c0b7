"""context_parallel(kind="ring"): sequence-sharded scaled-dot-product attention equals one device, forward and
backward (non-causal, causal, GQA, uneven and empty shards, cp = 2, 3, 4, composed with dp or tp heads on a 2-D
mesh), with exactly the ring's point-to-point traffic and no other collective."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import dtensor_plus
from dtensor_plus import Replicate, Shard, comm_mode, init_device_mesh
from dtensor_plus.placements import StridedShard
from dtensor_plus.layouts import context_parallel
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor


def _whole(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _sdpa(causal, gqa, scale=None):
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa, scale=scale)
    return fn


def _seq_lengths(size, n):
    """torch.chunk lengths of ``size`` over ``n`` ranks."""
    chunk = -(-size // n)
    return [max(0, min(chunk, size - i * chunk)) for i in range(n)]


def _kv_lengths(placement, size, n):
    """Each cp rank's sequence length under ``placement`` (Shard(2) or zigzag)."""
    if placement.is_strided_shard():
        return [placement.local_size(size, n, j) for j in range(n)]
    return _seq_lengths(size, n)


def _ring(mesh_shape, names, q_shape, kv_shape, q_placements, causal, seed, scale=None, only_ring=True):
    """Ring attention on the "cp" mesh dim vs one device; exact p2p counts and bytes (and, with ``only_ring``,
    no other collective: the other mesh dim stays local)."""
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    dtensor_plus.manual_seed(seed)  # the forward kernel is tagged random: a seed avoids a broadcast
    kv_placements = list(q_placements)
    q = make_dtensor(_whole(q_shape, seed), mesh, q_placements, requires_grad=True)
    k = make_dtensor(_whole(kv_shape, seed + 1), mesh, kv_placements, requires_grad=True)
    v = make_dtensor(_whole(kv_shape, seed + 2), mesh, kv_placements, requires_grad=True)
    fn = _sdpa(causal, q_shape[1] != kv_shape[1], scale)
    # Activations, as in a model: gradients w.r.t. non-leaves stay in the layout the ring ran on (a leaf's
    # would be moved to the leaf's own layout, traffic that is not the ring's).
    seen = [t.view_as(t) for t in (q, k, v)]
    with context_parallel(mesh_dim="cp", kind="ring"):
        with comm_mode() as forward:
            out = fn(*seen)
        with comm_mode() as backward:
            dq, dk, dv = torch.autograd.grad(out, seen, out.detach() * 0 + 1)  # grad_out placed like out
        assert_spmd_equal(fn, q, k, v)
    _check_ring_traffic(mesh, dk, forward, backward, only_ring)
    if only_ring:
        assert out.placements == tuple(q_placements) and dq.placements == tuple(q_placements), out.placements
        assert dk.placements == tuple(kv_placements), dk.placements


def _check_ring_traffic(mesh, dk, forward, backward, only_ring):
    """Forward: n-1 shifts of (k, v); backward: n-1 of (k, v) and n-1 of (dk, dv), exact bytes."""
    n, r = mesh.size("cp"), mesh.get_local_rank("cp")
    assert not forward.fallbacks and not backward.fallbacks
    assert forward.count("ring_shift", "cp") == n - 1, forward
    assert backward.count("ring_shift", "cp") == 2 * (n - 1), backward
    if only_ring:
        assert forward.count() == n - 1 and backward.count() == 2 * (n - 1), (forward, backward)
    row_shape = list(dk._spec.local_shape_and_offset()[0])  # the layout the ring ran on
    row_shape[2] = 1  # one sequence position of this rank's k block
    row_bytes = torch.Size(row_shape).numel() * dk.element_size()
    lengths = _kv_lengths(dk.placements[mesh.mesh_dim_index("cp")], dk.shape[2], n)
    sent_kv = sum(lengths[(r - step) % n] for step in range(n - 1)) * 2 * row_bytes  # k and v
    sent_grads = sum(lengths[(r - step) % n] for step in range(1, n)) * 2 * row_bytes
    assert forward.bytes("ring_shift", "cp") == sent_kv, (forward, sent_kv)
    assert backward.bytes("ring_shift", "cp") == sent_kv + sent_grads, (backward, sent_kv + sent_grads)


@pytest.mark.parametrize("cp", [2, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_ring_equals_one_device(cp, causal):
    run_on_ranks(cp, _ring, (cp,), ("cp",), (2, 3, 11, 4), (2, 3, 11, 4), [Shard(2)], causal, cp)


_MESHES = [  # (mesh shape, names, placement on the non-cp mesh dim or None)
    ((2,), ("cp",), None), ((3,), ("cp",), None), ((4,), ("cp",), None),
    ((2, 2), ("dp", "cp"), Shard(0)), ((2, 2), ("tp", "cp"), Shard(1)),
]


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_ring_shapes(data):
    """Batch, heads (GQA groups), lengths (empty shards when below cp; cross-attention lengths when not
    causal), scale, and 1-D or 2-D meshes; uneven batch or head shards on the other mesh dim."""
    mesh_shape, names, other = data.draw(st.sampled_from(_MESHES))
    b, h, d = (data.draw(st.integers(1, 3)) for _ in range(3))
    groups = data.draw(st.sampled_from([1, 1, 2]))  # GQA: q heads per k/v head
    t = data.draw(st.integers(1, 9))
    causal = data.draw(st.booleans())
    s = t if causal else data.draw(st.integers(1, 9))
    scale = data.draw(st.sampled_from([None, 0.3]))
    placements = [Shard(2)] if other is None else [other, Shard(2)]
    # GQA heads that do not split evenly over tp are gathered on tp (ops/attention.py), exactly
    heads_split = other != Shard(1) or groups == 1 or h % 2 == 0
    run_on_ranks(math.prod(mesh_shape), _ring, mesh_shape, names, (b, h * groups, t, d), (b, h, s, d), placements,
                 causal, data.draw(st.integers(0, 999)), scale, heads_split)


@pytest.mark.parametrize("other", ["dp", "tp"])
@pytest.mark.parametrize("causal", [False, True])
def test_ring_composes_on_2d_mesh(other, causal):
    """dp shards the batch, tp the heads (GQA included): both stay local; the ring runs per cp group."""
    placement = Shard(0) if other == "dp" else Shard(1)
    run_on_ranks(4, _ring, (2, 2), (other, "cp"), (2, 4, 7, 3), (2, 2, 7, 3), [placement, Shard(2)], causal, 5)


def _unsharded_keeps_default():
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
    dtensor_plus.manual_seed(0)
    q = make_dtensor(_whole((2, 2, 5, 3), 0), mesh, [Shard(0)], requires_grad=True)
    with context_parallel(mesh_dim="cp"):
        with comm_mode() as comm:
            _sdpa(True, False)(q, q, q).sum().backward()
        assert_spmd_equal(_sdpa(True, False), q, q, q)
    assert comm.count() == 0, comm  # batch-sharded: local, as outside the block


def test_other_layouts_keep_the_default_rule():
    run_on_ranks(2, _unsharded_keeps_default)


def _causal_cross_lengths_and_strict_mode():
    """Causal with T != S keeps the default (gathered) rule; strict RNG mode keeps the ring: both exact."""
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
    dtensor_plus.manual_seed(0)
    q = make_dtensor(_whole((1, 2, 3, 4), 0), mesh, [Shard(2)], requires_grad=True)
    kv = make_dtensor(_whole((1, 2, 5, 4), 1), mesh, [Shard(2)], requires_grad=True)
    with context_parallel(mesh_dim=0):
        with comm_mode() as comm:
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True)
        assert comm.count("ring_shift") == 0 and comm.count("all_gather") > 0, comm
        assert_spmd_equal(_sdpa(True, False), q, kv, kv)
        dtensor_plus.manual_seed(0, strict=True)
        try:  # at dropout_p == 0 the kernel draws nothing: strict mode still runs the ring
            with comm_mode() as comm:
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            assert comm.count() == comm.count("ring_shift") == 1, comm
            assert_spmd_equal(_sdpa(True, False), q, q, q)
        finally:
            dtensor_plus.manual_seed(0)  # leave the pool's rank in default mode for later tests


def test_causal_cross_lengths_and_strict_mode():
    run_on_ranks(2, _causal_cross_lengths_and_strict_mode)


def _ring_shift_uneven_async():
    """point_to_point.ring_shift: next rank receives, sizes may differ (empty too), two shifts in flight at once."""
    from dtensor_plus import point_to_point
    mesh = init_device_mesh("cpu", (3,), mesh_dim_names=("cp",))
    r = mesh.get_local_rank("cp")
    mine = [torch.full((r,), float(r)), torch.full((2, r), -float(r))]  # rank r holds r elements: rank 0 none
    prev = (r - 1) % 3
    with comm_mode() as comm:
        first = point_to_point.ring_shift(mine, mesh, "cp", recv_shapes=[(prev,), (2, prev)], async_op=True)
        second = point_to_point.ring_shift(mine[:1], mesh, "cp", recv_shapes=[(prev,)], tag=2, async_op=True)
        got, again = first.wait(), second.wait()
    torch.testing.assert_close(got[0], torch.full((prev,), float(prev)))
    torch.testing.assert_close(got[1], torch.full((2, prev), -float(prev)))
    torch.testing.assert_close(again[0], got[0])
    assert comm.count("ring_shift", "cp") == 2 and comm.bytes("ring_shift", "cp") == 4 * (r + 2 * r + r), comm


def test_ring_shift():
    run_on_ranks(3, _ring_shift_uneven_async)


def _bad_mesh_dim():
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    dtensor_plus.manual_seed(0)
    q = make_dtensor(_whole((1, 1, 4, 2), 0), mesh, [Shard(2)])
    with pytest.raises(ValueError, match="'cp'"):
        with context_parallel(mesh_dim="cp"):
            F.scaled_dot_product_attention(q, q, q)


def test_unknown_mesh_dim_names_it():
    run_on_ranks(2, _bad_mesh_dim)


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        with context_parallel(kind="tree"):
            pass
    with pytest.raises(TypeError, match="mesh_dim"):
        with context_parallel(mesh_dim=1.5):
            pass


def _attention_block(x, w_qkv, w_out, heads):
    """(B, T, C) -> (B, T, C): projections, heads split by views, causal SDPA, heads merged."""
    b, t, c = x.shape
    q, k, v = (x @ w_qkv).split(c, dim=-1)
    q, k, v = (y.view(b, t, heads, c // heads).transpose(1, 2) for y in (q, k, v))  # (B, H, T, D)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(b, t, c) @ w_out


def _sequence_sharded_block(cp, dtype):
    """A whole attention block on activations sharded on the sequence: the views keep the sequence sharded
    and the ring is the only communication in forward."""
    mesh = init_device_mesh("cpu", (cp,), mesh_dim_names=("cp",))
    dtensor_plus.manual_seed(0)
    x = make_dtensor(_whole((2, 10, 8), 0, dtype), mesh, [Shard(1)], requires_grad=True)
    w_qkv = make_dtensor(_whole((8, 24), 1, dtype), mesh, [Replicate()], requires_grad=True)
    w_out = make_dtensor(_whole((8, 8), 2, dtype), mesh, [Replicate()], requires_grad=True)
    with context_parallel(mesh_dim="cp"):
        with comm_mode() as comm:
            y = _attention_block(x, w_qkv, w_out, 2)
        assert comm.count() == comm.count("ring_shift", "cp") == cp - 1 and not comm.fallbacks, comm
        assert y.placements == (Shard(1),), y.placements
        assert_spmd_equal(lambda *a: _attention_block(*a, 2), x, w_qkv, w_out)


@pytest.mark.parametrize("cp", [2, 3])
def test_sequence_sharded_attention_block(cp):
    run_on_ranks(cp, _sequence_sharded_block, cp, torch.float64)


def _ulysses_by_name():
    """kind="ulysses" (ops/ulysses_attention.py) selected by mesh dim name on a 2-D mesh: exact."""
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "cp"))
    dtensor_plus.manual_seed(0)
    q = make_dtensor(_whole((1, 4, 6, 3), 0), mesh, [Replicate(), Shard(2)], requires_grad=True)
    with context_parallel(mesh_dim="cp", kind="ulysses"):
        with comm_mode() as comm:
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
        assert comm.count("all_to_all", "cp") > 0 and comm.count("all_gather") == 0, comm
        assert_spmd_equal(_sdpa(True, False), q, q, q)


def test_ulysses_selected_by_name():
    pytest.importorskip("dtensor_plus.ops.ulysses_attention")
    run_on_ranks(2, _ulysses_by_name)


def _bf16_and_negative_dim():
    """bf16 q/k/v (accumulators in fp32: within bf16 rounding of one device) placed as Shard(-2)."""
    mesh = init_device_mesh("cpu", (3,), mesh_dim_names=("cp",))
    dtensor_plus.manual_seed(0)
    q, k, v = (make_dtensor(_whole((2, 2, 8, 16), i, torch.bfloat16), mesh, [Shard(-2)], requires_grad=True)
               for i in range(3))
    with context_parallel(mesh_dim="cp"):
        with comm_mode() as comm:
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert comm.count() == comm.count("ring_shift") == 2, comm
        assert_spmd_equal(_sdpa(True, False), q, k, v, atol=2e-2, rtol=2e-2)


def test_bf16_and_negative_dim():
    run_on_ranks(3, _bf16_and_negative_dim)


def _block_reentry_replans_nothing():
    """Entering the block again gives the same rule set: every plan comes from the cache."""
    from dtensor_plus import dispatch
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
    dtensor_plus.manual_seed(0)
    q = make_dtensor(_whole((1, 2, 6, 4), 0), mesh, [Shard(2)], requires_grad=True)
    misses = []
    for _ in range(2):
        q.grad = None  # an existing grad would add an accumulation op on the second pass
        before = dispatch.cache_info()["misses"]
        with context_parallel(mesh_dim="cp"):
            F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
        misses.append(dispatch.cache_info()["misses"] - before)
    assert misses[0] > 0 and misses[1] == 0, misses


def test_block_reentry_replans_nothing():
    run_on_ranks(2, _block_reentry_replans_nothing)


# -- load balancing: the zigzag placement -------------------------------------------------------------------

ZIGZAG = StridedShard(2, 1, zigzag=True)


@pytest.mark.parametrize("cp,seq", [(2, 11), (3, 13), (4, 11), (4, 5)])
@pytest.mark.parametrize("causal", [False, True])
def test_zigzag_ring_equals_one_device(cp, seq, causal):
    """q, k, v zigzag on cp (uneven lengths; seq 5 on cp 4 leaves empty pieces): outputs and grads equal one
    device, stay zigzag, and the ring moves exactly the zigzag blocks (n-1 shifts, no other collective)."""
    run_on_ranks(cp, _ring, (cp,), ("cp",), (2, 3, seq, 4), (2, 3, seq, 4), [ZIGZAG], causal, cp)


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_zigzag_ring_shapes(data):
    """As test_ring_shapes, zigzag on cp: GQA, scale, lengths below 2*cp, dp or tp beside it."""
    mesh_shape, names, other = data.draw(st.sampled_from(_MESHES))
    b, h, d = (data.draw(st.integers(1, 3)) for _ in range(3))
    groups = data.draw(st.sampled_from([1, 2]))
    t = data.draw(st.integers(1, 10))
    causal = data.draw(st.booleans())
    s = t if causal else data.draw(st.integers(1, 10))
    placements = [ZIGZAG] if other is None else [other, ZIGZAG]
    heads_split = other != Shard(1) or groups == 1 or h % 2 == 0
    run_on_ranks(math.prod(mesh_shape), _ring, mesh_shape, names, (b, h * groups, t, d), (b, h, s, d), placements,
                 causal, data.draw(st.integers(0, 999)), data.draw(st.sampled_from([None, 0.3])), heads_split)


def _count_work(cp, seq, zigzag):
    """Per rank: the (q, kv) block pairs the kernels compute in forward and backward, and the attention
    scores they cover (a full pair q*kv, a causal diagonal q*(q+1)/2), counted at the kernel calls."""
    from dtensor_plus.ops import ring_attention
    mesh = init_device_mesh("cpu", (cp,), mesh_dim_names=("cp",))
    dtensor_plus.manual_seed(0)
    placement = ZIGZAG if zigzag else Shard(2)
    q, k, v = (make_dtensor(_whole((1, 2, seq, 4), i), mesh, [placement], requires_grad=True) for i in range(3))
    counts = {"forward": 0, "backward": 0, "scores": 0}
    forward, backward = ring_attention._FORWARD, ring_attention._BACKWARD

    def counting(kernel, name):
        def call(*args, **kwargs):
            query, key = args[1:3] if name == "backward" else args[:2]
            if query.device.type != "meta":
                causal = args[7] if name == "backward" else args[4]
                counts[name] += 1
                if name == "forward":
                    t, s = query.shape[2], key.shape[2]
                    counts["scores"] += t * (t + 1) // 2 if causal else t * s
            return kernel(*args, **kwargs)
        return call

    with context_parallel(mesh_dim="cp"):
        ring_attention._FORWARD, ring_attention._BACKWARD = counting(forward, "forward"), counting(backward, "backward")
        try:
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        finally:
            ring_attention._FORWARD, ring_attention._BACKWARD = forward, backward
    return counts


def _piece_pairs(cp, seq, zigzag):
    """Per rank: the (q piece, kv piece) pairs the ring geometry computes over all steps."""
    from dtensor_plus.ops.ring_attention import RingGeometry
    mesh = init_device_mesh("cpu", (cp,), mesh_dim_names=("cp",))
    ring = RingGeometry(mesh, 0, seq, seq, True, zigzag)
    return sum(len(ring.piece_pairs(step)) for step in range(cp))


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_zigzag_gives_every_rank_equal_work(cp):
    """Causal, seq a multiple of 2*cp. Zigzag: every rank computes 2*cp + 1 chunk pairs (two diagonals and one
    full pair at step 0, two full pairs per later step, run as one kernel call: cp + 2 calls each way) and the
    same number of attention scores. Plain blocks: rank r computes r+1 pairs (the last cp times the first)."""
    seq = 8 * cp
    assert run_on_ranks(cp, _piece_pairs, cp, seq, True) == [2 * cp + 1] * cp
    assert run_on_ranks(cp, _piece_pairs, cp, seq, False) == list(range(1, cp + 1))
    zigzag = run_on_ranks(cp, _count_work, cp, seq, True)
    assert all(c == {"forward": cp + 2, "backward": cp + 2, "scores": zigzag[0]["scores"]} for c in zigzag), zigzag
    assert sum(c["scores"] for c in zigzag) == seq * (seq + 1) // 2  # the causal triangle, each score once
    plain = run_on_ranks(cp, _count_work, cp, seq, False)
    assert [c["forward"] for c in plain] == list(range(1, cp + 1)), plain


def _load_balance_moves_shards():
    """load_balance=True: causal Shard(2) inputs are moved to zigzag (one all-gather each), the output is
    zigzag and equal to one device; non-causal calls keep Shard(2)."""
    mesh = init_device_mesh("cpu", (3,), mesh_dim_names=("cp",))
    dtensor_plus.manual_seed(0)
    q, k, v = (make_dtensor(_whole((1, 2, 10, 4), i), mesh, [Shard(2)], requires_grad=True) for i in range(3))
    with context_parallel(mesh_dim="cp", load_balance=True):
        with comm_mode() as comm:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert out.placements == (ZIGZAG,) and comm.count("all_gather", "cp") == 3, (out.placements, comm)
        assert comm.count("ring_shift", "cp") == 2 and not comm.fallbacks, comm
        assert F.scaled_dot_product_attention(q, k, v).placements == (Shard(2),)
        assert_spmd_equal(_sdpa(True, False), q, k, v)


def test_load_balance_moves_shards():
    run_on_ranks(3, _load_balance_moves_shards)
    with pytest.raises(ValueError, match="load_balance"):
        with context_parallel(kind="ulysses", load_balance=True):
            pass


def _linear_block(x, w_qkv, w_out, heads):
    """(B, T, C) -> (B, T, C) as a GPT writes it: F.linear (which folds (B, T) into rows), heads split by
    view + transpose, causal SDPA, heads merged, output projection."""
    b, t, c = x.shape
    q, k, v = F.linear(x, w_qkv).split(c, dim=-1)
    q, k, v = (y.view(b, t, heads, c // heads).transpose(1, 2) for y in (q, k, v))  # (B, H, T, D)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.linear(y.transpose(1, 2).reshape(b, t, c), w_out)


def _zigzag_gpt_block(cp, block):
    """A zigzag (B, T, D) activation through the whole attention block: no gather anywhere, forward or
    backward; the ring's shifts are the only communication of the forward; output zigzag, equal to one device."""
    mesh = init_device_mesh("cpu", (cp,), mesh_dim_names=("cp",))
    dtensor_plus.manual_seed(0)
    x = make_dtensor(_whole((2, 13, 8), 0, torch.float64), mesh, [StridedShard(1, 1, zigzag=True)], requires_grad=True)
    w_qkv = make_dtensor(_whole((24, 8) if block is _linear_block else (8, 24), 1, torch.float64), mesh, [Replicate()],
                         requires_grad=True)
    w_out = make_dtensor(_whole((8, 8), 2, torch.float64), mesh, [Replicate()], requires_grad=True)
    with context_parallel(mesh_dim="cp", load_balance=True):
        with comm_mode() as comm:
            y = block(x, w_qkv, w_out, 2)
        assert comm.count() == comm.count("ring_shift", "cp") == cp - 1 and not comm.fallbacks, comm
        assert y.placements == (StridedShard(1, 1, zigzag=True),), y.placements
        grad = y.detach() * 0 + 1  # a zigzag gradient (a full sum() gathers: reductions read no StridedShard)
        with comm_mode() as comm:
            y.backward(grad)
        assert comm.count("all_gather") == 0 and comm.count("ring_shift", "cp") == 2 * (cp - 1), comm
        assert x.grad.placements == (StridedShard(1, 1, zigzag=True),), x.grad.placements
        assert_spmd_equal(lambda *a: block(*a, 2), x, w_qkv, w_out)


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("block", ["linear", "matmul"])
def test_zigzag_attention_block_never_gathers(cp, block):
    run_on_ranks(cp, _zigzag_gpt_block, cp, _linear_block if block == "linear" else _attention_block)
