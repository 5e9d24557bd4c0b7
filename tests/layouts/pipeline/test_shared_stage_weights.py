"""Weights shared across pipeline stages: a language model whose head is tied to its embedding, split so the
embedding lives on the first stage and the head on the last, trains as one device does (the loss, every gradient
and the weights over three steps), with no hand-written all-reduce: the stages declare the tie
(``find_shared_parameters``) and the schedule sums the gradient over the pp ranks holding it, counted.

Legend: B batch, T tokens, D width, V vocabulary (5: uneven on tp=2, one rank holds 3 rows and the other 2).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Replicate, Shard
from dtensor_plus.layouts.pipeline import PipelineSchedule, PipelineStage, build_schedule, find_shared_parameters
from dtensor_plus.testing import run_on_ranks

B, T, D, V = 4, 3, 4, 5
STEPS, LR = 3, 0.5


class TiedLM(nn.Module):
    def __init__(self, num_blocks):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(num_blocks))
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight  # tied: one Parameter, used at both ends

    def forward(self, tokens_BT):
        x_BTD = self.emb(tokens_BT)
        for block in self.blocks:
            x_BTD = x_BTD + block(x_BTD)
        return self.head(x_BTD)  # (B, T, V)


class Piece(nn.Module):
    """Stage ``s`` of ``n``: block s, with the embedding on the first stage and the head on the last."""

    def __init__(self, model, s, n):
        super().__init__()
        self.s, self.first, self.last = s, s == 0, s == n - 1
        if self.first:
            self.emb = model.emb
        self.block = model.blocks[s]
        if self.last:
            self.head = model.head

    def forward(self, x):
        x = self.emb(x) if self.first else x
        x = x + self.block(x)
        return self.head(x) if self.last else x

    def model_name(self, name):
        return f"blocks.{self.s}.{name.removeprefix('block.')}" if name.startswith("block.") else name


def lm_loss(logits_BTV, targets_BT):
    return F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)) for _ in range(STEPS)]


def _single_device(num_blocks):
    """Per step: the loss and every gradient (by the model's names, the tie under both), then an SGD step."""
    torch.manual_seed(0)
    model = TiedLM(num_blocks)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    history = []
    for tokens, targets in _batches():
        loss = lm_loss(model(tokens), targets)
        loss.backward()
        history.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)}))
        opt.step()
        opt.zero_grad()
    return history, {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _place(piece, mesh, tp):
    """On a (pp, tp) mesh: the tied weight vocab-sharded (Shard(0): 5 rows as 3 + 2), the rest replicated."""
    if not tp:
        return piece
    for module in piece.modules():
        for key, p in list(module._parameters.items()):
            if p is None:  # the head's absent bias
                continue
            placement = Shard(0) if p.shape == (V, D) else Replicate()
            module._parameters[key] = nn.Parameter(dtp.distribute_tensor(p.detach(), mesh["tp"], [placement]))
    return piece


def _pipelined(pp, tp, schedule_name):
    """This rank's stages trained for STEPS steps; returns per step (loss on the last stage's ranks, {model name:
    full gradient}, all_reduce count on pp) and the final weights."""
    names, shape = (("pp", "tp"), (pp, tp)) if tp else (("pp",), (pp,))
    mesh = dtp.init_device_mesh("cpu", shape, mesh_dim_names=names)
    schedule = build_schedule(schedule_name, pp, 2, stages_per_rank=2)
    torch.manual_seed(0)
    model = TiedLM(schedule.num_stages)
    pieces = [Piece(model, s, schedule.num_stages) for s in range(schedule.num_stages)]
    shared = find_shared_parameters(pieces)  # before any layout replaces the Parameters
    mine = [(s, _place(pieces[s], mesh, tp)) for s in schedule.stages_of(mesh.get_local_rank("pp"))]
    stages = [PipelineStage(piece, s, schedule.num_stages, mesh, shared_parameters=shared[s]) for s, piece in mine]
    pipe = PipelineSchedule(stages, schedule, loss_fn=lm_loss)
    params = list({id(p): p for _, piece in mine for p in piece.parameters()}.values())
    opt = torch.optim.SGD(params, lr=LR)
    history = []
    for tokens, targets in _batches():
        losses = []
        with dtp.comm_mode() as comm:
            pipe.step(tokens, target=targets, losses=losses)
        loss = torch.stack([_full(x) for x in losses]).mean() if losses else None
        grads = {piece.model_name(n): _full(p.grad) for _, piece in mine for n, p in piece.named_parameters()}
        history.append((loss, grads, comm.count("all_reduce", "pp")))
        opt.step()
        opt.zero_grad()
    weights = {piece.model_name(n): _full(p.detach()) for _, piece in mine for n, p in piece.named_parameters()}
    return history, weights, shared


def _check_against_single_device(pp, tp, schedule_name, sums_on_pp):
    world = pp * (tp or 1)
    results = run_on_ranks(world, _pipelined, pp, tp, schedule_name, timeout=120)
    num_stages = build_schedule(schedule_name, pp, 2, stages_per_rank=2).num_stages
    want_history, want_weights = _single_device(num_stages)
    last_rank_losses = 0
    for history, weights, shared in results:
        assert shared[0] == {"emb.weight": "emb.weight"} and shared[-1] == {"head.weight": "emb.weight"}
        for (loss, grads, all_reduces), (want_loss, want_grads) in zip(history, want_history):
            if loss is not None:
                last_rank_losses += 1
                torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-6)
            for name, grad in grads.items():  # the head's gradient is the tie's: both ends summed
                torch.testing.assert_close(grad, want_grads[name], atol=1e-6, rtol=1e-6, msg=name)
            holds_tie = "emb.weight" in grads or "head.weight" in grads
            assert all_reduces == (1 if holds_tie and sums_on_pp else 0), (all_reduces, sorted(grads))
        for name, w in weights.items():
            torch.testing.assert_close(w, want_weights[name], atol=1e-6, rtol=1e-6, msg=name)
    assert last_rank_losses == STEPS * (tp or 1)


