"""Batched linear algebra rules (ops/linalg.py): torch.linalg functions on hypothesis layouts of their
inputs (batch dims, matrix dims, Partial right-hand sides) checked against one device, outputs and
gradients, on meshes of 2, 3, 4 and 2x2 ranks with uneven and empty batch shards; no collective when only
batch dims are sharded."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for

WORLD_SIZES = [2, 3, 4]


def _lu_solve(a, b):
    lu, pivots = torch.linalg.lu_factor(a)
    return torch.linalg.lu_solve(lu, pivots, b)


def _cholesky_solve(a, b):
    return torch.cholesky_solve(b, torch.linalg.cholesky(a))


def _ldl_solve(a, b):
    ld, pivots = torch.linalg.ldl_factor(a)
    return torch.linalg.ldl_solve(ld, pivots, b)


def _svd(a, b):
    u, s, vh = torch.linalg.svd(a)
    return u @ torch.diag_embed(s) @ vh, s  # gauge-invariant: U and Vh are defined up to signs


def _eigh(a, b):
    values, vectors = torch.linalg.eigh(a)
    return values, vectors @ torch.diag_embed(values) @ vectors.mT


# name -> (function of (A, B), kind of A: "general" | "triangular" | "spd"); B is (*, n, k)
FUNCTIONS = {
    "solve_triangular": (lambda a, b: torch.linalg.solve_triangular(a, b, upper=False), "triangular"),
    "solve": (torch.linalg.solve, "general"),
    "lu_solve": (_lu_solve, "general"),
    "cholesky_solve": (_cholesky_solve, "spd"),
    "inv": (lambda a, b: torch.linalg.inv(a), "general"),
    "det": (lambda a, b: (torch.linalg.det(a), torch.linalg.slogdet(a)), "general"),
    "lu": (lambda a, b: torch.linalg.lu(a), "general"),
    "qr": (lambda a, b: torch.linalg.qr(a), "general"),
    "eigh": (_eigh, "spd"),
    "svd": (_svd, "spd"),
    "pinv": (lambda a, b: torch.linalg.pinv(a), "spd"),
    "matrix_exp": (lambda a, b: torch.linalg.matrix_exp(a), "general"),
    "ldl_solve": (_ldl_solve, "spd"),
}
NO_GRADIENT = {"ldl_solve"}  # torch has no derivative for the LDL factorization
NO_BROADCAST = {"ldl_solve"}  # torch's ldl_solve gives wrong values (or crashes) on one device for a broadcast LD


def _matrix(kind, shape, seed):
    """Well-conditioned matrices, so that gradients compare at tight tolerances."""
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    m = torch.randn(shape, generator=g, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    if kind == "triangular":
        return m.tril() + 2 * n * eye
    if kind == "spd":
        return m @ m.mT + n * eye
    return m / n + 2 * eye


def check_linalg(name, mesh_shape, a_shape, b_shape, placements, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    fn, kind = FUNCTIONS[name]
    whole_b = torch.randn(b_shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    a = make_dtensor(_matrix(kind, a_shape, seed), mesh, placements[0], requires_grad=True)
    b = make_dtensor(whole_b, mesh, placements[1], requires_grad=True)
    backward = name not in NO_GRADIENT
    if kind == "spd":  # symmetrise on the mesh, so that the gradient (through sym) is that of a symmetric input
        assert_spmd_equal(lambda x, y: fn((x + x.mT) / 2, y), a, b, atol=1e-7, rtol=1e-7, backward=backward)
    else:
        assert_spmd_equal(fn, a, b, atol=1e-7, rtol=1e-7, backward=backward)


@st.composite
def _case(draw, name):
    world_size = draw(st.sampled_from(WORLD_SIZES))
    mesh_shape = draw(mesh_shapes(world_size))
    batch = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=2)))
    n, k = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    # A's batch may be broadcast against B's: a leading dim dropped or a size made 1
    a_batch = batch[draw(st.integers(0, len(batch))):]
    a_batch = tuple(1 if draw(st.booleans()) and draw(st.booleans()) else s for s in a_batch)
    if name in NO_BROADCAST:
        a_batch = batch
    a_shape, b_shape = a_batch + (n, n), batch + (n, k)
    mesh_ndim = len(mesh_shape)
    placements = (draw(placements_for(len(a_shape), mesh_ndim, partial=True)),
                  draw(placements_for(len(b_shape), mesh_ndim, partial=True)))
    return world_size, (name, mesh_shape, a_shape, b_shape, placements, draw(st.integers(0, 999)))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@settings(max_examples=6)
@given(data=st.data())
def test_linalg_matches_single_device(name, data):
    world_size, case = data.draw(_case(name))
    run_on_ranks(world_size, check_linalg, *case)


def check_batch_sharded_is_local(mesh_shape):
    """Batch dims sharded: triangular solve, det, LU factor and solve run without a collective and their
    outputs keep the batch Shard; a Partial right-hand side stays Partial."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    placements = tuple([Shard(0), Shard(1)][: len(mesh_shape)])
    a = make_dtensor(_matrix("general", (5, 3, 2, 2), 0), mesh, placements)
    b = make_dtensor(torch.randn(5, 3, 2, 4, dtype=torch.float64), mesh, placements)
    with dtp.comm_mode() as comm:
        x = torch.linalg.solve_triangular(a, b, upper=True)
        d = torch.linalg.det(a)
        lu, pivots, _ = torch.linalg.lu_factor_ex(a)  # lu_factor would gather the info codes (check_errors)
        y = torch.linalg.lu_solve(lu, pivots, b)
    assert comm.count() == 0 and not comm.fallbacks, comm
    assert x.placements == d.placements == y.placements == placements
    want = torch.linalg.solve_triangular(a.full_tensor(), b.full_tensor(), upper=True)
    torch.testing.assert_close(x.full_tensor(), want)
    partial = (Partial(),) + (Replicate(),) * (len(mesh_shape) - 1)
    r = (Replicate(),) * len(mesh_shape)
    whole_b = torch.randn(3, 2, 4, dtype=torch.float64)
    a_r = make_dtensor(_matrix("triangular", (3, 2, 2), 1), mesh, r)
    with dtp.comm_mode() as comm:
        z = torch.linalg.solve_triangular(a_r, make_dtensor(whole_b, mesh, partial), upper=False)
    assert comm.count() == 0 and z.placements == partial, (comm, z.placements)
    torch.testing.assert_close(z.full_tensor(), torch.linalg.solve_triangular(a_r.full_tensor(), whole_b, upper=False))


