"""What a collective sends for a tensor: dtypes gloo lacks carried as ones it has, uneven pieces padded.

Gloo has no kernels for int16, the unsigned types wider than a byte or the float8 types. Collectives that only
move data send those as a bitwise view of a same-size type gloo has (``wire``); reductions run in a type that
holds every value exactly and come back by a cast that wraps as the narrow type's own arithmetic would
(``reducible``). Pure functions on tensors: ``collectives.py`` makes the calls.
"""

from __future__ import annotations

from types import MappingProxyType

import torch

# A same-size type to move each one as: the bits travel unchanged (no collective here that moves data computes).
_WIRE_DTYPES = {torch.int16: torch.float16, torch.uint16: torch.float16, torch.uint32: torch.int32,
                torch.uint64: torch.int64}
_WIRE_DTYPES.update({dt: torch.uint8 for dt in (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2,
                                                  torch.float8_e5m2fnuz, torch.float8_e8m0fnu)})
_WIRE_DTYPES = MappingProxyType(_WIRE_DTYPES)  # read-only: a constant table
_INT64_MIN = -(2**63)


def wire(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a same-size bitwise view of it in a type the backend moves (``.view(t.dtype)`` undoes it)."""
    dtype = _WIRE_DTYPES.get(t.dtype)
    return t if dtype is None else t.view(dtype)


def reducible(t: torch.Tensor, reduce_op: str):
    """(a tensor to reduce in place of ``t``, the reduce op to run on it, a function mapping the reduced tensor
    back to t's dtype).

    int16/uint16/uint32 reduce in a wider int (exact; a sum wraps back to the narrow type exactly as the narrow
    type's own addition would, addition being the same modulo 2^bits in any order); uint64 sums as its int64
    bits (same wrap-around), and its max/min compare int64s with the sign bit flipped (order-preserving);
    float8 reduces in float32 (one rounding at the end); bool's sum is a logical or, a max of bytes, and its
    product a logical and, a product of bytes."""
    dtype = t.dtype
    if dtype == torch.bool:
        op = "max" if reduce_op in ("sum", "avg") else reduce_op
        return t.to(torch.uint8), op, lambda r: r.to(torch.bool)
    if dtype in (torch.int16, torch.uint16, torch.uint32):
        return t.to(torch.int64 if dtype == torch.uint32 else torch.int32), reduce_op, lambda r: r.to(dtype)
    if dtype == torch.uint64:
        if reduce_op in ("sum", "avg", "product"):  # the low 64 bits of a sum or product: the same in int64
            return t.view(torch.int64), reduce_op, lambda r: r.view(dtype)
        return t.view(torch.int64) ^ _INT64_MIN, reduce_op, lambda r: (r ^ _INT64_MIN).view(dtype)
    if dtype.is_floating_point and dtype.itemsize == 1:
        return t.to(torch.float32), reduce_op, lambda r: r.to(dtype)
    return t, reduce_op, lambda r: r


def divide(t: torch.Tensor, n: int) -> torch.Tensor:
    """avg's division of a sum by the group size, in ``t``'s dtype (integers floor, as torch's ``//``)."""
    return t / n if t.is_floating_point() or t.is_complex() else t // n


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def pad_dim(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``t`` with zeros appended along ``dim`` up to ``size``: the torch.chunk piece padded to ceil(size / n)."""
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = missing
    return torch.cat([t, t.new_zeros(pad_shape)], dim)
