"""Sizes the mesh does not divide, through every layout: Colwise/Rowwise/SequenceParallel on tp (an MLP width of
7 on 3 ranks, 1 on 2: empty shards; 5 or 1 tokens of sequence), a vocabulary of 97 on tp under ``replicate`` and
``fully_shard`` on (dp, tp), with an uneven batch on dp. Each equals one device in outputs, input gradients and
parameter gradients (and parameters after an AdamW step); ``full_tensor()`` and a checkpoint save work.

No library path may build a DTensor from a local block by guessing even blocks (layouts/data.py ``_lift``,
layouts/tensor.py ``_to_dtensor``): 97 rows on 2 ranks are blocks of 49 and 48, which a guess reads as 98 and 96.

Legend: B batch, T sequence, D model width, F MLP width, V vocabulary.
"""

import contextlib
import copy

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Replicate, Shard
from dtensor_plus.layouts import (
    ColwiseParallel, RowwiseParallel, SequenceParallel, fully_shard, loss_parallel, parallelize_module,
)
from dtensor_plus.layouts.data import replicate, shard_batch
from dtensor_plus.testing import run_on_ranks

D = 4


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(D), nn.Linear(D, width), nn.Linear(width, D)

    def forward(self, x_BTD):
        return self.fc2(F.gelu(self.fc1(self.norm(x_BTD))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embed, self.mlp, self.head = nn.Embedding(vocab, D), MLP(width), nn.Linear(D, vocab)

    def forward(self, tokens_BT):
        h_BTD = self.embed(tokens_BT)
        return self.head(h_BTD + self.mlp(h_BTD))  # (B, T, V)


def _perturbed(model: nn.Module) -> nn.Module:
    with torch.no_grad():  # LayerNorm starts at (1, 0): move it off so its gradients are checked honestly
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.double()


def _chunk(t: torch.Tensor, dim: int, mesh, name: str) -> torch.Tensor:
    """This rank's torch.chunk block (empty where torch.chunk runs out of rows)."""
    return Shard(dim).chunk(t, mesh.size(name), mesh.get_local_rank(name))


def _check_grads(model: nn.Module, reference: nn.Module) -> None:
    for name, p in reference.named_parameters():
        got = model.get_parameter(name).grad
        got = got.full_tensor() if isinstance(got, DTensor) else got
        torch.testing.assert_close(got, p.grad, msg=lambda m: f"grad of {name}: {m}")


# ---------------------------------------------------------------- styles on tp, plain local blocks between them


def _mlp_on_tp(n: int, width: int, seq: int, sp: bool):
    """Plain local tensors in, between and out: the styles must learn the global sizes (width features split
    as torch.chunk: 7 on 3 ranks is 3, 3, 1; sequence shards of ``seq`` tokens), never guess them."""
    mesh = dtp.init_device_mesh("cpu", (n,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    reference = _perturbed(MLP(width))
    model = copy.deepcopy(reference)
    if sp:  # sequence shards in and out; the norm runs on them
        plan = {"norm": SequenceParallel(use_local_output=True), "fc1": ColwiseParallel(input_layouts=Shard(1)),
                "fc2": RowwiseParallel(output_layouts=Shard(1))}
    else:  # fc1's local output (width / n features) is fc2's plain local input
        plan = {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
    parallelize_module(model, mesh, plan)
    x_BTD = torch.randn(2, seq, D, dtype=torch.float64, requires_grad=True)
    x_local = (_chunk(x_BTD, 1, mesh, "tp") if sp else x_BTD).detach().requires_grad_()
    y_local = model(x_local)
    weights = torch.randn(2, seq, D, dtype=torch.float64)
    (y_local * (_chunk(weights, 1, mesh, "tp") if sp else weights)).sum().backward()
    y_BTD = reference(x_BTD)
    (y_BTD * weights).sum().backward()
    assert type(y_local) is torch.Tensor
    torch.testing.assert_close(y_local, _chunk(y_BTD, 1, mesh, "tp") if sp else y_BTD)
    torch.testing.assert_close(x_local.grad, _chunk(x_BTD.grad, 1, mesh, "tp") if sp else x_BTD.grad)
    _check_grads(model, reference)  # without sp the norm stays plain: replicated by construction
    return True


@settings(max_examples=6)
@given(n=st.sampled_from([2, 3]), width=st.sampled_from([1, 5, 7]), seq=st.sampled_from([1, 5]), sp=st.booleans())
def test_styles_with_plain_blocks_of_uneven_sizes(n, width, seq, sp):
    assert all(run_on_ranks(n, _mlp_on_tp, n, width, seq, sp))


def _wrong_block():
    """Every rank fed the whole hidden activation instead of its block: a clear error on every rank."""
    mesh = dtp.init_device_mesh("cpu", (3,), mesh_dim_names=("tp",))
    fc2 = parallelize_module(nn.Linear(128, D), mesh, RowwiseParallel())
    try:
        fc2(torch.randn(2, 128))
    except ValueError as error:
        return str(error)
    return None


def test_rowwise_input_not_its_block_raises_on_every_rank():
    for message in run_on_ranks(3, _wrong_block):
        assert message is not None and "128 input features" in message and "torch.chunk" in message, message


def _sequence_blocks_not_chunks():
    """Sequence blocks 1 and 3 on 2 ranks are not torch.chunk pieces of 4 tokens: every rank raises."""
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    norm = parallelize_module(nn.LayerNorm(D), mesh, SequenceParallel())
    try:
        norm(torch.randn(2, 1 + 2 * mesh.get_local_rank(0), D))
    except ValueError as error:
        return str(error)
    return None


def test_sequence_blocks_that_are_not_chunks_raise_on_every_rank():
    for message in run_on_ranks(2, _sequence_blocks_not_chunks):
        assert message is not None and "torch.chunk" in message, message


# ---------------------------------------------------------------- (dp, tp): replicate and fully_shard

def _lm_plan(vocab_parallel: bool) -> dict:
    return {
        "embed": RowwiseParallel(input_layouts=Replicate(), use_local_output=False),  # vocab rows split: 49 + 48
        "mlp.fc1": ColwiseParallel(use_local_output=False),
        "mlp.fc2": RowwiseParallel(use_local_output=False),
        # vocab-sharded logits into loss_parallel, or whole ones
        "head": ColwiseParallel(output_layouts=None if vocab_parallel else Replicate(), use_local_output=False),
    }


def _lm_on_dp_tp(zero3: bool, vocab: int, width: int, batch: int, path: str, vocab_parallel: bool = False):
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    reference = _perturbed(TinyLM(vocab, width))
    model = copy.deepcopy(reference)
    parallelize_module(model, mesh["tp"], _lm_plan(vocab_parallel))
    replicate(model, mesh, reduce_in_backward=not zero3)
    assert tuple(model.embed.weight.shape) == (vocab, D)  # the global shape, on every rank
    if zero3:
        fully_shard(model.mlp, mesh, mesh_dim="dp")
        fully_shard(model, mesh, mesh_dim="dp")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False)
    tokens_BT, targets_BT = (torch.randint(0, vocab, (batch, 3), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    for _ in range(2):
        with loss_parallel() if vocab_parallel else contextlib.nullcontext(), dtp.comm_mode(per_module=True) as comm:
            logits = model(shard_batch(tokens_BT, mesh))
            loss = F.cross_entropy(logits.flatten(0, 1), shard_batch(targets_BT, mesh).flatten(0, 1))
            loss.backward()
        if vocab_parallel:  # the logits stay split 49 + 48 on tp, forward and backward: the head and the loss
            # (outside any module) gather nothing on tp
            gathers = [key for key in comm.by_module if key[2:] == ("all_gather", "tp") and not key[0].startswith("TinyLM.mlp")]
            assert logits.placements[1] == Shard(2) and not gathers, comm.report()
        ref_logits = reference(tokens_BT)
        ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), targets_BT.flatten(0, 1))
        ref_loss.backward()
        torch.testing.assert_close(logits.full_tensor(), ref_logits)
        torch.testing.assert_close(loss.full_tensor(), ref_loss)
        _check_grads(model, reference)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for name, p in reference.named_parameters():  # full_tensor() of every uneven parameter, after two steps
        torch.testing.assert_close(model.get_parameter(name).full_tensor(), p, msg=lambda m: f"{name}: {m}")
    from dtensor_plus.checkpoint import load, save

    save({"model": model.state_dict()}, path)
    fresh = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    load(fresh, path)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh["model"][k].full_tensor(), v.full_tensor(), msg=lambda m: f"{k}: {m}")
    return True


@settings(max_examples=4)
@given(zero3=st.booleans(), vocab=st.sampled_from([97, 3]), width=st.sampled_from([7, 1]), batch=st.sampled_from([3, 1]),
       vocab_parallel=st.booleans())
def test_replicate_and_fully_shard_on_dp_tp_with_uneven_sizes(tmp_path_factory, zero3, vocab, width, batch, vocab_parallel):
    path = str(tmp_path_factory.mktemp("ckpt") / "step")
    assert all(run_on_ranks(4, _lm_on_dp_tp, zero3, vocab, width, batch, path, vocab_parallel))


def test_vocabulary_of_97_under_replicate_and_fully_shard(tmp_path):
    """The issue's case, pinned: 97 rows on tp = 2 (49 + 48) lifted onto (dp, tp) = (2, 2); under fully_shard
    with loss_parallel too."""
    for zero3 in (False, True):
        assert all(run_on_ranks(4, _lm_on_dp_tp, zero3, 97, 7, 3, str(tmp_path / f"zero{int(zero3)}"), zero3))
