"""Tied parameters stay one Parameter under every layout (dtensor_plus/shared_parameters.py).

nanoGPT, GPT-2 and Gemma hold one Parameter in two slots: ``lm_head.weight is wte.weight``. Under replicate (dp),
distribute_module with ZeRO-1/2, parallelize_module (tp), tp x dp and fully_shard (ZeRO-3) it must stay one
Parameter in both slots, yielded once by ``model.parameters()``, with one gradient reduction: AdamW steps then
equal one device's (losses and every parameter). Two slots asking for layouts that cannot be the same raise a
ValueError on every rank naming both slots and the fix. The vocabulary (7) divides over no mesh dim here, so
shards are uneven, and on 3 ranks the batch of 3 and the 7 rows leave ranks with short blocks.

Legend: B batch, T sequence, D model width, V vocabulary.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Replicate, Shard
from dtensor_plus.layouts import (
    ColwiseParallel, MixedPrecision, RowwiseParallel, ZeroRedundancyOptimizer, fully_shard, parallelize_module,
    replicate, shard_batch,
)
from dtensor_plus.shared_parameters import parameter_slots
from dtensor_plus.testing import run_on_ranks

B, T, D, V = 3, 4, 6, 7
STEPS = 5


class TiedLM(nn.Module):
    """An embedding, one MLP layer and an output head that is the embedding (nanoGPT's ``wte.weight = lm_head.weight``)."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.fc = nn.Linear(D, D)
        self.lm_head = nn.Linear(D, V, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens_BT):
        return self.lm_head(F.gelu(self.fc(self.wte(tokens_BT))))


def _tied_lm():
    torch.manual_seed(0)
    return TiedLM().double()


def _tokens(step):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(10 + step))


def _loss(logits_BTV, tokens_BT):
    """Next-token cross-entropy."""
    return F.cross_entropy(logits_BTV[:, :-1].reshape(-1, V), tokens_BT[:, 1:].reshape(-1))


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _assert_tied(model):
    assert model.lm_head.weight is model.wte.weight, "the tied weight was split into two Parameters"
    assert len(list(model.parameters())) == 3


def _train_beside_one_device(model, reference, place, optimizer=None):
    """STEPS AdamW steps of ``model`` (tokens laid out by ``place``) beside ``reference``: losses and every
    parameter equal one device's."""
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for step in range(STEPS):
        tokens = _tokens(step)
        loss = _loss(model(place(tokens)), place(tokens))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ref_loss = _loss(reference(tokens), tokens)
        ref_loss.backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        torch.testing.assert_close(_full(loss), ref_loss, msg=lambda m, step=step: f"loss of step {step}: {m}")
    named = list(model.named_parameters())
    assert [name for name, _ in named] == [name for name, _ in reference.named_parameters()]
    for (name, p), q in zip(named, reference.parameters()):
        torch.testing.assert_close(_full(p).detach(), q.detach(), msg=lambda m, name=name: f"{name}: {m}")


def test_parameter_slots_names_every_slot_of_a_tied_parameter():
    model = TiedLM()
    groups = {tuple(slot.name for slot in slots): param for param, slots in parameter_slots(model)}
    assert list(groups) == [("wte.weight", "lm_head.weight"), ("fc.weight",), ("fc.bias",)]
    assert groups[("wte.weight", "lm_head.weight")] is model.wte.weight


# -- data parallelism and ZeRO-1/2 --------------------------------------------------------------------------------


def _check_replicate():
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    reference = _tied_lm()
    model = replicate(copy.deepcopy(reference), mesh)
    _assert_tied(model)
    # one gradient hook: the summed gradient of both uses is reduced once, not each half on its own
    assert len(model.wte.weight._post_accumulate_grad_hooks) == 1
    _train_beside_one_device(model, reference, lambda t: shard_batch(t, mesh))


@pytest.mark.parametrize("world_size", [2, 3])
def test_replicate_keeps_a_tied_weight_one_parameter(world_size):
    run_on_ranks(world_size, _check_replicate)


def _check_zero_stage(stage):
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    reference = _tied_lm()
    model = dtp.distribute_module(copy.deepcopy(reference), mesh)
    _assert_tied(model)
    optimizer = ZeroRedundancyOptimizer(model.parameters(), mesh, torch.optim.AdamW, stage=stage, lr=1e-2)
    _train_beside_one_device(model, reference, lambda t: shard_batch(t, mesh), optimizer)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stage_1_and_2_step_a_tied_weight_once(stage):
    run_on_ranks(2, _check_zero_stage, stage)


# -- distribute_module: a partition_fn decides per module ---------------------------------------------------------


