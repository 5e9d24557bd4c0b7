"""What local_step remembers between steps (layouts/local_step.py ``_Memo``): the swap one step found is reused
by the next while every identity check holds, and everything the checks guard against is seen: a gradient
missing one step, the learning rate changed, a state_dict() / load_state_dict() round trip, a state tensor set
by hand (in the parameter's layout: stepped on its block; in another: the step stays on DTensors), a parameter
group added. Every step equals one device (parameters and AdamW state, in their layouts) on a batch no mesh
divides (5 rows: 3 and 2), and the steps on blocks dispatch no DTensor op.

Legend: B batch, T sequence, D model width.
"""

import copy

import torch
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Partial, Replicate, Shard
from dtensor_plus.dispatcher import DISPATCHER
from dtensor_plus.layouts import local_step
from dtensor_plus.layouts.data import replicate, shard_batch
from dtensor_plus.testing import run_on_ranks

B, T, D = 5, 3, 6


class Net(nn.Module):
    """``late`` computes from the start; its parameters join the optimizer as a group added later."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.late = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x_BTD):
        return self.late(self.fc2(torch.tanh(self.fc1(x_BTD))))


def _dispatched(opt) -> int:
    """How many DTensor ops ``opt.step()`` dispatches (the swap's hooks run around it)."""
    seen, execute = [], DISPATCHER.execute

    def recording(func, args, kwargs):
        seen.append(func)
        return execute(func, args, kwargs)

    DISPATCHER.execute = recording
    try:
        opt.step()
    finally:
        DISPATCHER.execute = execute
    return len(seen)


def _check(model, reference, opt, ref_opt, what):
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach(), msg=lambda m: f"{what}: {name}: {m}")
        state, want = opt.state.get(p, {}), ref_opt.state.get(q, {})
        assert state.keys() == want.keys(), (what, name, state.keys(), want.keys())
        for key, value in state.items():
            if want[key].ndim:
                assert isinstance(value, DTensor) and value.shape == p.shape, (what, name, key, value)
                value = value.full_tensor()
            torch.testing.assert_close(value, want[key], msg=lambda m: f"{what}: {name} {key}: {m}")


def _memo_follows_every_change():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    reference = Net()
    model = replicate(copy.deepcopy(reference), mesh)
    opts = [torch.optim.AdamW(m.fc1.parameters(), lr=1e-2, weight_decay=0.1, foreach=False) for m in (model, reference)]
    for m, o in zip((model, reference), opts):
        o.add_param_group({"params": list(m.fc2.parameters()), "lr": 2e-2})
    opt, ref_opt = opts
    g = torch.Generator().manual_seed(1)
    swaps, dispatched = [], []

    def step(what, before_step=lambda: None):
        x = torch.randn(B, T, D, generator=g)
        model(shard_batch(x, mesh)).pow(2).mean().backward()
        reference(x).pow(2).mean().backward()
        before_step()
        dispatched.append(_dispatched(opt))
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        _check(model, reference, opt, ref_opt, what)
        memo = opt.__dict__[local_step._MEMO]
        swaps.append(None if memo is None else memo.last)

    step("the first step (creates the state)")
    step("the second (its swap found afresh: the state is new)")
    step("the third (the second's swap reused)")
    assert swaps[2] is swaps[1] is not None, swaps

    def no_fc1_bias_gradient():
        model.fc1.bias.grad = reference.fc1.bias.grad = None

    step("fc1.bias without a gradient", no_fc1_bias_gradient)
    step("fc1.bias with one again")

    def lr_changed():
        for o in opts:
            o.param_groups[1]["lr"] = 5e-3

    step("the learning rate changed", lr_changed)

    def state_dict_round_trip():
        saved = opt.state_dict()
        assert all(isinstance(v, DTensor) for s in saved["state"].values() for k, v in s.items() if k != "step")
        opt.load_state_dict(saved)
        assert opt.__dict__[local_step._MEMO] is None  # forgotten at once: the old state is not held
        ref_opt.load_state_dict(ref_opt.state_dict())

    step("after a state_dict round trip", state_dict_round_trip)

    def exp_avg_set_by_hand():
        for o, p in ((opt, model.fc2.weight), (ref_opt, reference.fc2.weight)):
            o.state[p]["exp_avg"] = o.state[p]["exp_avg"] * 0.5  # DTensor op: the same layout

    step("an exp_avg set by hand", exp_avg_set_by_hand)

    def group_added():
        for m, o in zip((model, reference), opts):
            o.add_param_group({"params": list(m.late.parameters())})

    step("a parameter group added", group_added)
    step("the added group stepped a second time")
    assert sum(dispatched) == 0, dispatched  # every step so far on the blocks

    def exp_avg_in_another_layout():
        state = opt.state[model.fc1.weight]
        state["exp_avg"] = state["exp_avg"].redistribute(placements=[Shard(0)])

    step("an exp_avg in another layout (the step on DTensors)", exp_avg_in_another_layout)
    assert dispatched[-1] > 0, dispatched
    assert opt.state[model.fc1.weight]["exp_avg"].placements == (Shard(0),)
    assert opt.state[model.fc2.weight]["exp_avg"].placements == (Replicate(),)
    return True


def test_the_memo_follows_every_change_and_every_step_equals_one_device():
    assert all(run_on_ranks(2, _memo_follows_every_change))


def _tensor_parallel_steps_on_blocks():
    """parallelize_module's parameters (Shard and Replicate on tp, 7 rows on 2 ranks: uneven; the LayerNorm on rows
    split over tp) step on their blocks once their gradients are in their layouts; a Partial gradient keeps the
    step on DTensors, which reduce it: both equal one device."""
    from dtensor_plus.layouts import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(D, 7), nn.Tanh(), nn.Linear(7, D), nn.LayerNorm(D))
    model = parallelize_module(copy.deepcopy(reference), mesh, {
        "0": ColwiseParallel(), "2": RowwiseParallel(output_layouts=Shard(0), use_local_output=False),
        "3": SequenceParallel(sequence_dim=0)})
    opt, ref_opt = (torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
                    for m in (model, reference))
    g = torch.Generator().manual_seed(1)
    dispatched = []
    for step in range(3):
        x = torch.randn(B, D, generator=g)
        model(x).full_tensor().pow(2).mean().backward()
        reference(x).pow(2).mean().backward()
        if step == 1:  # a gradient not in its parameter's layout: Partial (Replicate -> Partial moves nothing)
            norm = model[3].weight
            norm.grad = norm.grad.redistribute(placements=[Partial()])
        dispatched.append(_dispatched(opt))
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        _check(model, reference, opt, ref_opt, f"tp step {step}")
    assert dispatched[0] == dispatched[2] == 0, dispatched
    return dispatched


def test_tensor_parallel_parameters_step_on_their_blocks():
    dispatched = run_on_ranks(2, _tensor_parallel_steps_on_blocks)[0]
    assert dispatched[1] > 0, dispatched  # the Partial gradients: the step on DTensors
