"""ZeRO-1/2's inner step on the masters' local blocks (layouts/local_step.py): AdamW and SGD with momentum step the
dp-sharded masters block by block, and every step equals one device (parameters and optimizer state), on sizes
no mesh divides, on a 1-D dp mesh and on (dp, tp); the inner step dispatches no DTensor op, where the DTensor
path (masters untagged) dispatches every one of them; a state tensor in another layout keeps the DTensor path.

Legend: B batch, D model width, F MLP width, O output width.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Replicate, Shard
from dtensor_plus.dispatcher import DISPATCHER
from dtensor_plus.layouts import local_step
from dtensor_plus.layouts.data import replicate
from dtensor_plus.layouts.zero import ZeroRedundancyOptimizer
from dtensor_plus.testing import run_on_ranks

B, D, F_, O, STEPS = 5, 7, 9, 3, 3  # odd sizes: neither dp=2 nor tp=2 divides them
OPTIMIZERS = {"adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
              "sgd": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9})}
TP_PLACEMENTS = {"fc1.weight": Shard(0), "fc1.bias": Shard(0), "fc2.weight": Shard(1)}  # Megatron MLP on tp


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(D, F_), nn.Linear(F_, D), nn.Linear(D, O)

    def forward(self, x_BD):
        return self.head(x_BD + self.fc2(F.gelu(self.fc1(x_BD))))


def _place(mesh):
    def place(name, module, mesh):
        for key, param in list(module._parameters.items()):
            tp = TP_PLACEMENTS.get(f"{name}.{key}", Replicate())
            placements = [Replicate()] if mesh.ndim == 1 else [Replicate(), tp]
            module._parameters[key] = nn.Parameter(dtp.distribute_tensor(param.detach(), mesh, placements, src_data_rank=None))
    return place


def _placed(mesh_shape, names, stage, optimizer, forward="dtensor"):
    mesh = dtp.init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    torch.manual_seed(0)
    reference = Net().double()
    model = Net().double()
    model.load_state_dict(reference.state_dict())
    if forward == "local":  # replicate's local forward on each rank's rows; gradients left Partial for ZeRO to reduce
        replicate(model, mesh, reduce_in_backward=False)
    else:
        dtp.distribute_module(model, mesh, _place(mesh))
    cls, options = OPTIMIZERS[optimizer]
    opt = ZeroRedundancyOptimizer(model.parameters(), mesh, cls, stage=stage, mesh_dim="dp", **options)
    return mesh, model, opt, reference, cls(reference.parameters(), **options)


def _backward(model, reference, mesh, step):
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, O, generator=g, dtype=torch.float64)
    batch = [Shard(0)] + [Replicate()] * (mesh.ndim - 1)
    x_dt, y_dt = (dtp.distribute_tensor(t, mesh, batch, src_data_rank=None) for t in (x, y))
    F.mse_loss(model(x_dt), y_dt).backward()
    F.mse_loss(reference(x), y).backward()


def _probe(opt) -> list:
    """The DTensor ops the wrapped optimizer's step dispatches, appended to the list returned. Its own hooks run
    inside the global ones (local_step's swap): they see exactly its step, on the blocks or on DTensors."""
    seen, execute = [], DISPATCHER.execute

    def recording(func, args, kwargs):
        seen.append(func)
        return execute(func, args, kwargs)

    opt.optimizer.register_step_pre_hook(lambda *_: setattr(DISPATCHER, "execute", recording))
    opt.optimizer.register_step_post_hook(lambda *_: setattr(DISPATCHER, "execute", execute))
    return seen


def _check_equal(mesh_shape, names, stage, optimizer, forward="dtensor", micro_batches=1):
    mesh, model, opt, reference, ref_opt = _placed(mesh_shape, names, stage, optimizer, forward)
    dispatched = _probe(opt)
    for step in range(STEPS):
        for micro in range(micro_batches):  # gradients accumulate over the micro-batches, on both sides
            _backward(model, reference, mesh, 10 * step + micro)
        opt.step()
        assert dispatched == [], dispatched
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.full_tensor(), q.detach(), msg=lambda m: f"step {step}, {name}: {m}")
            master, state, want = opt._master_of[id(p)], opt.state[p], ref_opt.state[q]
            assert state.keys() == want.keys(), (name, state.keys(), want.keys())
            for key, value in state.items():
                if isinstance(want[key], torch.Tensor) and want[key].ndim:
                    assert isinstance(value, DTensor) and value.placements == master.placements, (name, key, value)
                    value = value.full_tensor()
                torch.testing.assert_close(value, want[key], msg=lambda m: f"step {step}, {name} {key}: {m}")


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("mesh_shape, names", [((2,), ("dp",)), ((2, 2), ("dp", "tp"))], ids=["dp2", "dp2xtp2"])
def test_steps_equal_one_device(mesh_shape, names, stage, optimizer):
    world = 1
    for s in mesh_shape:
        world *= s
    run_on_ranks(world, _check_equal, mesh_shape, names, stage, optimizer)


@pytest.mark.parametrize("stage", [1, 2])
def test_steps_equal_one_device_with_replicates_local_forward(stage):
    """ZeRO-1/2 over ``replicate(model, mesh, reduce_in_backward=False)``: the forward and backward run on each
    rank's rows (no DTensor dispatch on dp), the gradients reach ZeRO Partial on dp, and it reduce-scatters them."""
    run_on_ranks(2, _check_equal, (2,), ("dp",), stage, "adamw", "local")


