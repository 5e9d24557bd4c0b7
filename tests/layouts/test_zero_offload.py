"""ZeRO-3 with ``CPUOffload`` and the overlapped host optimizer step (layouts/offload.py): every step equals one
device's AdamW step (the losses of the following steps and the final parameters, uneven sizes, an uneven batch),
each block's step is started inside the backward (as its gradients land, before backward ends), the gradients are
consumed by it, and the bytes copied between host and device per step are exactly the shards' (to the device:
every shard for forward plus the saved ones for backward; to the host: every reduced gradient shard). With
``offload_activations`` every saved activation goes to the host and comes back once, the steps still exact. Under
HSDP with two microbatches per step (replicas synchronized and units stepped by the last only) it is still exact.
"""

import pytest
import torch
import torch.nn.functional as F

import dtensor_plus as dtp
from dtensor_plus import Shard
from dtensor_plus.layouts import fully_shard
from dtensor_plus.layouts.offload import OverlappedStep
from dtensor_plus.layouts.zero import CPUOffload
from dtensor_plus.testing import run_on_ranks

from test_zero import _model  # noqa: E402  (tests/layouts is on sys.path under pytest's rootdir)

SIZES, ROWS, STEPS = (6, 10, 3), 7, 4
ADAMW = dict(lr=1e-2, weight_decay=0.1)


def _batch(step):
    g = torch.Generator().manual_seed(700 + step)
    return (torch.randn(ROWS, SIZES[0], generator=g, dtype=torch.float64),
            torch.randn(ROWS, SIZES[2], generator=g, dtype=torch.float64))


def _one_device():
    model = _model(SIZES)
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    losses = []
    for step in range(STEPS):
        x, y = _batch(step)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.detach() for n, p in model.named_parameters()}


def _check_overlapped_step(offload, activations=False, local_compute=True):
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    model = _model(SIZES)
    for block in model.blocks:
        fully_shard(block, mesh, offload=offload, offload_activations=activations, local_compute=local_compute)
    fully_shard(model, mesh, offload=offload, offload_activations=activations, local_compute=local_compute)
    stepper = OverlappedStep(model, torch.optim.AdamW, **ADAMW)
    units = [m._zero_state for m in (model, *model.blocks)]
    schedule = units[0].schedule
    started_in_backward = []  # (unit label, inside backward?) for every step queued
    landed = stepper.landed
    stepper.landed = lambda unit: started_in_backward.append((unit, schedule.backward_started)) or landed(unit)
    losses = []
    for step in range(STEPS):
        started_in_backward.clear()
        for unit in units:
            unit.offload_bytes.clear()
        x, y = (dtp.distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None) for t in _batch(step))
        x.requires_grad_()  # every weight saved for the input gradient: all re-gathered in backward
        loss = F.mse_loss(model(x), y)
        loss.backward()
        losses.append(loss.full_tensor())
        # Each unit's step was queued inside backward as its gradients landed, in backward order: blocks.1's when
        # blocks.0's reduce-scatter started, blocks.0's when the root's did, the root's as backward ended.
        assert started_in_backward == [(units[2], True), (units[1], True), (units[0], True)], started_in_backward
        for unit in units:
            shard_bytes = sum(s._local_tensor.numel() * s._local_tensor.element_size() for _, _, s in unit.entries)
            saved = sum(s._local_tensor.numel() * 8 for _, name, s in unit.entries if name == "weight")
            want = {"to device": shard_bytes + saved, "to host": shard_bytes} if offload else {}
            moved = unit.offload_bytes
            assert {k: moved[k] for k in ("to device", "to host") if k in moved} == want, (unit.label, moved, want)
            # Every activation saved to the host came back once for backward.
            assert moved["activations to host"] == moved["activations to device"], moved
            assert (moved["activations to host"] > 0) == activations, moved
            if offload:
                assert all(s.device.type == "cpu" for _, _, s in unit.entries)
    stepper.wait()
    assert all(p.grad is None for p in model.parameters())  # consumed by the steps
    want_losses, want_params = _one_device()
    torch.testing.assert_close(torch.stack(losses), want_losses)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.full_tensor(), want_params[name], msg=lambda m: f"{name}: {m}")
    stepper.close()


@pytest.mark.parametrize("offload,activations,local_compute", [
    (CPUOffload(pin_memory=False), True, True), (CPUOffload(pin_memory=False), True, False), (None, False, True)],
    ids=["offload with activations", "the same on the DTensor path (saved DTensors)", "no offload"])
def test_overlapped_step_equals_one_device(offload, activations, local_compute):
    run_on_ranks(2, _check_overlapped_step, offload, activations, local_compute)


def _check_errors():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    with pytest.raises(ValueError, match="element-wise optimizer"):
        OverlappedStep(fully_shard(_model(SIZES), mesh), torch.optim.LBFGS)
    with pytest.raises(ValueError, match="overlap=True"):
        OverlappedStep(fully_shard(_model(SIZES), mesh, overlap=False), torch.optim.AdamW)
    with pytest.raises(ValueError, match="no fully_shard module"):
        OverlappedStep(_model(SIZES), torch.optim.AdamW)
    model = fully_shard(_model(SIZES), mesh)
    OverlappedStep(model, torch.optim.AdamW)
    with pytest.raises(ValueError, match="already has an OverlappedStep"):
        OverlappedStep(model, torch.optim.AdamW)


def test_errors_name_the_fix():
    run_on_ranks(2, _check_errors)


# -- with HSDP and gradient accumulation ---------------------------------------------------------------------------


def _check_hsdp_accumulation():
    """HSDP on 2 x 2 ranks, offloaded, two microbatches per step: the first neither synchronizes the replicas nor
    steps, the second does both, one unit at a time on the side thread; equal to one device's accumulated steps."""
    from dtensor_plus.layouts.zero import set_requires_all_reduce

    hsdp = ("replicate", "shard")
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=hsdp)
    model, reference = _model(SIZES), _model(SIZES)
    for block in model.blocks:
        fully_shard(block, mesh, mesh_dim=hsdp, offload=CPUOffload(pin_memory=False))
    fully_shard(model, mesh, mesh_dim=hsdp, offload=CPUOffload(pin_memory=False))
    stepper = OverlappedStep(model, torch.optim.AdamW, **ADAMW)
    opt = torch.optim.AdamW(reference.parameters(), **ADAMW)
    for step in range(2):
        for micro in range(2):
            last = micro == 1
            set_requires_all_reduce(model, last)
            stepper.set_requires_step(last)
            x, y = _batch(10 * step + micro)
            F.mse_loss(reference(x), y).backward()
            x, y = (dtp.distribute_tensor(t, mesh, [Shard(0), Shard(0)], src_data_rank=None) for t in (x, y))
            with dtp.comm_mode() as comm:
                F.mse_loss(model(x), y).backward()
            assert comm.count("all_reduce", "replicate") == (3 if last else 0), comm  # once per unit, at the last
        opt.step()
        opt.zero_grad()
    stepper.close()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach(), msg=lambda m, name=name: f"{name}: {m}")


def test_hsdp_offload_overlapped_step_with_accumulation():
    run_on_ranks(4, _check_hsdp_accumulation)
