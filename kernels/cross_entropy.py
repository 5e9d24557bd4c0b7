"""Softmax cross-entropy over logits that may be sharded on the vocab dim, without materialising softmax.

A rank holding the logit columns ``[vocab_offset, vocab_offset + V_local)`` makes one pass over them for
per-row statistics: the local max, the sum of ``exp(x - max)`` and the target logit (0 when the target is in
another rank's block). Those are a few bytes per row; the caller combines them across the ranks sharing the
vocab (``all_reduce``: max of the maxes, rescaled sum of the sums, sum of the target logits), giving each row's
``lse`` and loss ``lse - x[target]``. The backward writes ``(softmax - onehot) * grad`` block by block.

``cross_entropy(logits, target, ...)`` is the differentiable whole; ``all_reduce=None`` means one device, where
it equals ``F.cross_entropy``. layouts/loss.py passes an ``all_reduce`` over the tp mesh dim(s). The Triton
kernels (``cross_entropy_triton.py``) run where ``use_kernels`` allows; the ``*_reference`` functions elsewhere.

Example::

    loss = cross_entropy(logits_NV, target_N)                   # one device: F.cross_entropy
    rows = cross_entropy(local_NV, target_N, vocab_offset=off, all_reduce=fn, reduction="none")
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dtensor_plus.kernels import switch

__all__ = ["cross_entropy", "cross_entropy_backward_reference", "cross_entropy_stats", "cross_entropy_stats_reference"]

AllReduce = Callable[[torch.Tensor, str], torch.Tensor]  # (tensor, "max" | "sum") -> reduced over the vocab ranks


def cross_entropy_stats_reference(logits_NV: torch.Tensor, target_N: torch.Tensor, vocab_offset: int = 0):
    """Plain torch: (max, sum of exp(x - max), target logit or 0), each (N,) fp32, over the local columns."""
    x = logits_NV.float()
    n, v = x.shape
    if v == 0:  # an empty vocab block holds no max
        row_max = x.new_full((n,), float("-inf"))
        return row_max, x.new_zeros(n), x.new_zeros(n)
    row_max = x.amax(1)
    sumexp = (x - row_max[:, None]).exp().sum(1)
    local = target_N - vocab_offset
    mine = (local >= 0) & (local < v)
    target_logit = torch.where(mine, x.gather(1, torch.where(mine, local, 0)[:, None])[:, 0], 0.0)
    return row_max, sumexp, target_logit


def cross_entropy_backward_reference(logits_NV, target_N, vocab_offset: int, lse_N, grad_N) -> torch.Tensor:
    """Plain torch: ``(exp(x - lse) - onehot(target - vocab_offset)) * grad`` in the logits' dtype."""
    x = logits_NV.float()
    local = (target_N - vocab_offset)[:, None]
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == local
    return ((x - lse_N[:, None]).exp() - onehot.float()).mul(grad_N[:, None]).to(logits_NV.dtype)


def cross_entropy_stats(logits_NV: torch.Tensor, target_N: torch.Tensor, vocab_offset: int = 0, *,
                        kernel: bool | None = None):
    """Per-row (max, sumexp, target logit) of the local vocab block: the kernel or the reference."""
    if kernel if kernel is not None else switch.want_kernel("cross_entropy", logits_NV):
        return switch.load("cross_entropy_triton", logits_NV.device).cross_entropy_stats(
            _rows(logits_NV), target_N.contiguous(), vocab_offset)
    return cross_entropy_stats_reference(logits_NV, target_N, vocab_offset)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def combine_stats(row_max, sumexp, target_logit, all_reduce: AllReduce | None):
    """Per-row (lse, target logit) over the whole vocab from each rank's block statistics."""
    if all_reduce is not None:
        global_max = all_reduce(row_max, "max")
        # a row whose max is -inf everywhere stays nan, as on one device
        sumexp = all_reduce(sumexp * (row_max - global_max).exp(), "sum")
        target_logit = all_reduce(target_logit, "sum")
        row_max = global_max
    return row_max + sumexp.log(), target_logit


class CrossEntropyRows(torch.autograd.Function):
    """forward: per-row loss lse - x[target] (0 where ignored) / backward: (softmax - onehot) * grad, local."""

    @staticmethod
    def forward(ctx, logits_NV, target_N, vocab_offset, ignore_index, all_reduce):
        ctx.kernel = switch.want_kernel("cross_entropy", logits_NV)
        stats = cross_entropy_stats(logits_NV, target_N, vocab_offset, kernel=ctx.kernel)
        lse, target_logit = combine_stats(*stats, all_reduce)
        keep = target_N != ignore_index
        ctx.save_for_backward(logits_NV, target_N, lse, keep)
        ctx.vocab_offset = vocab_offset
        return torch.where(keep, lse - target_logit, 0.0)

    @staticmethod
    def backward(ctx, grad_rows):
        logits_NV, target_N, lse, keep = ctx.saved_tensors
        grad_N = torch.where(keep, grad_rows.float(), 0.0).contiguous()
        if ctx.kernel:
            kern = switch.load("cross_entropy_triton", logits_NV.device)
            dlogits = kern.cross_entropy_backward(_rows(logits_NV), target_N.contiguous(), ctx.vocab_offset,
                                                  lse.contiguous(), grad_N)
        else:
            dlogits = cross_entropy_backward_reference(logits_NV, target_N, ctx.vocab_offset, lse, grad_N)
        return dlogits, None, None, None, None


def cross_entropy(logits_NV: torch.Tensor, target_N: torch.Tensor, *, vocab_offset: int = 0,
                  ignore_index: int = -100, reduction: str = "mean", all_reduce: AllReduce | None = None):
    """Softmax cross-entropy of (N, V_local) logits against (N,) class indices, vocab possibly sharded.

    Args:
        logits_NV: this rank's logit columns ``[vocab_offset, vocab_offset + V_local)``.
        target_N: global class indices (int64); ``ignore_index`` rows give loss 0 and no gradient.
        vocab_offset: first global class of the local columns.
        reduction: "none" (per-row fp32 losses), "sum" or "mean" (over the rows not ignored; the rows of
            this call: a caller with rows sharded too reduces itself from "none").
        all_reduce: combines per-row statistics across the ranks that share the vocab; None for one device.
    """
    if logits_NV.ndim != 2 or target_N.shape != logits_NV.shape[:1]:
        raise ValueError(f"cross_entropy wants logits (N, V) and target (N,); got {tuple(logits_NV.shape)} and "
                         f"{tuple(target_N.shape)}; flatten the batch dims first")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"cross_entropy: reduction={reduction!r}; use 'none', 'sum' or 'mean'")
    rows = CrossEntropyRows.apply(logits_NV, target_N, vocab_offset, ignore_index, all_reduce)
    if reduction == "none":
        return rows.to(logits_NV.dtype)
    total = rows.sum()
    if reduction == "sum":
        return total.to(logits_NV.dtype)
    return (total / (target_N != ignore_index).sum()).to(logits_NV.dtype)  # no rows kept: nan, as torch
