"""Ulysses attention (ops/ulysses_attention.py): sequence-sharded q, k, v equal one device, forward and
backward, for n = 2, 3, 4 ranks (uneven and empty head and sequence shards, causal, GQA, masks), with exactly
4 all-to-alls forward (q, k, v in; out back) and 8 backward, bytes equal to the all-to-all figure; composed
with dp (batch) and tp (heads) on a 2-D mesh; layouts it cannot serve fall back to gathering, exact.

Legend: B batch, H q heads, G q heads per kv head (GQA), T query length, S key length, D head dim,
n ranks on the sequence mesh dim.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import dtensor_plus
from dtensor_plus import Replicate, Shard, comm_mode, init_device_mesh, rules
from dtensor_plus.ops.ulysses_attention import ulysses_attention, ulysses_rules
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.rules import decide
from dtensor_plus.testing.strategies import make_dtensor

aten = torch.ops.aten
R = Replicate()
FORWARD = aten._scaled_dot_product_flash_attention_for_cpu.default
BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _whole(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # fp32: the 1e-5 oracle


def _sdpa(causal, gqa, mask=None):
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    return fn


def _qkv(mesh, q_shape, kv_shape, placements, seed):
    dtensor_plus.manual_seed(seed)  # the kernel is tagged random: without a seed, its first call broadcasts one
    return [make_dtensor(_whole(shape, seed + i), mesh, placements, requires_grad=True)
            for i, shape in enumerate((q_shape, kv_shape, kv_shape))]


def _step(fn, q, k, v, grad_seed=0):
    """Collectives of one forward and one backward with a sequence-sharded grad_out (as a real loss gives)."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    with comm_mode() as forward:
        out = fn(q, k, v)
    grad = make_dtensor(_whole(out.shape, grad_seed), out.device_mesh, out.placements)
    with comm_mode() as backward:
        out.backward(grad)
    return out, (q.grad, k.grad, v.grad), forward, backward


# ---------------------------------------------------------------- rules, no ranks


def test_rule_asks_for_heads_and_returns_sequences():
    q = ((2, 4, 6, 3), (Shard(2),))
    with rules.override_rule(ulysses_rules(0)):
        inputs, outputs = decide(FORWARD, q, q, q, 0.0, True, mesh_shape=(4,))
        assert inputs == [(Shard(1),)] * 3
        assert outputs == ((Shard(2),), (Shard(1),))  # out back to the sequence; logsumexp stays with the heads
        lse = ((2, 4, 6), (Shard(1),))
        inputs, outputs = decide(BACKWARD, q, q, q, q, q, lse, 0.0, True, mesh_shape=(4,))
        assert inputs == [(Shard(1),)] * 6 and outputs == ((Shard(2),),) * 3


def test_rule_composes_with_batch_and_outer_heads():
    with rules.override_rule(ulysses_rules(1)):
        dp = ((2, 4, 6, 3), (Shard(0), Shard(2)))
        assert decide(FORWARD, dp, dp, dp, 0.0, False, mesh_shape=(2, 2)) == (
            [(Shard(0), Shard(1))] * 3, ((Shard(0), Shard(2)), (Shard(0), Shard(1))))
        tp = ((2, 4, 6, 3), (Shard(1), Shard(2)))  # tp splits heads, Ulysses splits each tp block further
        assert decide(FORWARD, tp, tp, tp, 0.0, False, mesh_shape=(2, 2)) == (
            [(Shard(1), Shard(1))] * 3, ((Shard(1), Shard(2)), (Shard(1), Shard(1))))


def test_rule_leaves_other_layouts_to_the_default():
    heads = ((2, 4, 6, 3), (Shard(1),))
    with rules.override_rule(ulysses_rules(0)):
        assert decide(FORWARD, heads, heads, heads, 0.0, False, mesh_shape=(4,))[1] == ((Shard(1),), (Shard(1),))


@pytest.mark.parametrize("q_shape,kv_shape,placements,mesh_shape,why", [
    ((2, 6, 4, 3), (2, 3, 4, 3), (Shard(2),), (2,), "GQA"),  # 3 kv heads on 2 ranks
    ((2, 4, 4, 3), (2, 4, 4, 3), (Shard(2), Shard(1)), (2, 2), "innermost"),  # tp heads inside the sequence dim
])
def test_rule_falls_back_with_a_reason(q_shape, kv_shape, placements, mesh_shape, why):
    with rules.override_rule(ulysses_rules(0)), pytest.warns(UserWarning, match=why):
        inputs, _ = decide(FORWARD, (q_shape, placements), (kv_shape, placements), (kv_shape, placements), 0.0,
                           False, mesh_shape=mesh_shape)
    assert all(not p[0].is_shard(1) for p in inputs)


