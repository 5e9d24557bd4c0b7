"""Random op rules: placements, per-shard streams (Replicate agrees, shards differ, seeds repeat), strict mode
equal to the single-device draw (forward and backward), and no collective for shape-only draws."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import DTensor, Partial, Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import layouts, make_dtensor, placements_for

WORLD_SIZES = [2, 3, 4]
MESH_SHAPES = [(2,), (3,), (2, 2)]

# Every sampler the rules cover, as (x, probs) -> tensor; probs has a suffix of x's shape, values in [0, 1].
DRAWS = {
    "bernoulli": lambda x, probs: torch.bernoulli(probs),
    "bernoulli.p": lambda x, probs: torch.bernoulli(x, 0.3),
    "bernoulli_.float": lambda x, probs: x.clone().bernoulli_(0.3),
    "bernoulli_.Tensor": lambda x, probs: x.clone().bernoulli_(probs),
    "normal_": lambda x, probs: x.clone().normal_(1.0, 2.0),
    "uniform_": lambda x, probs: x.clone().uniform_(-1.0, 1.0),
    "exponential_": lambda x, probs: x.clone().exponential_(2.0),
    "geometric_": lambda x, probs: x.clone().geometric_(0.3),
    "log_normal_": lambda x, probs: x.clone().log_normal_(),
    "cauchy_": lambda x, probs: x.clone().cauchy_(),
    "random_": lambda x, probs: x.clone().random_(),
    "random_.from": lambda x, probs: x.clone().random_(-5, 5),
    "random_.to": lambda x, probs: x.clone().random_(7),
    "rand_like": lambda x, probs: torch.rand_like(x),
    "randn_like": lambda x, probs: torch.randn_like(x),
    "randint_like": lambda x, probs: torch.randint_like(x, 10),
    "randint_like.low_dtype": lambda x, probs: torch.randint_like(x, 3, 10),
    "normal.Tensor_float": lambda x, probs: torch.normal(x, 2.0),
    "normal.float_Tensor": lambda x, probs: torch.normal(1.0, probs),
    "normal.Tensor_Tensor": lambda x, probs: torch.normal(x, probs),
    "native_dropout": lambda x, probs: torch.native_dropout(x, 0.4, True),
    "native_dropout.eval": lambda x, probs: torch.native_dropout(x, 0.4, False),
}


def _whole(shape, seed, rand=False):
    draw = torch.rand if rand else torch.randn
    return draw(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _mesh(mesh_shape):
    return dtp.init_device_mesh("cpu", mesh_shape)


def _rest(mesh):
    return [Replicate()] * (mesh.ndim - 1)


# Equal draws; the tolerance only absorbs the rounding of reducing Partial(avg) inputs.
TIGHT = dict(atol=1e-12, rtol=1e-12)


def _seeded(fn, seed):
    """``fn`` that reseeds before running: dtensor_plus strict mode for DTensors, torch for whole tensors."""

    def run(*args):
        if any(isinstance(a, DTensor) for a in args):
            dtp.manual_seed(seed, strict=True)
        else:
            torch.manual_seed(seed)
        return fn(*args)

    return run


# -- ranks ----------------------------------------------------------------------------------------------


def local_dropout_masks(mesh_shape, placements):
    """Each rank's dropout masks (native and CPU-composite F.dropout) and mesh coordinate."""
    mesh = _mesh(mesh_shape)
    x = make_dtensor(torch.ones(12, 40, dtype=torch.float64), mesh, placements)
    _, mask = torch.native_dropout(x, 0.5, True)
    composite = F.dropout(x, 0.5) != 0
    assert mask.placements == composite.placements == tuple(placements)
    return mesh.get_coordinate(), mask.to_local(), composite.to_local()


def seeded_twice(mesh_shape, seed):
    mesh = _mesh(mesh_shape)
    x = make_dtensor(torch.ones(12, 40), mesh, [Shard(0)] + _rest(mesh))
    runs = []
    for s in (seed, seed, seed + 1):
        dtp.manual_seed(s)
        runs.append(torch.cat([F.dropout(x, 0.5).full_tensor(), torch.rand_like(x).full_tensor()]))
    assert torch.equal(runs[0], runs[1]), "same seed, different draws"
    assert not torch.equal(runs[0], runs[2]), "different seeds, same draws"


