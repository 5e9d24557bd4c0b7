"""fully_shard's schedule and mixed precision: the next unit's all-gather is in flight before it runs (forward and
backward, from the second step on), every gathered whole is freed after forward and after backward, and
``mp_policy`` gathers and computes in bf16 (half the all-gather bytes) with fp32 gradients on the fp32 shards.
"""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Shard
from dtensor_plus.layouts import MixedPrecision, fully_shard
from dtensor_plus.testing import run_on_ranks

from test_zero import _data, _model  # noqa: E402  (tests/layouts is on sys.path under pytest's rootdir)

SIZES = (8, 16, 4)
BF16 = dict(atol=2e-2, rtol=2e-2)


def _sharded_model(mesh, mp_policy=None, **options):
    model = _model(SIZES).float()
    for block in model.blocks:
        fully_shard(block, mesh, mp_policy=mp_policy, **options)
    fully_shard(model, mesh, mp_policy=mp_policy, **options)
    return model


def _units(model):
    return {"blocks.0": model.blocks[0]._zero_state, "blocks.1": model.blocks[1]._zero_state, "root": model._zero_state}


def _batch(mesh, step):
    x, y = _data(SIZES, step)
    return tuple(dtp.distribute_tensor(t.float(), mesh, [Shard(0)], src_data_rank=None) for t in (x, y))


def _check_prefetch_order():
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    model = _sharded_model(mesh)
    units = _units(model)
    events = []
    for name, unit in units.items():
        gather, regather = unit._issue_gather, unit.regather
        unit._issue_gather = lambda indices, _g=gather, _n=name: events.append(("issue", _n)) or _g(indices)
        unit.regather = lambda index, _r=regather, _n=name: events.append(("need", _n)) or _r(index)
        module = model if name == "root" else model.blocks[int(name[-1])]
        module.register_forward_pre_hook(lambda m, a, _n=name: events.append(("forward", _n)))  # after the gather
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(2):
        events.clear()
        x, y = _batch(mesh, step)
        loss = F.mse_loss(model(x), y)
        forward_events = list(events)
        events.clear()
        loss.backward()
        backward_events = list(events)
        opt.step()
        opt.zero_grad()
    schedule = model._zero_state.schedule
    assert all(u.schedule is schedule for u in units.values())
    assert [u for u in schedule.forward_order] == [units["root"], units["blocks.0"], units["blocks.1"]]
    assert schedule.backward_order == [units["root"], units["blocks.1"], units["blocks.0"]], [u.label for u in schedule.backward_order]
    # Second step, forward: blocks.1's gather is issued while blocks.0 runs, before blocks.1's forward.
    assert forward_events.index(("issue", "blocks.1")) < forward_events.index(("forward", "blocks.0"))
    assert forward_events.count(("issue", "blocks.1")) == 1
    # Backward: each block's re-gather is issued before the block first needs a weight.
    for name in ("blocks.1", "blocks.0"):
        assert backward_events.index(("issue", name)) < backward_events.index(("need", name)), backward_events
        assert backward_events.count(("issue", name)) == 1


def test_prefetch_order():
    run_on_ranks(2, _check_prefetch_order)


def _check_freed_with_prefetch(local_compute):
    """From the second step on (prefetching), the wholes are still freed after forward and after backward."""
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    model = _sharded_model(mesh, local_compute=local_compute)
    units = _units(model)
    gathered = []

    def record(module, args):  # runs after fully_shard's gather hook
        for owner, name, _ in module._zero_state.entries:
            whole = owner.__dict__[name]
            assert isinstance(whole, DTensor) != local_compute  # local compute binds plain wholes
            gathered.append(weakref.ref(whole._local_tensor if isinstance(whole, DTensor) else whole))

    for module in (*model.blocks, model):
        module.register_forward_pre_hook(record)
    regathered = []
    for unit in units.values():  # record every whole re-gathered in backward
        def receive(pending, _unit=unit, _receive=unit._receive):
            _receive(pending)
            regathered.extend(weakref.ref(_unit.alive[i]) for i in pending[1] if i in _unit.alive)
        unit._receive = receive
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        gathered.clear()
        regathered.clear()
        x, y = _batch(mesh, step)
        loss = F.mse_loss(model(x), y)
        gc.collect()
        assert len(gathered) == 10 and all(ref() is None for ref in gathered), step
        assert all(u.prefetched is None for u in units.values())
        loss.backward()
        del loss
        gc.collect()
        assert len(regathered) == 4 and all(ref() is None for ref in regathered), step  # the 4 saved weights
        for unit in units.values():
            assert not unit.alive and not unit.unpacks_left and unit.regather_prefetched is None
        assert all(isinstance(p.grad, DTensor) and p.grad.placements == (Shard(0),) for p in model.parameters())
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("local_compute", [True, False])
def test_freed_with_prefetch(local_compute):
    run_on_ranks(2, _check_freed_with_prefetch, local_compute)


