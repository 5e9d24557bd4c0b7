"""Global-norm gradient clipping on a (dp, tp) mesh: gradients Replicate, Shard on tp, Shard on dp (as after
ZeRO), both, and Partial. Ours (layouts.clip) and torch's own clip_grad_norm_ give the single-device total
norm and clipped gradients for the 2-norm, a 3-norm and the inf-norm; ours moves only scalars.

Also: clipping after gradient accumulation with ZeRO-3 on (dp, tp) equals one device.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Partial, Replicate, Shard
from dtensor_plus.layouts.clip import clip_grad_norm_
from dtensor_plus.layouts.zero import fully_shard
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor

INF = float("inf")
# One gradient per layout; shapes uneven on purpose (5 rows on 2 ranks).
LAYOUTS = [
    (Replicate(), Replicate()),   # plain DP after reduction
    (Replicate(), Shard(0)),      # tp colwise
    (Shard(1), Shard(0)),         # ZeRO on dp + tp
    (Partial(), Replicate()),     # DP before its reduction
    (Shard(0), Partial()),        # tp rowwise partial
]


def _wholes():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(5, 4, generator=g, dtype=torch.float64) * (i + 1) for i in range(len(LAYOUTS))]


def _params(mesh, wholes):
    params = []
    for whole, placements in zip(wholes, LAYOUTS):
        p = nn.Parameter(make_dtensor(torch.zeros_like(whole), mesh, [Replicate() if q.is_partial() else q for q in placements]))
        p.grad = make_dtensor(whole, mesh, placements)
        params.append(p)
    return params


def _check_clip(norm_type, ours, foreach=None):
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    wholes = _wholes()
    params = _params(mesh, wholes)
    with dtp.comm_mode() as comm:
        if ours:
            total = clip_grad_norm_(params, 1.0, norm_type)
        else:
            total = torch.nn.utils.clip_grad_norm_(params, 1.0, norm_type, foreach=foreach)
    ref = [nn.Parameter(torch.zeros_like(w)) for w in wholes]
    for r, w in zip(ref, wholes):
        r.grad = w.clone()
    want = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type)
    assert isinstance(total, DTensor) and total.placements == (Replicate(), Replicate())
    torch.testing.assert_close(total.full_tensor(), want)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad.full_tensor(), r.grad)
    assert not comm.fallbacks, comm
    if ours:
        # Only the two Partial gradients move (each all-reduced once); otherwise one scalar per mesh dim.
        assert comm.count("all_gather") == 0 and comm.count("reduce_scatter") == 0, comm
        assert comm.count("all_reduce") == 2 + 2, comm
        assert comm.bytes("all_reduce") <= 2 * 5 * 4 * 8 + 2 * 8, comm
    return comm.bytes()


@pytest.mark.parametrize("norm_type", [2.0, 3.0, INF])
def test_clip_matches_single_device(norm_type):
    ours = run_on_ranks(4, _check_clip, norm_type, True)
    torchs = run_on_ranks(4, _check_clip, norm_type, False)  # per-tensor path: 2-norms gather the shards
    assert ours[0] <= torchs[0]
    # torch's foreach path runs on ops/foreach.py's rules: the same values and traffic as its per-tensor path.
    assert run_on_ranks(4, _check_clip, norm_type, False, True) == torchs


def _check_foreach_ops():
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    wholes = _wholes()
    xs = [make_dtensor(w, mesh, pl) for w, pl in zip(wholes, LAYOUTS)]
    ys = [make_dtensor(w.flip(0), mesh, pl) for w, pl in zip(wholes, reversed(LAYOUTS))]
    with dtp.comm_mode() as comm:
        sums = torch._foreach_add(xs, ys)
        scaled = torch._foreach_mul(xs, 0.5)
        norms = torch._foreach_norm(xs, 1)
        torch._foreach_mul_(xs, dtp.distribute_tensor(torch.tensor(3.0, dtype=torch.float64), mesh, [Replicate()] * 2))
    assert not comm.fallbacks, comm
    for w, s, sc, n, x in zip(wholes, sums, scaled, norms, xs):
        torch.testing.assert_close(s.full_tensor(), w + w.flip(0))
        torch.testing.assert_close(sc.full_tensor(), w * 0.5)
        torch.testing.assert_close(n.full_tensor(), torch.linalg.vector_norm(w, 1))
        torch.testing.assert_close(x.full_tensor(), w * 3)
    maxed = [make_dtensor(wholes[0], mesh, [Partial("max"), Replicate()])]
    with pytest.raises(ValueError, match="in place"):
        torch._foreach_mul_(maxed, 2.0)


def test_foreach_ops_follow_per_tensor_rules():
    run_on_ranks(4, _check_foreach_ops)


def _check_no_clip_and_errors():
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    params = _params(mesh, [w * 1e-3 for w in _wholes()])
    before = [p.grad.full_tensor() for p in params]
    clip_grad_norm_(params, 1e3)  # below max_norm: gradients unchanged (the coefficient is clamped to 1)
    for p, b in zip(params, before):
        torch.testing.assert_close(p.grad.full_tensor(), b)
    with pytest.raises(ValueError, match="norm_type"):
        clip_grad_norm_(params, 1.0, norm_type=0.0)
    params[0].grad = torch.zeros(5, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="plain tensor"):
        clip_grad_norm_(params, 1.0)


def test_no_clip_below_max_norm_and_errors():
    run_on_ranks(4, _check_no_clip_and_errors)


def _check_several_meshes(norm_type):
    """Gradients on mesh["tp"], mesh["dp"] and the whole (dp, tp) mesh (a model whose layers were placed on
    sub-meshes): one joint norm and the same clipped gradients as one device; meshes over other ranks refused."""
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    wholes = _wholes()[:3]
    layouts = [(mesh["tp"], [Shard(0)]), (mesh["dp"], [Replicate()]), (mesh, [Shard(1), Partial()])]
    params = []
    for whole, (sub, placements) in zip(wholes, layouts):
        p = nn.Parameter(make_dtensor(torch.zeros_like(whole), sub, [Replicate() if q.is_partial() else q for q in placements]))
        p.grad = make_dtensor(whole, sub, placements)
        params.append(p)
    reference = [nn.Parameter(torch.zeros_like(w)) for w in wholes]
    for r, w in zip(reference, wholes):
        r.grad = w.clone()
    total = clip_grad_norm_(params, 1.0, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(reference, 1.0, norm_type)
    torch.testing.assert_close(total, expected)
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.grad.full_tensor(), r.grad)
    other = dtp.DeviceMesh("cpu", [[0, 1]], mesh_dim_names=("a", "b"))  # ranks 0 and 1 only
    stray = nn.Parameter(dtp.distribute_tensor(torch.zeros(2), other, [Replicate(), Replicate()]))
    if other.get_coordinate() is None:
        return None
    stray.grad = dtp.distribute_tensor(torch.ones(2), other, [Replicate(), Replicate()])
    with pytest.raises(ValueError, match="not slices of one mesh"):
        clip_grad_norm_([params[0], stray], 1.0, norm_type)
    return True


@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF])
def test_clip_over_several_meshes_matches_single_device(norm_type):
    assert run_on_ranks(4, _check_several_meshes, norm_type)[:2] == [True, True]


# -- clipping after gradient accumulation, ZeRO-3 on (dp, tp) ----------------------------------------------

B, D, F_, MICRO = 4, 6, 8, 2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, F_), nn.GELU(), nn.Linear(F_, D)).double()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, D, generator=g, dtype=torch.float64))
            for _ in range(MICRO)]


def _single_device():
    model = _model()
    for x, y in _batches():
        (F.mse_loss(model(x), y) / MICRO).backward()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    return total, [p.grad for p in model.parameters()]


def _check_accumulation():
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = _model()
    # tp: the first Linear colwise (weight rows, bias), the second's weight rowwise (columns) on tp.
    tp = {"0.weight": [Replicate(), Shard(0)], "0.bias": [Replicate(), Shard(0)], "2.weight": [Replicate(), Shard(1)],
          "2.bias": [Replicate(), Replicate()]}
    for name, p in list(model.named_parameters()):
        owner, key = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        owner._parameters[key] = nn.Parameter(dtp.distribute_tensor(p.detach(), mesh, tp[name], src_data_rank=None))
    fully_shard(model, mesh, mesh_dim="dp")
    for x, y in _batches():
        xs, ys = (dtp.distribute_tensor(t, mesh, [Shard(0), Replicate()], src_data_rank=None) for t in (x, y))
        (F.mse_loss(model(xs), ys) / MICRO).backward()
    with dtp.comm_mode() as comm:
        total = clip_grad_norm_(model.parameters(), 0.1)
    want_total, want_grads = _single_device()
    torch.testing.assert_close(total.full_tensor(), want_total)
    for p, want in zip(model.parameters(), want_grads):
        torch.testing.assert_close(p.grad.full_tensor(), want)
    assert comm.count("all_gather") == 0 and not comm.fallbacks, comm


def test_clip_after_accumulation_zero3_tp():
    run_on_ranks(4, _check_accumulation)
