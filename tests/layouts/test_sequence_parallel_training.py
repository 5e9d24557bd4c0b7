"""Three SGD steps of a small causal attention model under each sequence-parallel scheme equal one device's:
losses, every parameter after each step, and the input's gradient. Ring family on 4 ranks in a row
(plain, zigzag, striped, DistFlashAttn, Ulysses); USP and the double ring on a 2 x 2 mesh. Sequence 12:
striped needs n | T; the rest take it sharded as they come."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtensor_plus
from dtensor_plus import Replicate, Shard, distribute_tensor, init_device_mesh
from dtensor_plus.layouts import context_parallel, striped_placement
from dtensor_plus.placements import StridedShard
from dtensor_plus.testing import run_on_ranks

SEQ, CHANNELS, HEADS = 12, 8, 2


class CausalAttention(nn.Module):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w_qkv = nn.Parameter(torch.randn(CHANNELS, 3 * CHANNELS, generator=generator, dtype=torch.float64) / 3)
        self.w_out = nn.Parameter(torch.randn(CHANNELS, CHANNELS, generator=generator, dtype=torch.float64) / 3)

    def forward(self, x):  # (B, T, C)
        b, t, c = x.shape
        q, k, v = _bmm(x, self.w_qkv).split(c, dim=-1)
        q, k, v = (y.view(b, t, HEADS, c // HEADS).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + _bmm(y.transpose(1, 2).reshape(b, t, c), self.w_out)


def _bmm(x, weight):
    """x @ weight as one bmm, for USP and the double ring: their T is split by two nested mesh dims, and a
    matmul's (B, T) fold of that is gathered by the view rules (a StridedShard nested in another of the same
    dim is not a layout redistribute can gather yet); the bmm keeps every layout's rows in place. A striped
    or zigzag T alone keeps its split through the fold (tests/ops/test_view_strided_split.py)."""
    return torch.bmm(x, weight.expand(x.shape[0], *weight.shape))


SCHEMES = {  # name: (mesh shape, mesh dim names, placements of x (B, T, C), context_parallel arguments)
    "ring": ((4,), ("cp",), [Shard(1)], dict(mesh_dim="cp")),
    "zigzag": ((4,), ("cp",), [StridedShard(1, 1, zigzag=True)], dict(mesh_dim="cp", load_balance=True)),
    "striped": ((4,), ("cp",), [striped_placement(1, SEQ, 4)], dict(mesh_dim="cp", load_balance="striped")),
    "distflash": ((4,), ("cp",), [Shard(1)], dict(mesh_dim="cp", load_balance="distflash")),
    "ulysses": ((4,), ("cp",), [Shard(1)], dict(mesh_dim="cp", kind="ulysses")),
    "usp": ((2, 2), ("ring", "ulysses"), [Shard(1), Shard(1)], dict(mesh_dim=("ring", "ulysses"), kind="usp")),
    "double_ring": ((2, 2), ("outer", "inner"), [Shard(1), Shard(1)],
                    dict(mesh_dim=("outer", "inner"), kind="double_ring")),
}


def _train(names):
    for name in names:
        mesh_shape, dims, placements, cp_args = SCHEMES[name]
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=dims)
        dtensor_plus.manual_seed(0)
        single = CausalAttention()
        model = copy.deepcopy(single)
        for module_name, p in list(model.named_parameters()):
            setattr(model, module_name, nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()] * len(dims))))
        whole = torch.randn(2, SEQ, CHANNELS, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        x = distribute_tensor(whole, mesh, placements).requires_grad_()
        single_x = whole.clone().requires_grad_()
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.2) for m in (model, single)]
        for step in range(3):
            with context_parallel(**cp_args):
                y = model(x)
                loss = (y * y).mean()
                loss.backward()
            expected = (single(single_x) ** 2).mean()
            expected.backward()
            torch.testing.assert_close(loss.full_tensor(), expected, msg=lambda m: f"{name} step {step}: {m}")
            torch.testing.assert_close(x.grad.full_tensor(), single_x.grad, msg=lambda m: f"{name} step {step}: {m}")
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
            x.grad = single_x.grad = None
            for p, q in zip(model.parameters(), single.parameters()):
                torch.testing.assert_close(p.full_tensor(), q, msg=lambda m: f"{name} step {step}: {m}")


@pytest.mark.parametrize("names", [("ring", "striped", "distflash"),
                                   pytest.param(("zigzag", "ulysses"), marks=pytest.mark.slow),
                                   ("usp", "double_ring")])
def test_training_steps_equal_one_device(names):
    run_on_ranks(4, _train, names, timeout=180)
