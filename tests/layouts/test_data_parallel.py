"""Data parallelism as a layout (layouts/data.py): each training step all-reduces every parameter's gradient
exactly once on dp (in backward; AdamW then communicates nothing), and the reduced gradients equal one
device's. On dp = 2 and 4, and on (dp, tp) = (2, 2) composed with a Megatron MLP on mesh["tp"].

Legend: B batch, T sequence, D model width, F MLP width.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Replicate, Shard
from dtensor_plus.layouts import ColwiseParallel, RowwiseParallel, parallelize_module
from dtensor_plus.layouts.data import GradientBucket, reduce_grad_in_backward, replicate, shard_batch, sync_gradients
from dtensor_plus.testing import run_on_ranks

B, T, D, F_ = 4, 3, 8, 16


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, F_)
        self.fc2 = nn.Linear(F_, D)

    def forward(self, x_BTD):
        return self.fc2(F.gelu(self.fc1(self.norm(x_BTD))))


PLAN = {"fc1": ColwiseParallel(use_local_output=False), "fc2": RowwiseParallel(use_local_output=False)}


def _loss(model, x_BTD, y_BTD):
    return (model(x_BTD) - y_BTD).pow(2).mean()


def _run(mesh_shape, names, reduce_in_backward):
    mesh = dtp.init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    if "tp" in names:
        parallelize_module(model, mesh["tp"], PLAN)
    replicate(model, mesh, reduce_in_backward=reduce_in_backward)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False)

    counts = []
    for step in range(2):
        x, y = torch.randn(B, T, D), torch.randn(B, T, D)
        with dtp.comm_mode() as comm:
            loss = _loss(model, shard_batch(x, mesh), shard_batch(y, mesh))
            loss.backward()
            if not reduce_in_backward:
                sync_gradients(model)
            grads = {name: p.grad for name, p in model.named_parameters()}
            with dtp.comm_mode() as in_step:
                opt.step()
        ref_loss = _loss(reference, x, y)
        ref_loss.backward()
        torch.testing.assert_close(loss.full_tensor(), ref_loss)
        for name, p in reference.named_parameters():
            assert tuple(grads[name].placements) == tuple(dict(model.named_parameters())[name].placements), name
            torch.testing.assert_close(grads[name].full_tensor(), p.grad, msg=lambda m: f"grad of {name}: {m}")
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        assert in_step.count() == 0, in_step  # the optimizer never sees a Partial gradient: no hidden collectives
        n = mesh.size("dp")
        grad_bytes = sum(g._local_tensor.numel() * g.element_size() for g in grads.values())
        counts.append((comm.count("all_reduce", "dp"), comm.bytes("all_reduce", "dp"), 2 * (n - 1) * grad_bytes // n, dict(comm.fallbacks)))
    for name, p in reference.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name].full_tensor(), p)
    return counts


# Gradients reducing over the same mesh dims share one all-reduce per dim. On (dp, tp) there are two such
# groups: most gradients are Partial on dp only, but the norm's are Partial on dp and tp (the gradient entering
# it from the column-wise fc1 is Partial on tp).
CASES = [((2,), ("dp",), 1), ((4,), ("dp",), 1), ((2, 2), ("dp", "tp"), 2)]


@pytest.mark.parametrize("reduce_in_backward", [True, False], ids=["hook", "sync"])
@pytest.mark.parametrize("mesh_shape, names, num_groups", CASES, ids=["dp2", "dp4", "dp2xtp2"])
def test_gradients_reduced_in_one_bucket_per_step(mesh_shape, names, num_groups, reduce_in_backward):
    """All gradients of these small models fit one bucket: one all-reduce on dp per group per step, of exactly
    the analytic 2(n-1)/n bytes of the gradients."""
    world = 1
    for s in mesh_shape:
        world *= s
    for counts in run_on_ranks(world, _run, mesh_shape, names, reduce_in_backward):
        for all_reduces, sent, analytic, fallbacks in counts:
            assert all_reduces == num_groups and sent == analytic, (all_reduces, sent, analytic)
            assert not fallbacks, fallbacks


def _lift_rank():
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    w = torch.arange(8.0).reshape(4, 2)
    on_tp = dtp.distribute_tensor(w, mesh["tp"], [Shard(0)], src_data_rank=None)
    lin = nn.Linear(2, 4)
    lin.weight = nn.Parameter(on_tp)
    replicate(lin, mesh)
    assert lin.weight.device_mesh == mesh and tuple(lin.weight.placements) == (Replicate(), Shard(0))
    assert isinstance(lin.bias, DTensor) and tuple(lin.bias.placements) == (Replicate(), Replicate())
    return torch.equal(lin.weight.full_tensor(), w)


def test_lift_from_tp_submesh_keeps_tp_placement():
    assert all(run_on_ranks(4, _lift_rank))


def _bad_mesh_rank():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("batch",))
    with pytest.raises(ValueError, match="no mesh dim named 'dp'"):
        replicate(nn.Linear(2, 2), mesh)
    return True


def test_replicate_names_the_missing_mesh_dim():
    assert all(run_on_ranks(2, _bad_mesh_rank))


def _small_buckets(mesh_shape, names):
    """Gradients reduced in buckets of a 1-byte cap: every gradient Partial on dp alone fills a bucket by itself
    and its all-reduce starts inside backward; the norm's (Partial on dp and tp) wait for the end of backward."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    if "tp" in names:
        parallelize_module(model, mesh["tp"], PLAN)
    replicate(model, mesh, reduce_in_backward=False)
    reduce_grad_in_backward(list(model.parameters()), GradientBucket(cap_bytes=1))
    x, y = torch.randn(B, T, D), torch.randn(B, T, D)
    with dtp.comm_mode() as comm:
        _loss(model, shard_batch(x, mesh), shard_batch(y, mesh)).backward()
    _loss(reference, x, y).backward()
    for (name, p), want in zip(model.named_parameters(), reference.parameters()):
        assert tuple(p.grad.placements) == tuple(p.placements), name
        torch.testing.assert_close(p.grad.full_tensor(), want.grad, msg=lambda m: f"grad of {name}: {m}")
    return comm.count("all_reduce", "dp")