@pytest.mark.parametrize("mesh_shape", [(3,), (2, 2)])
def test_batch_sharded_needs_no_collective(mesh_shape):
    run_on_ranks(int(torch.tensor(mesh_shape).prod()), check_batch_sharded_is_local, mesh_shape)


def check_errors_raise_everywhere(mesh_shape):
    """A singular matrix in one rank's batch shard: every rank raises, naming the global batch element."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole = _matrix("general", (4, 2, 2), 2)
    whole[3] = 0
    a = make_dtensor(whole, mesh, [Shard(0)] * len(mesh_shape))
    with pytest.raises(RuntimeError, match=r"Batch element 3"):
        torch.linalg.inv(a)


@pytest.mark.parametrize("mesh_shape", [(2,), (2, 2)])
def test_check_errors_raise_on_every_rank(mesh_shape):
    run_on_ranks(int(torch.tensor(mesh_shape).prod()), check_errors_raise_everywhere, mesh_shape)


def check_cross(mesh_shape, shapes, dim, placements, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    a, b = (make_dtensor(torch.randn(s, generator=torch.Generator().manual_seed(seed + i), dtype=torch.float64),
                         mesh, p, requires_grad=True) for i, (s, p) in enumerate(zip(shapes, placements)))
    assert_spmd_equal(lambda x, y: torch.linalg.cross(x, y, dim=dim), a, b)


@st.composite
def _cross_case(draw):
    world_size = draw(st.sampled_from(WORLD_SIZES))
    mesh_shape = draw(mesh_shapes(world_size))
    shape = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
    dim = draw(st.integers(0, len(shape)))
    shape.insert(dim, 3)
    # the same rank; size-1 dims of either input broadcast
    shapes = [tuple(1 if d != dim and draw(st.integers(0, 3)) == 0 else n for d, n in enumerate(shape)) for _ in "ab"]
    placements = [draw(placements_for(len(shape), len(mesh_shape), partial=True)) for _ in "ab"]
    return world_size, (mesh_shape, shapes, dim, placements, draw(st.integers(0, 999)))


@settings(max_examples=15)
@given(data=st.data())
def test_cross_matches_single_device(data):
    world_size, case = data.draw(_cross_case())
    run_on_ranks(world_size, check_cross, *case)
