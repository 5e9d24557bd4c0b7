"""ZeRO-1/2's flat master buffer (layouts/zero_flat.py, zero_flat_state.py) against one device and against the
per-master step it replaces, bit for bit: sizes no mesh divides, empty shards (a 1-row head on 3 ranks), a 0-d
parameter (a master the buffer does not pack), tied weights, two parameter groups with their own lr and weight
decay, a step where one parameter has no gradient (its group steps per master from then on: its step count
fell behind the others'; the other group stays flat), and a state_dict round trip onto a fresh optimizer whose state is per parameter (DTensors
in each master's layout, each with its own step count).

Legend: B batch, V vocabulary, D width.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Shard
from dtensor_plus.layouts.zero import ZeroRedundancyOptimizer
from dtensor_plus.testing import run_on_ranks

STEPS, SKIP_AT, RELOAD_AT = 5, 2, 3  # at SKIP_AT `extra` gets no gradient; at RELOAD_AT a fresh optimizer loads
CLOSE = dict(rtol=1e-7, atol=1e-9)  # float64 against one device: the reduction order differs (Adam divides it by tiny roots)


class TiedNet(nn.Module):
    def __init__(self, vocab, width):
        super().__init__()
        self.embed, self.norm = nn.Embedding(vocab, width), nn.LayerNorm(width)
        self.mix, self.one = nn.Linear(width, width), nn.Linear(width, 1)  # one: a 1-row weight, a 1-entry bias
        self.extra = nn.Linear(width, width, bias=False)  # used on every step but SKIP_AT
        self.scale = nn.Parameter(torch.tensor(0.5))  # 0-d: its master stays Replicate on dp, outside the packing
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens_B, step):
        x_BD = self.norm(self.embed(tokens_B))
        x_BD = x_BD + torch.tanh(self.mix(x_BD)) * self.scale
        if step != SKIP_AT:
            x_BD = x_BD + self.extra(x_BD)
        return self.head(x_BD) + self.one(x_BD)


def _model(vocab, width):
    torch.manual_seed(0)
    return TiedNet(vocab, width).double()


def _groups(model):
    decay = [model.embed.weight, model.mix.weight, model.one.weight, model.extra.weight]
    rest = [p for p in model.parameters() if all(p is not q for q in decay)]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0, "lr": 3e-3}]


def _batch(vocab, batch, step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, vocab, (batch,), generator=g), torch.randint(0, vocab, (batch,), generator=g)


def _train(model, make_opt, vocab, batch, place=lambda t: t, on_step=lambda step, opt: None):
    opt = make_opt(_groups(model))
    for step in range(STEPS):
        if step == RELOAD_AT:  # a fresh optimizer continues from the state dict
            saved = opt.state_dict()
            opt = make_opt(_groups(model))
            opt.load_state_dict(saved)
        tokens, targets = (place(t) for t in _batch(vocab, batch, step))
        F.cross_entropy(model(tokens, step), targets).backward()
        opt.step()
        on_step(step, opt)
        opt.zero_grad()
    return opt


def _check(vocab, width, batch, stage):
    world = torch.distributed.get_world_size()
    mesh = dtp.init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    place = lambda t: dtp.distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)  # noqa: E731
    stepped_flat = []

    def zero(flat):
        def make(groups):
            opt = ZeroRedundancyOptimizer(groups, mesh, torch.optim.AdamW, stage=stage, lr=1e-2)
            assert (opt._flat is not None) == (world > 1)
            if not flat:
                opt._flat = None  # the per-master step, as before the flat buffer
            return opt
        return make

    def record(step, opt):
        if opt._flat is not None:
            stepped_flat.append(opt._flat_state.flat_groups)

    runs = {}
    for flat in (True, False):
        model = _model(vocab, width)
        dtp.distribute_module(model, mesh)
        assert model.head.weight is model.embed.weight
        runs[flat] = model, _train(model, zero(flat), vocab, batch, place, record if flat else lambda *_: None)
    # Both groups flat until SKIP_AT; from then on `extra`'s group (0) per master: its step count is behind.
    assert stepped_flat == [[0, 1] if step < SKIP_AT else [1] for step in range(STEPS)], stepped_flat

    reference = _model(vocab, width)
    ref_opt = _train(reference, lambda groups: torch.optim.AdamW(groups, lr=1e-2), vocab, batch)
    (model, opt), (per_master, per_master_opt) = runs[True], runs[False]
    for (name, p), q, r in zip(model.named_parameters(), per_master.parameters(), reference.parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor()), name  # the flat step is the per-master step
        torch.testing.assert_close(p.full_tensor(), r.detach(), **CLOSE, msg=lambda m: f"{name}: {m}")
        state, want = opt.state[p], ref_opt.state[r]
        assert state.keys() == want.keys(), (name, state.keys())
        assert int(state["step"]) == int(want["step"]), name  # `extra` skipped one step, on both
        for key in ("exp_avg", "exp_avg_sq"):
            value = state[key]
            assert isinstance(value, DTensor) and value.placements == opt._master_of[id(p)].placements, (name, key)
            assert torch.equal(value.full_tensor(), per_master_opt.state[q][key].full_tensor()), (name, key)
            torch.testing.assert_close(value.full_tensor(), want[key], **CLOSE, msg=lambda m: f"{name} {key}: {m}")
    # The public state dict: per parameter, each with its own step tensor (a checkpoint loads into each alone).
    saved = opt.state_dict()["state"]
    steps = [s["step"] for s in saved.values()]
    assert len(saved) == len(list(model.parameters())) and len({id(t) for t in steps}) == len(steps)
    return True


@pytest.mark.parametrize("stage", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_flat_step_equals_per_master_step_and_one_device(stage):
    # 7 embedding rows on 3 ranks (3, 3, 1); the 1-row weight and 1-entry bias: shards (1, 0, 0)
    assert all(run_on_ranks(3, _check, 7, 4, 5, stage))


@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(vocab=st.integers(1, 9), width=st.integers(1, 5), batch=st.integers(1, 6), world=st.sampled_from([2, 3, 4]),
       stage=st.sampled_from([1, 2]))
def test_flat_step_equals_per_master_step_on_any_sizes(vocab, width, batch, world, stage):
    assert all(run_on_ranks(world, _check, vocab, width, batch, stage))