@pytest.mark.parametrize("pp, tp, schedule_name, sums_on_pp", [
    (2, 0, "1f1b", True),  # embedding on rank 0, head on rank 1: one all-reduce over pp per step
    (3, 0, "gpipe", True),  # ranks 0 and 2 hold the tie, rank 1 takes no part (a mesh over the holders)
    (2, 2, "1f1b", True),  # the tie vocab-sharded on tp (5 rows: uneven), summed as blocks over pp
])
def test_tied_embedding_and_head_train_as_one_device(pp, tp, schedule_name, sums_on_pp):
    _check_against_single_device(pp, tp, schedule_name, sums_on_pp)


@pytest.mark.slow
@pytest.mark.parametrize("schedule_name, sums_on_pp", [
    ("zb_v", False),  # stages 0 and 3 both on rank 0: one Parameter, autograd sums it, nothing to send
    ("interleaved_1f1b", True),  # stage 0 on rank 0, stage 3 on rank 1
])
def test_tied_weights_under_multi_stage_schedules(schedule_name, sums_on_pp):
    _check_against_single_device(2, 0, schedule_name, sums_on_pp)


def _mismatched_tie(kind):
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    rank = mesh.get_rank()
    torch.manual_seed(rank if kind == "values" else 0)
    width = 4 if kind == "values" or rank == 0 else 3  # "shape": (4, 4) on stage 0, (3, 3) on stage 1
    stage = PipelineStage(nn.Linear(width, width), rank, 2, mesh, shared_parameters={"weight": "w"})
    with pytest.raises(ValueError) as error:
        PipelineSchedule(stage, "1f1b", n_microbatches=2, loss_fn=F.mse_loss)
    return str(error.value)


@pytest.mark.parametrize("kind, message", [
    ("shape", "shared parameter 'w' has different specs on the stages holding it (pp ranks [0]: (4, 4) torch.float32"),
    ("values", "shared parameter 'w' holds different values on the stages holding it"),
])
def test_a_mismatched_tie_raises_on_every_rank(kind, message):
    messages = run_on_ranks(2, _mismatched_tie, kind)
    assert messages[0] == messages[1] and message in messages[0], messages


def test_an_unknown_shared_name_is_named():
    with pytest.raises(ValueError, match=r"stage 0: shared_parameters names \['wieght'\], which the stage's module"):
        PipelineStage(nn.Linear(2, 2), 0, 2, _FakeMesh(), shared_parameters={"wieght": "w"})


class _FakeMesh:
    """Enough of a mesh for PipelineStage's argument checks (no process group needed)."""

    mesh_dim_names = ("pp",)