def _placing(layouts):
    """A partition_fn that places ``weight`` of the modules named in ``layouts`` as given."""

    def partition_fn(name, module, mesh):
        if name in layouts:
            whole = module.weight.detach()
            module.register_parameter("weight", nn.Parameter(dtp.distribute_tensor(whole, mesh, [layouts[name]])))

    return partition_fn


def _check_distribute_module():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    for layouts in ({"wte": Shard(0), "lm_head": Shard(0)}, {"wte": Shard(1)}, {"lm_head": Shard(1)}):
        model = dtp.distribute_module(_tied_lm(), mesh, _placing(layouts))
        _assert_tied(model)  # a module whose partition_fn left it alone takes the other's decision
        assert model.wte.weight.placements == tuple(layouts.values())[:1]
    with pytest.raises(ValueError) as error:
        dtp.distribute_module(_tied_lm(), mesh, _placing({"wte": Shard(1), "lm_head": Shard(0)}))
    message = str(error.value)
    assert "wte.weight and lm_head.weight" in message and "Shard(dim=1)" in message and "Shard(dim=0)" in message
    assert "partition_fn on 'lm_head'" in message and "untie" in message
    return True


def test_distribute_module_places_a_tied_weight_once_or_names_both_slots():
    assert all(run_on_ranks(2, _check_distribute_module))  # every rank raised


# -- tensor parallelism, alone and with dp ------------------------------------------------------------------------


def _check_tensor_parallel():
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("tp",))
    reference = _tied_lm()
    model = copy.deepcopy(reference)
    # Megatron's tied vocabulary: both styles shard the vocabulary dim, Shard(0), so they agree.
    parallelize_module(model, mesh, {"wte": RowwiseParallel(), "lm_head": ColwiseParallel(output_layouts=Replicate())})
    _assert_tied(model)
    assert model.wte.weight.placements == (Shard(0),)
    assert len(model.wte.weight._post_accumulate_grad_hooks) == 1  # the style's, once
    dtp.distribute_module(model, mesh)  # the MLP layer: Replicate
    _assert_tied(model)
    _train_beside_one_device(model, reference, lambda t: t)
    with pytest.raises(ValueError, match=r"wte\.weight and lm_head\.weight .* RowwiseParallel\(\) on the nn\.Embedding"):
        parallelize_module(_tied_lm(), mesh, {"wte": ColwiseParallel(), "lm_head": ColwiseParallel()})
    return True


@pytest.mark.parametrize("world_size", [2, 3])
def test_tensor_parallel_styles_agree_on_a_tied_weight_or_raise(world_size):
    assert all(run_on_ranks(world_size, _check_tensor_parallel))


def _check_tp_x_dp():
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    reference = _tied_lm()
    model = copy.deepcopy(reference)
    plan = {
        "wte": RowwiseParallel(use_local_output=False),
        "lm_head": ColwiseParallel(output_layouts=Replicate(), use_local_output=False),
    }
    parallelize_module(model, mesh["tp"], plan)
    replicate(model, mesh)
    _assert_tied(model)
    assert model.wte.weight.placements == (Replicate(), Shard(0))
    assert len(model.wte.weight._post_accumulate_grad_hooks) == 1
    _train_beside_one_device(model, reference, lambda t: shard_batch(t, mesh))


def test_tp_x_dp_keeps_a_tied_weight_one_parameter():
    run_on_ranks(4, _check_tp_x_dp)


# -- ZeRO-3 --------------------------------------------------------------------------------------------------------


def _check_fully_shard(first):
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    reference = _tied_lm()
    model = copy.deepcopy(reference)
    for name in first:  # inner units first; the root then owns the tied weight (their common ancestor)
        fully_shard(model.get_submodule(name), mesh)
    fully_shard(model, mesh)
    _assert_tied(model)
    owners = [m for m in model.modules() if hasattr(m, "_zero_state")]
    entries = [shard for m in owners for _, _, shard in m._zero_state.entries]
    assert sum(shard is model.wte.weight for shard in entries) == 1  # one gather, one reduce-scatter
    assert any(shard is model.wte.weight for _, _, shard in model._zero_state.entries)
    _train_beside_one_device(model, reference, lambda t: dtp.distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None))


@pytest.mark.parametrize("world_size, first", [(2, ("fc",)), (3, ()), (2, ("lm_head", "fc"))])
def test_fully_shard_gathers_a_tied_weight_once(world_size, first):
    run_on_ranks(world_size, _check_fully_shard, first)


def _check_fully_shard_siblings():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    model = _tied_lm()
    fully_shard(model.lm_head, mesh)
    with pytest.raises(ValueError, match=r"Embedding.s weight is the Parameter Linear.s weight holds, .* common ancestor"):
        fully_shard(model.wte, mesh)  # the other holder alone: neither call may own the weight
    model = _tied_lm()
    fully_shard(model.lm_head, mesh, mp_policy=MixedPrecision(param_dtype=torch.float32))
    with pytest.raises(ValueError, match=r"TiedLM's wte\.weight and lm_head\.weight .* different .* policies"):
        fully_shard(model, mesh)  # the root would take the weight over, but gathers it another way
    return True


