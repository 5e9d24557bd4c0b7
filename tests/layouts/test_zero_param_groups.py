"""ZeroRedundancyOptimizer with parameter groups, as torch.optim takes them: per-group lr and weight decay, an LR
scheduler changing ``group["lr"]``, ``add_param_group`` (a frozen layer unfrozen mid-run), a state_dict round
trip onto a fresh optimizer, and tied weights, all equal to one device's torch.optim.AdamW on sizes the mesh
does not divide (7 rows on 2 and 3 ranks, a 1-row head: an empty shard); a parameter listed twice raises on
every rank, as torch refuses it.

Legend: B batch, D input width, H hidden width.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings, strategies as st
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Shard
from dtensor_plus.layouts.zero import ZeroRedundancyOptimizer
from dtensor_plus.testing import run_on_ranks

STEPS, UNFREEZE_AT, RELOAD_AT = 20, 8, 14
LR, NO_DECAY_LR = 1e-2, 3e-3
EXACT = dict(rtol=1e-9, atol=1e-12)  # float64: only the reduction order differs from one device


class Net(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, 1)  # head: 1 row

    def forward(self, x_BD):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x_BD)))))


def _model(d, h):
    torch.manual_seed(0)
    model = Net(d, h).double()
    model.head.requires_grad_(False)  # frozen until UNFREEZE_AT, then added as a third group
    return model


def _groups(model):
    decay = [model.fc1.weight, model.fc2.weight]
    no_decay = [model.fc1.bias, model.fc2.bias]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr": NO_DECAY_LR}]


def _head_group(model):
    return {"params": list(model.head.parameters()), "lr": 5e-3, "weight_decay": 0.05}


def _data(d, batch, step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(batch, d, generator=g, dtype=torch.float64), torch.randn(batch, 1, generator=g, dtype=torch.float64)


def _train(model, make_opt, d, batch, place=lambda t: t):
    """STEPS steps of AdamW on three groups under an ExponentialLR schedule; the head joins at UNFREEZE_AT, and at
    RELOAD_AT a fresh optimizer and scheduler continue from the state dicts. Returns the losses, the lr each
    group stepped with, and the optimizer last used."""
    opt = make_opt(_groups(model))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    losses, lrs = [], []
    for step in range(STEPS):
        if step == UNFREEZE_AT:
            model.head.requires_grad_(True)
            opt.add_param_group(_head_group(model))
        if step == RELOAD_AT:
            opt_state, sched_state = opt.state_dict(), sched.state_dict()
            opt = make_opt(_groups(model) + [_head_group(model)])
            opt.load_state_dict(opt_state)
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
            sched.load_state_dict(sched_state)
        x, y = (place(t) for t in _data(d, batch, step))
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(loss.full_tensor().item() if isinstance(loss, DTensor) else loss.item())
        lrs.append([group["lr"] for group in opt.param_groups])
    return losses, lrs, opt


def _check_groups(d, h, batch, stage):
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    model = _model(d, h)
    dtp.distribute_module(model, mesh)
    make_opt = lambda groups: ZeroRedundancyOptimizer(groups, mesh, torch.optim.AdamW, stage=stage, lr=LR)  # noqa: E731
    place = lambda t: dtp.distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)  # noqa: E731
    losses, lrs, opt = _train(model, make_opt, d, batch, place)

    reference = _model(d, h)
    want_losses, want_lrs, ref_opt = _train(reference, lambda groups: torch.optim.AdamW(groups, lr=LR), d, batch)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), **EXACT)
    assert lrs == want_lrs  # the scheduler drove every group as on one device
    for (name, p), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.full_tensor(), want.detach(), **EXACT, msg=lambda m: f"{name}: {m}")

    # param_groups: the model's parameters with the user's options and the wrapped class's defaults.
    assert isinstance(opt, torch.optim.Optimizer)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(p) for p in g["params"]] for g in _groups(model) + [_head_group(model)]]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.05]
    assert all(g["betas"] == ref_g["betas"] for g, ref_g in zip(opt.param_groups, ref_opt.param_groups))
    # The state of each parameter is its master's: sharded on dp, one entry per parameter.
    assert len(opt.state) == len(ref_opt.state) == 6
    head = {id(p) for p in model.head.parameters()}
    for p in model.parameters():
        exp_avg = opt.state[p]["exp_avg"]
        assert exp_avg.placements == (Shard(0),) and exp_avg.shape == p.shape
        assert int(opt.state[p]["step"]) == (STEPS - UNFREEZE_AT if id(p) in head else STEPS)


@settings(max_examples=3)
@given(d=st.integers(1, 4), h=st.integers(1, 7), batch=st.integers(1, 7), world=st.sampled_from([2, 3]),
       stage=st.sampled_from([1, 2]))
@example(d=3, h=7, batch=5, world=2, stage=1)  # 7 rows on 2 ranks (4, 3), a 5-row batch (3, 2), head (1, 0)
@example(d=3, h=7, batch=7, world=3, stage=2)  # 7 rows on 3 ranks (3, 3, 1), head rows (1, 0, 0)
@example(d=2, h=1, batch=1, world=2, stage=2)  # 1-row weights and a 1-row batch: empty shards everywhere
def test_groups_scheduler_add_and_reload_match_one_device(d, h, batch, world, stage):
    run_on_ranks(world, _check_groups, d, h, batch, stage)


# -- tied weights: one parameter, one master, one state ------------------------------------------------------


class TiedLM(nn.Module):
    def __init__(self, vocab, width):
        super().__init__()
        self.embed, self.norm, self.head = nn.Embedding(vocab, width), nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied: one Parameter in two modules

    def forward(self, tokens_B):
        return self.head(self.norm(self.embed(tokens_B)))


def _tied_train(model, opt, vocab, place=lambda t: t):
    losses = []
    for step in range(6):
        tokens = torch.randint(0, vocab, (5,), generator=torch.Generator().manual_seed(step))
        targets = torch.randint(0, vocab, (5,), generator=torch.Generator().manual_seed(50 + step))
        loss = F.cross_entropy(model(place(tokens)), place(targets))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.full_tensor().item() if isinstance(loss, DTensor) else loss.item())
    return losses


def _tied_model(vocab):
    torch.manual_seed(0)
    return TiedLM(vocab, 4).double()


def _check_tied(stage, vocab):
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    model = _tied_model(vocab)
    dtp.distribute_module(model, mesh)
    assert model.head.weight is model.embed.weight
    groups = [{"params": [model.embed.weight], "weight_decay": 0.1}, {"params": list(model.norm.parameters()), "weight_decay": 0.0}]
    opt = ZeroRedundancyOptimizer(groups, mesh, torch.optim.AdamW, stage=stage, lr=1e-2)
    assert len(opt.masters) == len(list(model.parameters())) == 3
    losses = _tied_train(model, opt, vocab, lambda t: dtp.distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None))
    assert len(opt.state) == 3 and opt.state[model.head.weight] is opt.state[model.embed.weight]
    assert int(opt.state[model.embed.weight]["step"]) == 6  # stepped once per step, not once per module

    reference = _tied_model(vocab)
    ref_groups = [{"params": [reference.embed.weight], "weight_decay": 0.1},
                  {"params": list(reference.norm.parameters()), "weight_decay": 0.0}]
    want = _tied_train(reference, torch.optim.AdamW(ref_groups, lr=1e-2), vocab)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want), **EXACT)
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.full_tensor(), ref.detach(), **EXACT, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("stage, vocab", [(1, 7), (2, 5)])  # 7 and 5 embedding rows on 2 ranks
def test_tied_weights_are_one_parameter_with_one_state(stage, vocab):
    run_on_ranks(2, _check_tied, stage, vocab)


# -- errors, on every rank --------------------------------------------------------------------------------


def _check_errors():
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    model = dtp.distribute_module(nn.Linear(3, 5).double(), mesh)
    w, b = model.weight, model.bias
    with pytest.raises(ValueError, match="more than one parameter group"):
        torch.optim.AdamW([{"params": [w]}, {"params": [w, b]}])  # torch's own refusal
    with pytest.raises(ValueError, match=r"more than one parameter group: the parameter of shape \(5, 3\) at position 0"):
        ZeroRedundancyOptimizer([{"params": [w]}, {"params": [w, b]}], mesh)
    opt = ZeroRedundancyOptimizer([{"params": [w]}], mesh, lr=1e-3)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [b, w]})
    assert len(opt.param_groups) == len(opt.optimizer.param_groups) == 1  # the refused group left no trace
    with pytest.raises(ValueError, match=r"lists the parameter of shape \(5,\) twice \(positions 0 and 2\)"):
        ZeroRedundancyOptimizer([b, w, b], mesh)
    with pytest.raises(TypeError, match="not a set"):
        ZeroRedundancyOptimizer([{"params": {w, b}}], mesh)
    with pytest.raises(TypeError, match="holds str at position 1"):
        ZeroRedundancyOptimizer([w, "bias"], mesh)
    with pytest.raises(ValueError, match="empty parameter list"):
        ZeroRedundancyOptimizer([], mesh)


def test_parameter_listed_twice_raises_like_torch_on_every_rank():
    run_on_ranks(2, _check_errors)
