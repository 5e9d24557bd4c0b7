"""Layer norm and RMS norm rules: the single-device oracle over hypothesis layouts, output placements of the
backward ops (grad_weight Partial(sum) over row shards), and no collectives where none is needed."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._decomp import decompositions

import dtensor_plus as dtp
from dtensor_plus import DTensor, Partial, Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import layouts, make_dtensor, placements_for

aten = torch.ops.aten
WORLD_SIZES = [2, 3, 4]
EPS = 1e-5


def _whole(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _params(mesh, shape, seed, placements, affine):
    if not affine:
        return None, None
    weight = make_dtensor(_whole(shape, seed + 1) + 1, mesh, placements[0], requires_grad=True)
    bias = make_dtensor(_whole(shape, seed + 2), mesh, placements[1], requires_grad=True)
    return weight, bias


def _expected(input_placements, grad_placements, axis):
    """The algebra table restated: (grad_input placements, grad_weight/bias placements)."""
    grad_input, param = [], []
    for inp, grad in zip(input_placements, grad_placements):
        if isinstance(inp, Shard) and inp.dim < axis:
            base = inp
        elif isinstance(grad, Shard) and grad.dim < axis:
            base = grad
        elif grad.is_partial() and grad.reduce_op in ("sum", "avg"):
            base = grad
        else:
            base = Replicate()
        grad_input.append(base)
        param.append(Partial() if isinstance(base, Shard) else base)
    return tuple(grad_input), tuple(param)


# -- ranks ----------------------------------------------------------------------------------------------


def check_norm(kind, mesh_shape, shape, placements, num_normalized, affine, param_placements, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    x = make_dtensor(_whole(shape, seed), mesh, placements, requires_grad=True)
    normalized = shape[len(shape) - num_normalized :]
    weight, bias = _params(mesh, normalized, seed, param_placements, affine)
    if kind == "layer_norm":
        out = assert_spmd_equal(lambda t, w, b: F.layer_norm(t, normalized, w, b, EPS), x, weight, bias)
    else:
        out = assert_spmd_equal(lambda t, w: F.rms_norm(t, normalized, w, EPS), x, weight)
    if kind == "layer_norm":  # rms_norm decomposes on CPU: its layout is the pointwise/reduction rules' business
        axis = len(shape) - num_normalized
        assert out.placements == tuple(p if isinstance(p, Shard) and p.dim < axis else Replicate() for p in placements)


def check_layer_norm_backward_op(
    mesh_shape, shape, input_placements, grad_placements, num_normalized, affine, mask, seed
):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole_x, whole_grad = _whole(shape, seed), _whole(shape, seed + 3)
    normalized = list(shape[len(shape) - num_normalized :])
    r = [Replicate()] * len(mesh_shape)
    weight, bias = _params(mesh, normalized, seed, (r, r), affine)
    x = make_dtensor(whole_x, mesh, input_placements)
    grad = make_dtensor(whole_grad, mesh, grad_placements)
    _, mean, rstd = aten.native_layer_norm(x, normalized, weight, bias, EPS)
    axis = len(shape) - num_normalized
    leading = tuple(p if isinstance(p, Shard) and p.dim < axis else Replicate() for p in input_placements)
    assert mean.placements == rstd.placements == leading  # same rank as input: the same Shard dims
    got = aten.native_layer_norm_backward(grad, x, normalized, mean, rstd, weight, bias, mask)
    full_w, full_b = (None, None) if weight is None else (weight.full_tensor(), bias.full_tensor())
    _, full_mean, full_rstd = aten.native_layer_norm(whole_x, normalized, full_w, full_b, EPS)
    want = aten.native_layer_norm_backward(whole_grad, whole_x, normalized, full_mean, full_rstd, full_w, full_b, mask)
    _compare_backward(got, want, input_placements, grad_placements, axis)


def _compare_backward(got, want, input_placements, grad_placements, axis):
    expected_input, expected_param = _expected(input_placements, grad_placements, axis)
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None
            continue
        torch.testing.assert_close(g.full_tensor(), w, equal_nan=True, msg=lambda m: f"output {i}: {m}")
        assert g.placements == (expected_input if i == 0 else expected_param), (i, g.placements)


def _fused(func, *args):
    """Call the aten op on DTensors as the dispatcher does on CUDA (on CPU it decomposes before reaching us)."""
    return DTensor.__torch_dispatch__(func, (DTensor,), args, {})


def check_fused_rms_norm(mesh_shape, shape, input_placements, grad_placements, num_normalized, affine, mask, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole_x, whole_grad = _whole(shape, seed), _whole(shape, seed + 3)
    normalized = list(shape[len(shape) - num_normalized :])
    r = [Replicate()] * len(mesh_shape)
    weight = _params(mesh, normalized, seed, (r, r), affine)[0]
    x = make_dtensor(whole_x, mesh, input_placements)
    out, rstd = _fused(aten._fused_rms_norm.default, x, normalized, weight, EPS)
    full_w = None if weight is None else weight.full_tensor()
    full_out, full_rstd = aten._fused_rms_norm(whole_x, normalized, full_w, EPS)
    torch.testing.assert_close(out.full_tensor(), full_out, equal_nan=True)
    torch.testing.assert_close(rstd.full_tensor(), full_rstd, equal_nan=True)
    axis = len(shape) - num_normalized
    leading = tuple(p if isinstance(p, Shard) and p.dim < axis else Replicate() for p in input_placements)
    assert out.placements == rstd.placements == leading
    # The backward has no CPU kernel in torch 2.13: lend it the reference decomposition for this check.
    lib = torch.library.Library("aten", "IMPL")
    try:
        lib.impl("_fused_rms_norm_backward", decompositions._fused_rms_norm_backward, "CPU")
        grad = make_dtensor(whole_grad, mesh, grad_placements)
        got = _fused(aten._fused_rms_norm_backward.default, grad, x, normalized, rstd, weight, mask)
        want = aten._fused_rms_norm_backward(whole_grad, whole_x, normalized, full_rstd, full_w, mask)
    finally:
        lib._destroy()
    _compare_backward(got, want, input_placements, grad_placements, axis)


def check_collectives(mesh_shape):
    """Rows sharded, last dim normalised: no collective in forward or backward; param grads Partial(sum)."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    placements = [Shard(0), Shard(1)][: len(mesh_shape)]
    r = [Replicate()] * len(mesh_shape)
    x = make_dtensor(_whole((5, 3, 4), 0), mesh, placements, requires_grad=True)
    weight, bias = _params(mesh, (4,), 0, (r, r), True)
    with dtp.comm_mode() as comm:
        y = F.layer_norm(x, (4,), weight, bias)
    assert comm.count() == 0 and not comm.fallbacks, comm
    assert y.placements == tuple(placements)
    grad = make_dtensor(_whole((5, 3, 4), 1), mesh, placements)
    with dtp.comm_mode() as comm:
        y.backward(grad)
    assert comm.count() == 0 and not comm.fallbacks, comm
    assert x.grad.placements == tuple(placements)
    assert weight.grad.placements == bias.grad.placements == (Partial(),) * len(mesh_shape)
    full_x = x.full_tensor().detach().requires_grad_(True)
    full_w, full_b = (t.full_tensor().detach().requires_grad_(True) for t in (weight, bias))
    F.layer_norm(full_x, (4,), full_w, full_b).backward(grad.full_tensor())
    for dist_grad, want in ((x.grad, full_x.grad), (weight.grad, full_w.grad), (bias.grad, full_b.grad)):
        torch.testing.assert_close(dist_grad.full_tensor(), want)


