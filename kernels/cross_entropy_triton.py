"""Triton kernels of ``cross_entropy.py``: one pass over a row's local logits (imported on first use).

The forward keeps a running (max, sum of exp) over blocks of ``BLOCK_V`` logits (the online softmax
normaliser), so each logit is read once; the target logit is one masked scalar load. The backward reads each
logit once more and writes ``(exp(x - lse) - onehot) * grad``: softmax is never stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dtensor_plus.kernels import switch

INTERPRETED = switch.interpreting()  # what triton.jit read below: compiled for a GPU, or interpreted on CPU


@triton.jit
def _cross_entropy_stats_kernel(
    logits_ptr, target_ptr, max_ptr, sumexp_ptr, target_logit_ptr, V, vocab_offset, stride_ln,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_ln
    offs_v = tl.arange(0, BLOCK_V)
    row_max = tl.max(tl.full((BLOCK_V,), float("-inf"), tl.float32), axis=0)
    sumexp = tl.sum(tl.zeros((BLOCK_V,), tl.float32), axis=0)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(row_ptr + v0 + offs_v, mask=v0 + offs_v < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(x, axis=0))
        # rescale the running sum to the new max; a block holds >= 1 real logit, so new_max is finite
        # unless the whole row so far is -inf (then the row is nan, as in torch)
        sumexp = sumexp * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        row_max = new_max
    local_target = tl.load(target_ptr + row) - vocab_offset
    mine = (local_target >= 0) & (local_target < V)
    target_logit = tl.load(row_ptr + tl.where(mine, local_target, 0), mask=mine, other=0.0).to(tl.float32)
    tl.store(max_ptr + row, row_max)
    tl.store(sumexp_ptr + row, sumexp)
    tl.store(target_logit_ptr + row, target_logit)


@triton.jit
def _cross_entropy_backward_kernel(
    logits_ptr, target_ptr, lse_ptr, grad_ptr, dlogits_ptr, V, vocab_offset, stride_ln, stride_dn,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_v = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    grad = tl.load(grad_ptr + row)
    local_target = tl.load(target_ptr + row) - vocab_offset
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs_v
        x = tl.load(logits_ptr + row * stride_ln + cols, mask=cols < V, other=0.0).to(tl.float32)
        dx = (tl.exp(x - lse) - tl.where(cols == local_target, 1.0, 0.0)) * grad
        tl.store(dlogits_ptr + row * stride_dn + cols, dx.to(dlogits_ptr.dtype.element_ty), mask=cols < V)


def _block_v(v: int, device: torch.device) -> int:
    # the interpreter pays per element of a block, a GPU per loop trip: small blocks there, 4096 here
    return 16 if device.type == "cpu" else min(4096, triton.next_power_of_2(v))


def cross_entropy_stats(logits_NV: torch.Tensor, target_N: torch.Tensor, vocab_offset: int):
    """(max, sum of exp(x - max), target logit or 0), each (N,) fp32, over the local vocab block."""
    n, v = logits_NV.shape
    row_max = torch.empty(n, dtype=torch.float32, device=logits_NV.device)
    sumexp, target_logit = torch.empty_like(row_max), torch.empty_like(row_max)
    if n:
        block_v = _block_v(v, logits_NV.device)
        _cross_entropy_stats_kernel[(n,)](
            logits_NV, target_N, row_max, sumexp, target_logit, v, vocab_offset, logits_NV.stride(0),
            BLOCK_V=block_v, **switch.launch_options(logits_NV.device, block_v),
        )
    return row_max, sumexp, target_logit


def cross_entropy_backward(logits_NV, target_N, vocab_offset: int, lse_N, grad_N) -> torch.Tensor:
    """d loss / d logits for rows with loss ``lse - x[target]`` and upstream grad ``grad_N`` (N,)."""
    n, v = logits_NV.shape
    dlogits = torch.empty_like(logits_NV)
    if n:
        block_v = _block_v(v, logits_NV.device)
        _cross_entropy_backward_kernel[(n,)](
            logits_NV, target_N, lse_N, grad_N, dlogits, v, vocab_offset, logits_NV.stride(0), dlogits.stride(0),
            BLOCK_V=block_v, **switch.launch_options(logits_NV.device, block_v),
        )
    return dlogits
