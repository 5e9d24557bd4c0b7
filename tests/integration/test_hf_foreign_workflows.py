"""Hugging Face models through the workflows around a layout, each against the same model on one device:

    checkpoint   saved under one layout (with the AdamW state after a step), loaded under another, one more step:
                 every parameter equals two steps on one device (T5: embeddings tied across encoder, decoder, head)
    pipeline     an HF Llama cut into 2 stages by a user's wrapper module (PipelineStage takes any module):
                 the microbatch losses and every parameter after 2 steps
    context      an HF Llama on a 1-D cp mesh, sequence 7 (no split is even), HF's loss from labels= inside
                 forward, eager and sdpa attention (sdpa: the ring, nothing gathers the sequence)
    empty shard  one row on 2 dp ranks, on the DTensor path (local_compute=False) and the local paths (which
                 then take the DTensor path: HF's ``view(0, T, -1, D)`` fails on an empty rank's plain rows)

    loss         ``loss_parallel()`` around HF's loss inside forward (``labels=``), the head colwise: the logits stay
                 vocab-sharded (3 ranks, vocabulary 97), tied heads (Qwen2, GPT-2) included
    export       ``checkpoint.export_safetensors`` of a T5 under tp2 (tied embeddings): the file equals the model's own
                 state dict on one device, key for key, and ``from_pretrained`` on it gives the same logits

plus ZeRO-3's local path refusing HF's loss inside forward, naming the fixes. Export and that refusal run by
default, the rest is slow.

Legend: B batch, T sequence.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

import dtensor_plus as dtp  # noqa: E402
from dtensor_plus import Shard, checkpoint  # noqa: E402
from dtensor_plus.layouts import (context_parallel, fully_shard, loss_parallel, parallelize_module,  # noqa: E402
                                  replicate, shard_batch)
from dtensor_plus.layouts.pipeline import PipelineSchedule, PipelineStage  # noqa: E402
from dtensor_plus.testing import run_on_ranks  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_tiny_models  # noqa: E402
from hf_foreign_models import TP_PLANS, build, loss_outside, make_batch  # noqa: E402
from test_hf_foreign_layouts import (LAYOUTS, LR, _whole, assert_parameters_match, forward,  # noqa: E402
                                     noise_only_entries, place)


def _zero3_local_reruns_loss_inside_forward():
    """BERT with labels= computes its loss inside forward: fully_shard's local path cannot put a per-rank mean back,
    runs the call again on the DTensor path (one warning naming the fixes) and equals one device."""
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    model, reference = fully_shard(build("bert"), mesh), build("bert")
    whole = make_batch("bert", 0)
    with pytest.warns(UserWarning, match=r"a loss computed inside forward\?.*local_compute=False"):
        loss = model(**{k: shard_batch(v, mesh) for k, v in whole.items()}).loss
    expected = reference(**whole).loss
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss.full_tensor(), expected, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    return True


def test_zero3_local_path_reruns_a_loss_inside_forward_on_the_dtensor_path():
    assert all(run_on_ranks(2, _zero3_local_reruns_loss_inside_forward))


# -- export: one safetensors file of whole tensors, as HF's model.safetensors -----------------------------------

def _export_under_tp(directory: str):
    from safetensors.torch import load_file

    model, _, _ = _placed("t5", "tp2")
    file = f"{directory}/model.safetensors"
    checkpoint.export_safetensors(model, file)
    rank = torch.distributed.get_rank()
    with pytest.raises(ValueError, match="different state dict keys"):  # raised on every rank, before any gather
        checkpoint.export_safetensors({"only_on_rank_0": torch.ones(2)} if rank == 0 else {}, file + ".bad")
    with pytest.raises(OSError):  # rank 0 cannot write there: every rank fails, none waits
        checkpoint.export_safetensors({"w": torch.ones(2)}, f"{directory}/no/such/dir/model.safetensors")
    if rank == 0:
        reference = build("t5")
        want, got = reference.state_dict(), load_file(file)
        assert list(got) == list(want)  # every name the model lists, tied ones included
        for name, t in want.items():
            torch.testing.assert_close(got[name], t, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")
        reference.config.save_pretrained(directory)
        loaded = type(reference).from_pretrained(directory, attn_implementation="eager")
        batch = {k: v for k, v in make_batch("t5", 0).items() if k != "labels"}
        torch.testing.assert_close(loaded(**batch).logits, reference(**batch).logits, atol=0, rtol=0)
    return True


def test_export_safetensors_of_a_tp_model_equals_its_state_dict_and_loads_in_transformers(tmp_path):
    assert all(run_on_ranks(2, _export_under_tp, str(tmp_path)))


# -- checkpoint: save under one layout, load under another ------------------------------------------------------

def _step(arch: str, model, opt, put, seed: int):
    out = forward(arch, model, {k: put(v) for k, v in make_batch(arch, seed).items()}, [])
    out.loss.backward()
    opt.step()
    opt.zero_grad()


def _placed(arch: str, layout: str):
    model = build(arch)
    put, make_optimizer = place(arch, model, layout)
    opt = make_optimizer(model.parameters()) if make_optimizer else torch.optim.AdamW(model.parameters(), lr=LR)
    return model, put, opt


def _save_after_one_step(arch: str, layout: str, path: str):
    model, put, opt = _placed(arch, layout)
    _step(arch, model, opt, put, seed=0)
    state = checkpoint.get_state_dict(model, opt)
    state["step"] = 1
    checkpoint.save(state, path)
    return True


def _load_and_step(arch: str, layout: str, path: str):
    model, put, opt = _placed(arch, layout)
    state = checkpoint.get_state_dict(model, opt)
    state["step"] = 0
    checkpoint.load(state, path)
    checkpoint.set_state_dict(model, opt, state)
    assert state["step"] == 1
    _step(arch, model, opt, put, seed=1)
    reference = build(arch)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR)
    noise_only = {}
    for seed in range(2):
        forward(arch, reference, make_batch(arch, seed), []).loss.backward()
        noise_only = noise_only or noise_only_entries(reference)
        ref_opt.step()
        ref_opt.zero_grad()
    assert_parameters_match(model, reference, noise_only, "after load and a step,")
    return True


ROUND_TRIPS = [("t5", "tp2", "zero3_dt"), ("t5", "tp3", "zero2"), ("bert", "dp2xtp2", "tp3"), ("gpt2", "zero2", "tp2"),
               ("bart", "zero3_dt", "tp3"), ("vit", "tp2", "dp2")]


@pytest.mark.slow
@pytest.mark.parametrize("arch,saved,loaded", ROUND_TRIPS, ids=["-".join(c) for c in ROUND_TRIPS])
def test_checkpoint_saved_under_one_layout_resumes_under_another(tmp_path, arch, saved, loaded):
    path = str(tmp_path / "ckpt")
    assert all(run_on_ranks(LAYOUTS[saved], _save_after_one_step, arch, saved, path, timeout=300.0))
    assert all(run_on_ranks(LAYOUTS[loaded], _load_and_step, arch, loaded, path, timeout=300.0))


# -- pipeline: an HF Llama in two stages ------------------------------------------------------------------------

class LlamaPiece(nn.Module):
    """Decoder layers [first, last) of an HF Llama; the embedding on the first piece, norm and head on the last.
    Shares the model's modules. Each piece computes the rotary tables itself (they depend on positions only)."""

    def __init__(self, model, first: int, last: int):
        super().__init__()
        self.is_first, self.is_last = first == 0, last == len(model.model.layers)
        self.rotary_emb = model.model.rotary_emb
        if self.is_first:
            self.embed_tokens = model.model.embed_tokens
        self.layers = nn.ModuleList(model.model.layers[first:last])
        if self.is_last:
            self.norm, self.lm_head = model.model.norm, model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden_BTD = self.embed_tokens(x) if self.is_first else x
        position_ids = torch.arange(hidden_BTD.shape[1])[None]
        cos_sin = self.rotary_emb(hidden_BTD, position_ids)
        for layer in self.layers:  # sdpa with no mask is causal
            hidden_BTD = layer(hidden_BTD, attention_mask=None, position_ids=position_ids, position_embeddings=cos_sin)
        return self.lm_head(self.norm(hidden_BTD)) if self.is_last else hidden_BTD


