"""Loss rules (ops/losses.py): nll_loss / nll_loss2d and the elementwise losses, forward and backward against one
device on real gloo ranks, with uneven and empty batch shards; exact means; collective counts; no fallbacks."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dtensor_plus import Partial, Replicate, Shard, comm_mode, init_device_mesh
from dtensor_plus.testing.rules import decide
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for

aten = torch.ops.aten
R = Replicate()
WORLD_SIZES = [2, 3, 4]


def _no_loss_fallbacks(comm, names=("nll_loss", "mse_loss", "smooth_l1", "huber", "binary_cross", "soft_margin")):
    fell_back = [op for op in comm.fallbacks if any(name in op for name in names)]
    assert not fell_back, f"loss ops fell back: {fell_back}"


# ---------------------------------------------------------------- the rule as a pure function


_decide = decide


def test_nll_rule_layouts():
    x, t, tw = ((10, 5), (Shard(0),)), ((10,), (Shard(0),), torch.int64), ((), (R,))
    fwd = aten.nll_loss_forward.default
    assert _decide(fwd, x, t, None, 0, -100) == ([(Shard(0),), (Shard(0),)], ((Shard(0),), (R,)))
    assert _decide(fwd, x, t, None, 2, -100) == ([(Shard(0),), (Shard(0),)], ((Partial(),), (Partial(),)))
    assert _decide(fwd, x, t, None, 1, -100) == ([(Shard(0),), (Shard(0),)], ((Partial(),), (R,)))  # targets stay put
    # class dim sharded: made whole; a sharded target pulls the input along (all-to-all, not all-gather)
    assert _decide(fwd, ((10, 5), (Shard(1),)), t, None, 2, -100)[0] == [(Shard(0),), (Shard(0),)]
    # 2-D: spatial sharding of nll_loss2d maps input dim 2 to target dim 1
    ins, outs = _decide(aten.nll_loss2d_forward.default, ((2, 5, 6, 3), (Shard(2), Shard(1))),
                        ((2, 6, 3), (R, R), torch.int64), None, 0, -100, mesh_shape=(2, 2))
    assert ins == [(Shard(2), R), (Shard(1), R)] and outs[0] == (Shard(1), R)
    bwd = aten.nll_loss_backward.default
    ins, outs = _decide(bwd, ((), (Partial(),)), x, t, None, 1, -100, tw)
    assert ins == [(R,), (Shard(0),), (Shard(0),), (R,)] and outs == ((Shard(0),),)


def test_elementwise_rule_layouts():
    x = ((5, 3), (Shard(0),))
    assert _decide(aten.mse_loss.default, x, x, 1)[1] == ((Partial(),),)
    assert _decide(aten.mse_loss.default, x, x, 0)[1] == ((Shard(0),),)
    assert _decide(aten.mse_loss_backward.default, ((), (R,)), x, x, 1)[1] == ((Shard(0),),)


# ---------------------------------------------------------------- nll_loss and cross_entropy on ranks


def _nll_data(shape, seed, ignore_index, use_weight):
    g = torch.Generator().manual_seed(seed)
    num_classes = shape[1] if len(shape) >= 2 else shape[0]
    target_shape = (shape[0], *shape[2:]) if len(shape) >= 2 else ()
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    target = torch.randint(0, num_classes, target_shape, generator=g)
    if ignore_index < 0:
        target = torch.where(torch.rand(target_shape, generator=g) < 0.3, ignore_index, target)
    weight = torch.rand(num_classes, generator=g, dtype=torch.float64) + 0.1 if use_weight else None
    return x, target, weight


def check_nll(mesh_shape, shape, x_p, t_p, reduction, use_weight, ignore_index, seed, through_cross_entropy):
    mesh = init_device_mesh("cpu", mesh_shape)
    x, target, weight = _nll_data(shape, seed, ignore_index, use_weight)
    dx = make_dtensor(x, mesh, x_p, requires_grad=True)
    dt = make_dtensor(target, mesh, t_p)
    dw = make_dtensor(weight, mesh, (R,) * len(mesh_shape)) if use_weight else None
    loss = F.cross_entropy if through_cross_entropy else F.nll_loss
    with comm_mode() as comm:
        assert_spmd_equal(loss, dx, dt, dw, reduction=reduction, ignore_index=ignore_index, atol=1e-10, rtol=1e-10)
    _no_loss_fallbacks(comm)


@st.composite
def nll_cases(draw, world_size, partial):
    mesh_shape = draw(mesh_shapes(world_size))
    ndim = draw(st.sampled_from([2, 2, 2, 4, 1]))
    n, c = draw(st.integers(0, 7)), draw(st.integers(1, 5))
    shape = {1: (c,), 2: (n, c), 4: (n, c, draw(st.integers(1, 3)), draw(st.integers(1, 3)))}[ndim]
    x_p = draw(placements_for(ndim, len(mesh_shape), partial=partial))
    t_p = draw(placements_for(max(ndim - 1, 0), len(mesh_shape)))
    reduction = draw(st.sampled_from(["none", "sum", "mean"]))
    ignore_index = draw(st.sampled_from([-100, 0, 7]))  # some targets ignored / class 0 ignored / none
    return mesh_shape, shape, x_p, t_p, reduction, draw(st.booleans()), ignore_index, draw(st.integers(0, 2**16))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=35)
@given(data=st.data())
def test_nll_loss_matches_one_device(world_size, data):
    # nll_loss's input need not be log-probabilities, so Partial inputs are fair game here.
    case = data.draw(nll_cases(world_size, partial=True))
    run_on_ranks(world_size, check_nll, *case, False)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=15)
@given(data=st.data())
def test_cross_entropy_matches_one_device(world_size, data):
    case = data.draw(nll_cases(world_size, partial=False))
    run_on_ranks(world_size, check_nll, *case, True)


def check_nll_collectives(world_size):
    mesh = init_device_mesh("cpu", (world_size,))
    x, target, weight = _nll_data((5, 4), 0, -100, True)
    dx = make_dtensor(x, mesh, [Shard(0)], requires_grad=True)
    dt, dw = make_dtensor(target, mesh, [Shard(0)]), make_dtensor(weight, mesh, [R])
    counts = {}
    for reduction in ("none", "sum", "mean"):
        with comm_mode() as comm:
            out = F.nll_loss(dx, dt, dw, reduction=reduction)
        counts[reduction] = (comm.count(), comm.count("all_gather"), out.placements)
    total_weight = aten.nll_loss_forward(dx, dt, dw, 1, -100)[1]
    one = make_dtensor(torch.tensor(1.0, dtype=torch.float64), mesh, [R])
    with comm_mode() as comm:  # the backward of the mean: local, given the replicated scalar grad and total weight
        grad = aten.nll_loss_backward(one, dx, dt, dw, 1, -100, total_weight)
    counts["backward"] = (comm.count(), grad.placements)
    return counts


def test_nll_collectives():
    counts = run_on_ranks(3, check_nll_collectives, 3)[0]
    assert counts["none"] == (0, 0, (Shard(0),))
    assert counts["sum"] == (0, 0, (Partial(),))
    assert counts["mean"] == (1, 0, (Partial(),))  # one all-reduce of the local total weights (a scalar)
    assert counts["backward"] == (0, (Shard(0),))


# ---------------------------------------------------------------- elementwise losses


def _bce_with_logits(x, y, weight=None, **kwargs):
    return F.binary_cross_entropy_with_logits(x, y, weight, pos_weight=weight, **kwargs)


_ELEMENTWISE = {  # name: (loss, input transform, target transform, target differentiable)
    "mse": (F.mse_loss, None, None, True),
    "smooth_l1": (lambda x, y, **kw: F.smooth_l1_loss(x, y, beta=0.5, **kw), None, None, True),
    "huber": (lambda x, y, **kw: F.huber_loss(x, y, delta=0.7, **kw), None, None, True),
    "bce": (F.binary_cross_entropy, torch.sigmoid, torch.sigmoid, False),
    "bce_logits": (_bce_with_logits, None, torch.sigmoid, False),
    "soft_margin": (F.soft_margin_loss, None, torch.sign, False),
}


def check_elementwise(name, mesh_shape, shape, x_p, y_p, w_p, reduction, seed):
    loss, fx, fy, target_grad = _ELEMENTWISE[name]
    mesh = init_device_mesh("cpu", mesh_shape)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    x, y = fx(x) if fx else x, fy(y) if fy else y
    args = [make_dtensor(x, mesh, x_p, requires_grad=True), make_dtensor(y, mesh, y_p, requires_grad=target_grad)]
    if w_p is not None and name.startswith("bce"):  # a per-feature weight broadcast over the rows
        args.append(make_dtensor(torch.rand(shape[-1:], generator=g, dtype=torch.float64) + 0.5, mesh, w_p))
    with comm_mode() as comm:
        assert_spmd_equal(loss, *args, reduction=reduction, atol=1e-10, rtol=1e-10)
    if x.numel():  # torch's meta kernels of the mean backwards divide by numel 0 in Python: those fall back
        _no_loss_fallbacks(comm)


@st.composite
def elementwise_cases(draw, world_size):
    mesh_shape = draw(mesh_shapes(world_size))
    shape = (draw(st.integers(0, 7)), *draw(st.lists(st.integers(1, 4), max_size=2)))
    x_p = draw(placements_for(len(shape), len(mesh_shape), partial=True))
    y_p = draw(placements_for(len(shape), len(mesh_shape)))
    w_p = draw(st.none() | placements_for(1, len(mesh_shape)))
    reduction = draw(st.sampled_from(["none", "sum", "mean", "mean"]))
    name, seed = draw(st.sampled_from(sorted(_ELEMENTWISE))), draw(st.integers(0, 2**16))
    return name, mesh_shape, shape, x_p, y_p, w_p, reduction, seed


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=35)
@given(data=st.data())
def test_elementwise_losses_match_one_device(world_size, data):
    run_on_ranks(world_size, check_elementwise, *data.draw(elementwise_cases(world_size)))


def check_design_case():
    """DESIGN.md: mse_loss mean over 5 rows on 2 ranks (shards of 3 and 2) is the single-device mean."""
    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    dx, dy = make_dtensor(x, mesh, [Shard(0)], requires_grad=True), make_dtensor(y, mesh, [Shard(0)])
    out = assert_spmd_equal(F.mse_loss, dx, dy)
    return out.placements, out.full_tensor().item(), F.mse_loss(x, y).item()


def test_mse_mean_is_exact_on_uneven_shards():
    placements, got, expected = run_on_ranks(2, check_design_case)[0]
    assert placements == (Partial(),)
    assert got == pytest.approx(expected, rel=1e-6)