def test_bad_mesh_dim():
    with pytest.raises(TypeError, match="mesh_dim"):
        ulysses_rules(-1)
    q = ((2, 4, 6, 3), (Shard(2),))
    with rules.override_rule(ulysses_rules(1)), pytest.raises(ValueError, match="1-d mesh"):
        decide(FORWARD, q, q, q, 0.0, False, mesh_shape=(2,))


# ---------------------------------------------------------------- one device vs n ranks


def _equal_and_counted(n, q_shape, kv_shape, causal, seed):
    mesh = init_device_mesh("cpu", (n,))
    q, k, v = _qkv(mesh, q_shape, kv_shape, [Shard(2)], seed)
    fn = _sdpa(causal, q_shape[1] != kv_shape[1])
    with rules.override_rule(ulysses_rules(0)):
        out, grads, forward, backward = _step(fn, q, k, v, seed)
        assert_spmd_equal(fn, q, k, v)
    assert out.placements == (Shard(2),) and all(g.placements == (Shard(2),) for g in grads)
    assert not forward.fallbacks and not backward.fallbacks, (forward, backward)
    assert forward.count() == forward.count("all_to_all") == 4, forward  # q, k, v in; out back
    assert backward.count() == backward.count("all_to_all") == 8, backward  # grad_out, q, k, v, out in; 3 grads back


@st.composite
def _shapes(draw, n):
    b, t, d = draw(st.integers(1, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 4))
    gqa = draw(st.booleans())
    h_kv = n * draw(st.integers(1, 2)) if gqa else draw(st.integers(1, 5))  # GQA: kv heads divisible by n
    h = h_kv * (draw(st.integers(2, 3)) if gqa else 1)
    s = t if draw(st.booleans()) else draw(st.integers(1, 7))
    causal = draw(st.booleans()) and s == t
    return (b, h, t, d), (b, h_kv, s, d), causal


@pytest.mark.parametrize("n", (2, 3, 4))
@settings(max_examples=6)
@given(data=st.data())
def test_equals_one_device(n, data):
    q_shape, kv_shape, causal = data.draw(_shapes(n))
    run_on_ranks(n, _equal_and_counted, n, q_shape, kv_shape, causal, data.draw(st.integers(0, 99)))


def test_fewer_heads_than_ranks():
    run_on_ranks(4, _equal_and_counted, 4, (1, 2, 5, 3), (1, 2, 5, 3), True, 3)  # two ranks hold no head


def _bytes(n):
    mesh = init_device_mesh("cpu", (n,))
    B, H, S, D = 2, 2 * n, 3 * n, 4
    q, k, v = _qkv(mesh, (B, H, S, D), (B, H, S, D), [Shard(2)], 0)
    with rules.override_rule(ulysses_rules(0)):
        _, _, forward, backward = _step(_sdpa(True, False), q, k, v)
    block = B * H * (S // n) * D * 4  # one rank's (B, H, S/n, D) fp32 block; s·h/n for B = 1, h = H·D
    reference = 4 * (n - 1) * block // n  # q, k, v, out: (n-1)/n of the block leaves each rank once
    return forward.bytes("all_to_all") / reference, backward.bytes("all_to_all") / reference


@pytest.mark.parametrize("n", (2, 4))
def test_bytes_match_the_all_to_all_figure(n):
    for forward_ratio, backward_ratio in run_on_ranks(n, _bytes, n):
        assert forward_ratio == 1.0
        assert backward_ratio == 2.0  # q, k, v, out move again, grad_out in, 3 grads out (see the module docstring)


def _with_mask(n):
    mesh = init_device_mesh("cpu", (n,))
    q, k, v = _qkv(mesh, (2, 3, 5, 4), (2, 3, 7, 4), [Shard(2)], 5)
    mask = make_dtensor(_whole((2, 1, 5, 7), 9), mesh, [R])
    with rules.override_rule(ulysses_rules(0)):
        _, _, forward, _ = _step(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), q, k, v)
        assert_spmd_equal(lambda a, b, c, m: F.scaled_dot_product_attention(a, b, c, attn_mask=m), q, k, v, mask)
    assert forward.count() == forward.count("all_to_all") == 4, forward