@pytest.mark.parametrize("mesh_shape, names, all_reduces", [((2,), ("dp",), 6), ((2, 2), ("dp", "tp"), 4 + 1)],
                         ids=["dp2", "dp2xtp2"])
def test_a_bucket_per_gradient_under_a_small_cap(mesh_shape, names, all_reduces):
    """dp2: one all-reduce per parameter (6); dp2xtp2: one per fc1/fc2 parameter, and one for the two norm
    gradients together at the end of backward."""
    world = 1
    for s in mesh_shape:
        world *= s
    assert run_on_ranks(world, _small_buckets, mesh_shape, names) == [all_reduces] * world


def _old_keyword():
    mesh = dtp.init_device_mesh("cpu", (2, 1), mesh_dim_names=("batch", "tp"))
    torch.manual_seed(0)
    new, old = nn.Linear(2, 3), nn.Linear(2, 3)
    replicate(new, mesh, dp_mesh_dim="batch")
    with pytest.warns(DeprecationWarning, match=r"replicate\(dp_dim=\.\.\.\) is now dp_mesh_dim=\.\.\."):
        replicate(old, mesh, dp_dim="batch")
    assert tuple(old.weight.placements) == tuple(new.weight.placements) == (Replicate(), Replicate())
    x = torch.arange(8.0).view(4, 2)
    with pytest.warns(DeprecationWarning, match=r"shard_batch\(dp_dim=\.\.\.\) is now dp_mesh_dim=\.\.\."):
        old_x = shard_batch(x, mesh, dp_dim="batch")
    new_x = shard_batch(x, mesh, dp_mesh_dim="batch")
    assert tuple(old_x.placements) == tuple(new_x.placements) == (Shard(0), Replicate())
    assert torch.equal(old_x.to_local(), new_x.to_local())
    with pytest.raises(TypeError, match="pass dp_mesh_dim= only"):
        replicate(nn.Linear(2, 3), mesh, dp_dim="batch", dp_mesh_dim="batch")
    return True


def test_old_dp_dim_keyword_keeps_working_and_warns():
    """``dp_dim=`` (the name before issue 17) still places as ``dp_mesh_dim=``, with a DeprecationWarning."""
    assert all(run_on_ranks(2, _old_keyword))


def _shard_batch_as_distribute_tensor():
    from dtensor_plus.api import distribute_tensor

    mesh = dtp.init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
    for whole, dp_mesh_dim in [(torch.arange(15.0).view(5, 3), "dp"),  # uneven: 3 and 2 rows
                               (torch.arange(6).view(1, 6), "dp"),  # one row: rank 1's block is empty
                               (torch.arange(8.0).view(2, 4).t(), "dp"),  # not contiguous
                               (torch.arange(4.0), "-")]:  # no dp mesh dim: Replicate everywhere
        got = shard_batch(whole, mesh, dp_mesh_dim=dp_mesh_dim)
        placements = [Shard(0) if name == dp_mesh_dim else Replicate() for name in mesh.mesh_dim_names]
        want = distribute_tensor(whole, mesh, placements, src_data_rank=None)
        assert got._spec == want._spec and got.stride() == want.stride()
        assert torch.equal(got.to_local(), want.to_local()) and got.to_local().is_contiguous()
        assert got.to_local().untyped_storage().data_ptr() != whole.untyped_storage().data_ptr()  # own storage
    grad_wanted = shard_batch(torch.ones(4, 2, requires_grad=True), mesh)
    assert grad_wanted.requires_grad and grad_wanted.is_leaf
    return True


def test_shard_batch_equals_distribute_tensor():
    """shard_batch's fast path cuts the same block with the same spec as distribute_tensor(src_data_rank=None)."""
    assert all(run_on_ranks(2, _shard_batch_as_distribute_tensor))