def _local_leaves(stage):
    """ZeRO's parameters under replicate(reduce_in_backward=False) compute through local leaves (no autograd
    Function per parameter; layouts/data_local.py ``GRADIENT_OWNER``); their gradients reach ZeRO Partial on dp,
    accumulated over two backwards, and every step equals one device."""
    from dtensor_plus.layouts.data_local import LocalCompute

    _check_equal((2,), ("dp",), stage, "adamw", "local", micro_batches=2)
    mesh, model, opt, reference, _ = _placed((2,), ("dp",), stage, "adamw", "local")
    local = next(h.__self__ for h in model._forward_pre_hooks.values() if isinstance(getattr(h, "__self__", None), LocalCompute))
    _backward(model, reference, mesh, 0)
    assert {id(p) for p in model.parameters()} == set(local.leaves), "a parameter computed through _DropDp"
    leaves = {key: entry[2] for key, entry in local.leaves.items()}
    _backward(model, reference, mesh, 1)
    assert all(local.leaves[key][2] is leaf for key, leaf in leaves.items()), "a leaf was made again"
    for p in opt.params:  # stage 2 reduce-scattered them in backward; stage 1 holds them Partial for step()
        assert (p.grad is None) if stage == 2 else tuple(p.grad.placements) == (dtp.Partial(),), p.grad
    return True


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_over_replicate_computes_through_local_leaves(stage):
    assert all(run_on_ranks(2, _local_leaves, stage))


def _inner_step_dispatches(stage, optimizer, how):
    """How many DTensor ops the wrapped optimizer's step dispatches: on the masters' blocks ("local"), on DTensors
    ("untagged": the masters untagged, so no flat step, and the swap to blocks turned off), or with one state
    tensor in another layout."""
    stepped = local_step._stepped
    try:
        return _count_dispatches(stage, optimizer, how)
    finally:
        local_step._stepped = stepped  # the pool's worker runs later tests too


def _count_dispatches(stage, optimizer, how):
    mesh, model, opt, reference, _ = _placed((2,), ("dp",), stage, optimizer)
    if how == "untagged":
        for master in opt.masters:
            del master.__dict__[local_step.TAG]
        local_step._stepped = lambda optimizer: None
    execute, seen = DISPATCHER.execute, _probe(opt)
    counts = []
    for step in range(2):
        _backward(model, reference, mesh, step)
        if how == "state in another layout" and step == 1:
            state = opt.optimizer.state[opt.masters[0]]
            key = "exp_avg" if "exp_avg" in state else "momentum_buffer"
            state[key] = state[key].redistribute(placements=[Replicate()])
        opt.step()
        opt.zero_grad()
        counts.append(len(seen))
        seen.clear()
    assert DISPATCHER.execute == execute
    return counts


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("stage", [1, 2])
def test_inner_step_dispatches_nothing(stage, optimizer):
    """Both steps (the first creates the state, the second updates it) dispatch no DTensor op on the blocks;
    the same probe sees every op of the DTensor path."""
    assert run_on_ranks(2, _inner_step_dispatches, stage, optimizer, "local")[0] == [0, 0]
    untagged = run_on_ranks(2, _inner_step_dispatches, stage, optimizer, "untagged")[0]
    assert all(n > 0 for n in untagged), untagged


def test_state_in_another_layout_keeps_the_dtensor_path():
    counts = run_on_ranks(2, _inner_step_dispatches, 2, "adamw", "state in another layout")[0]
    assert counts[0] == 0 and counts[1] > 0, counts


def _swap_hands_back_what_it_took():
    """The swap around the inner step (the flat segments of layouts/zero_flat_state.py) hands everything back
    as it was: each group's parameter list (the same object), each master's state dict (the same object, the
    step's new entries added into it in the master's layout), and a state tensor replaced by hand between
    steps (an equal DTensor in the layout: copied into the flat state and stepped there, no dispatch; the dict
    then holds its view), with every value equal to one device."""
    mesh, model, opt, reference, ref_opt = _placed((2,), ("dp",), 1, "adamw", "local")
    inner, dispatched = opt.optimizer, _probe(opt)
    lists = [group["params"] for group in inner.param_groups]
    states = []
    for step in range(2):
        _backward(model, reference, mesh, step)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        assert all(group["params"] is held for group, held in zip(inner.param_groups, lists))
        if step == 0:
            states = [inner.state[m] for m in opt.masters]
            replaced = states[0]["exp_avg"] = states[0]["exp_avg"].clone()
    assert dispatched == [], dispatched
    assert all(inner.state[m] is held for m, held in zip(opt.masters, states))
    held = states[0]["exp_avg"]
    assert held is not replaced and held.placements == replaced.placements and held.shape == replaced.shape
    for p, master, q in zip(opt.params, opt.masters, reference.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach())
        for key in ("exp_avg", "exp_avg_sq"):
            value = inner.state[master][key]
            assert isinstance(value, DTensor) and value.placements == master.placements, (key, value)
            torch.testing.assert_close(value.full_tensor(), ref_opt.state[q][key])
    return True


def test_the_swap_hands_back_what_it_took():
    assert all(run_on_ranks(2, _swap_hands_back_what_it_took))