# -- mixed precision ----------------------------------------------------------------------------------------------


def _single_device_bf16():
    model = _model(SIZES).to(torch.bfloat16)
    x, y = _data(SIZES, 0)
    loss = F.mse_loss(model(x.to(torch.bfloat16)).float(), y.float())
    loss.backward()
    return loss.detach(), [p.grad.float() for p in model.parameters()]


def _check_mixed_precision():
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    policy = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    bytes_ = {}
    for mp in (None, policy):
        model = _sharded_model(mesh, mp)
        x, y = _batch(mesh, 0)
        with dtp.comm_mode() as comm:
            out = model(x)
            loss = F.mse_loss(out.float(), y)
            loss.backward()
        assert not comm.fallbacks, comm
        bytes_[mp] = (comm.bytes("all_gather"), comm.bytes("reduce_scatter"), comm.count())
    assert out.dtype == torch.bfloat16
    want_loss, want_grads = _single_device_bf16()
    torch.testing.assert_close(loss.full_tensor(), want_loss, **BF16)
    for p, want in zip(model.parameters(), want_grads):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and p.grad.placements == (Shard(0),)
        torch.testing.assert_close(p.grad.full_tensor(), want, **BF16)
    (ag32, rs32, count32), (ag16, rs16, count16) = bytes_[None], bytes_[policy]
    assert ag16 * 2 == ag32 and rs16 == rs32 and count16 == count32, bytes_  # gathers in bf16, reduces in fp32


def test_mixed_precision_bf16_gather_fp32_reduce():
    run_on_ranks(2, _check_mixed_precision)


def _check_mp_errors():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    with pytest.raises(TypeError, match="MixedPrecision"):
        fully_shard(_model(SIZES), mesh, mp_policy=torch.bfloat16)


def test_mp_policy_type_checked():
    run_on_ranks(2, _check_mp_errors)


# -- input gradients over packing sizes ---------------------------------------------------------------------------
# A unit's wholes come out of one flat all-gather and may all be views of its one output buffer (one rank, or
# every piece one row long). Backward must re-gather each saved weight by its parameter: looked up by storage
# address, `sigmoid(a(x)) * b(x)` took b's weight for a's and the input gradient came out wrong while the
# parameter gradients were right. So the input gradient is compared with one device, over packings.


class _Heads(nn.Module):
    """Linear heads of several widths on one input; the first gates the others, so every weight is saved for the
    input gradient and a weight re-gathered in another's place changes it."""

    def __init__(self, in_features, widths, bias):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(in_features, width, bias=bias) for width in widths)

    def forward(self, x_BD):
        gate_B1 = torch.sigmoid(self.heads[0](x_BD)).sum(-1, keepdim=True)
        return torch.cat([gate_B1 * head(x_BD) for head in self.heads[1:]], -1)


def _check_input_gradient(in_features, widths, bias, batch, units):
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    reference = _Heads(in_features, widths, bias).double()
    model = copy.deepcopy(reference)
    if units == "per head":
        for head in model.heads:
            fully_shard(head, mesh)
    fully_shard(model, mesh)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, in_features, generator=g, dtype=torch.float64)
    weights = torch.randn(batch, sum(widths[1:]), generator=g, dtype=torch.float64)  # every output element counts
    x_ref = x.clone().requires_grad_()
    out_ref = reference(x_ref)
    (out_ref * weights).sum().backward()
    x_dist = dtp.distribute_tensor(x, mesh, [Shard(0)], src_data_rank=None).requires_grad_()
    out = model(x_dist)
    (out * dtp.distribute_tensor(weights, mesh, [Shard(0)], src_data_rank=None)).sum().backward()
    torch.testing.assert_close(out.full_tensor(), out_ref.detach())
    torch.testing.assert_close(x_dist.grad.full_tensor(), x_ref.grad, msg=lambda m: f"input gradient: {m}")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, msg=lambda m, name=name: f"{name}.grad: {m}")


def test_input_gradient_of_the_issue():
    """The issue's case: two Linear(8, 1), sigmoid(a(x)) * b(x), on 2 ranks (rows 1 + 0: one-row pieces)."""
    run_on_ranks(2, _check_input_gradient, 8, (1, 1), True, 4, "one")


@settings(max_examples=8)
@given(
    world_size=st.sampled_from([1, 2, 3]),
    in_features=st.integers(1, 9),
    widths=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    bias=st.booleans(),
    batch=st.integers(1, 5),
    units=st.sampled_from(["one", "per head"]),
)
def test_input_gradient_over_packing_sizes(world_size, in_features, widths, bias, batch, units):
    run_on_ranks(world_size, _check_input_gradient, in_features, tuple(widths), bias, batch, units)
