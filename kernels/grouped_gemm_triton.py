"""Triton kernels of ``grouped_gemm.py`` (imported on first use; see switch.py for why).

Row tiles are numbered expert by expert, ``cdiv(counts[e], BLOCK_N)`` tiles for expert ``e``. The launch
grid never reads the counts on the host (no device-to-host sync): it has ``cdiv(N, BLOCK_N) + E`` row
tiles, an upper bound on the sum of the per-expert tile counts, and a program past the last tile exits.
Each program finds its expert by a scan over the E counts (E is small: the experts on one rank).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dtensor_plus.kernels import switch

INTERPRETED = switch.interpreting()  # what triton.jit read below: compiled for a GPU, or interpreted on CPU
# Triton 3.9's interpreter computes wrong values for arithmetic and tl.dot on bf16 operands (loads, stores and
# casts are right), so under it the dot operands are cast to fp32 first; a GPU multiplies bf16 natively.
_UPCAST = tl.constexpr(INTERPRETED)


@triton.jit
def _find_tile(counts_ptr, pid_tile, NUM_EXPERTS, BLOCK_N: tl.constexpr):
    """Expert of row tile ``pid_tile`` (-1 past the last tile), its first row and its group's end row."""
    expert = pid_tile * 0 - 1
    row_start = pid_tile * 0
    row_end = pid_tile * 0
    tile_base = pid_tile * 0
    group_start = pid_tile * 0
    for e in range(0, NUM_EXPERTS):
        count = tl.load(counts_ptr + e)
        num_tiles = tl.cdiv(count, BLOCK_N)
        mine = (pid_tile >= tile_base) & (pid_tile < tile_base + num_tiles)
        expert = tl.where(mine, e, expert)
        row_start = tl.where(mine, group_start + (pid_tile - tile_base) * BLOCK_N, row_start)
        row_end = tl.where(mine, group_start + count, row_end)
        tile_base += num_tiles
        group_start += count
    return expert, row_start, row_end


@triton.jit
def _grouped_mm_kernel(
    x_ptr, w_ptr, y_ptr, counts_ptr, NUM_EXPERTS, K, M,
    stride_xn, stride_xk, stride_we, stride_wk, stride_wm, stride_yn, stride_ym,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    pid_m = tl.program_id(1)
    expert, row_start, row_end = _find_tile(counts_ptr, pid_tile, NUM_EXPERTS, BLOCK_N)
    if expert >= 0:
        offs_n = row_start + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(x_ptr + offs_n[:, None] * stride_xn + kk[None, :] * stride_xk,
                        mask=(offs_n[:, None] < row_end) & (kk[None, :] < K), other=0.0)
            w = tl.load(w_base + kk[:, None] * stride_wk + offs_m[None, :] * stride_wm,
                        mask=(kk[:, None] < K) & (offs_m[None, :] < M), other=0.0)
            if _UPCAST:
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        y_ptrs = y_ptr + offs_n[:, None] * stride_yn + offs_m[None, :] * stride_ym
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_n[:, None] < row_end) & (offs_m[None, :] < M))


@triton.jit
def _grouped_mm_weight_grad_kernel(
    x_ptr, dy_ptr, dw_ptr, counts_ptr, K, M,
    stride_xn, stride_xk, stride_dyn, stride_dym, stride_dwe, stride_dwk, stride_dwm,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dw[e] = x_e^T @ dy_e: one (BLOCK_K, BLOCK_M) tile of one expert, reducing over that expert's rows."""
    expert = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    group_start = expert * 0
    for e in range(0, expert):
        group_start += tl.load(counts_ptr + e)
    count = tl.load(counts_ptr + expert)
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    for r0 in range(0, count, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        offs_n = group_start + rows
        xt = tl.load(x_ptr + offs_n[None, :] * stride_xn + offs_k[:, None] * stride_xk,
                     mask=(rows[None, :] < count) & (offs_k[:, None] < K), other=0.0)
        dy = tl.load(dy_ptr + offs_n[:, None] * stride_dyn + offs_m[None, :] * stride_dym,
                     mask=(rows[:, None] < count) & (offs_m[None, :] < M), other=0.0)
        if _UPCAST:
            xt, dy = xt.to(tl.float32), dy.to(tl.float32)
        acc = tl.dot(xt, dy, acc, input_precision=INPUT_PRECISION)
    dw_ptrs = dw_ptr + expert.to(tl.int64) * stride_dwe + offs_k[:, None] * stride_dwk + offs_m[None, :] * stride_dwm
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=(offs_k[:, None] < K) & (offs_m[None, :] < M))


def _blocks(device: torch.device) -> tuple[int, int, int]:
    # tl.dot wants every block dim >= 16; the interpreter is slow per element, so it gets the smallest.
    return (16, 16, 16) if device.type == "cpu" else (64, 32, 64)


def input_precision(dtype: torch.dtype) -> str:
    """fp32 matmuls as torch does them: TF32 only where torch.backends allows it (16-bit inputs: triton's default)."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def grouped_mm_forward(x_NK: torch.Tensor, w_EKM: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """y (N, M) = x_e @ w[e] per group; w may be any strided view (the backward passes w^T)."""
    num_rows, k = x_NK.shape
    num_experts, _, m = w_EKM.shape
    y = torch.empty(num_rows, m, dtype=x_NK.dtype, device=x_NK.device)
    if num_rows == 0 or m == 0:
        return y
    block_n, block_k, block_m = _blocks(x_NK.device)
    grid = (triton.cdiv(num_rows, block_n) + num_experts, triton.cdiv(m, block_m))
    _grouped_mm_kernel[grid](
        x_NK, w_EKM, y, counts_E, num_experts, k, m,
        x_NK.stride(0), x_NK.stride(1), w_EKM.stride(0), w_EKM.stride(1), w_EKM.stride(2), y.stride(0), y.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=block_m, INPUT_PRECISION=input_precision(x_NK.dtype),
    )
    return y


def grouped_mm_weight_grad(x_NK: torch.Tensor, dy_NM: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """dw (E, K, M) = x_e^T @ dy_e per expert (zeros for an expert with no rows)."""
    k, m, num_experts = x_NK.shape[1], dy_NM.shape[1], counts_E.numel()
    dw = torch.empty(num_experts, k, m, dtype=x_NK.dtype, device=x_NK.device)
    if dw.numel() == 0:
        return dw
    block_n, block_k, block_m = _blocks(x_NK.device)
    grid = (num_experts, triton.cdiv(k, block_k), triton.cdiv(m, block_m))
    _grouped_mm_weight_grad_kernel[grid](
        x_NK, dy_NM, dw, counts_E, k, m,
        x_NK.stride(0), x_NK.stride(1), dy_NM.stride(0), dy_NM.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=block_m, INPUT_PRECISION=input_precision(x_NK.dtype),
    )
    return dw
