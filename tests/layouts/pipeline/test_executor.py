"""The pipeline executor against one device: every schedule, on 2 and 4 pp ranks, gives the single-device loss
and gradients (fp32, 1e-6); the B/W split equals a plain backward; tp inside the stages composes.

Legend: B batch, D width.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtensor_plus as dtp
from dtensor_plus.layouts.pipeline import Kind, PipelineSchedule, PipelineStage, build_schedule, pipeline_step
from dtensor_plus.layouts.pipeline.backward import backward_input, backward_weight
from dtensor_plus.layouts.pipeline.schedules import SCHEDULES
from dtensor_plus.testing import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))

B, D = 8, 6
TOL = dict(atol=1e-6, rtol=1e-6)


class Block(nn.Module):
    """LayerNorm (a multi-output autograd node), Linear, tanh, residual: what the B/W split has to cut."""

    def __init__(self, d):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x_BD):
        return x_BD + torch.tanh(self.fc(self.ln(x_BD)))


def _blocks(num_stages):
    torch.manual_seed(0)
    return nn.ModuleList(Block(D) for _ in range(num_stages))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)


def _single_device(num_stages):
    blocks = _blocks(num_stages)
    x, y = _data()
    for block in blocks:
        x = block(x)
    loss = F.mse_loss(x, y)
    loss.backward()
    return loss.detach(), blocks


def _pipeline(name, m):
    """This rank's stages of a ``name`` schedule on a 1-D pp mesh; returns (losses, {stage: grads}, events)."""
    p = torch.distributed.get_world_size()
    mesh = dtp.init_device_mesh("cpu", (p,), mesh_dim_names=("pp",))
    schedule = build_schedule(name, p, m, stages_per_rank=2)
    blocks = _blocks(schedule.num_stages)
    stages = [PipelineStage(blocks[s], s, schedule.num_stages, mesh) for s in schedule.stages_of(mesh.get_rank())]
    x, y = _data()
    losses = []
    _, timeline = pipeline_step(schedule, stages, x, y, F.mse_loss, losses=losses)
    grads = {s.stage_index: [p.grad for p in s.submodule.parameters()] for s in stages}
    return losses, grads, timeline, schedule


def _check_schedule(name, m):
    losses, grads, timeline, schedule = _pipeline(name, m)
    want_loss, want = _single_device(schedule.num_stages)
    for s, got in grads.items():
        for g, p in zip(got, want[s].parameters()):
            torch.testing.assert_close(g, p.grad, **TOL)
    if schedule.num_stages - 1 in grads:
        assert len(losses) == m
        torch.testing.assert_close(torch.stack(losses).mean(), want_loss, **TOL)
    # The timeline holds every action of this rank once, compute and sends in the schedule's order; a receive is
    # recorded over its wait, right before the compute action that consumes it.
    mine = list(schedule.actions[torch.distributed.get_rank()])
    assert sorted(map(repr, (e.action for e in timeline))) == sorted(map(repr, mine))
    not_recv = [a for a in mine if a.kind not in (Kind.RECV_F, Kind.RECV_B)]
    assert [e.action for e in timeline if e.action.kind not in (Kind.RECV_F, Kind.RECV_B)] == not_recv
    for i, e in enumerate(timeline):
        if e.action.kind in (Kind.RECV_F, Kind.RECV_B):
            consumer = timeline[i + 1].action
            assert (consumer.stage, consumer.microbatch) == (e.action.stage, e.action.microbatch), (e, consumer)
            assert consumer.kind in ((Kind.F,) if e.action.kind is Kind.RECV_F else (Kind.B, Kind.BW)), (e, consumer)
    assert all(e.end >= e.start for e in timeline)
    # compute actions carry their thread CPU time (the benchmark's oversubscription figure); messages do not
    assert all(e.cpu is not None and e.cpu >= 0 for e in timeline if e.action.kind.is_compute)
    assert all(e.cpu is None for e in timeline if e.action.kind.is_comm)


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_matches_single_device(name, p):
    run_on_ranks(p, _check_schedule, name, 2 * p if name == "interleaved_1f1b" else 4)


