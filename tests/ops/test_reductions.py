"""Reductions and scans against the single-device oracle (outputs and gradients), on 1-D and 2-D meshes of
2, 3 and 4 ranks with uneven, empty and Partial inputs; and the collectives each sharded path issues."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils._pytree import tree_flatten

from dtensor_plus import Partial, Replicate, Shard, comm_mode, distribute_tensor, init_device_mesh
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import layouts, make_dtensor

WORLD_SIZES = (2, 3, 4)
F, I, B = torch.float64, torch.int64, torch.bool
INF = float("inf")


def _all_dims(x, d):
    return tuple(range(x.ndim)) if d is None else d


# name -> (fn(x, dim, keepdim), dim kind, input dtypes). Dim kind "list": None or a list of dims; "int": None
# (the full-reduction overload) or one dim.
REDUCTIONS = {
    "sum": (lambda x, d, k: x.sum() if d is None else x.sum(d, k), "list", (F, I, B)),
    "sum_dtype": (lambda x, d, k: x.sum(dtype=F) if d is None else x.sum(d, k, dtype=torch.float32), "list", (F, I)),
    "mean": (lambda x, d, k: x.mean() if d is None else x.mean(d, k), "list", (F,)),
    "nansum": (lambda x, d, k: x.nansum() if d is None else x.nansum(d, k), "list", (F,)),
    "count_nonzero": (lambda x, d, k: torch.count_nonzero(x, d), "list", (F, I)),
    "prod": (lambda x, d, k: x.prod() if d is None else x.prod(d, k), "int", (F, I)),
    "amax": (lambda x, d, k: x.amax(_all_dims(x, d), k), "list", (F, I, B)),
    "amin": (lambda x, d, k: x.amin(_all_dims(x, d), k), "list", (F, I)),
    "max": (lambda x, d, k: x.max() if d is None else x.max(d, k), "int", (F, I)),
    "min": (lambda x, d, k: x.min() if d is None else x.min(d, k), "int", (F, I)),
    "argmax": (lambda x, d, k: x.argmax(d, k), "int", (F, I)),
    "argmin": (lambda x, d, k: x.argmin(d, k), "int", (F,)),
    "var": (lambda x, d, k: x.var(d, correction=0, keepdim=k), "list", (F,)),
    "std": (lambda x, d, k: x.std(d, keepdim=k), "list", (F,)),
    "var_mean": (lambda x, d, k: torch.var_mean(x, d, keepdim=k), "list", (F,)),
    "std_mean": (lambda x, d, k: torch.std_mean(x, d, correction=0, keepdim=k), "list", (F,)),
    "norm": (lambda x, d, k: torch.linalg.vector_norm(x, dim=d, keepdim=k), "list", (F,)),
    "norm_1": (lambda x, d, k: torch.linalg.vector_norm(x, 1, d, k), "list", (F,)),
    "norm_0": (lambda x, d, k: torch.linalg.vector_norm(x, 0, d, k), "list", (F,)),
    "norm_inf": (lambda x, d, k: torch.linalg.vector_norm(x, INF, d, k), "list", (F,)),
    "norm_-inf": (lambda x, d, k: torch.linalg.vector_norm(x, -INF, d, k), "list", (F,)),
    "norm_3.5": (lambda x, d, k: torch.linalg.vector_norm(x, 3.5, d, k), "list", (F,)),
    "torch.norm": (lambda x, d, k: torch.norm(x, 1, d, k), "list", (F,)),
    "logsumexp": (lambda x, d, k: x.logsumexp(_all_dims(x, d), k), "list", (F,)),
    "any": (lambda x, d, k: x.any() if d is None else x.any(tuple(d), k), "list", (B, F)),
    "all": (lambda x, d, k: x.all() if d is None else x.all(d, k), "int", (B, I)),
}

SCANS = {
    "cumsum": lambda x, d: x.cumsum(d),
    "cumsum_dtype": lambda x, d: x.cumsum(d, dtype=torch.float32),
    "cumprod": lambda x, d: x.cumprod(d),
    "sort": lambda x, d: x.sort(d, descending=True),
    "sort_stable": lambda x, d: torch.sort(x, dim=d, stable=True),
    "topk": lambda x, d: x.topk(min(2, x.shape[d] if x.ndim else 1), d),
    "cummax": lambda x, d: x.cummax(d),
    "cummin": lambda x, d: x.cummin(d),
    "logcumsumexp": lambda x, d: x.logcumsumexp(d),
}


def _whole(shape, dtype, seed):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F)
    if dtype == B:
        return t > 0.3
    return t if dtype == F else (t * 3).round().to(dtype)


def _is_finite(out) -> bool:
    floats = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return all(torch.isfinite(t).all() for t in floats)


def _check(fn, whole, mesh, placements, backward=True):
    """fn on a DTensor equals fn on the whole tensor (gradients too, where finite); no fallback forward."""
    warnings.simplefilter("ignore")  # degrees of freedom <= 0 and the like: the oracle says the same
    x = make_dtensor(whole, mesh, placements, requires_grad=whole.is_floating_point())
    try:
        expected = fn(whole)
    except (RuntimeError, IndexError):  # e.g. max() of an empty tensor: the distributed op must raise too
        with pytest.raises((RuntimeError, IndexError)):
            fn(x)
        return
    with comm_mode() as comm, torch.no_grad():
        fn(x)
    # (some meta kernels refuse empty inputs that the CPU kernel takes: vector_norm(inf) of a (0, 1) tensor)
    assert not comm.fallbacks or whole.numel() == 0, f"fell back: {dict(comm.fallbacks)}"
    assert_spmd_equal(fn, x, backward=backward and _is_finite(expected))


def _run_reductions(mesh_shape, shape, placements, cases, seed):
    mesh = init_device_mesh("cpu", mesh_shape)
    for name, dtype, dim, keepdim in cases:
        fn = REDUCTIONS[name][0]
        _check(lambda x: fn(x, dim, keepdim), _whole(shape, dtype, seed), mesh, placements)


def _run_scans(mesh_shape, shape, placements, cases, seed):
    mesh = init_device_mesh("cpu", mesh_shape)
    for name, dtype, dim in cases:
        fn = SCANS[name]
        _check(lambda x: fn(x, dim), _whole(shape, dtype, seed), mesh, placements)


def _dim_strategy(ndim: int, kind: str):
    r = max(ndim, 1)
    one = st.integers(-r, r - 1)
    if kind == "int":
        return st.one_of(st.none(), one)
    # distinct dims, each possibly written negatively
    many = st.lists(st.integers(0, r - 1), min_size=1, max_size=r, unique=True).flatmap(
        lambda ds: st.tuples(*[st.sampled_from([d, d - r]) for d in ds]).map(list))
    return st.one_of(st.none(), many)


@st.composite
def _reduction_case(draw, ndim):
    name = draw(st.sampled_from(sorted(REDUCTIONS)))
    _, kind, dtypes = REDUCTIONS[name]
    return name, draw(st.sampled_from(dtypes)), draw(_dim_strategy(ndim, kind)), draw(st.booleans())


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=34)
@given(data=st.data())
def test_reductions_match_single_device(world_size, data):
    mesh_shape, shape, placements = data.draw(layouts(world_size, min_ndim=0, max_size=6, partial=True))
    cases = data.draw(st.lists(_reduction_case(len(shape)), min_size=3, max_size=3))
    run_on_ranks(world_size, _run_reductions, mesh_shape, shape, placements, cases, data.draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=12)
@given(data=st.data())
def test_scans_match_single_device(world_size, data):
    mesh_shape, shape, placements = data.draw(layouts(world_size, min_ndim=0, max_size=6, partial=True))
    r = max(len(shape), 1)
    case = st.tuples(st.sampled_from(sorted(SCANS)), st.sampled_from((F, I)), st.integers(-r, r - 1))
    cases = [c for c in data.draw(st.lists(case, min_size=2, max_size=2)) if c[1] == F or c[0] != "cumprod"]
    run_on_ranks(world_size, _run_scans, mesh_shape, shape, placements, cases, data.draw(st.integers(0, 2**16)))


# -- the sharded paths and their collectives --------------------------------------------------------------


def _sum_stays_partial():
    mesh = init_device_mesh("cpu", (2,))
    whole = _whole((5, 3), F, 0)
    x = distribute_tensor(whole, mesh, [Shard(0)])
    with comm_mode() as comm:
        by_dim, full, kept = x.sum(0), x.sum(), x.sum(1, keepdim=True)
    assert comm.count() == 0 and not comm.fallbacks, comm
    assert by_dim.placements == full.placements == (Partial(),) and kept.placements == (Shard(0),)
    with comm_mode() as comm:
        got = by_dim.full_tensor()
    assert comm.count("all_reduce") == 1 and comm.count() == 1, comm
    torch.testing.assert_close(got, whole.sum(0))
    torch.testing.assert_close(full.full_tensor(), whole.sum())


def test_sum_over_a_sharded_dim_is_partial_until_full_tensor():
    run_on_ranks(2, _sum_stays_partial)


def _exact_mean(num_rows):
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    whole = _whole((num_rows, 3), torch.float32, 1)
    x = distribute_tensor(whole, mesh, [Shard(0)])
    with comm_mode() as comm:
        rows, everything = x.mean(0), x.mean()
    assert comm.count() == 0 and rows.placements == (Partial(),), comm
    torch.testing.assert_close(rows.full_tensor(), whole.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(everything.full_tensor(), whole.mean(), rtol=1e-6, atol=1e-6)
    shard_means = torch.stack([c.mean(0) for c in whole.chunk(mesh.size())]).mean(0)  # PyTorch DTensor's answer
    return torch.allclose(shard_means, whole.mean(0))


@pytest.mark.parametrize("world_size, num_rows", [(2, 5), (3, 7), (4, 2)])
def test_mean_of_uneven_shards_is_exact(world_size, num_rows):
    naive_is_right = run_on_ranks(world_size, _exact_mean, num_rows)
    assert not any(naive_is_right) or num_rows == 2  # 2 rows on 4 ranks: two 1-row shards, the naive mean holds


_EMPTY_SHARD_CASES = {  # name -> (fn, input dtypes, output placement when dim 0 is sharded)
    "amax": (lambda x: x.amax(0), (F, I, B), Partial("max")),
    "amin": (lambda x: x.amin(0), (F, I, B), Partial("min")),
    "max": (lambda x: x.max(), (F, I), Partial("max")),
    "min": (lambda x: x.min(), (F, I), Partial("min")),
    "norm_inf": (lambda x: torch.linalg.vector_norm(x, INF, 0), (F,), Partial("max")),
    "norm_-inf": (lambda x: torch.linalg.vector_norm(x, -INF), (F,), Partial("min")),
    "norm_1": (lambda x: torch.linalg.vector_norm(x, 1, 0), (F,), Partial("sum")),
    "norm_0": (lambda x: torch.linalg.vector_norm(x, 0), (F,), Partial("sum")),
    "any": (lambda x: x.any(0), (B, I), Partial("max")),
    "all": (lambda x: x.all(), (B, F), Partial("min")),
    "sum": (lambda x: x.sum(0), (F, I, B), Partial("sum")),
    "mean": (lambda x: x.mean(0), (F,), Partial("sum")),
    "count_nonzero": (lambda x: x.count_nonzero(0), (F,), Partial("sum")),
    "var": (lambda x: x.var(0), (F,), Replicate()),
    "logsumexp": (lambda x: x.logsumexp(0), (F,), Replicate()),
    "argmax": (lambda x: x.argmax(0), (F,), Replicate()),
}


def _empty_shards():
    mesh = init_device_mesh("cpu", (4,))
    for name, (fn, dtypes, placement) in _EMPTY_SHARD_CASES.items():
        for dtype in dtypes:
            whole = _whole((2, 3), dtype, 2)
            x = distribute_tensor(whole, mesh, [Shard(0)])  # ranks 2 and 3 hold (0, 3) blocks
            with comm_mode() as comm:
                out = fn(x)
            assert out.placements == (placement,), (name, dtype, out.placements)
            assert comm.count() == (0 if placement.is_partial() else 1) and not comm.fallbacks, (name, comm)
            torch.testing.assert_close(out.full_tensor(), fn(whole), msg=lambda m: f"{name} {dtype}: {m}")


def test_empty_shards_reduce_to_the_identity():
    run_on_ranks(4, _empty_shards)


def _gathers_only_reduced_dims():
    mesh = init_device_mesh("cpu", (2, 2))
    whole = _whole((5, 3, 4), F, 3)
    x = distribute_tensor(whole, mesh, [Shard(0), Shard(2)])
    for fn, placements in [
        (lambda t: t.var(0), (Replicate(), Shard(1))),
        (lambda t: torch.linalg.vector_norm(t, 2, (0, 1), keepdim=True), (Replicate(), Shard(2))),
        (lambda t: t.max(0).values, (Replicate(), Shard(1))),
        (lambda t: t.cumsum(0), (Replicate(), Shard(2))),
        (lambda t: t.prod(1), (Shard(0), Shard(1))),
    ]:
        with comm_mode() as comm:
            out = fn(x)
        assert out.placements == placements, out.placements
        expected = 0 if placements[0].is_shard() else 1
        assert comm.count("all_gather", "0") == expected and comm.count() == expected and not comm.fallbacks, comm
        torch.testing.assert_close(out.full_tensor(), fn(whole))


def test_non_decomposable_ops_gather_only_the_reduced_dims():
    run_on_ranks(4, _gathers_only_reduced_dims)


def _partials():
    mesh = init_device_mesh("cpu", (2,))
    whole = _whole((4, 3), F, 4)
    for placement, fn, kept in [
        (Partial("sum"), lambda t: t.sum(1), True),
        (Partial("avg"), lambda t: t.mean(0, keepdim=True), True),
        (Partial("sum"), lambda t: t.cumsum(0), True),
        (Partial("max"), lambda t: t.amax(1), True),
        (Partial("min"), lambda t: t.min(), True),
        (Partial("sum"), lambda t: t.amax(1), False),
        (Partial("max"), lambda t: t.sum(0), False),
        (Partial("sum"), lambda t: t.sum(0, dtype=torch.int64), False),
        (Partial("sum"), lambda t: t.var(1), False),
    ]:
        x = make_dtensor(whole, mesh, [placement])
        with comm_mode() as comm:
            out = fn(x)
        assert (out.placements == (placement,)) == kept and comm.count() == (0 if kept else 1), (placement, comm)
        torch.testing.assert_close(out.full_tensor(), fn(whole))
    flags = make_dtensor(whole > 0, mesh, [Partial("max")])
    with comm_mode() as comm:
        out, none_reduced = flags.any(0), flags.any(())  # any.dims with [] reduces no dim
    assert out.placements == none_reduced.placements == (Partial("max"),) and comm.count() == 0
    assert torch.equal(out.full_tensor(), (whole > 0).any(0))
    assert torch.equal(none_reduced.full_tensor(), whole > 0)


def test_partial_inputs_pass_linear_and_matching_reductions():
    run_on_ranks(2, _partials)


def _norm_orders():
    """Same DTensor, ords in turn: a float ord keys the plan cache by type only, except +-inf."""
    mesh = init_device_mesh("cpu", (3,))
    whole = _whole((7, 2), F, 5)
    x = distribute_tensor(whole, mesh, [Shard(0)])
    for ord_, placement in [(INF, Partial("max")), (2.0, Replicate()), (-INF, Partial("min")), (3.5, Replicate()),
                            (1, Partial("sum")), (0, Partial("sum")), (1.0, Replicate()), (INF, Partial("max"))]:
        out = torch.linalg.vector_norm(x, ord_, 0)
        assert out.placements == (placement,), (ord_, out.placements)
        torch.testing.assert_close(out.full_tensor(), torch.linalg.vector_norm(whole, ord_, 0))


def test_vector_norm_ords_take_their_own_plans():
    run_on_ranks(3, _norm_orders)


def _sum_to_size(mesh_shape, placements):
    mesh = init_device_mesh("cpu", mesh_shape)
    whole = _whole((6, 4), F, 6)
    x = distribute_tensor(whole, mesh, placements)
    with comm_mode() as comm:
        out = x.sum_to_size(1, 4)
    assert comm.count() == 0 and not comm.fallbacks and out.shape == (1, 4), comm
    torch.testing.assert_close(out.full_tensor(), whole.sum(0, keepdim=True))
    bias = distribute_tensor(torch.randn(4, requires_grad=True), mesh, [Replicate()] * len(mesh_shape))
    w = make_dtensor(whole, mesh, placements, requires_grad=True)
    assert_spmd_equal(lambda a, b: (a * b.expand(6, 4)).sum_to_size(6, 1), w, bias)  # expand's backward sums


@pytest.mark.parametrize("mesh_shape, placements", [((3,), [Shard(0)]), ((2, 2), [Shard(0), Shard(1)])])
def test_sum_to_size_and_expand_backward(mesh_shape, placements):
    run_on_ranks(math.prod(mesh_shape), _sum_to_size, mesh_shape, placements)


def _scans_in_place():
    mesh = init_device_mesh("cpu", (2,))
    whole = _whole((5, 4), F, 7)
    x = distribute_tensor(whole, mesh, [Shard(0)])
    with comm_mode() as comm:
        values, indices = x.sort(1)
        x.cumsum_(1)
    assert comm.count() == 0 and values.placements == indices.placements == x.placements == (Shard(0),)
    x.cumsum_(0)  # along the sharded dim: computed gathered, then copied back into x's layout
    assert x.placements == (Shard(0),)
    torch.testing.assert_close(x.full_tensor(), whole.cumsum(1).cumsum(0))


def test_scans_along_kept_dims_move_nothing_and_in_place_keeps_layout():
    run_on_ranks(2, _scans_in_place)