def test_fully_shard_on_two_holders_of_a_tied_weight_raises():
    assert all(run_on_ranks(2, _check_fully_shard_siblings))


# -- a model no one here wrote: GPT-2 with tie_word_embeddings=True -----------------------------------------------


def _gpt2():
    import transformers

    config = transformers.GPT2Config(
        vocab_size=97, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double()


def _check_gpt2(layout, steps):
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    reference = _gpt2()
    model = copy.deepcopy(reference)
    assert model.lm_head.weight is model.transformer.wte.weight
    if layout == "replicate":
        replicate(model, mesh)
    else:
        for block in model.transformer.h:
            fully_shard(block, mesh)
        fully_shard(model, mesh)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert len(list(model.parameters())) == len(list(reference.parameters()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        tokens_BT = torch.randint(0, 97, (3, 6), generator=g)  # 3 sequences on 2 ranks: 2 + 1
        with dtp.implicit_replication():  # the position ids and masks GPT-2 builds inside forward
            logits_BTV = model(shard_batch(tokens_BT, mesh)).logits
            loss = F.cross_entropy(logits_BTV[:, :-1].reshape(-1, 97), shard_batch(tokens_BT, mesh)[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ref_loss = F.cross_entropy(reference(tokens_BT).logits[:, :-1].reshape(-1, 97), tokens_BT[:, 1:].reshape(-1))
        ref_loss.backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        torch.testing.assert_close(loss.full_tensor(), ref_loss, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(
            p.full_tensor(), q.detach(), atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("layout", ["replicate", "fully_shard"])
def test_gpt2_with_tied_embeddings_trains_as_one_device(layout):
    pytest.importorskip("transformers")
    run_on_ranks(2, _check_gpt2, layout, 5, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["replicate", "fully_shard"])
def test_gpt2_with_tied_embeddings_trains_20_steps_as_one_device(layout):
    pytest.importorskip("transformers")
    run_on_ranks(2, _check_gpt2, layout, 20, timeout=300)


# -- compositions with cp and ep: examples/gpt.py's GPT with its head tied to its token embedding -----------------


SDPA, MOE = dict(attention="sdpa"), dict(moe_experts=4, moe_top_k=2)
TIED_GPT_LAYOUTS = {  # name: (train_gpt.Layout's fields, GPTConfig changes, slow)
    "zero3-dp2-cp2": (dict(dp=2, cp=2, zero=3), SDPA, False),
    "tp2-cp2": (dict(tp=2, cp=2), SDPA, True),
    "zero1-dp2-tp2": (dict(dp=2, tp=2, zero=1), {}, True),
    "zero3-dp2-tp2": (dict(dp=2, tp=2, zero=3), {}, True),
    "ep=dp2-moe": (dict(dp=2), MOE, True),  # experts sharded over the dp ranks
}


def _check_tied_gpt(layout_fields, config_changes, steps):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    import train_gpt
    from gpt import PRESETS

    config = PRESETS["debug"].replace(**config_changes)
    untied = train_gpt.GPT

    def tied_gpt(config):
        model = untied(config)
        model.head.weight = model.tok_emb.weight
        return model

    train_gpt.GPT = tied_gpt  # compare_with_single builds the model (and its one-device copy) with this
    try:
        data = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
        batch_list = list(train_gpt.batches(data, steps, 4, config.block_size, 0))
        result = train_gpt.compare_with_single(config, train_gpt.Layout(**layout_fields), batch_list, lr=1e-3)
    finally:
        train_gpt.GPT = untied
    assert len(result.param_placements) == len(list(tied_gpt(config).parameters()))  # still tied
    assert max(abs(a - b) for a, b in zip(result.mesh_losses, result.single_losses)) <= 1e-5, result
    assert result.max_param_diff <= 1e-5, result.max_param_diff


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=[pytest.mark.slow] * slow) for name, (_, _, slow) in TIED_GPT_LAYOUTS.items()]
)
def test_tied_gpt_composes_with_cp_ep_tp_and_zero(name):
    """3 AdamW steps equal one device with the head tied to the embedding, on compositions with cp (ring
    attention) and ep; the default run takes the first row, ``-m slow`` the rest."""
    fields, config_changes, _ = TIED_GPT_LAYOUTS[name]
    world_size = fields.get("dp", 1) * fields.get("tp", 1) * fields.get("cp", 1)
    run_on_ranks(world_size, _check_tied_gpt, fields, config_changes, 3, timeout=120)
