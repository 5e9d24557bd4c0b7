"""Grouped GEMM for mixture-of-experts: rows grouped by expert, each group times its own weight.

``grouped_mm(x_NK, w_EKM, counts)``: the rows of ``x`` are sorted by expert, ``counts[e]`` consecutive rows
for expert ``e`` (``sum(counts) == N``, zeros allowed); row ``i`` of group ``e`` gives ``x[i] @ w[e]``.
Returns ``(N, M)``, differentiable in ``x`` and ``w``. The Triton kernel (``grouped_gemm_triton.py``) runs
where ``switch.want_kernel`` says so; ``grouped_mm_reference`` (a loop of matmuls) everywhere else.

Legend: N rows (tokens routed to this rank's experts), K in features, M out features, E experts.

Example::

    y = grouped_mm(x_sorted, w_EKM, counts=[3, 0, 5])   # x_sorted: (8, K)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dtensor_plus.kernels import switch

__all__ = ["grouped_mm", "grouped_mm_reference"]


def _check(x_NK: torch.Tensor, w_EKM: torch.Tensor, counts) -> None:
    if x_NK.ndim != 2 or w_EKM.ndim != 3:
        raise ValueError(f"grouped_mm wants x (N, K) and w (E, K, M); got x {tuple(x_NK.shape)}, w {tuple(w_EKM.shape)}")
    if x_NK.shape[1] != w_EKM.shape[1]:
        raise ValueError(f"grouped_mm: x has K={x_NK.shape[1]} columns but w has K={w_EKM.shape[1]} rows per expert")
    num_counts = counts.numel() if isinstance(counts, torch.Tensor) else len(counts)
    if num_counts != w_EKM.shape[0]:
        raise ValueError(f"grouped_mm: {num_counts} counts for {w_EKM.shape[0]} experts; pass one count per expert")
    if not isinstance(counts, torch.Tensor) and sum(counts) != x_NK.shape[0]:
        raise ValueError(f"grouped_mm: counts {list(counts)} sum to {sum(counts)}, but x has {x_NK.shape[0]} rows")
    if x_NK.dtype != w_EKM.dtype:
        raise TypeError(f"grouped_mm: x is {x_NK.dtype} but w is {w_EKM.dtype}; cast one of them")


def _counts_list(counts) -> list[int]:
    if isinstance(counts, torch.Tensor):
        return [int(c) for c in counts.tolist()]  # NOTE: device-to-host sync on CUDA
    return [int(c) for c in counts]


def grouped_mm_reference(x_NK: torch.Tensor, w_EKM: torch.Tensor, counts) -> torch.Tensor:
    """Plain torch: one matmul per expert over its slice of rows (the oracle for the kernel)."""
    _check(x_NK, w_EKM, counts)
    sizes = _counts_list(counts)
    if sum(sizes) != x_NK.shape[0]:
        raise ValueError(f"grouped_mm: counts {sizes} sum to {sum(sizes)}, but x has {x_NK.shape[0]} rows")
    pieces = [x_e @ w_EKM[e] for e, x_e in enumerate(torch.split(x_NK, sizes))]
    if not pieces:
        return x_NK.new_zeros(x_NK.shape[0], w_EKM.shape[2])
    return torch.cat(pieces)


class GroupedMM(torch.autograd.Function):
    """forward: y_e = x_e @ w_e per group / backward: dx_e = dy_e @ w_e^T, dw_e = x_e^T @ dy_e (Triton)."""

    @staticmethod
    def forward(ctx, x_NK, w_EKM, counts_E):
        kern = switch.load("grouped_gemm_triton", x_NK.device)
        ctx.save_for_backward(x_NK, w_EKM, counts_E)
        return kern.grouped_mm_forward(x_NK, w_EKM, counts_E)

    @staticmethod
    def backward(ctx, dy_NM):
        x_NK, w_EKM, counts_E = ctx.saved_tensors
        kern = switch.load("grouped_gemm_triton", x_NK.device)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = kern.grouped_mm_forward(dy_NM, w_EKM.transpose(1, 2), counts_E)
        if ctx.needs_input_grad[1]:
            dw = kern.grouped_mm_weight_grad(x_NK, dy_NM, counts_E)
        return dx, dw, None


def grouped_mm(x_NK: torch.Tensor, w_EKM: torch.Tensor, counts: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """``cat([x_e @ w[e] for each expert e])`` for rows of ``x`` grouped by expert, ``counts[e]`` rows each.

    Args:
        x_NK: (N, K) rows sorted by expert.
        w_EKM: (E, K, M) one weight per expert.
        counts: (E,) ints summing to N: a list, or an integer tensor, kept on the device on the kernel path
            (where its sum is not checked: that would be a device-to-host sync).

    Returns (N, M). The Triton kernel where ``dtensor_plus.kernels.use_kernels`` allows it, else
    ``grouped_mm_reference``; both differentiable in ``x`` and ``w``.
    """
    _check(x_NK, w_EKM, counts)
    if not switch.want_kernel("grouped_mm", x_NK, w_EKM):
        return grouped_mm_reference(x_NK, w_EKM, counts)
    counts_E = torch.as_tensor(counts, dtype=torch.int32, device=x_NK.device)
    return GroupedMM.apply(x_NK, w_EKM, counts_E)
