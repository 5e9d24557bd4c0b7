"""Mixed precision: bf16 compute on fp32 master parameters, for replicate (DP) and fully_shard (ZeRO-3) on a
dp mesh. Loss and gradients equal one device computing the same way (params cast to bf16, fp32 gradients)
within bf16 tolerance; masters and their gradients stay fp32; reduce_dtype=bf16 halves the all-reduce bytes.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Shard
from dtensor_plus.layouts import ZeroRedundancyOptimizer, fully_shard, replicate
from dtensor_plus.layouts.precision import MixedPrecision, mixed_precision
from dtensor_plus.testing import run_on_ranks

B, D, F_ = 8, 8, 16
BF16 = dict(atol=2e-2, rtol=2e-2)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, F_), nn.GELU(), nn.Linear(F_, D))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)


def _single_device():
    """The reference: the same casts by hand (fp32 leaves, bf16 compute, fp32 loss and gradients)."""
    model = _model()
    x, y = _data()
    h = F.linear(x.bfloat16(), model[0].weight.bfloat16(), model[0].bias.bfloat16())
    out = F.linear(F.gelu(h), model[2].weight.bfloat16(), model[2].bias.bfloat16())
    loss = F.mse_loss(out.float(), y)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def _run(layout, reduce_dtype):
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    model = _model()
    if layout == "replicate":
        replicate(model, mesh)
    elif layout == "zero2":
        dtp.distribute_module(model, mesh)
        zero = ZeroRedundancyOptimizer(model.parameters(), mesh, torch.optim.AdamW, stage=2)  # its hooks scatter grads
    else:
        fully_shard(model, mesh)
    mixed_precision(model, MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype),
                    reduce_gradients=layout != "zero2")
    x, y = (dtp.distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None) for t in _data())
    with dtp.comm_mode() as comm:
        out = model(x)
        assert out.dtype == torch.bfloat16
        loss = F.mse_loss(out.float(), y)
        loss.backward()
    want_loss, want_grads = _single_device()
    torch.testing.assert_close(loss.full_tensor(), want_loss, **BF16)
    for p, want in zip(zero.masters if layout == "zero2" else model.parameters(), want_grads):  # zero2: grads on the masters
        assert isinstance(p, DTensor) and p.dtype == torch.float32 and p.grad.dtype == torch.float32
        assert not any(q.is_partial() for q in p.grad.placements)  # reduced once
        torch.testing.assert_close(p.grad.full_tensor(), want, **BF16)
    assert not comm.fallbacks, comm
    n = torch.distributed.get_world_size()
    if layout != "replicate":  # one fp32 reduce-scatter for all gradients (one bucket), nothing all-reduced
        assert comm.count("reduce_scatter") == 1 and comm.count("all_reduce") == 0, comm
        assert comm.bytes("reduce_scatter") == (n - 1) * 4 * _param_bytes() // n, comm
    return comm.bytes("all_reduce", "dp"), comm.bytes("reduce_scatter", "dp")


@pytest.mark.parametrize("layout", ["replicate", "fully_shard", "zero2"])
def test_bf16_compute_matches_single_device(layout):
    run_on_ranks(2, _run, layout, torch.float32)


def _param_bytes():
    return sum(p.numel() for p in _model().parameters())


def test_reduce_dtype_bf16_halves_bytes():
    fp32 = run_on_ranks(2, _run, "replicate", torch.float32)[0]
    bf16 = run_on_ranks(2, _run, "replicate", torch.bfloat16)[0]
    # DP on 2 ranks: one all-reduce per gradient, 2(n-1)/n x its bytes = its bytes.
    assert fp32[0] == 4 * _param_bytes() and bf16[0] == 2 * _param_bytes(), (fp32, bf16)


def _check_fully_shard_refuses_bf16_reduce():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    model = fully_shard(_model(), mesh)
    with pytest.raises(ValueError, match="reduce_dtype"):
        mixed_precision(model, MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16))


def test_fully_shard_refuses_bf16_reduce():
    run_on_ranks(2, _check_fully_shard_refuses_bf16_reduce)
