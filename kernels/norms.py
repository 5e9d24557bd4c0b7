"""Fused RMSNorm and LayerNorm over the last dim: Triton kernels (``norms_triton.py``) and torch references.

``rms_norm(x, weight, eps)`` and ``layer_norm(x, weight, bias, eps)`` normalise each row of ``x`` (..., D)
with statistics in fp32 and return ``x``'s dtype; both are differentiable in x, weight and bias. The kernel
path is taken where ``dtensor_plus.kernels.use_kernels`` allows it; the ``*_reference`` functions (the same
arithmetic in plain torch) run everywhere else. ``layer_norm_aten`` / ``layer_norm_backward_aten`` (and the
RMS pair) have the signatures of the aten ops, so ops/normalization.py can run them as a rule's local op.

Example::

    y = rms_norm(x, weight, eps=1e-6)     # x: (B, T, D), weight: (D,)
"""

from __future__ import annotations

import torch

from dtensor_plus.kernels import switch

__all__ = ["layer_norm", "layer_norm_reference", "rms_norm", "rms_norm_reference"]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    xc = xf - xf.mean(-1, keepdim=True)
    y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x_ND = x.reshape(-1, x.shape[-1])
    return x_ND if x_ND.stride(-1) == 1 else x_ND.contiguous()


class FusedNorm(torch.autograd.Function):
    """forward: y = (x - mean?) * rstd * w (+ b) per row / backward: dx per row, dw and db summed over rows."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, is_rms):
        kern = switch.load("norms_triton", x.device)
        x_ND = _rows(x)
        y, mean, rstd = kern.norm_forward(x_ND, weight.contiguous(), bias, eps, is_rms)
        ctx.save_for_backward(x_ND, weight, mean, rstd)
        ctx.is_rms, ctx.has_bias, ctx.shape = is_rms, bias is not None, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x_ND, weight, mean, rstd = ctx.saved_tensors
        kern = switch.load("norms_triton", x_ND.device)
        dx, dw, db = kern.norm_backward(_rows(dy), x_ND, weight.contiguous(), mean, rstd, ctx.is_rms, ctx.has_bias)
        return dx.view(ctx.shape), dw, db, None, None


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, who: str) -> None:
    d = x.shape[-1] if x.ndim else None
    if weight.shape != (d,) or (bias is not None and bias.shape != (d,)):
        raise ValueError(f"{who}: x {tuple(x.shape)} wants weight and bias of shape ({d},); got weight "
                         f"{tuple(weight.shape)}, bias {None if bias is None else tuple(bias.shape)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x**2, -1) + eps) * weight``, fused on the kernel path."""
    _check(x, weight, None, "rms_norm")
    if not switch.want_kernel("rms_norm", x, weight):
        return rms_norm_reference(x, weight, eps)
    return FusedNorm.apply(x, weight, None, eps, True)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dim, fused on the kernel path."""
    _check(x, weight, bias, "layer_norm")
    if not switch.want_kernel("layer_norm", x, weight):
        return layer_norm_reference(x, weight, bias, eps)
    return FusedNorm.apply(x, weight, bias, eps, False)


# -- the aten signatures, for the op rules (ops/normalization.py) ----------------------------------------


def kernel_fits(x: torch.Tensor, normalized_shape, weight) -> bool:
    """The kernels normalise the last dim with a weight; other layouts stay with aten."""
    return weight is not None and len(normalized_shape) == 1 and x.numel() > 0


def _stat_shape(x: torch.Tensor) -> list[int]:
    return [*x.shape[:-1], 1]


def layer_norm_aten(x, normalized_shape, weight, bias, eps):
    """native_layer_norm on the kernel: (out, mean, rstd), the statistics shaped (..., 1) in fp32."""
    y, mean, rstd = switch.load("norms_triton", x.device).norm_forward(_rows(x), weight.contiguous(), bias, eps, False)
    return y.view(x.shape), mean.view(_stat_shape(x)), rstd.view(_stat_shape(x))


def layer_norm_backward_aten(grad, x, normalized_shape, mean, rstd, weight, bias, output_mask):
    """native_layer_norm_backward on the kernel: (grad_input, grad_weight, grad_bias), None where not asked."""
    kern = switch.load("norms_triton", x.device)
    dx, dw, db = kern.norm_backward(_rows(grad), _rows(x), weight.contiguous(), mean.float().reshape(-1).contiguous(),
                                    rstd.float().reshape(-1).contiguous(), False, True)
    return tuple(t if m else None for t, m in zip((dx.view(x.shape), dw, db), output_mask))


def rms_norm_aten(x, normalized_shape, weight, eps):
    """_fused_rms_norm on the kernel: (out, rstd shaped (..., 1) in fp32)."""
    eps = torch.finfo(x.dtype).eps if eps is None else eps  # aten's default when eps is not given
    y, _, rstd = switch.load("norms_triton", x.device).norm_forward(_rows(x), weight.contiguous(), None, eps, True)
    return y.view(x.shape), rstd.view(_stat_shape(x))


def rms_norm_backward_aten(grad, x, normalized_shape, rstd, weight, output_mask):
    kern = switch.load("norms_triton", x.device)
    dx, dw, _ = kern.norm_backward(_rows(grad), _rows(x), weight.contiguous(), None,
                                   rstd.float().reshape(-1).contiguous(), True, False)
    return tuple(t if m else None for t, m in zip((dx.view(x.shape), dw), output_mask))
