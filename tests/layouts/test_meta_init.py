"""The way large models are built: on the ``meta`` device, laid out (parallelize_module, distribute_module,
replicate, fully_shard) with no communication, materialised with ``to_empty`` and initialised under
``dtp.manual_seed(s, strict=True)``; the parameters then equal one device's ``torch.manual_seed(s)`` model
and three AdamW steps train alike. 7 hidden features and 5 batch rows on 2 ranks: uneven everywhere.
"""

import pytest
import torch
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Shard
from dtensor_plus.layouts import ColwiseParallel, RowwiseParallel, fully_shard, parallelize_module, replicate
from dtensor_plus.testing import run_on_ranks


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _shard_rows(name, module, mesh):
    for key, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(key, nn.Parameter(dtp.distribute_tensor(param, mesh, [Shard(0)])))


def _lay_out(model, layout, mesh):
    if layout == "tp":
        parallelize_module(model, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    elif layout == "distribute_module":
        dtp.distribute_module(model, mesh, _shard_rows)
    elif layout == "replicate":
        replicate(model, mesh)
    elif layout == "fully_shard":
        fully_shard(model.fc1, mesh)
        fully_shard(model, mesh)


def _meta_then_train(layout):
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    with torch.device("meta"):
        model = _MLP()
    with dtp.comm_mode() as comm:
        _lay_out(model, layout, mesh)
    assert comm.count() == 0, f"laying out a meta model communicated: {comm.counts}"
    assert all(isinstance(p, DTensor) and p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    dtp.manual_seed(3, strict=True)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    torch.manual_seed(3)
    reference = _MLP()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert not p.is_meta and torch.equal(p.full_tensor(), q), name

    opt, ref_opt = torch.optim.AdamW(model.parameters(), lr=0.05), torch.optim.AdamW(reference.parameters(), lr=0.05)
    torch.manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(5, 4), torch.randn(5, 3)
        if layout in ("replicate", "fully_shard"):  # data parallel: each rank its rows of the batch
            out = model(dtp.distribute_tensor(x, mesh, [Shard(0)]))
            loss = (out - dtp.distribute_tensor(y, mesh, [Shard(0)])).pow(2).mean().full_tensor()
        else:
            loss = (model(x) - y).pow(2).mean()
        ref_loss = (reference(x) - y).pow(2).mean()
        torch.testing.assert_close(loss, ref_loss)
        loss.backward()
        ref_loss.backward()
        opt.step(), ref_opt.step(), opt.zero_grad(), ref_opt.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach())
    return True


@pytest.mark.parametrize("layout", ["tp", "distribute_module", "replicate", "fully_shard"])
def test_meta_model_laid_out_materialised_initialised_trains_as_one_device(layout):
    assert run_on_ranks(2, _meta_then_train, layout) == [True, True]
