"""Pointwise ops with broadcasting: every layout (uneven, empty, nested, Partial) equals one device, forward
and backward, and linear ops keep Partial without communication."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from dtensor_plus import Partial, Replicate, Shard, comm_mode, init_device_mesh
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import mesh_shapes, placements_for, shapes, make_dtensor

WORLD_SIZES = (2, 3, 4)

BINARY = {
    "add": lambda a, b: a + b,
    "sub_alpha": lambda a, b: torch.sub(a, b, alpha=2),
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / (b.abs() + 1),
    "maximum": torch.maximum,
    "where": lambda a, b: torch.where(a > 0, a, b),
    "addcmul": lambda a, b: torch.addcmul(a, a, b, value=0.5),
    "lerp": lambda a, b: torch.lerp(a, b, 0.25),
}
UNARY = {
    "neg": lambda a: -a,
    "scale": lambda a: a * 3.0 - 1.0,
    "exp": torch.exp,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "clamp": lambda a: a.clamp(-0.5, 0.5),
    "pow": lambda a: a.pow(2),
    "masked_fill": lambda a: a.masked_fill(a < 0, 0.0),
    "to_double": lambda a: a.double(),
}


def _whole(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _binary(mesh_shape, shape_a, shape_b, placements_a, placements_b, name, seed):
    mesh = init_device_mesh("cpu", mesh_shape)
    a = make_dtensor(_whole(shape_a, seed), mesh, placements_a, requires_grad=True)
    b = make_dtensor(_whole(shape_b, seed + 1), mesh, placements_b, requires_grad=True)
    with comm_mode() as comm:
        BINARY[name](a, b)
    assert not comm.fallbacks, comm
    assert_spmd_equal(BINARY[name], a, b)


def _unary(mesh_shape, shape, placements, name, seed):
    mesh = init_device_mesh("cpu", mesh_shape)
    a = make_dtensor(_whole(shape, seed), mesh, placements, requires_grad=True)
    assert_spmd_equal(UNARY[name], a)


@st.composite
def _broadcast_pair(draw):
    shape = draw(shapes(1, 3, 0, 6))
    other = list(shape[draw(st.integers(0, len(shape) - 1)):])  # a trailing suffix: broadcasting
    other = [1 if draw(st.booleans()) and s else s for s in other]  # some dims broadcast from size 1
    return shape, tuple(other) if draw(st.booleans()) else shape


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=40)
@given(data=st.data())
def test_binary_and_ternary_ops(world_size, data):
    mesh_shape = data.draw(mesh_shapes(world_size))
    shape_a, shape_b = data.draw(_broadcast_pair())
    if data.draw(st.booleans()):
        shape_a, shape_b = shape_b, shape_a
    pa = data.draw(placements_for(len(shape_a), len(mesh_shape), partial=True))
    pb = data.draw(placements_for(len(shape_b), len(mesh_shape), partial=True))
    name = data.draw(st.sampled_from(sorted(BINARY)))
    run_on_ranks(world_size, _binary, mesh_shape, shape_a, shape_b, pa, pb, name, data.draw(st.integers(0, 999)))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=35)
@given(data=st.data())
def test_unary_ops(world_size, data):
    mesh_shape = data.draw(mesh_shapes(world_size))
    shape = data.draw(shapes(0, 3, 0, 6))
    placements = data.draw(placements_for(len(shape), len(mesh_shape), partial=True))
    name = data.draw(st.sampled_from(sorted(UNARY)))
    run_on_ranks(world_size, _unary, mesh_shape, shape, placements, name, data.draw(st.integers(0, 999)))


def _partial_algebra():
    mesh = init_device_mesh("cpu", (2,))
    a, b = _whole((4, 3), 0), _whole((4, 3), 1)
    p, q = make_dtensor(a, mesh, [Partial()]), make_dtensor(b, mesh, [Partial()])
    r = make_dtensor(b, mesh, [Replicate()])
    avg = make_dtensor(a, mesh, [Partial("avg")])
    cases = {
        "P+P": (lambda: p + q, a + b),
        "P+R": (lambda: p - r, a - b),
        "P*R": (lambda: p * r, a * b),
        "P/R": (lambda: p / (r.abs() + 1), a / (b.abs() + 1)),
        "-P": (lambda: -p * 2.0, -a * 2.0),
        "avg+scalar": (lambda: avg + 1.0, a + 1.0),
    }
    for name, (fn, want) in cases.items():
        with comm_mode() as comm:
            out = fn()
        assert comm.count() == 0 and out.placements[0].is_partial(), (name, comm, out.placements)
        torch.testing.assert_close(out.full_tensor(), want)
    with comm_mode() as comm:
        out = p.exp()
    assert comm.count("all_reduce") == 1 and out.placements == (Replicate(),)
    with comm_mode() as comm:
        out = p + 1.0  # adding a constant to a partial sum is not linear: reduce first
    assert comm.count("all_reduce") == 1
    torch.testing.assert_close(out.full_tensor(), a + 1.0)


def test_linear_ops_keep_partial_without_communication():
    run_on_ranks(2, _partial_algebra)


def _shard_follows():
    mesh = init_device_mesh("cpu", (2, 2))
    x = make_dtensor(_whole((5, 4), 2), mesh, [Shard(0), Shard(1)])
    bias = make_dtensor(_whole((4,), 3), mesh, [Replicate(), Replicate()])
    with comm_mode() as comm:
        out = x + bias  # the broadcast bias is sliced locally to follow x's column shards
    assert comm.count() == 0 and out.placements == (Shard(0), Shard(1))
    torch.testing.assert_close(out.full_tensor(), _whole((5, 4), 2) + _whole((4,), 3))


def test_broadcast_operand_follows_the_sharded_one_for_free():
    run_on_ranks(4, _shard_follows)


def check_conjugate_views(placements):
    """conj() and neg views set a bit only torch's dispatch layers above ours honour: the DTensor must hold
    the conjugated values, so later ops (mul, linalg.eig's backward) are right on every layout."""
    mesh = init_device_mesh("cpu", (2,))
    c = torch.randn(4, 3, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    d = make_dtensor(c, mesh, placements)
    torch.testing.assert_close((torch.conj(d) * d).full_tensor(), torch.conj(c) * c)
    a = torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
    x = make_dtensor(a, mesh, [Replicate()], requires_grad=True)
    ref = a.clone().requires_grad_()
    grads = [torch.autograd.grad(torch.linalg.eigvals(t).imag.pow(2).sum(), t)[0] for t in (x, ref)]
    torch.testing.assert_close(grads[0].full_tensor(), grads[1])


@pytest.mark.parametrize("placements", [[Replicate()], [Shard(0)], [Shard(1)]], ids=["R", "S0", "S1"])
def test_conjugate_views_hold_values(placements):
    run_on_ranks(2, check_conjugate_views, placements)
