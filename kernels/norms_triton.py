"""Triton kernels of ``norms.py``: fused LayerNorm / RMSNorm forward and backward (imported on first use).

One program normalises one row in the forward (the whole row in one block of ``BLOCK_D`` >= D columns,
statistics in fp32). The backward gives each program ``ROWS_PER_PROGRAM`` consecutive rows: it writes their
input gradients and accumulates their share of the weight (and bias) gradient in registers, then stores it as
one row of a (num_programs, D) fp32 buffer; torch sums that buffer over its rows (the reduction across row
blocks), so no atomics and the same result every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dtensor_plus.kernels import switch

INTERPRETED = switch.interpreting()  # what triton.jit read below: compiled for a GPU, or interpreted on CPU


@triton.jit
def _norm_forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, D, eps, stride_xn, stride_yn,
    BLOCK_D: tl.constexpr, IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs_d < D
    x = tl.load(x_ptr + row * stride_xn + offs_d, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / D
        tl.store(mean_ptr + row, mean)
        xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    tl.store(rstd_ptr + row, rstd)
    y = xc * rstd * tl.load(w_ptr + offs_d, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_d, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_yn + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_backward_kernel(
    x_ptr, w_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, dw_part_ptr, db_part_ptr, N, D,
    stride_xn, stride_dyn, stride_dxn, ROWS_PER_PROGRAM,
    BLOCK_D: tl.constexpr, IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs_d < D
    w = tl.load(w_ptr + offs_d, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * ROWS_PER_PROGRAM  # int64 bounds: row * stride may pass 2**31
    row_end = tl.minimum(row_start + ROWS_PER_PROGRAM, N)
    for row64 in range(row_start, row_end):
        x = tl.load(x_ptr + row64 * stride_xn + offs_d, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row64 * stride_dyn + offs_d, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row64)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(mean_ptr + row64)) * rstd, 0.0)
        wdy = w * dy
        # d/dx of (x - mean) * rstd * w: the two projections below remove the gradient's components
        # along xhat (through rstd) and, for LayerNorm, along the constant vector (through the mean).
        dx = wdy - xhat * (tl.sum(xhat * wdy, axis=0) / D)
        if not IS_RMS:
            dx -= tl.sum(wdy, axis=0) / D
        tl.store(dx_ptr + row64 * stride_dxn + offs_d, (dx * rstd).to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        if HAS_BIAS:
            db_acc += dy
    tl.store(dw_part_ptr + pid * D + offs_d, dw_acc, mask=mask)
    if HAS_BIAS:
        tl.store(db_part_ptr + pid * D + offs_d, db_acc, mask=mask)


def _check_width(d: int) -> int:
    block_d = triton.next_power_of_2(d)
    if block_d > 65536:  # one row must fit one program's registers / the interpreter's arrays
        raise ValueError(f"fused norm kernel: rows of {d} features are wider than the 65536 it supports; "
                         f"use dtensor_plus.kernels.use_kernels(False)")
    return block_d


def norm_forward(x_ND, weight, bias, eps: float, is_rms: bool):
    """(y (N, D), mean (N,) fp32 or None, rstd (N,) fp32) for rows of x_ND (last dim contiguous)."""
    n, d = x_ND.shape
    y = torch.empty_like(x_ND)
    mean = None if is_rms else torch.empty(n, dtype=torch.float32, device=x_ND.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x_ND.device)
    if n == 0:
        return y, mean, rstd
    _norm_forward_kernel[(n,)](
        x_ND, weight, bias if bias is not None else weight, y, mean if mean is not None else rstd, rstd,
        d, eps, x_ND.stride(0), y.stride(0),
        BLOCK_D=_check_width(d), IS_RMS=is_rms, HAS_BIAS=bias is not None,
        **switch.launch_options(x_ND.device, _check_width(d)),
    )
    return y, mean, rstd


def _rows_per_program(n: int, device: torch.device) -> int:
    if device.type == "cuda":  # about four programs per SM: enough parallelism, few partial rows to sum
        return max(1, triton.cdiv(n, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return 4


def norm_backward(dy_ND, x_ND, weight, mean, rstd, is_rms: bool, has_bias: bool):
    """(dx (N, D), dw (D,), db (D,) or None) given the forward's saved statistics."""
    n, d = x_ND.shape
    dx = torch.empty_like(x_ND)
    rows = _rows_per_program(n, x_ND.device)
    num_programs = max(1, triton.cdiv(n, rows))
    dw_part = torch.zeros(num_programs, d, dtype=torch.float32, device=x_ND.device)
    db_part = torch.zeros(num_programs, d, dtype=torch.float32, device=x_ND.device) if has_bias else None
    if n > 0:
        _norm_backward_kernel[(num_programs,)](
            x_ND, weight, dy_ND, dx, mean if mean is not None else rstd, rstd, dw_part,
            db_part if db_part is not None else dw_part, n, d,
            x_ND.stride(0), dy_ND.stride(0), dx.stride(0), rows,
            BLOCK_D=_check_width(d), IS_RMS=is_rms, HAS_BIAS=has_bias,
            **switch.launch_options(x_ND.device, _check_width(d)),
        )
    db = db_part.sum(0).to(weight.dtype) if has_bias else None
    return dx, dw_part.sum(0).to(weight.dtype), db
