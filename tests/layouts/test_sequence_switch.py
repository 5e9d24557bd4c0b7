"""Dynamic sequence parallelism (layouts/sequence_switch.py): a space-time model whose temporal stage runs with
space sharded and whose spatial stage runs with time sharded equals one device (outputs, parameter and input
gradients, two SGD steps); each switch is exactly one all-to-all forward and one backward, with the DSP
paper's bytes (M (n-1) / n^2 per rank for an M-byte activation; torch.chunk-uneven dims padded to the
largest block), and nothing else moves in forward. Uneven and empty shards (T < n)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtensor_plus
from dtensor_plus import Replicate, Shard, comm_mode, distribute_module, init_device_mesh
from dtensor_plus.layouts import SequenceSwitch, parallelize_module, switch_sequence_dim
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor

TIME, SPACE = 1, 2  # dims of a (B, T, S, C) video activation


class AxisAttention(nn.Module):
    """Attention along one axis of (B, T, S, C); the other axis acts as the heads (so it may stay sharded)."""

    def __init__(self, channels: int, along: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.along = along
        self.w_qkv = nn.Parameter(torch.randn(channels, 3 * channels, generator=generator) / channels ** 0.5)
        self.w_out = nn.Parameter(torch.randn(channels, channels, generator=generator) / channels ** 0.5)

    def forward(self, x):
        h = x.transpose(TIME, SPACE) if self.along == TIME else x  # (B, other axis, attended axis, C)
        q, k, v = _project(h, self.w_qkv).chunk(3, dim=-1)
        y = _project(F.scaled_dot_product_attention(q, k, v), self.w_out)
        return x + (y.transpose(TIME, SPACE) if self.along == TIME else y)


def _project(h, weight):
    """h @ weight as broadcast product and sum: a Linear folds (B, T, S) into rows, a view that gathers dims
    sharded unevenly (torch.chunk blocks of T do not make torch.chunk blocks of B*T*S); this keeps the
    uneven and empty shards, the case under test, local."""
    return (h.unsqueeze(-1) * weight).sum(-2)


class SpaceTime(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.temporal, self.spatial = AxisAttention(channels, TIME, 1), AxisAttention(channels, SPACE, 2)

    def forward(self, x):
        return self.spatial(self.temporal(x))


def _switch_bytes(shape, n, element_size=8):
    """Per rank, one switch between the time and space dims: (n-1) blocks of ceil(T/n) x ceil(S/n) rows."""
    b, t, s, c = shape
    return (n - 1) * b * -(-t // n) * -(-s // n) * c * element_size


def _space_time(n, shape):
    mesh = init_device_mesh("cpu", (n,), mesh_dim_names=("sp",))
    dtensor_plus.manual_seed(0)
    single = SpaceTime(shape[-1]).double()  # float64: the oracle's tolerance holds through the squared loss
    model = distribute_module(copy.deepcopy(single), mesh)  # parameters replicated
    parallelize_module(model, mesh, {"temporal": SequenceSwitch(SPACE), "spatial": SequenceSwitch(TIME)})
    whole = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = make_dtensor(whole, mesh, [Shard(TIME)], requires_grad=True)  # arrives time-sharded
    single_x = whole.clone().requires_grad_()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, single)]
    for step in range(2):
        with comm_mode() as forward:
            y = model(x)
        with comm_mode() as backward:
            loss = (y * y).mean()
            loss.backward()
        expected = single(single_x)
        (expected * expected).mean().backward()
        torch.testing.assert_close(y.full_tensor(), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad.full_tensor(), single_x.grad, atol=1e-5, rtol=1e-5)
        for (name, p), q in zip(model.named_parameters(), single.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        x.grad, single_x.grad = None, None
    assert y.placements == (Shard(TIME),), y.placements
    # forward: time -> space before the temporal stage, space -> time before the spatial one, nothing else
    assert forward.count() == forward.count("all_to_all", "sp") == 2 and not forward.fallbacks, forward
    assert forward.bytes("all_to_all", "sp") == 2 * _switch_bytes(shape, n), forward
    assert backward.count("all_to_all", "sp") == 2, backward  # the mirrors (besides the weights' reductions)
    assert backward.bytes("all_to_all", "sp") == 2 * _switch_bytes(shape, n), backward
    return forward.bytes("all_to_all", "sp")


@pytest.mark.parametrize("n, shape", [(2, (2, 4, 6, 4)), (3, (1, 2, 7, 4))])
def test_space_time_switch_equals_one_device(n, shape):
    """n=2 divides both dims: the bytes are the paper's M (n-1) / n^2 per switch. n=3 on T=2: an empty shard
    of time, S=7 uneven."""
    moved = run_on_ranks(n, _space_time, n, shape)
    if all(d % n == 0 for d in shape[1:3]):
        activation = math.prod(shape) * 8  # float64
        assert moved == [2 * activation * (n - 1) // n ** 2] * n, moved


def _switch_function_and_errors():
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    x = make_dtensor(torch.randn(2, 5, 3, 4), mesh, [Shard(0), Shard(1)])
    with comm_mode() as comm:
        y = switch_sequence_dim(x, -2, "sp")
    assert y.placements == (Shard(0), Shard(2)) and comm.count() == comm.count("all_to_all", "sp") == 1, comm
    torch.testing.assert_close(y.full_tensor(), x.full_tensor())
    assert switch_sequence_dim(y, 2, "sp") is y  # already there: nothing moves
    with pytest.raises(ValueError, match="already sharded on mesh dim 0"):
        switch_sequence_dim(y, 0, "sp")
    with pytest.raises(ValueError, match="not sharded on a sequence dim"):
        switch_sequence_dim(make_dtensor(torch.randn(2, 4), mesh, [Shard(0), Replicate()]), 1, "sp")
    with pytest.raises(TypeError, match="DTensor"):
        switch_sequence_dim(torch.randn(2, 4), 1)


def test_switch_function_and_errors():
    run_on_ranks(4, _switch_function_and_errors)
    with pytest.raises(TypeError, match="SequenceSwitch"):
        SequenceSwitch("time")
