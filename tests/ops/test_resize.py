"""resize_ / resize and resize_as_ (ops/resize.py, mutation.InplaceViewPlan) against one device on real gloo ranks: the DTensor
itself takes the new shape, strides and values (the storage's leading elements in storage order, transposed
inputs included); elements past the old storage, uninitialised on one device, are zeros on every rank."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard, comm_mode
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.testing.rules import decide
from dtensor_plus.testing.strategies import make_dtensor

aten = torch.ops.aten
R = Replicate()


def test_rule_decisions():
    # a new size: gathered (the storage order is global); the same size: torch changes nothing, nor do we
    assert decide(aten.resize_.default, ((5, 6), (Shard(0),)), [30]) == ([(R,)], ((R,),))
    assert decide(aten.resize_.default, ((5, 6), (Shard(1), Partial()),), [5, 6], mesh_shape=(2, 2)) == (
        [(Shard(1), Partial())], ((Shard(1), Partial()),))
    assert decide(aten.resize.default, ((5, 6), (Shard(1),)), [5, 6], memory_format=torch.contiguous_format) == (
        [(R,)], ((R,),))


def _check_resize(mesh_shape, shape, placements, transpose, size, channels_last, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x = make_dtensor(whole, mesh, placements)
    if transpose:  # a non-contiguous tensor: resize_ reads its storage column by column
        whole, x = whole.transpose(0, -1), x.transpose(0, -1)
    kwargs = {"memory_format": torch.channels_last} if channels_last else {}
    expected = whole.clone().resize_(size, **kwargs)
    with comm_mode() as comm:
        out = x.resize_(size, **kwargs)
    assert not comm.fallbacks, comm.fallbacks
    assert out is x and x.shape == expected.shape and x.stride() == expected.stride()
    kept = min(whole.untyped_storage().nbytes() // whole.element_size(), expected.numel())
    got = x.full_tensor()
    # Compare in storage order: the first `kept` storage elements are defined, the rest are zeros here.
    laid_out = torch.empty_strided(expected.shape, expected.stride()).copy_(got)
    got_storage = laid_out.as_strided((expected.numel(),), (1,))
    want_storage = expected.as_strided((expected.numel(),), (1,))
    assert torch.equal(got_storage[:kept], want_storage[:kept])
    assert not got_storage[kept:].any()
    assert torch.equal(x.redistribute(mesh, [R] * len(mesh_shape)).to_local(), got)  # every rank holds the same
    return None


@st.composite
def resize_cases(draw, world_size):
    mesh_shape = draw(st.sampled_from([(world_size,), (2, 2)] if world_size == 4 else [(world_size,)]))
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)))
    placements = tuple(draw(st.sampled_from([R, Partial()] + [Shard(d) for d in range(ndim)])) for _ in mesh_shape)
    channels_last = draw(st.booleans())
    size = tuple(draw(st.lists(st.integers(0, 6), min_size=4 if channels_last else 1, max_size=4)))
    return mesh_shape, shape, placements, draw(st.booleans()), size, channels_last, draw(st.integers(0, 2**16))


@pytest.mark.parametrize("world_size", (2, 4))
@settings(max_examples=20)
@given(data=st.data())
def test_resize_matches_one_device(world_size, data):
    run_on_ranks(world_size, _check_resize, *data.draw(resize_cases(world_size)))


def test_resize_opinfo_samples():
    """The OpInfo sample (5, 5, 5) -> (25, 5) with each dim sharded, and the same size (a no-op: no traffic)."""
    for placements in ([Shard(0)], [Shard(1)], [Shard(2)], [Partial()]):
        run_on_ranks(2, _check_resize, (2,), (5, 5, 5), placements, False, (25, 5), False, 0)
    run_on_ranks(2, _same_size_moves_nothing)


def _same_size_moves_nothing():
    mesh = dtp.init_device_mesh("cpu", (2,))
    x = make_dtensor(torch.arange(12.0).reshape(3, 4), mesh, [Shard(1)])
    with comm_mode() as comm:
        x.resize_(3, 4)
    assert comm.count() == 0 and x.placements == (Shard(1),)
    assert torch.equal(x.full_tensor(), torch.arange(12.0).reshape(3, 4))


def _resize_as(template_placements):
    """resize_as_ takes the template's global shape (a sharded template stays put: only its shape is read)."""
    mesh = dtp.init_device_mesh("cpu", (2,))
    whole = torch.arange(12.0).reshape(3, 4)
    x = make_dtensor(whole, mesh, [Shard(1)])
    template = make_dtensor(torch.zeros(2, 5), mesh, template_placements)
    with comm_mode() as comm:
        out = x.resize_as_(template)
    assert out is x and x.shape == (2, 5) and not comm.fallbacks
    assert torch.equal(x.full_tensor().reshape(-1)[:10], whole.reshape(-1)[:10])
    assert template.placements == tuple(template_placements) and comm.count("all_gather") == 1  # x's only


def test_resize_as():
    for placements in ([Shard(0)], [Replicate()]):
        run_on_ranks(2, _resize_as, placements)