def _token_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())


def _llama_pipeline(schedule: str):
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    rank = mesh.get_local_rank("pp")
    reference, model = hf_tiny_models.build("llama", "sdpa"), hf_tiny_models.build("llama", "sdpa")
    piece = LlamaPiece(model, rank, rank + 1)
    opt = torch.optim.AdamW(piece.parameters(), lr=LR)
    pipe = PipelineSchedule(PipelineStage(piece, rank, 2, mesh), schedule, n_microbatches=3, loss_fn=_token_loss,
                            optimizer=opt)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):
        tokens_BT, targets_BT = (torch.randint(0, hf_tiny_models.VOCAB, (3, 7), generator=generator) for _ in "xy")
        losses = []
        pipe.step(tokens_BT, target=targets_BT, losses=losses)
        ref_loss = _token_loss(reference(tokens_BT, use_cache=False).logits, targets_BT)
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        if rank == 1:
            torch.testing.assert_close(torch.stack(losses).mean(), ref_loss.detach(), atol=2e-5, rtol=2e-5)
    names = {id(p): name for name, p in model.named_parameters()}
    for p in piece.parameters():
        torch.testing.assert_close(p, reference.get_parameter(names[id(p)]), atol=5e-5, rtol=5e-5,
                                   msg=lambda m: f"{names[id(p)]}: {m}")
    return True


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_hf_llama_in_two_pipeline_stages_matches_one_device(schedule):
    assert all(run_on_ranks(2, _llama_pipeline, schedule))


# -- context parallelism on an HF Llama, sequence 7 -------------------------------------------------------------

