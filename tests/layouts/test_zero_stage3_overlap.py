"""fully_shard with its overlap on (next unit's all-gather prefetched in forward and backward, reduce-scatters in
flight until the next unit's starts or backward ends) and local compute on, over uneven sizes and an uneven
batch: every step's loss and gradients equal one device's, prefetches are really taken, and nothing is left in
flight after backward. The same with overlap off and with the DTensor path, so the four combinations agree.
"""

import pytest
import torch
import torch.nn.functional as F

import dtensor_plus as dtp
from dtensor_plus import DTensor, Shard
from dtensor_plus.layouts import fully_shard
from dtensor_plus.testing import run_on_ranks

from test_zero import _model  # noqa: E402  (tests/layouts is on sys.path under pytest's rootdir)

SIZES, ROWS, STEPS = (6, 10, 3), 7, 3  # 7 rows over 2 ranks: 4 + 3; every weight's rows uneven over 2 and 4


def _batch(step):
    g = torch.Generator().manual_seed(300 + step)
    return (torch.randn(ROWS, SIZES[0], generator=g, dtype=torch.float64),
            torch.randn(ROWS, SIZES[2], generator=g, dtype=torch.float64))


def _one_device():
    model = _model(SIZES)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    record = []
    for step in range(STEPS):
        x, y = _batch(step)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        record.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.step()
        opt.zero_grad()
    return record


def _check(local_compute, overlap):
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    model = _model(SIZES)
    for block in model.blocks:
        fully_shard(block, mesh, local_compute=local_compute, overlap=overlap)
    fully_shard(model, mesh, local_compute=local_compute, overlap=overlap)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    prefetched = []  # per block forward: was its all-gather already in flight when it began?
    for block in model.blocks:  # prepend: runs before fully_shard's pre-hook takes the gather
        block.register_forward_pre_hook(lambda m, a: prefetched.append(m._zero_state.prefetched is not None), prepend=True)
    units = [m._zero_state for m in (model, *model.blocks)]
    want = _one_device()
    for step in range(STEPS):
        prefetched.clear()
        x, y = (dtp.distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None) for t in _batch(step))
        loss = F.mse_loss(model(x), y)
        loss.backward()
        assert not model._zero_state.schedule.reducing  # every reduce-scatter finished when backward ended
        assert all(u.regather_prefetched is None and not u.alive for u in units)
        want_loss, want_grads = want[step]
        torch.testing.assert_close(loss.full_tensor(), want_loss, msg=lambda m: f"step {step} loss: {m}")
        for name, p in model.named_parameters():
            assert isinstance(p.grad, DTensor) and p.grad.placements == p.placements, name
            torch.testing.assert_close(p.grad.full_tensor(), want_grads[name], msg=lambda m: f"step {step} {name}: {m}")
        # From the second step on, each block's gather was issued while the unit before it ran (overlap only).
        assert prefetched == ([False, False] if step == 0 or not overlap else [True, True]), (step, prefetched)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("local_compute,overlap", [(True, True), (True, False), (False, True), (False, False)])
def test_equal_to_one_device_step_by_step(local_compute, overlap):
    run_on_ranks(2, _check, local_compute, overlap)


@pytest.mark.slow
def test_equal_to_one_device_on_four_ranks():
    run_on_ranks(4, _check, True, True)  # rows 2, 2, 2, 1; the head's bias rows 1, 1, 1, 0 (an empty shard)
