"""torch.compile over the sequence switch (layouts/sequence_switch.py) and the keep_attention recompute policy
(layouts/recompute.py), on real gloo ranks, backend aot_eager, CPU fp32.

- Sequence switch (DSP): a space-time model, attention along time with space sharded, then along space with time
  sharded (``SequenceSwitch`` styles), three SGD steps on a sequence 5 and a space 3 that 2 ranks do not divide:
  the compiled model's output, loss, input gradient, parameter gradients and updated parameters equal eager's and
  one device's; one graph, no break, no recompilation; the forward graph holds exactly the two switches (two
  all-to-alls), as eager runs.
- keep_attention: examples/gpt.py's SDPA GPT, every block checkpointed with ``policy="keep_attention"``, under ring
  context parallelism on 2 ranks: loss, gradients and the parameters after two AdamW steps equal eager's and one
  device's, one graph with no break. The backward graph holds the ring shifts of a backward without recomputation
  (the forward's k/v shifts are not rerun: the attention's outputs are kept).
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dtensor_plus as dtp
from dtensor_plus import DTensor, Shard, distribute_module, distribute_tensor, init_device_mesh
from dtensor_plus.layouts import SequenceSwitch, context_parallel, parallelize_module
from dtensor_plus.layouts.recompute import checkpoint_modules
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.testing.compiling import counted_compile, graph_breaks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

TIME, SPACE = 1, 2  # dims of a (B, T, S, C) activation
TOL = 1e-5


def _whole(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _assert_steps_equal(got, want, what):
    for step, (got_step, want_step) in enumerate(zip(got, want, strict=True)):
        for i, (a, b) in enumerate(zip(got_step, want_step, strict=True)):
            torch.testing.assert_close(a, b, rtol=TOL, atol=TOL, msg=lambda m: f"{what}, step {step}, value {i}: {m}")


# -- the sequence switch -----------------------------------------------------------------------------------------


class AxisAttention(nn.Module):
    """Attention along one axis of (B, T, S, C), the other axis as heads (it may stay sharded)."""

    def __init__(self, channels: int, along: int):
        super().__init__()
        self.along = along
        self.qkv, self.out = nn.Linear(channels, 3 * channels), nn.Linear(channels, channels)

    def forward(self, x):
        h = x.transpose(TIME, SPACE) if self.along == TIME else x  # (B, other axis, attended axis, C)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        y = self.out(F.scaled_dot_product_attention(q, k, v))
        return x + (y.transpose(TIME, SPACE) if self.along == TIME else y)


class SpaceTime(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.temporal, self.spatial = AxisAttention(channels, TIME), AxisAttention(channels, SPACE)

    def forward(self, x):
        return self.spatial(self.temporal(x))


def _switch_steps(run, optimizer, place, steps=3):
    record = []
    for step in range(steps):
        x = place(torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(step))).requires_grad_()
        y = run(x)
        loss = y.pow(2).mean()
        loss.backward()
        grads = [_whole(p.grad) for p in optimizer.param_groups[0]["params"]]
        optimizer.step()
        optimizer.zero_grad()
        record.append([_whole(y), _whole(loss), _whole(x.grad), *grads,
                       *(_whole(p).detach().clone() for p in optimizer.param_groups[0]["params"])])
    return record


def _sequence_switch_compiled():
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("sp",))
    torch.manual_seed(0)
    single = SpaceTime(4)
    placed = []
    for _ in range(2):  # eager, compiled
        model = distribute_module(copy.deepcopy(single), mesh)
        parallelize_module(model, mesh, {"temporal": SequenceSwitch(SPACE), "spatial": SequenceSwitch(TIME)})
        placed.append(model)
    eager, model = placed
    compiled, counter, code = counted_compile(model, keep_code=True, fullgraph=True)
    place = lambda whole: distribute_tensor(whole, mesh, [Shard(TIME)], src_data_rank=None)  # noqa: E731
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    got = _switch_steps(compiled, sgd(model), place)
    _assert_steps_equal(got, _switch_steps(eager, sgd(eager), place), "sequence switch against eager")
    _assert_steps_equal(got, _switch_steps(single, sgd(single), lambda whole: whole), "against one device")
    forward_switches = code[0].count("_c10d_functional.all_to_all_single")
    return counter.frame_count, graph_breaks(), len(code), forward_switches


def test_sequence_switch_trains_compiled_equal_to_eager_and_one_device():
    # one graph (forward + backward), no break, no recompilation; the forward's two switches, nothing more
    assert run_on_ranks(2, _sequence_switch_compiled, timeout=300) == [(1, 0, 2, 2)] * 2


# -- keep_attention under ring context parallelism ---------------------------------------------------------------


def _gpt_steps(model, loss_fn, optimizer, windows, scope, place=lambda tokens: tokens):
    record = []
    for window in windows:
        with scope():
            loss = loss_fn(place(window[:, :-1]), place(window[:, 1:]))
            loss.backward()
        record.append([_whole(loss)] + [_whole(p.grad) for p in model.parameters()])
        optimizer.step()
        optimizer.zero_grad()
    return record + [[_whole(p).detach() for p in model.parameters()]]


def _keep_attention_compiled():
    from gpt import GPT, PRESETS
    from gpt_layouts import Layout, make_mesh, place_batch, place_model

    config = PRESETS["debug"].replace(attention="sdpa", dropout=0.0, num_layers=1)
    layout = Layout(cp=2)
    mesh = make_mesh(layout)
    gen = torch.Generator().manual_seed(3)
    windows = [torch.randint(0, config.vocab_size, (2, 9), generator=gen) for _ in range(2)]
    torch.manual_seed(0)
    single = GPT(config)
    runs = []
    for compile_it in (False, True):
        model = place_model(copy.deepcopy(single), mesh, layout)
        checkpoint_modules(model, "blocks.*", "keep_attention")
        loss_fn = model.loss
        if compile_it:
            loss_fn, counter, code = counted_compile(loss_fn, keep_code=True, fullgraph=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        runs.append(_gpt_steps(model, loss_fn, optimizer, windows, lambda: context_parallel("cp", "ring"),
                               lambda tokens: place_batch(tokens, mesh)))
    eager, got = runs
    _assert_steps_equal(got, eager, "keep_attention against eager")
    one = _gpt_steps(single, single.loss, torch.optim.AdamW(single.parameters(), lr=1e-3), windows,
                     torch.enable_grad)
    _assert_steps_equal(got, one, "keep_attention against one device")
    forward_shifts, backward_shifts = (graph.count("_c10d_functional.all_to_all_single") for graph in code)
    return counter.frame_count, graph_breaks(), len(code), forward_shifts, backward_shifts


@pytest.mark.slow
def test_keep_attention_under_ring_attention_compiles_equal_to_eager_and_one_device():
    for frames, breaks, graphs, forward_shifts, backward_shifts in run_on_ranks(
            2, _keep_attention_compiled, timeout=600):
        assert (frames, breaks, graphs) == (1, 0, 2)
        # 1 layer on a 2-rank ring: one k/v shift forward; backward: the dk/dv shift back and the k/v shift the
        # backward's own ring makes, no rerun of the forward's (eager: 1 forward, 2 backward)
        assert (forward_shifts, backward_shifts) == (1, 2), (forward_shifts, backward_shifts)