def _llama_cp(attn_implementation: str):
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
    reference = hf_tiny_models.build("llama", attn_implementation)
    model = dtp.distribute_module(hf_tiny_models.build("llama", attn_implementation), mesh)
    tokens_BT = torch.randint(0, hf_tiny_models.VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    placed = dtp.distribute_tensor(tokens_BT, mesh, [Shard(1)])
    with dtp.implicit_replication(), context_parallel("cp"), dtp.comm_mode() as comm:
        out = model(placed, labels=placed, use_cache=False)  # HF shifts the labels: a slice across the shards
        out.loss.backward()
    ref = reference(tokens_BT, labels=tokens_BT, use_cache=False)
    ref.loss.backward()
    torch.testing.assert_close(_whole(out.logits), ref.logits, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(_whole(out.loss), ref.loss, atol=2e-5, rtol=2e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(_whole(p.grad), reference.get_parameter(name).grad, atol=5e-5, rtol=5e-5,
                                   msg=lambda m: f"gradient of {name}: {m}")
    return dict(comm.fallbacks), dict(comm.counts)


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_llama_context_parallel_sequence_7_with_labels_matches_one_device(attn):
    fallbacks, counts = run_on_ranks(2, _llama_cp, attn, timeout=300.0)[0]
    assert not fallbacks, fallbacks
    if attn == "sdpa":  # the ring: per layer 1 shift forward, 2 backward; the sequence gathered once, for the loss
        assert counts[("ring_shift", "cp")] == 3 * 2, counts


# -- loss_parallel around HF's own loss --------------------------------------------------------------------------

def _hf_loss_under_loss_parallel(arch: str):
    mesh = dtp.init_device_mesh("cpu", (3,), mesh_dim_names=("tp",))
    if arch in hf_tiny_models.ARCHITECTURES:
        reference, model = hf_tiny_models.build(arch), hf_tiny_models.build(arch)
        tokens_BT = torch.randint(0, hf_tiny_models.VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": tokens_BT, "labels": tokens_BT}
    else:
        reference, model = build(arch), build(arch)
        batch = make_batch(arch, 0)
    plan = {**(getattr(model, "tp_plan", None) or TP_PLANS[arch]), "lm_head": "colwise"}  # logits kept sharded
    parallelize_module(model, mesh, plan)
    with dtp.implicit_replication(), loss_parallel(), dtp.comm_mode() as comm:
        out = model(**batch, use_cache=False)
        assert out.logits.placements == (Shard(2),), out.logits.placements
        out.loss.backward()
    ref = reference(**batch, use_cache=False)
    ref.loss.backward()
    torch.testing.assert_close(_whole(out.loss), ref.loss, atol=2e-5, rtol=2e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(_whole(p.grad), reference.get_parameter(name).grad, atol=5e-5, rtol=5e-5,
                                   msg=lambda m: f"gradient of {name}: {m}")
    return dict(comm.fallbacks)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_hf_loss_inside_forward_under_loss_parallel_matches_one_device(arch):
    for fallbacks in run_on_ranks(3, _hf_loss_under_loss_parallel, arch, timeout=300.0):
        assert not fallbacks, fallbacks


# -- an empty shard: one row on two dp ranks --------------------------------------------------------------------

def _one_row_on_two_ranks(arch: str, how: str):
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    reference, model = build(arch), build(arch)
    if how.startswith("zero3"):
        fully_shard(model, mesh, local_compute=how == "zero3_local")
    else:
        replicate(model, mesh, local_compute=how == "replicate_local")
    batch = make_batch(arch, 0, batch=1)
    labels = batch.pop("labels")
    out = model(**{k: shard_batch(v, mesh) for k, v in batch.items()})
    loss = loss_outside(arch, out.logits, shard_batch(labels, mesh))
    loss.backward()
    ref_loss = loss_outside(arch, reference(**batch).logits, labels)
    ref_loss.backward()
    torch.testing.assert_close(_whole(loss), ref_loss, atol=2e-5, rtol=2e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(_whole(p.grad), reference.get_parameter(name).grad, atol=5e-5, rtol=5e-5,
                                   msg=lambda m: f"gradient of {name}: {m}")
    return True


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["bert", "t5", "vit", "gpt_neox"])
@pytest.mark.parametrize("how", ["replicate", "zero3"])
def test_one_row_on_two_dp_ranks_on_the_dtensor_path_matches_one_device(arch, how):
    assert all(run_on_ranks(2, _one_row_on_two_ranks, arch, how, timeout=300.0))


@pytest.mark.parametrize("how", ["replicate_local", pytest.param("zero3_local", marks=pytest.mark.slow)])
def test_one_row_on_two_dp_ranks_on_the_local_paths(how):
    # HF's attention runs view(0, T, -1, D) on an empty rank's rows, which plain torch refuses: a dp block that is
    # empty anywhere sends every rank down the DTensor path together (data_local.LocalCompute._batch)
    assert all(run_on_ranks(2, _one_row_on_two_ranks, "bert", how, timeout=300.0))
