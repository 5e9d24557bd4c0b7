"""fully_shard's local compute (layouts/zero_local.py): the forward of a fully_shard-ed model dispatches no DTensor
op (plain wholes, this rank's rows), the DTensor path dispatches every op, AdamW steps the shards on their local
blocks, and a loss computed inside forward (whose per-rank mean could not be put back as the global one) runs
again on the DTensor path, with a warning naming the fixes: exact, as one device.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Shard
from dtensor_plus.dispatcher import DISPATCHER
from dtensor_plus.layouts import fully_shard
from dtensor_plus.testing import run_on_ranks

from test_zero import _data, _model  # noqa: E402  (tests/layouts is on sys.path under pytest's rootdir)

SIZES = (8, 16, 4)


def _dispatched_in_forward(local_compute):
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    model = _model(SIZES)
    for block in model.blocks:
        fully_shard(block, mesh, local_compute=local_compute)
    fully_shard(model, mesh, local_compute=local_compute)
    x, y = (dtp.distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None) for t in _data(SIZES, 0))
    seen, execute = [], DISPATCHER.execute

    def recording(func, args, kwargs):
        seen.append(str(func))
        return execute(func, args, kwargs)

    DISPATCHER.execute = recording
    try:
        out = model(x)
    finally:
        DISPATCHER.execute = execute
    assert isinstance(out, DTensor) and out.placements == (Shard(0),) and out.shape == (8, SIZES[2])
    F.mse_loss(out, y).backward()  # the gradients still land on the shards
    assert all(p.grad is not None and p.grad.placements == (Shard(0),) for p in model.parameters())
    in_forward, seen[:] = len(seen), []
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    DISPATCHER.execute = recording
    try:
        opt.step()  # AdamW on the shards' local blocks (layouts/local_step.py): nothing dispatched
    finally:
        DISPATCHER.execute = execute
    assert all(isinstance(v, DTensor) and v.placements == (Shard(0),) for st in opt.state.values()
               for k, v in st.items() if k != "step")
    return in_forward, len(seen)


@pytest.mark.parametrize("local_compute", [True, False])
def test_local_forward_and_step_dispatch_nothing(local_compute):
    for in_forward, in_step in run_on_ranks(2, _dispatched_in_forward, local_compute):
        assert (in_forward == 0) == local_compute, in_forward  # the DTensor path dispatches every op of the forward
        assert in_step == 0


class _LossInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x, y):
        return F.mse_loss(self.fc(x), y)


def _loss_inside_forward():
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    torch.manual_seed(1)
    model = fully_shard(_LossInside(), mesh)
    torch.manual_seed(1)
    reference = _LossInside()
    xd, yd = (dtp.distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None) for t in (x, y))
    for call in range(2):  # the first call warns and runs again; the second takes the DTensor path at once
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = model(xd, yd)
        named = [w for w in caught if "local_compute=False" in str(w.message)]
        assert len(named) == (1 - call), [str(w.message) for w in caught]
        loss.backward()
        expected = reference(x, y)
        expected.backward()
        torch.testing.assert_close(loss.full_tensor(), expected)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad)
    return True


def test_loss_inside_forward_runs_again_on_the_dtensor_path():
    assert all(run_on_ranks(2, _loss_inside_forward))
