"""Hugging Face causal LMs laid out by their own string plans (``parallelize_module(model, mesh["tp"],
model.tp_plan)``, layouts/hf_plan.py), no hand-written plan: a table of tiny random-init architectures
(hf_tiny_models.py: dense and MoE, tied and untied embeddings, a vocabulary of 97 and head counts that tp 2 or
3 does not divide) on four layouts, each against the same model on one device: the logits, every parameter
gradient, the gradient of the input embeddings, then the loss of 5 AdamW steps and every parameter after them.

    tp2, tp3    the plan on a 1-D tp mesh of 2 or 3 ranks
    dp2xtp2     the plan on mesh["tp"] of a (dp, tp) = (2, 2) mesh, then ``replicate`` on dp (batch of 3: uneven)
    zero3       the same mesh with ``fully_shard`` on dp (ZeRO-3) per decoder layer and on the root
    ep2xtp2     (MoE models) dp2xtp2, then ``expert_parallel`` shards the experts on dp (layouts/hf_experts.py)

The whole table is marked slow (``pytest -m slow``); the default run takes a sample.

Legend: B batch, T sequence, V vocabulary, D hidden.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import dtensor_plus as dtp  # noqa: E402
from dtensor_plus import DTensor, Replicate, Shard  # noqa: E402
from dtensor_plus.layouts import expert_parallel, fully_shard, parallelize_module, replicate, shard_batch  # noqa: E402
from dtensor_plus.layouts.hf_plan import HF_STYLE_NAMES, translate_hf_plan  # noqa: E402
from dtensor_plus.testing import run_on_ranks  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_tiny_models import ARCHITECTURES, MOE_ARCHITECTURES, VOCAB, build  # noqa: E402

B, T, STEPS, LR = 3, 5, 5, 1e-3
LAYOUTS = {"tp2": 2, "tp3": 3, "dp2xtp2": 4, "zero3": 4, "ep2xtp2": 4}


def _layout(model, layout: str):
    """Place ``model`` by its own ``tp_plan``; returns (mesh, a function placing a (B, T) batch)."""
    if layout in ("tp2", "tp3"):
        mesh = dtp.init_device_mesh("cpu", (LAYOUTS[layout],), mesh_dim_names=("tp",))
        parallelize_module(model, mesh, model.tp_plan)
        return mesh, lambda batch: batch
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], model.tp_plan)
    if layout in ("dp2xtp2", "ep2xtp2"):
        replicate(model, mesh)
        if layout == "ep2xtp2":
            expert_parallel(model, mesh, ep_mesh_dim="dp")  # 2 of the 4 experts per rank; tokens all-gathered on dp
            experts = [p for name, p in model.named_parameters() if ".experts." in name]
            assert experts and all(p.placements == (Shard(0), Replicate()) for p in experts)
    else:
        replicate(model, mesh, reduce_in_backward=False)  # lift onto (dp, tp); ZeRO reduces the gradients
        for layer in model.model.layers:
            fully_shard(layer, mesh, mesh_dim="dp")
        fully_shard(model, mesh, mesh_dim="dp")
    return mesh, lambda batch: shard_batch(batch, mesh)


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _loss_and_logits(model, tokens_BT, targets_BT, embeds_out: list):
    handle = model.get_input_embeddings().register_forward_hook(lambda _, __, out: embeds_out.append(out))
    try:
        with dtp.implicit_replication():  # the position ids, rotary cos/sin and masks HF builds as plain tensors
            logits_BTV = model(tokens_BT, use_cache=False).logits
            loss = F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())
    finally:
        handle.remove()
    embeds_out[-1].retain_grad()
    return loss, logits_BTV


def _run(arch: str, layout: str, attn_implementation: str = "eager"):
    """Rank function: ``arch`` under ``layout`` vs one device. Returns the fallbacks of the first step."""
    reference, model = build(arch, attn_implementation), build(arch, attn_implementation)
    mesh, place = _layout(model, layout)
    generator = torch.Generator().manual_seed(2)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR)
    fallbacks = {}
    for step in range(STEPS):
        tokens_BT = torch.randint(0, VOCAB, (B, T), generator=generator)
        targets_BT = torch.randint(0, VOCAB, (B, T), generator=generator)
        embeds, ref_embeds = [], []
        with dtp.comm_mode() as comm:
            loss, logits = _loss_and_logits(model, place(tokens_BT), place(targets_BT), embeds)
            loss.backward()
        ref_loss, ref_logits = _loss_and_logits(reference, tokens_BT, targets_BT, ref_embeds)
        ref_loss.backward()
        torch.testing.assert_close(_whole(loss), ref_loss, atol=2e-5, rtol=2e-5, msg=lambda m: f"step {step} loss: {m}")
        if step == 0:
            fallbacks = dict(comm.fallbacks)
            torch.testing.assert_close(_whole(logits), ref_logits, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(_whole(embeds[-1].grad), ref_embeds[-1].grad, atol=2e-5, rtol=2e-5,
                                       msg=lambda m: f"input-embedding gradient: {m}")
            _assert_params_equal(model, reference, lambda p: p.grad, "gradient of")
            # A gradient entry that is zero in exact arithmetic (a key bias off the rotary dims: softmax ignores a
            # constant added to a row's scores) is rounding noise on both sides, and Adam scales noise up to steps
            # of size lr: such an entry can only be held to "moved no more than Adam allows".
            noise_only = {name: p.grad.abs() < 1e-7 for name, p in reference.named_parameters()}
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
    _assert_params_equal(model, reference, lambda p: p, f"after {STEPS} steps,", noise_only)
    return fallbacks


def _assert_params_equal(model, reference, get, what: str, noise_only=None):
    names = [name for name, _ in reference.named_parameters()]
    assert names == [name for name, _ in model.named_parameters()], "the layout changed the parameters' names"
    for name, p in model.named_parameters():
        got, want = _whole(get(p)), get(reference.get_parameter(name))
        if noise_only is not None:  # those entries: within Adam's reach of each other; the rest: equal
            noise = noise_only[name]
            assert bool(((got - want)[noise].abs() <= 2 * STEPS * LR).all()), f"{what} {name}: noise entries"
            got, want = got[~noise], want[~noise]
        torch.testing.assert_close(got, want, atol=5e-5, rtol=5e-5, msg=lambda m: f"{what} {name}: {m}")


def _table(arch: str, layout: str):
    run_on_ranks(LAYOUTS[layout], _run, arch, layout, timeout=300.0)


SAMPLE = [("llama", "tp3"), ("qwen2", "zero3"), ("qwen3_moe", "ep2xtp2")]
TABLE = [(a, l) for a in ARCHITECTURES for l in LAYOUTS if l != "ep2xtp2" or a in MOE_ARCHITECTURES]


@pytest.mark.parametrize("arch,layout", SAMPLE, ids=[f"{a}-{l}" for a, l in SAMPLE])
def test_sample_of_the_table(arch, layout):
    _table(arch, layout)


@pytest.mark.slow
@pytest.mark.parametrize("arch,layout", TABLE, ids=[f"{a}-{l}" for a, l in TABLE])
def test_table(arch, layout):
    if (arch, layout) in SAMPLE:
        pytest.skip("in the default sample")
    _table(arch, layout)


def test_unknown_style_string_raises_naming_it_and_the_known_ones():
    model = build("llama")
    with pytest.raises(ValueError, match=r"unknown tensor-parallel style string\(s\) \['colwize'\].*'rowwise'"):
        translate_hf_plan(model, {**model.tp_plan, "model.layers.*.mlp.up_proj": "colwize"})
    assert "ep_dispatch_experts" in HF_STYLE_NAMES and "embedding_rowwise" in HF_STYLE_NAMES


def test_a_plan_for_another_model_raises_and_entries_for_absent_layers_are_skipped():
    model = build("qwen2_moe")  # every layer is MoE: the plan's dense-MLP entries match nothing, as in transformers
    translated = translate_hf_plan(model, model.tp_plan)
    assert "model.layers.*.mlp.gate_proj" in model.tp_plan and "model.layers.*.mlp.gate_proj" not in translated
    assert "model.layers.*.self_attn.q_proj" in translated
    with pytest.raises(ValueError, match="matches a module or parameter"):
        translate_hf_plan(model, {"transformer.h.*.attn.c_attn": "colwise"})
    with pytest.raises(ValueError, match="lays out nn.Linear or nn.Embedding"):
        translate_hf_plan(model, {"model.layers.*.mlp": "colwise"})


def _expert_parallel_on_a_dense_model_raises():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    with pytest.raises(ValueError, match="has no MoE layer it knows"):
        expert_parallel(build("llama"), mesh, ep_mesh_dim="ep")
    return True


def test_expert_parallel_raises_on_a_model_without_moe_blocks():
    assert all(run_on_ranks(2, _expert_parallel_on_a_dense_model_raises))