def check_strict_dropout(mesh_shape, shape, placements, p, seed):
    mesh = _mesh(mesh_shape)
    x = make_dtensor(_whole(shape, seed), mesh, placements, requires_grad=True)
    try:
        assert_spmd_equal(_seeded(lambda t: F.dropout(t, p), seed), x, **TIGHT)
        if x.numel():  # torch's own native_dropout returns an empty input itself, breaking autograd on one device
            assert_spmd_equal(_seeded(lambda t: torch.native_dropout(t, p, True)[0], seed), x, **TIGHT)
    finally:
        dtp.manual_seed(seed)  # leave strict mode: the rank processes serve later tests


def check_strict_draws(mesh_shape, shape, placements, probs_ndim, probs_placements, seed):
    mesh = _mesh(mesh_shape)
    whole_x = _whole(shape, seed)
    whole_probs = _whole(shape[len(shape) - probs_ndim :], seed + 1, rand=True)
    x = make_dtensor(whole_x, mesh, placements)
    probs = make_dtensor(whole_probs, mesh, probs_placements)
    try:
        for name, fn in DRAWS.items():
            got = _seeded(fn, seed)(x, probs)
            want = _seeded(fn, seed)(whole_x, whole_probs)
            for g, w in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, want))):
                # torch's native_dropout gives an empty input a float mask (its meta kernel says bool)
                torch.testing.assert_close(
                    g.full_tensor(), w, **TIGHT, check_dtype=w.numel() > 0, msg=lambda m: f"{name}: {m}"
                )
    finally:
        dtp.manual_seed(seed)


def _expected_placements(name, x, probs):
    kept = tuple(Replicate() if p.is_partial() else p for p in x.placements)
    if name == "bernoulli" or name == "normal.float_Tensor":
        return tuple(Replicate() if p.is_partial() else p for p in probs.placements)
    if name.endswith("_") or "_." in name:  # in place on a clone: a Partial self stays Partial
        return x.placements
    if name == "normal.Tensor_Tensor":
        return None  # whichever input shards a dim: covered by the values check
    return kept


def check_draw_placements(mesh_shape, shape, placements, probs_ndim, probs_placements, seed):
    """Default (per-shard) mode: output placements follow the table; shape-only draws move nothing."""
    mesh = _mesh(mesh_shape)
    x = make_dtensor(_whole(shape, seed), mesh, placements)
    probs = make_dtensor(_whole(shape[len(shape) - probs_ndim :], seed + 1, rand=True), mesh, probs_placements)
    for name, fn in DRAWS.items():
        with dtp.comm_mode() as comm:
            out = fn(x, probs)
        first = out[0] if isinstance(out, tuple) else out
        want = _expected_placements(name, x, probs)
        assert want is None or first.placements == want, (name, first.placements, want)
        assert not comm.fallbacks, (name, comm)
        if name in ("bernoulli.p", "rand_like", "randn_like", "randint_like", "randint_like.low_dtype"):
            assert comm.count() == 0, (name, comm)
        if name.startswith("native_dropout"):
            out_full, mask_full = out[0].full_tensor(), out[1].full_tensor()
            scale = 1 / 0.6 if name == "native_dropout" else 1.0
            torch.testing.assert_close(out_full, x.full_tensor() * mask_full * scale)


def check_partial_draw_value(mesh_shape):
    """normal_ on a Partial(sum) self: the value is one draw (not the sum of one draw per rank)."""
    mesh = _mesh(mesh_shape)
    dtp.manual_seed(0)  # seeded: an unseeded first draw agrees a seed across ranks first (a collective)
    x = make_dtensor(torch.zeros(5, 3), mesh, [Partial()] + _rest(mesh))
    with dtp.comm_mode() as comm:
        x.normal_()
    assert comm.count() == 0 and x.placements == (Partial(), *_rest(mesh))
    full = x.full_tensor()
    return mesh.get_coordinate(), full, x.to_local()


def check_strict_factories(mesh_shape, shape, placements, seed):
    mesh = _mesh(mesh_shape)
    try:
        for factory, reference in ((dtp.rand, torch.rand), (dtp.randn, torch.randn)):
            dtp.manual_seed(seed, strict=True)
            got = factory(*shape, device_mesh=mesh, placements=placements)
            torch.manual_seed(seed)
            torch.testing.assert_close(got.full_tensor(), reference(shape), **TIGHT)
    finally:
        dtp.manual_seed(seed)


