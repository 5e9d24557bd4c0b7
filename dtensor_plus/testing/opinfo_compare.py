"""How the OpInfo sweep judges a distributed result against the single-device oracle: same structure,
shapes and dtypes, then values within fp32 tolerances scaled to the output's magnitude.

    problem = compare(full_outputs, reference_outputs, "output", backend)   # None, or what differs
"""

from __future__ import annotations

import torch

__all__ = ["ATOL", "RTOL", "same", "compare", "compare_meta"]

ATOL, RTOL = 1e-5, 1.3e-6  # torch.testing's float32 defaults


def same(a, b) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            if not torch.equal(x.detach(), y.detach()):
                exact = x.is_floating_point() or x.is_complex()  # zero-tolerance allclose: equal, NaNs included
                if not (exact and torch.allclose(x.detach(), y.detach(), rtol=0, atol=0, equal_nan=True)):
                    return False
        elif x != y and not (x != x and y != y):
            return False
    return True


def compare_meta(got, want) -> str | None:
    if len(got) != len(want):
        return f"{len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if isinstance(w, torch.Tensor) and (not isinstance(g, torch.Tensor) or g.shape != w.shape or g.dtype != w.dtype):
            return f"output {i}: {describe(g)}, expected {describe(w)}"
    return None


def describe(value) -> str:
    return f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__


def compare(got, want, what, backend) -> str | None:
    problem = compare_meta(got, want) if what == "output" else None
    if problem:
        return problem
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None and w is None:
            continue
        if g is None or w is None:  # an unused input: None on one side, zeros on the other is fine
            other = w if g is None else g
            if isinstance(other, torch.Tensor) and not bool(other.detach().ne(0).any()):
                continue
            return f"{what} {i}: None on {'the mesh' if g is None else 'one device'}"
        if not isinstance(w, torch.Tensor):
            if not same([g], [w]):
                return f"{what} {i}: {g!r} != {w!r}"
            continue
        try:
            torch.testing.assert_close(g.detach(), w.detach(), atol=atol(w), rtol=RTOL, equal_nan=True)
        except AssertionError:
            return f"{what} {i}: {error_size(g.detach(), w.detach())}"
    return None


def atol(want: torch.Tensor) -> float:
    """ATOL, or a millionth of the largest magnitude (8 fp32 ulps there) when that is larger: a sharded sum
    adds in another order, and an element that cancels to near zero keeps the rounding of its large terms."""
    if not (want.is_floating_point() or want.is_complex()) or not want.numel():
        return ATOL
    return max(ATOL, 1e-6 * want.detach().abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).max().item())


def error_size(got, want) -> str:
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not (got.is_floating_point() or got.is_complex()):
        return f"{int((got != want).sum())} of {got.numel()} elements differ"
    diff = (got.double() - want.double()).abs().nan_to_num(nan=float("inf"))
    scale = want.double().abs().max().item() if want.numel() else 0.0
    return f"max abs err {diff.max().item():.3g} (max |value| {scale:.3g})"
