"""replicate's local compute (layouts/data_local.py, layouts/local_step.py): the forward runs on each rank's rows
without DTensor dispatch on the dp mesh dim, and AdamW steps the parameters on their blocks. Outputs, input and
parameter gradients and several AdamW steps equal one device, on uneven batches no mesh divides (a rank of 4 holding
no row at all sends every rank down the DTensor path), on a 1-D dp mesh and on (dp, tp) with a Megatron MLP on mesh["tp"]; nothing is dispatched on the dp
mesh dim; the DTensor path still runs where the local view could not be exact.

Legend: B batch, T sequence, D model width, F MLP width.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Replicate, Shard
from dtensor_plus import dispatch
from dtensor_plus.dispatcher import DISPATCHER
from dtensor_plus.layouts import ColwiseParallel, RowwiseParallel, parallelize_module
from dtensor_plus.layouts.data import replicate, shard_batch
from dtensor_plus.testing import run_on_ranks
from test_data_parallel import Net  # noqa: E402  (the same small model)

T, D, F_ = 3, 8, 16
PLAN = {"fc1": ColwiseParallel(use_local_output=False), "fc2": RowwiseParallel(use_local_output=False)}


def _placed(mesh, local_compute=True):
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    if "tp" in mesh.mesh_dim_names:
        parallelize_module(model, mesh["tp"], PLAN)
    replicate(model, mesh, local_compute=local_compute)
    return model, reference


def _train_equals_one_device(mesh_shape, names, batch_sizes):
    """Several AdamW steps, each batch of another size: loss, output, input and parameter gradients, parameters
    and optimizer state equal one device's, in their layouts."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    model, reference = _placed(mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False)
    g = torch.Generator().manual_seed(1)
    for b in batch_sizes:
        x, y = torch.randn(b, T, D, generator=g), torch.randn(b, T, D, generator=g)
        x_dt = shard_batch(x, mesh).requires_grad_()
        out = model(x_dt)
        assert isinstance(out, DTensor) and out.shape == (b, T, D), out.shape
        dp = mesh.size(names.index("dp"))
        if -(-b // dp) * (dp - 1) < b:  # every dp rank holds rows: the local path, its output put back on dp
            assert out.placements[names.index("dp")] == Shard(0)
        # else (5 rows on 4 ranks: 2, 2, 1, 0) every rank took the DTensor path together: exact all the same
        loss = (out - shard_batch(y, mesh)).pow(2).mean()
        loss.backward()
        x_ref = x.clone().requires_grad_()
        ref_out = reference(x_ref)
        ref_loss = (ref_out - y).pow(2).mean()
        ref_loss.backward()
        torch.testing.assert_close(out.full_tensor(), ref_out)
        torch.testing.assert_close(loss.full_tensor(), ref_loss)
        torch.testing.assert_close(x_dt.grad.full_tensor(), x_ref.grad)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert isinstance(p.grad, DTensor) and p.grad.placements == p.placements, (name, p.grad)
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, msg=lambda m: f"grad of {name}: {m}")
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.full_tensor(), q, msg=lambda m: f"{name} after the steps: {m}")
        state = opt.state[p]["exp_avg"]
        assert isinstance(state, DTensor) and state._spec == p._spec, (name, state)
        torch.testing.assert_close(state.full_tensor(), ref_opt.state[q]["exp_avg"])
    return True


# 5 and 7 rows: no mesh divides them; on dp=4, 5 rows are chunks 2, 2, 1, 0 (the last rank computes on no row).
CASES = [((2,), ("dp",)), ((4,), ("dp",)), ((2, 2), ("dp", "tp"))]


@pytest.mark.parametrize("mesh_shape, names", CASES, ids=["dp2", "dp4", "dp2xtp2"])
def test_training_steps_equal_one_device_on_uneven_batches(mesh_shape, names):
    world = 1
    for s in mesh_shape:
        world *= s
    assert all(run_on_ranks(world, _train_equals_one_device, mesh_shape, names, (5, 7, 4)))


