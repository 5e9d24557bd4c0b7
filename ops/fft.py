"""Discrete Fourier transforms: ``_fft_r2c``, ``_fft_c2c`` and ``_fft_c2r``, the three aten ops every
``torch.fft`` function (fft, rfft, irfft, hfft, fftn, ...) reaches, each over a list of dims ``dim``.

Every transformed dim must be whole; the others are independent lines. Per mesh dim:

    input                     output          why
    Shard(d), d not in dim    Shard(d)        each rank transforms its own lines; sizes off ``dim`` unchanged
    Shard(d), d in dim        Replicate       the transform mixes the whole dim (gathered first)
    Partial(sum | avg)        Partial(same)   each transform is linear over the reals (r2c, c2r included)
    Partial(max | min)        Replicate       not linear: reduced first

The normalisation divides by the transformed sizes only, which are whole, so it is exact on every rank.
r2c and c2r change the size of the last transformed dim (n -> n // 2 + 1 and back); that dim is whole, so
nothing else needs care. The CPU kernels (MKL) refuse empty inputs: an empty local block of a non-empty
tensor becomes an empty block of the output's shape without calling them (a globally empty input still
calls them, so every rank raises as one device does).
"""

from __future__ import annotations

import torch

from dtensor_plus.placements import Replicate
from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten, normalize_dim

_LINEAR = ("sum", "avg")


@register_rule(aten._fft_r2c.default, aten._fft_c2c.default, aten._fft_c2r.default)
def fft_rule(op: OpSchema) -> Sharding:
    """_fft_r2c(self, dim, normalization, onesided) / _fft_c2c(self, dim, normalization, forward) /
    _fft_c2r(self, dim, normalization, last_dim_size)."""
    spec = op.specs[0]
    dims = {normalize_dim(d, spec.ndim) for d in op.arg("dim")}
    placements = tuple(
        p if (p.is_shard() and p.dim not in dims) or (p.is_partial() and p.reduce_op in _LINEAR) else Replicate()
        for p in spec.placements
    )
    local_op = _skip_empty(op.func, spec.shape.numel() == 0)
    return Sharding(inputs=(placements,), outputs=(placements,), local_op=local_op)


def _skip_empty(func, globally_empty: bool):
    def local_op(x, dim, normalization, last):
        if globally_empty or x.numel() > 0:
            return func(x, dim, normalization, last)
        shape, dtype = list(x.shape), x.dtype
        if func == aten._fft_r2c.default:
            dtype = dtype.to_complex()
            if last:  # onesided: the last transformed dim keeps n // 2 + 1 entries
                shape[dim[-1]] = shape[dim[-1]] // 2 + 1
        elif func == aten._fft_c2r.default:
            dtype, shape[dim[-1]] = dtype.to_real(), last
        return torch.empty(shape, dtype=dtype, device=x.device)

    return local_op
