"""Factory and fill rules: values and placements over hypothesis layouts (Partial included), no collectives,
and gradients through compositions with them against the single-device oracle."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import layouts, make_dtensor, placements_for

aten = torch.ops.aten
WORLD_SIZES = [2, 3, 4]
NEW_SHAPE = (3, 2)

# name -> (fn, the placements the output must have: "same" as x, "kept" (Partial -> Replicate), "replicate")
LIKE = {
    "zeros_like": (torch.zeros_like, "same"),
    "ones_like": (torch.ones_like, "kept"),
    "empty_like": (torch.empty_like, "same"),  # keeps a Partial layout (to_empty() must not change full_tensor())
    "full_like": (lambda x: torch.full_like(x, 2.5), "kept"),
    "full_like.int": (lambda x: torch.full_like(x, 7, dtype=torch.int64), "kept"),
    "fill.Scalar": (lambda x: aten.fill.Scalar(x, 1.5), "kept"),
    "zero": (aten.zero.default, "same"),
    "new_zeros": (lambda x: x.new_zeros(NEW_SHAPE), "replicate"),
    "new_ones": (lambda x: x.new_ones(NEW_SHAPE), "replicate"),
    "new_empty": (lambda x: x.new_empty(NEW_SHAPE), "replicate"),
    "new_full": (lambda x: x.new_full(NEW_SHAPE, 4.0), "replicate"),
    "new_empty_strided": (lambda x: x.new_empty_strided(NEW_SHAPE, (1, 3)), "replicate"),
    "new_zeros(own shape)": (lambda x: x.new_zeros(x.shape), "kept"),
    "new_full(own shape)": (lambda x: x.new_full(x.shape, 4.0), "kept"),
    "new_empty_strided(own shape)": (lambda x: x.new_empty_strided(x.shape, x.stride()), "kept"),
}
IN_PLACE = {
    "fill_.Scalar": lambda x, value: x.fill_(3.5),
    "fill_.Tensor(plain)": lambda x, value: x.fill_(torch.tensor(-2.0, dtype=torch.float64)),
    "fill_.Tensor(DTensor)": lambda x, value: x.fill_(value),
    "zero_": lambda x, value: x.zero_(),
}


def _whole(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _want(kind, placements, mesh):
    if kind == "same":
        return tuple(placements)
    if kind == "kept":
        return tuple(Replicate() if p.is_partial() else p for p in placements)
    return (Replicate(),) * mesh.ndim


# -- ranks ----------------------------------------------------------------------------------------------


def check_like(mesh_shape, shape, placements, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole = _whole(shape, seed)
    x = make_dtensor(whole, mesh, placements)
    for name, (fn, kind) in LIKE.items():
        with dtp.comm_mode() as comm:
            out = fn(x)
        assert comm.count() == 0 and not comm.fallbacks, (name, comm)
        assert out.placements == _want(kind, placements, mesh), (name, out.placements)
        want = fn(whole)
        assert out.shape == want.shape and out.dtype == want.dtype and out.stride() == want.stride(), name
        if not name.startswith(("empty", "new_empty")):
            torch.testing.assert_close(out.full_tensor(), want, msg=lambda m: f"{name}: {m}")


def check_in_place(mesh_shape, shape, placements, value_placements, seed):
    """fill_/zero_ keep self's layout (a Partial self through the out-of-place path) and get the value right."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole = _whole(shape, seed)
    value = make_dtensor(torch.tensor(0.75, dtype=torch.float64), mesh, value_placements)
    for name, fn in IN_PLACE.items():
        x = make_dtensor(whole, mesh, placements)
        with dtp.comm_mode() as comm:
            result = fn(x, value)
        assert result is x and x.placements == tuple(placements), (name, x.placements)
        moved_value = name == "fill_.Tensor(DTensor)" and any(p.is_partial() for p in value_placements)
        if name == "fill_.Tensor(plain)":  # a plain 0-d value is checked equal on every rank: small all-gathers
            assert comm.count() == comm.count("all_gather") >= 1, (name, comm)
        else:
            assert comm.count() == (1 if moved_value else 0) * sum(p.is_partial() for p in value_placements), (name, comm)
        assert not comm.fallbacks, (name, comm)
        plain = whole.clone()
        fn(plain, value.full_tensor())
        torch.testing.assert_close(x.full_tensor(), plain, msg=lambda m: f"{name}: {m}")


def check_gradients(mesh_shape, shape, placements, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    x = make_dtensor(_whole(shape, seed), mesh, placements, requires_grad=True)
    assert_spmd_equal(lambda t: t * torch.full_like(t, 2.0) + torch.ones_like(t), x)
    assert_spmd_equal(lambda t: t * t.clone().fill_(3.0) + torch.zeros_like(t), x)
    assert_spmd_equal(lambda t: t + t.new_ones(t.shape), x)


# -- properties -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=12)
@given(data=st.data())
def test_like_and_new_factories(world_size, data):
    mesh_shape, shape, placements = data.draw(layouts(world_size, max_ndim=3, min_ndim=0, partial=True))
    run_on_ranks(world_size, check_like, mesh_shape, shape, placements, data.draw(st.integers(0, 999)))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=12)
@given(data=st.data())
def test_fill_and_zero_in_place(world_size, data):
    mesh_shape, shape, placements = data.draw(layouts(world_size, max_ndim=3, min_ndim=0, partial=True))
    value_placements = data.draw(placements_for(0, len(mesh_shape), partial=True))
    seed = data.draw(st.integers(0, 999))
    run_on_ranks(world_size, check_in_place, mesh_shape, shape, placements, value_placements, seed)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=8)
@given(data=st.data())
def test_gradients_through_factories(world_size, data):
    mesh_shape, shape, placements = data.draw(layouts(world_size, max_ndim=3, min_ndim=0, partial=True))
    run_on_ranks(world_size, check_gradients, mesh_shape, shape, placements, data.draw(st.integers(0, 999)))


def _fill_partial_self(mesh_shape):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    x = make_dtensor(torch.ones(4, 3), mesh, [Partial()] * len(mesh_shape))
    x.fill_(5.0)
    return x.placements, x.full_tensor()


@pytest.mark.parametrize("mesh_shape", [(2,), (3,), (2, 2)])
def test_fill_on_partial_sum_is_the_value(mesh_shape):
    for placements, full in run_on_ranks(int(torch.tensor(mesh_shape).prod()), _fill_partial_self, mesh_shape):
        assert placements == (Partial(),) * len(mesh_shape)
        assert torch.equal(full, torch.full((4, 3), 5.0))
