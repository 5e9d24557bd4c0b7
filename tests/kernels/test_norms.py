"""Fused RMSNorm / LayerNorm kernels (Triton interpreter) against their torch references and aten."""

import pytest
import torch
import torch.nn.functional as F
from kernel_compare import LOW_PRECISION, assert_kernel_matches

from dtensor_plus.kernels import norms, use_kernels


def _inputs(shape, dtype, bias=True):
    g = torch.Generator().manual_seed(1)
    d = shape[-1]
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype).requires_grad_()
    w = (1 + torch.randn(d, generator=g)).to(dtype).requires_grad_()
    b = torch.randn(d, generator=g).to(dtype).requires_grad_()
    return (x, w, b) if bias else (x, w)


# rows not a multiple of the 4 rows per program, widths not powers of two; low precision on one shape
SHAPES_DTYPES = [((7, 33), torch.float32), ((2, 5, 19), torch.float32), *(((7, 33), dt) for dt in LOW_PRECISION)]


@pytest.mark.parametrize("shape, dtype", SHAPES_DTYPES)
def test_rms_norm_matches_reference(shape, dtype):
    assert_kernel_matches(lambda x, w: norms.rms_norm(x, w, eps=1e-5), _inputs(shape, dtype, bias=False),
                          kernel="rms_norm", dtype=dtype)


@pytest.mark.parametrize("shape, dtype", SHAPES_DTYPES)
def test_layer_norm_matches_reference(shape, dtype):
    assert_kernel_matches(lambda x, w, b: norms.layer_norm(x, w, b, eps=1e-5), _inputs(shape, dtype),
                          kernel="layer_norm", dtype=dtype)


def test_layer_norm_without_bias():
    assert_kernel_matches(lambda x, w: norms.layer_norm(x, w), _inputs((6, 10), torch.float32, bias=False),
                          kernel="layer_norm", dtype=torch.float32)


def test_references_equal_torch():
    x, w, b = _inputs((5, 13), torch.float32)
    torch.testing.assert_close(norms.layer_norm_reference(x, w, b), F.layer_norm(x, (13,), w, b))
    torch.testing.assert_close(norms.rms_norm_reference(x, w, 1e-6), F.rms_norm(x, (13,), w, 1e-6))


def test_aten_signatures_match_aten():
    """The local ops ops/normalization.py runs in place of native_layer_norm / _fused_rms_norm (+ backward)."""
    x, w, b = (t.detach() for t in _inputs((3, 4, 21), torch.float32))
    grad = torch.randn_like(x)
    with use_kernels(True):
        out, mean, rstd = norms.layer_norm_aten(x, [21], w, b, 1e-5)
        back = norms.layer_norm_backward_aten(grad, x, [21], mean, rstd, w, b, [True, True, False])
    want = torch.ops.aten.native_layer_norm(x, [21], w, b, 1e-5)
    for got, ref in zip((out, mean, rstd), want):
        torch.testing.assert_close(got, ref)
    want_back = torch.ops.aten.native_layer_norm_backward(grad, x, [21], want[1], want[2], w, b, [True, True, False])
    assert back[2] is None
    for got, ref in zip(back[:2], want_back[:2]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with use_kernels(True):
        out, rstd = norms.rms_norm_aten(x, [21], w, 1e-6)
        back = norms.rms_norm_backward_aten(grad, x, [21], rstd, w, [True, True])
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    ref = F.rms_norm(xr, (21,), wr, 1e-6)
    torch.testing.assert_close(out, ref)
    for got, want_grad in zip(back, torch.autograd.grad(ref, (xr, wr), grad)):
        torch.testing.assert_close(got, want_grad, rtol=1e-5, atol=1e-5)


def test_wrong_weight_shape_names_the_fix():
    with pytest.raises(ValueError, match=r"weight and bias of shape \(8,\)"):
        norms.rms_norm(torch.randn(2, 8), torch.randn(7))