def test_mask():
    run_on_ranks(3, _with_mask, 3)


# ---------------------------------------------------------------- 2-D meshes and fallbacks


def _two_d(placements, q_shape, kv_shape, seq_mesh_dim):
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))
    q, k, v = _qkv(mesh, q_shape, kv_shape, placements, 1)
    fn = _sdpa(True, q_shape[1] != kv_shape[1])
    with rules.override_rule(ulysses_rules(seq_mesh_dim)):
        out, grads, forward, backward = _step(fn, q, k, v)
        assert_spmd_equal(fn, q, k, v)
    assert out.placements == tuple(placements) and all(g.placements == tuple(placements) for g in grads)
    name = "ab"[seq_mesh_dim]
    assert forward.count() == forward.count("all_to_all", name) == 4, forward
    assert backward.count() == backward.count("all_to_all", name) == 8, backward


@pytest.mark.parametrize("placements,q_shape,kv_shape", [
    ((Shard(0), Shard(2)), (2, 3, 5, 2), (2, 3, 5, 2)),  # dp on batch, Ulysses on "b"
    ((Shard(1), Shard(2)), (1, 5, 5, 2), (1, 5, 5, 2)),  # tp on heads (uneven: 3 + 2), Ulysses splits each block
    ((Shard(1), Shard(2)), (1, 8, 3, 2), (1, 4, 3, 2)),  # tp and GQA: 4 kv heads over 2 x 2 head shards
])
def test_two_d_mesh(placements, q_shape, kv_shape):
    run_on_ranks(4, _two_d, placements, q_shape, kv_shape, 1)


def _falls_back(q_shape, kv_shape):
    mesh = init_device_mesh("cpu", (2,))
    q, k, v = _qkv(mesh, q_shape, kv_shape, [Shard(2)], 2)
    fn = _sdpa(False, True)
    with rules.override_rule(ulysses_rules(0)), pytest.warns(UserWarning, match="GQA"):
        _, _, forward, _ = _step(fn, q, k, v)
        assert_spmd_equal(fn, q, k, v)
    assert forward.count("all_to_all") == 0 and forward.count("all_gather") == 3, forward


def test_gqa_with_indivisible_kv_heads_gathers():
    run_on_ranks(2, _falls_back, (1, 6, 4, 3), (1, 3, 4, 3))


# ---------------------------------------------------------------- ulysses_attention: the mirrored backward


def _autograd_level(n, q_shape, kv_shape, causal):
    mesh = init_device_mesh("cpu", (n,))
    q, k, v = _qkv(mesh, q_shape, kv_shape, [Shard(2)], 4)

    def fn(a, b, c):
        return ulysses_attention(a, b, c, 0, is_causal=causal, enable_gqa=q_shape[1] != kv_shape[1])

    out, grads, forward, backward = _step(fn, q, k, v)
    assert_spmd_equal(fn, q, k, v)
    assert out.placements == (Shard(2),) and all(g.placements == (Shard(2),) for g in grads)
    assert forward.count() == forward.count("all_to_all") == 4, forward
    assert backward.count() == backward.count("all_to_all") == 4, backward  # grad_out in; 3 grads out
    return forward.bytes("all_to_all"), backward.bytes("all_to_all")


@pytest.mark.parametrize("n,q_shape,kv_shape,causal", [
    (2, (2, 4, 6, 3), (2, 4, 6, 3), True),
    (3, (1, 4, 5, 2), (1, 4, 7, 2), False),  # uneven heads (2, 1, 1) and sequences
    (4, (1, 8, 6, 3), (1, 4, 6, 3), True),  # GQA, 4 kv heads on 4 ranks
])
def test_ulysses_attention_mirrors_the_backward(n, q_shape, kv_shape, causal):
    for forward_bytes, backward_bytes in run_on_ranks(n, _autograd_level, n, q_shape, kv_shape, causal):
        if q_shape == kv_shape and q_shape[1] % n == 0 and q_shape[2] % n == 0:
            assert backward_bytes == forward_bytes  # the same four blocks, the other way round
