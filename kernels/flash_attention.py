"""Flash attention returning the log-sum-exp: causal or not, grouped-query (GQA), any sequence lengths.

``flash_attention(q, k, v, causal=False, scale=None) -> (out, lse)`` with q (B, H, TQ, D), k and v
(B, HKV, TK, D), HKV dividing H (query head h reads kv head h // (H // HKV), as ``repeat_interleave``), out
(B, H, TQ, D) and lse (B, H, TQ) fp32, the log of each row's softmax normaliser (``-inf`` for a row that sees
no key). Both outputs are differentiable: ring attention merges blocks through lse, so a gradient can reach
it. Causal is top-left aligned, as torch's ``is_causal``. The Triton kernels (``flash_attention_triton.py``)
run where ``use_kernels`` allows; ``flash_attention_reference`` (plain torch, (T, T) scores) elsewhere.

Example::

    out, lse = flash_attention(q, k, v, causal=True)
"""

from __future__ import annotations

import math

import torch

from dtensor_plus.kernels import switch

__all__ = ["flash_attention", "flash_attention_reference"]


def _check(q, k, v) -> None:
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"flash_attention wants q (B, H, TQ, D) and k, v (B, HKV, TK, D) alike; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"flash_attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"flash_attention: {k.shape[1]} kv heads must divide {q.shape[1]} query heads (GQA)")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"flash_attention: q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} differ; cast them")


def flash_attention_reference(q, k, v, causal: bool = False, scale: float | None = None):
    """Plain torch, scores materialised, fp32 math: the oracle for the kernel."""
    _check(q, k, v)
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kf, vf = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
    s = q.float() @ kf.transpose(-2, -1) * scale
    if causal:
        tq, tk = q.shape[2], k.shape[2]
        keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = (s - lse.unsqueeze(-1)).exp().nan_to_num(0.0)  # a row with no visible key: out 0, lse -inf
    return (p @ vf).to(q.dtype), lse


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class FlashAttention(torch.autograd.Function):
    """forward: (softmax(q k^T * scale) v, logsumexp) per block of rows / backward: recompute p per block."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        q, k, v = (_last_contiguous(t) for t in (q, k, v))
        out, lse = switch.load("flash_attention_triton", q.device).flash_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else _last_contiguous(dout)
        # d lse / d score = p, so a gradient on lse enters the softmax backward as -dlse in delta
        delta = (dout.float() * out.float()).sum(-1)
        if dlse is not None:
            delta = delta - dlse.float()
        kern = switch.load("flash_attention_triton", q.device)
        dq, dk, dv = kern.flash_backward(dout, q, k, v, lse, delta.contiguous(), ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: float | None = None):
    """Attention of q over k, v: returns ``(out, lse)``; see the module docstring for shapes.

    Args:
        q: (B, H, TQ, D). k, v: (B, HKV, TK, D), HKV dividing H.
        causal: query row i sees keys j <= i.
        scale: multiplies the scores; default 1/sqrt(D).
    """
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not switch.want_kernel("flash_attention", q, k, v):
        return flash_attention_reference(q, k, v, causal, scale)
    return FlashAttention.apply(q, k, v, causal, scale)


# -- one block of ring attention (ops/ring_attention.py): the aten CPU flash op's signatures, no autograd --


def flash_block_forward(q, k, v, causal: bool, scale: float | None = None):
    """(out, lse fp32) of one (q block, kv block) pair on the kernel; ``scale`` None is 1/sqrt(D)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = (_last_contiguous(t) for t in (q, k, v))
    return switch.load("flash_attention_triton", q.device).flash_forward(q, k, v, causal, scale)


def flash_block_backward(dout, q, k, v, out, lse, causal: bool, scale: float | None = None):
    """(dq, dk, dv) of one block pair, given the merged ``out`` and ``lse`` of the q block's whole row."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v, dout = (_last_contiguous(t) for t in (q, k, v, dout))
    delta = (dout.float() * out.float()).sum(-1).contiguous()
    kern = switch.load("flash_attention_triton", q.device)
    return kern.flash_backward(dout, q, k, v, lse.float().contiguous(), delta, causal, scale)