def test_split_backward_equals_plain_backward():
    """B then W gives the gradients of one backward; B alone leaves the weights untouched. A parameter used twice
    (once beside the input path) gets both gradients, still in the exact split."""
    for shared in (False, True):
        torch.manual_seed(0)
        block = Block(D)
        ref = copy.deepcopy(block)
        x, g = torch.randn(B, D), torch.randn(B, D)

        def run(module, leaf):
            out = module(leaf)
            return out * module.fc.bias if shared else out

        leaf = x.clone().requires_grad_()
        grad_x, state = backward_input(run(block, leaf), g, leaf, list(block.parameters()))
        assert all(p.grad is None for p in block.parameters())
        assert state.root is None and len(state.deferred) == 1  # the exact split; fc's weight matmul waits for W
        backward_weight(state)
        leaf_ref = x.clone().requires_grad_()
        run(ref, leaf_ref).backward(g)
        torch.testing.assert_close(grad_x, leaf_ref.grad, **TOL)
        for p, q in zip(block.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TOL)


class Branches(nn.Module):
    """LayerNorm, then three parallel Linears (attention's q, k, v) combined, then a Linear in series."""

    def __init__(self, d):
        super().__init__()
        self.ln, self.q, self.k, self.v, self.out = (nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, d),
                                                     nn.Linear(d, d), nn.Linear(d, d))

    def forward(self, x_BD):
        h_BD = self.ln(x_BD)
        return self.out(torch.tanh(self.q(h_BD)) * self.k(h_BD) + self.v(h_BD))


def test_split_backward_defers_the_weight_matmuls_and_stays_bitwise_exact():
    """B leaves the four linear layers' weight-gradient matmuls (q, k, v and out: parallel and in series) to W, with
    the two LayerNorm and four bias gradients captured on their edges; W computes them as the engine's formula does,
    so the gradients equal one plain backward's bit for bit, and B alone touches no ``.grad``."""
    torch.manual_seed(0)
    block = Branches(D)
    ref = copy.deepcopy(block)
    x, g = torch.randn(B, D), torch.randn(B, D)
    leaf = x.clone().requires_grad_()
    grad_x, state = backward_input(block(leaf), g, leaf, list(block.parameters()))
    assert len(state.deferred) == 4 and len(state.captured) == 6, (state.deferred, state.captured)
    assert all(p.grad is None for p in block.parameters())
    backward_weight(state)
    leaf_ref = x.clone().requires_grad_()
    ref(leaf_ref).backward(g)
    assert torch.equal(grad_x, leaf_ref.grad)
    for (name, p), q in zip(block.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_schedule_for_other_ranks_and_ddp_under_a_split_backward_are_rejected():
    run_on_ranks(2, _rejected)


def _rejected():
    from torch.nn.parallel import DistributedDataParallel

    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    stage = PipelineStage(nn.Linear(2, 2), mesh.get_rank(), 2, mesh)
    with pytest.raises(ValueError, match=r"for 4 pipeline ranks, the mesh's 'pp' dim has 2"):
        PipelineSchedule(stage, build_schedule("1f1b", 4, 4), loss_fn=F.mse_loss)
    # W adds plain weight gradients itself: DDP's reducer hooks the AccumulateGrad nodes, which W does not run
    ddp_stage = PipelineStage(DistributedDataParallel(nn.Linear(2, 2)), mesh.get_rank(), 2, mesh)
    with pytest.raises(ValueError, match=r"stage \d holds a torch DistributedDataParallel module; schedule 'zb_h1'"):
        PipelineSchedule(ddp_stage, "zb_h1", n_microbatches=2, loss_fn=F.mse_loss)
    PipelineSchedule(ddp_stage, "1f1b", n_microbatches=2, loss_fn=F.mse_loss)  # a fused backward runs them


def _count_p2p_bytes():
    """GPipe on 2 ranks, 4 microbatches of (2, D) fp32: rank 0 sends the spec header once and 4 activations; rank 1
    sends 4 input gradients. Every send is counted on the pp dim."""
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    rank = mesh.get_rank()
    stage = PipelineStage(_blocks(2)[rank], rank, 2, mesh)
    pipe = PipelineSchedule(stage, "gpipe", n_microbatches=4, loss_fn=F.mse_loss)
    x, y = _data()
    with dtp.comm_mode() as comm:
        pipe.step(x, target=y)
    activations = 4 * (B // 4) * D * 4
    from dtensor_plus.layouts.pipeline.stage import HEADER_BYTES

    assert comm.bytes("send", "pp") == (HEADER_BYTES + activations if rank == 0 else activations), comm
    with dtp.comm_mode() as comm:  # the spec is cached: the second step sends data only
        pipe.step(x, target=y)
    assert comm.bytes("send", "pp") == activations, comm


def test_p2p_is_counted_and_the_spec_crosses_once():
    run_on_ranks(2, _count_p2p_bytes)


def _gpt_composed(pp, dp, tp, sp, zero, schedule):
    import pipeline_gpt
    from gpt import PRESETS
    from gpt_layouts import Layout

    g = torch.Generator().manual_seed(0)
    batch_list = [(torch.randint(0, 256, (8, 8), generator=g), torch.randint(0, 256, (8, 8), generator=g))
                  for _ in range(2)]
    layout = Layout(dp=dp, tp=tp, sp=sp, zero=zero)
    losses, single, diff = pipeline_gpt.compare_pipeline_with_single(
        PRESETS["debug"].replace(dropout=0.0), layout, pp=pp, schedule=schedule, n_microbatches=4,
        batch_list=batch_list, lr=1e-2)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single), atol=1e-5, rtol=1e-5)
    assert diff < 1e-5, diff


