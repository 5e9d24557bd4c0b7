"""Triton kernels of ``flash_attention.py`` (imported on first use; see switch.py for why).

Forward (one program per block of BLOCK_M query rows of one (batch, head)): a running max, normaliser and
output over blocks of BLOCK_N keys, so the (T, T) score matrix never exists; it also writes the row's
log-sum-exp, which ring attention needs to merge blocks and the backward needs to recompute probabilities.
Backward, in two kernels so that no two programs add into one place (no atomics): one per key block of a kv
head (dk, dv, summed over the query heads sharing that kv head: GQA), one per query block (dq).

Causal is top-left aligned, as torch's ``is_causal``: query row i sees keys j <= i.
Legend: B batch, H query heads, HKV kv heads (GROUP = H // HKV query heads share one), TQ/TK lengths, D head dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dtensor_plus.kernels import switch

INTERPRETED = switch.interpreting()  # what triton.jit read below: compiled for a GPU, or interpreted on CPU
_UPCAST = tl.constexpr(INTERPRETED)  # the 3.9 interpreter gets bf16 arithmetic wrong: compute in fp32 there


@triton.jit
def _load_tile(base_ptr, offs_t, offs_d, stride_t, T, D):
    """A (len(offs_t), BLOCK_D) tile of a (T, D) matrix whose last dim is contiguous; zeros outside."""
    tile = tl.load(base_ptr + offs_t[:, None] * stride_t + offs_d[None, :],
                   mask=(offs_t[:, None] < T) & (offs_d[None, :] < D), other=0.0)
    if _UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _visible(offs_m, offs_n, TQ, TK, CAUSAL: tl.constexpr):
    valid = (offs_m[:, None] < TQ) & (offs_n[None, :] < TK)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    return valid


@triton.jit
def _flash_forward_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, sm_scale, H, GROUP, TQ, TK, D,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh, offs_m, offs_d, stride_qt, TQ, D)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hk * stride_vh
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = tl.minimum(TK, (pid_m + 1) * BLOCK_M) if CAUSAL else TK  # later keys are all masked
    for n0 in range(0, hi, BLOCK_N):
        k = _load_tile(k_base, n0 + offs_n, offs_d, stride_kt, TK, D)
        v = _load_tile(v_base, n0 + offs_n, offs_d, stride_vt, TK, D)
        s = tl.dot(q, tl.trans(k)) * sm_scale
        s = tl.where(_visible(offs_m, n0 + offs_n, TQ, TK, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet: no nan
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(offs_m[:, None] < TQ) & (offs_d[None, :] < D))
    tl.store(lse_ptr + pid_bh.to(tl.int64) * TQ + offs_m, m_i + tl.log(l_safe), mask=offs_m < TQ)  # -inf: no key


@triton.jit
def _flash_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, sm_scale, H, HKV, GROUP, TQ, TK, D,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
):
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hk = pid_bh // HKV, pid_bh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(k_ptr + b.to(tl.int64) * stride_kb + hk * stride_kh, offs_n, offs_d, stride_kt, TK, D)
    v = _load_tile(v_ptr + b.to(tl.int64) * stride_vb + hk * stride_vh, offs_n, offs_d, stride_vt, TK, D)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0  # earlier query rows see none of these keys
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
        do_base = do_ptr + b.to(tl.int64) * stride_dob + h * stride_doh
        row_base = (b.to(tl.int64) * H + h) * TQ
        for m0 in range(lo, TQ, BLOCK_M):
            rows = m0 + offs_m
            q = _load_tile(q_base, rows, offs_d, stride_qt, TQ, D)
            do = _load_tile(do_base, rows, offs_d, stride_dot, TQ, D)
            lse = tl.load(lse_ptr + row_base + rows, mask=rows < TQ, other=0.0)
            delta = tl.load(delta_ptr + row_base + rows, mask=rows < TQ, other=0.0)
            s = tl.dot(q, tl.trans(k)) * sm_scale
            p = tl.where(_visible(rows, offs_n, TQ, TK, CAUSAL), tl.exp(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])  # softmax backward, row by row
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    mask = (offs_n[:, None] < TK) & (offs_d[None, :] < D)
    dk_ptrs = dk_ptr + b.to(tl.int64) * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    dv_ptrs = dv_ptr + b.to(tl.int64) * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _flash_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, sm_scale, H, GROUP, TQ, TK, D,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh, offs_m, offs_d, stride_qt, TQ, D)
    do = _load_tile(do_ptr + b.to(tl.int64) * stride_dob + h * stride_doh, offs_m, offs_d, stride_dot, TQ, D)
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * TQ + offs_m, mask=offs_m < TQ, other=0.0)
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * TQ + offs_m, mask=offs_m < TQ, other=0.0)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hk * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = tl.minimum(TK, (pid_m + 1) * BLOCK_M) if CAUSAL else TK
    for n0 in range(0, hi, BLOCK_N):
        k = _load_tile(k_base, n0 + offs_n, offs_d, stride_kt, TK, D)
        v = _load_tile(v_base, n0 + offs_n, offs_d, stride_vt, TK, D)
        s = tl.dot(q, tl.trans(k)) * sm_scale
        p = tl.where(_visible(offs_m, n0 + offs_n, TQ, TK, CAUSAL), tl.exp(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq_ptrs = dq_ptr + b.to(tl.int64) * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=(offs_m[:, None] < TQ) & (offs_d[None, :] < D))


def _blocks(head_dim: int, device: torch.device) -> tuple[int, int, int]:
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot wants every block dim >= 16
    if block_d > 256:
        raise ValueError(f"flash_attention kernel: head dim {head_dim} > 256 is not supported; "
                         f"use dtensor_plus.kernels.use_kernels(False)")
    if device.type == "cpu":  # the interpreter pays per element: the smallest blocks
        return 16, 16, block_d
    return (128, 64, block_d) if block_d <= 64 else (64, 64, block_d)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def flash_forward(q, k, v, causal: bool, scale: float):
    """(out (B, H, TQ, D) in q's dtype, lse (B, H, TQ) fp32); the last dims must be contiguous."""
    bsz, num_heads, tq, d = q.shape
    num_kv_heads, tk = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(bsz, num_heads, tq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    block_m, block_n, block_d = _blocks(d, q.device)
    grid = (triton.cdiv(tq, block_m), bsz * num_heads)
    _flash_forward_kernel[grid](
        q, k, v, out, lse, scale, num_heads, num_heads // num_kv_heads, tq, tk, d,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, CAUSAL=causal,
    )
    return out, lse


def flash_backward(do, q, k, v, lse, delta, causal: bool, scale: float):
    """(dq, dk, dv) given the forward's lse and delta = rowsum(dout * out) - dlse, both (B, H, TQ) fp32."""
    bsz, num_heads, tq, d = q.shape
    num_kv_heads, tk = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_m, block_n, block_d = _blocks(d, q.device)
    group = num_heads // num_kv_heads
    _flash_backward_dkdv_kernel[(triton.cdiv(tk, block_n), bsz * num_kv_heads)](
        q, k, v, do, lse, delta, dk, dv, scale, num_heads, num_kv_heads, group, tq, tk, d,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, CAUSAL=causal,
    )
    _flash_backward_dq_kernel[(triton.cdiv(tq, block_m), bsz * num_heads)](
        q, k, v, do, lse, delta, dq, scale, num_heads, group, tq, tk, d,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, CAUSAL=causal,
    )
    return dq, dk, dv