# -- tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mesh_shape", MESH_SHAPES)
def test_replicate_dropout_same_mask_on_every_rank(mesh_shape):
    world_size = int(torch.tensor(mesh_shape).prod())
    results = run_on_ranks(world_size, local_dropout_masks, mesh_shape, [Replicate()] * len(mesh_shape))
    for _, mask, composite in results[1:]:
        assert torch.equal(mask, results[0][1]) and torch.equal(composite, results[0][2])
    assert 0 < int(results[0][1].sum()) < results[0][1].numel()


@pytest.mark.parametrize("mesh_shape", MESH_SHAPES)
def test_shard_dropout_differs_between_shards(mesh_shape):
    world_size = int(torch.tensor(mesh_shape).prod())
    placements = [Shard(0)] + [Replicate()] * (len(mesh_shape) - 1)
    results = run_on_ranks(world_size, local_dropout_masks, mesh_shape, placements)
    by_shard = {}
    for coordinate, mask, composite in results:
        by_shard.setdefault(coordinate[0], []).append((mask, composite))
    for copies in by_shard.values():  # ranks holding the same shard agree
        assert all(torch.equal(m, copies[0][0]) and torch.equal(c, copies[0][1]) for m, c in copies)
    firsts = [copies[0] for copies in by_shard.values()]
    assert len(firsts) == mesh_shape[0]
    for i in range(len(firsts)):
        for j in range(i + 1, len(firsts)):
            assert not torch.equal(firsts[i][0], firsts[j][0]) and not torch.equal(firsts[i][1], firsts[j][1])


@pytest.mark.parametrize("mesh_shape", MESH_SHAPES)
def test_manual_seed_repeats_draws(mesh_shape):
    run_on_ranks(int(torch.tensor(mesh_shape).prod()), seeded_twice, mesh_shape, 11)


@pytest.mark.parametrize("mesh_shape", MESH_SHAPES)
def test_inplace_draw_on_partial_is_one_draw(mesh_shape):
    results = run_on_ranks(int(torch.tensor(mesh_shape).prod()), check_partial_draw_value, mesh_shape)
    origin = next(full for coordinate, full, _ in results if coordinate[0] == 0)
    for coordinate, full, local in results:
        assert torch.equal(full, origin)
        assert torch.equal(local, origin if coordinate[0] == 0 else torch.zeros_like(origin))


@pytest.mark.parametrize("mesh_shape", MESH_SHAPES)
def test_strict_dropout_on_rows_equals_torch(mesh_shape):
    placements = [Shard(0)] + [Replicate()] * (len(mesh_shape) - 1)
    run_on_ranks(int(torch.tensor(mesh_shape).prod()), check_strict_dropout, mesh_shape, (7, 5), placements, 0.5, 3)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=15)
@given(data=st.data())
def test_strict_dropout_equals_single_device(world_size, data):
    mesh_shape, shape, placements = data.draw(layouts(world_size, max_ndim=3, min_ndim=0, partial=True))
    p = data.draw(st.sampled_from([0.0, 0.3, 0.5, 1.0]))
    run_on_ranks(world_size, check_strict_dropout, mesh_shape, shape, placements, p, data.draw(st.integers(0, 999)))


@st.composite
def _draw_case(draw, world_size):
    mesh_shape, shape, placements = draw(layouts(world_size, max_ndim=3, min_ndim=1, partial=True))
    probs_ndim = draw(st.integers(1, len(shape)))
    probs_placements = draw(placements_for(probs_ndim, len(mesh_shape), partial=True))
    return mesh_shape, shape, placements, probs_ndim, probs_placements, draw(st.integers(0, 999))


# 4 ranks (2x2 meshes among the draws) under -m slow: the suite's time budget; 2x2 strict dropout runs by default
@pytest.mark.parametrize("world_size", [2, 3, pytest.param(4, marks=pytest.mark.slow)])
@settings(max_examples=8)
@given(data=st.data())
def test_strict_draws_equal_single_device(world_size, data):
    run_on_ranks(world_size, check_strict_draws, *data.draw(_draw_case(world_size)))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=8)
@given(data=st.data())
def test_draw_placements(world_size, data):
    run_on_ranks(world_size, check_draw_placements, *data.draw(_draw_case(world_size)))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=5)
@given(data=st.data())
def test_strict_factories_equal_torch(world_size, data):
    mesh_shape, shape, placements = data.draw(layouts(world_size, max_ndim=3, min_ndim=1))
    run_on_ranks(world_size, check_strict_factories, mesh_shape, shape, placements, data.draw(st.integers(0, 999)))