def _dispatched_meshes(mesh_shape, names, local_compute):
    """The meshes of every DTensor op dispatched by a forward, a loss, a backward and an AdamW step, by phase."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    model, _ = _placed(mesh, local_compute)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    x, y = torch.randn(6, T, D), torch.randn(6, T, D)
    seen, execute = [], DISPATCHER.execute

    def recording(func, args, kwargs):
        seen.extend(a._spec.mesh.mesh_dim_names for a in args if isinstance(a, DTensor))
        return execute(func, args, kwargs)

    phases = {}
    DISPATCHER.execute = recording
    try:
        x_dt, y_dt = shard_batch(x, mesh), shard_batch(y, mesh)
        out = model(x_dt)
        phases["forward"], seen[:] = sorted(set(seen)), []
        loss = (out - y_dt).pow(2).mean()
        loss.backward()
        phases["loss and backward"], seen[:] = sorted(set(seen)), []
        before = dict(dispatch.cache_info())
        opt.step()
        after = dispatch.cache_info()
        phases["step"], seen[:] = sorted(set(seen)), []
        phases["step lookups"] = after["hits"] + after["misses"] - before["hits"] - before["misses"]
    finally:
        DISPATCHER.execute = execute
    return phases


@pytest.mark.parametrize("mesh_shape, names", [((2,), ("dp",)), ((2, 2), ("dp", "tp"))], ids=["dp2", "dp2xtp2"])
def test_nothing_is_dispatched_on_the_dp_mesh_dim(mesh_shape, names):
    """Local compute: the forward dispatches no op on a mesh with dp (1-D: none at all; (dp, tp): only on
    mesh["tp"]), and AdamW's step none at all; the loss on the outputs (and its backward) still runs on the whole
    mesh, which is what keeps its mean exact. The DTensor path (local_compute=False) dispatches the forward on the
    whole mesh (the same probe sees it); its AdamW step runs on the blocks too (layouts/local_step.py: every DTensor
    parameter whose gradient is in its layout; test_local_step_memo.py shows the probe seeing a step on DTensors)."""
    world = 1
    for s in mesh_shape:
        world *= s
    local = run_on_ranks(world, _dispatched_meshes, mesh_shape, names, True)[0]
    whole = run_on_ranks(world, _dispatched_meshes, mesh_shape, names, False)[0]
    assert local["forward"] == ([] if len(names) == 1 else [("tp",)]), local
    assert local["step"] == [] and local["step lookups"] == 0, local
    assert names in local["loss and backward"], local
    assert whole["forward"] == [names] and whole["step"] == [] and whole["step lookups"] == 0, whole


def _falls_back(case):
    """Forwards the local view cannot make exact take the DTensor path (the forward dispatches on the whole
    mesh) and still equal one device."""
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    model, reference = _placed(mesh)
    x = torch.randn(4, T, D)
    if case == "strict rng":
        dtp.manual_seed(0, strict=True)
        x_in = shard_batch(x, mesh)
    elif case == "replicated input":
        x_in = dtp.distribute_tensor(x, mesh, [Replicate()], src_data_rank=None)
    else:  # a plain input: its rows are not known
        x_in = x
    seen, execute = [], DISPATCHER.execute

    def recording(func, args, kwargs):
        seen.append(func)
        return execute(func, args, kwargs)

    DISPATCHER.execute = recording
    try:
        with dtp.implicit_replication():
            out = model(x_in)
    finally:
        DISPATCHER.execute = execute
        if case == "strict rng":
            dtp.manual_seed(0)
    torch.testing.assert_close(out.full_tensor() if isinstance(out, DTensor) else out, reference(x))
    return len(seen) > 0


@pytest.mark.parametrize("case", ["strict rng", "replicated input", "plain input"])
def test_forwards_the_local_view_cannot_make_exact_take_the_dtensor_path(case):
    assert all(run_on_ranks(2, _falls_back, case))


class _LossInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x_BTD):
        return self.fc(x_BTD).pow(2).mean()


def _loss_inside_rank():
    """A loss computed inside forward (Hugging Face with labels=): the call reruns on the DTensor path, once warned,
    and stays there; the loss and the gradients equal one device over uneven batches."""
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    single = _LossInside()
    model = replicate(copy.deepcopy(single), mesh)
    for batch in (5, 3):  # uneven: 3 + 2 rows, then 2 + 1
        x = torch.randn(batch, T, D, generator=torch.Generator().manual_seed(batch))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = model(shard_batch(x, mesh))
        single.zero_grad()
        want = single(x)
        want.backward()
        loss.backward()
        torch.testing.assert_close(loss.full_tensor(), want)
        for p, q in zip(model.parameters(), single.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad)
            p.grad = None
        warned = [w for w in caught if "DTensor path from now on" in str(w.message)]
        assert len(warned) == (1 if batch == 5 else 0), [str(w.message) for w in caught]
    return True


def test_a_loss_computed_inside_forward_reruns_on_the_dtensor_path_exactly():
    assert all(run_on_ranks(2, _loss_inside_rank))


class _Dropout(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.5, self.training)


def _dropout_masks():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    model = replicate(_Dropout(), mesh)
    dtp.manual_seed(7)
    first = model(shard_batch(torch.ones(4, 64), mesh)).full_tensor()
    second = model(shard_batch(torch.ones(4, 64), mesh)).full_tensor()
    dtp.manual_seed(7)
    again = model(shard_batch(torch.ones(4, 64), mesh)).full_tensor()
    return first, second, again


def test_dropout_draws_differ_between_dp_ranks_and_repeat():
    first, second, again = run_on_ranks(2, _dropout_masks)[0]
    assert not torch.equal(first[:2], first[2:]), "both dp ranks drew the same mask"
    assert not torch.equal(first, second)
    assert torch.equal(first, again)


def _cross_entropy_with_ignored_targets(how):
    """A mean cross-entropy over an uneven batch whose ranks keep very different numbers of targets (most of the
    second rank's are ignore_index): replicate's buckets, or ZeRO-2 over replicate's local leaves; the loss, the
    gradients (replicate) and the parameters after two AdamW steps equal one device."""
    from dtensor_plus.layouts.zero import ZeroRedundancyOptimizer

    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, F_), nn.GELU(), nn.Linear(F_, 11))
    reference = copy.deepcopy(model)
    if how == "buckets":
        replicate(model, mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    else:
        replicate(model, mesh, reduce_in_backward=False)
        opt = ZeroRedundancyOptimizer(model.parameters(), mesh, torch.optim.AdamW, stage=2, lr=1e-2, foreach=False)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False)
    g = torch.Generator().manual_seed(2)
    for step in range(2):
        x, y = torch.randn(5, T, D, generator=g), torch.randint(0, 11, (5, T), generator=g)
        y[3:] = -100  # rows 3, 4 (the second rank's) ignored but one target: local counts 9 and 1
        y[4, 1] = 3
        out = model(shard_batch(x, mesh))
        loss = F.cross_entropy(out.flatten(0, 1), shard_batch(y, mesh).flatten(0, 1))
        loss.backward()
        ref_loss = F.cross_entropy(reference(x).flatten(0, 1), y.flatten(0, 1))
        ref_loss.backward()
        torch.testing.assert_close(loss.full_tensor(), ref_loss)
        if how == "buckets":
            for p, q in zip(model.parameters(), reference.parameters()):
                torch.testing.assert_close(p.grad.full_tensor(), q.grad)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.full_tensor(), q.detach(), msg=lambda m: f"step {step}: {m}")
    return True


@pytest.mark.parametrize("how", ["buckets", "zero2-leaves"])
def test_cross_entropy_with_ignored_targets_on_an_uneven_batch(how):
    assert all(run_on_ranks(2, _cross_entropy_with_ignored_targets, how))


def test_a_dp_rank_without_rows_on_dp_x_tp_takes_the_dtensor_path(tmp_path):
    """One row on (dp, tp) = (2, 2): the dp rank with no row would have decided the tp ops on empty tensors
    (where a gather costs 0 bytes) and laid its logits out unlike the other ranks; the forward takes the DTensor
    path on every rank instead (known from the global shape). test_uneven_layouts' LM, vocab-parallel logits into
    loss_parallel: equal to one device, logits Shard(2) on tp on every rank, nothing gathered on tp."""
    from test_uneven_layouts import _lm_on_dp_tp

    assert all(run_on_ranks(4, _lm_on_dp_tp, False, 97, 7, 1, str(tmp_path / "step"), True))