# -- properties -----------------------------------------------------------------------------------------


@st.composite
def _norm_case(draw, world_size):
    mesh_shape, shape, placements = draw(layouts(world_size, max_ndim=3, min_ndim=1, partial=True))
    num_normalized = draw(st.integers(1, min(2, len(shape))))
    affine = draw(st.booleans())
    params = draw(st.tuples(*[placements_for(num_normalized, len(mesh_shape), partial=True)] * 2))
    return mesh_shape, shape, placements, num_normalized, affine, params, draw(st.integers(0, 999))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=25)
@given(data=st.data())
def test_layer_norm_matches_single_device(world_size, data):
    run_on_ranks(world_size, check_norm, "layer_norm", *data.draw(_norm_case(world_size)))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=10)
@given(data=st.data())
def test_rms_norm_matches_single_device(world_size, data):
    run_on_ranks(world_size, check_norm, "rms_norm", *data.draw(_norm_case(world_size)))


@st.composite
def _backward_case(draw, world_size, num_outputs):
    mesh_shape, shape, input_placements = draw(layouts(world_size, max_ndim=3, min_ndim=1, partial=True))
    grad_placements = draw(placements_for(len(shape), len(mesh_shape), partial=True))
    num_normalized = draw(st.integers(1, min(2, len(shape))))
    affine = draw(st.booleans())
    mask = draw(st.lists(st.booleans(), min_size=num_outputs, max_size=num_outputs))
    if not affine:
        mask = mask[:1] + [False] * (num_outputs - 1)
    seed = draw(st.integers(0, 999))
    return mesh_shape, shape, input_placements, grad_placements, num_normalized, affine, mask, seed


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=15)
@given(data=st.data())
def test_layer_norm_backward_op_placements(world_size, data):
    run_on_ranks(world_size, check_layer_norm_backward_op, *data.draw(_backward_case(world_size, 3)))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=10)
@given(data=st.data())
def test_fused_rms_norm_rules(world_size, data):
    run_on_ranks(world_size, check_fused_rms_norm, *data.draw(_backward_case(world_size, 2)))


@pytest.mark.parametrize("mesh_shape", [(2,), (3,), (2, 2)])
def test_layer_norm_rows_sharded_no_collectives(mesh_shape):
    run_on_ranks(int(torch.tensor(mesh_shape).prod()), check_collectives, mesh_shape)
