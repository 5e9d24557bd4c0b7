"""DistFlashAttn's balanced causal schedule (ops/distflash_attention.py, ``load_balance="distflash"``): equal to
one device, forward and backward (GQA, lengths the ring does not divide, empty blocks, cp 2..4, beside dp),
on the plain Shard(2) layout; exactly n/2 kv shifts plus two shifts per far distance; every rank computes
the schedule's blocks (at most ceil((n+1)/2), the plain ring's last rank n); non-causal calls keep the ring.
Its rematerialization-aware checkpointing, with torch's selective checkpoint keeping the attention output:
the backward does not run the attention's forward (and its shifts) again."""

import functools

import pytest
import torch
import torch.nn.functional as F

import dtensor_plus
from dtensor_plus import Shard, comm_mode, init_device_mesh
from dtensor_plus.layouts import context_parallel
from dtensor_plus.ops import distflash_attention
from dtensor_plus.ops.distflash_attention import distflash_blocks
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor


def _whole(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _distflash(mesh_shape, names, q_shape, kv_heads, causal, seed):
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    placements = [Shard(2)] if len(mesh_shape) == 1 else [Shard(0), Shard(2)]
    dtensor_plus.manual_seed(seed)
    kv_shape = (q_shape[0], kv_heads) + tuple(q_shape[2:])
    q, k, v = (make_dtensor(_whole(shape, seed + i), mesh, placements, requires_grad=True)
               for i, shape in enumerate((q_shape, kv_shape, kv_shape)))

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=kv_heads != q_shape[1])

    blocks = [0]
    kernel = distflash_attention._block_forward

    def counting(*args):
        blocks[0] += 1
        return kernel(*args)

    seen = [t.view_as(t) for t in (q, k, v)]
    with context_parallel("cp", load_balance="distflash"):
        distflash_attention._block_forward = counting
        try:
            with comm_mode() as forward:
                out = fn(*seen)
        finally:
            distflash_attention._block_forward = kernel
        with comm_mode() as backward:
            torch.autograd.grad(out, seen, out.detach() * 0 + 1)
        assert_spmd_equal(fn, q, k, v)
    n = mesh.size("cp")
    assert out.placements == tuple(placements)
    assert not forward.fallbacks and forward.count() == forward.count("ring_shift", "cp"), forward
    if causal:
        half = n // 2
        assert forward.count() == half + 2 * (n - 1 - half), forward
        if q_shape[2] % n == 0 and len(mesh_shape) == 1:  # bytes: k/v blocks, q out, (out, lse) back
            b, h, t, d = q_shape
            r, rows = mesh.get_local_rank("cp"), t // n
            far = range(half + 1, n)
            sent = (half * 2 * b * kv_heads * rows * d + sum(r >= dist for dist in far) * b * h * rows * d
                    + sum(r + dist < n for dist in far) * b * h * rows * (d + 1)) * 4
            assert forward.bytes() == sent, (forward, sent)
        assert backward.count() == 2 * half + 2 * (n - 1 - half), backward
    else:  # the flat ring
        assert forward.count() == n - 1 and backward.count() == 2 * (n - 1), (forward, backward)
    return blocks[0]


@pytest.mark.parametrize("cp, seq", [(2, 7), (3, 11), (4, 16), (4, 3)])
def test_distflash_equals_one_device(cp, seq):
    """Causal; seq 3 on 4 ranks leaves an empty block. Rank r computes distflash_blocks(cp)[r] blocks when
    every block is non-empty."""
    blocks = run_on_ranks(cp, _distflash, (cp,), ("cp",), (2, 4, seq, 4), 2, True, cp)
    if seq % cp == 0:
        assert blocks == distflash_blocks(cp), blocks


def test_distflash_non_causal_and_beside_dp():
    run_on_ranks(3, _distflash, (3,), ("cp",), (1, 2, 8, 4), 1, False, 1)
    run_on_ranks(4, _distflash, (2, 2), ("dp", "cp"), (3, 2, 9, 2), 2, True, 2)


def test_schedule_balances_blocks():
    """The schedule's blocks per rank: the causal n(n+1)/2 pairs once, none over ceil((n+1)/2)."""
    for n in range(1, 17):
        blocks = distflash_blocks(n)
        assert sum(blocks) == n * (n + 1) // 2 and max(blocks) == -(-(n + 1) // 2), (n, blocks)


def _rematerialization_aware():
    """A checkpointed attention block (projection, head views, DistFlashAttn, heads merged): plain checkpointing
    reruns the attention forward in backward (3 more shifts on cp 3); keeping the attention's outputs (the
    paper's checkpoint at the attention output) leaves the backward its own 4 shifts; gradients equal one device."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    def keep_attention(ctx, func, *args, **kwargs):
        attention = func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
        return CheckpointPolicy.MUST_SAVE if attention else CheckpointPolicy.PREFER_RECOMPUTE

    def block(x, w):
        b, t, c = x.shape
        q, k, v = (x @ w).split(c, -1)
        q, k, v = (y.view(b, t, 2, c // 2).transpose(1, 2) for y in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)

    mesh = init_device_mesh("cpu", (3,), mesh_dim_names=("cp",))
    dtensor_plus.manual_seed(0)
    x = make_dtensor(_whole((2, 9, 8), 0).double(), mesh, [Shard(1)], requires_grad=True)
    w = make_dtensor(_whole((8, 24), 1).double(), mesh, [dtensor_plus.Replicate()], requires_grad=True)
    shifts = []
    for context_fn in (None, functools.partial(create_selective_checkpoint_contexts, keep_attention)):
        x.grad = w.grad = None
        with context_parallel("cp", load_balance="distflash"):
            y = checkpoint(block, x, w, use_reentrant=False, **({"context_fn": context_fn} if context_fn else {}))
            with comm_mode() as backward:
                y.backward(y.detach() * 0 + 1)
        shifts.append(backward.count("ring_shift", "cp"))
        whole_x, whole_w = (t.full_tensor().detach().requires_grad_() for t in (x, w))
        block(whole_x, whole_w).sum().backward()
        torch.testing.assert_close(x.grad.full_tensor(), whole_x.grad)
        torch.testing.assert_close(w.grad.full_tensor(), whole_w.grad)
    assert shifts == [3 + 4, 4], shifts


def test_rematerialization_aware_checkpointing():
    run_on_ranks(3, _rematerialization_aware)