@pytest.mark.parametrize("pp, dp, tp, sp, zero, schedule", [
    (2, 1, 2, True, 0, "zb_h1"),  # tp + sp inside the stages, the B/W split on DTensors
    (2, 2, 2, False, 3, "zb_v"),  # ZeRO-3 on dp and tp inside each stage, two stages per rank
])
def test_gpt_composed_matches_single_device(pp, dp, tp, sp, zero, schedule):
    run_on_ranks(pp * dp * tp, _gpt_composed, pp, dp, tp, sp, zero, schedule, timeout=120)


def _early_receives(name, m):
    p = torch.distributed.get_world_size()
    mesh = dtp.init_device_mesh("cpu", (p,), mesh_dim_names=("pp",))
    schedule = build_schedule(name, p, m)
    blocks = _blocks(schedule.num_stages)
    stages = [PipelineStage(blocks[s], s, schedule.num_stages, mesh) for s in schedule.stages_of(mesh.get_rank())]
    pipe = PipelineSchedule(stages, schedule, loss_fn=F.mse_loss)
    x, y = _data()
    counts = []
    for _ in range(2):  # the second step knows every shape from the start
        for s in stages:
            s.submodule.zero_grad(set_to_none=True)
        pipe.step(x, target=y)
        counts.append(pipe.early_receives)
    want_loss, want = _single_device(schedule.num_stages)
    for s in stages:
        for g, ref in zip((q.grad for q in s.submodule.parameters()), want[s.stage_index].parameters()):
            torch.testing.assert_close(g, ref.grad, **TOL)
    return counts


def test_receives_posted_early_give_the_same_gradients():
    counts = run_on_ranks(4, _early_receives, "1f1b", 4)
    # Every rank but the first receives activations, every rank but the last gradients: posted ahead of their action.
    assert all(second > 0 for _, second in counts), counts


def test_split_backward_replays_its_recorded_walk_and_rerecords_another_graph():
    """The input path's walk recorded on the first microbatch serves the next (same graph shape); a graph of another
    shape with the same plans (a different head on the block) is walked anew: every microbatch's gradients stay
    equal to plain backwards', bit for bit."""
    torch.manual_seed(0)
    block = Branches(D)
    ref = copy.deepcopy(block)
    plans = {}
    shapes = [lambda m, h: m(h), lambda m, h: m(h), lambda m, h: torch.tanh(m(h)) * 2]
    walks = []
    for i, shape in enumerate(shapes):
        x, g = torch.randn(B, D), torch.randn(B, D)
        leaf = x.clone().requires_grad_()
        grad_x, state = backward_input(shape(block, leaf), g, leaf, list(block.parameters()), plans)
        walks.append(plans["walk"])
        backward_weight(state)
        leaf_ref = x.clone().requires_grad_()
        shape(ref, leaf_ref).backward(g)
        assert torch.equal(grad_x, leaf_ref.grad), i
        for (name, p), q in zip(block.named_parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad), (i, name)
    assert walks[1] is walks[0] and walks[2] is not walks[0]
