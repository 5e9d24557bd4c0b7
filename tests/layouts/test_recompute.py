"""Activation recomputation (layouts/recompute.py) equal to one device without it, on every layout.

examples/gpt.py's debug GPT with dropout 0.1 drawn in strict RNG mode (each rank keeps its slice of the mask one
device draws): two AdamW steps with ``checkpoint_modules`` "full" (each block) or "selective" (the attention
core of each attention module) on tp+sp, dp, ZeRO-2, ZeRO-3 and cp ring, and a Hugging Face Llama on tp+sp
(no attention dropout against one device, see _run_llama; with it, against the same layout): losses,
first-step parameter gradients and final parameters equal one device without recomputation.

Dropout masks in recomputation: the gradients above would differ if a recomputed mask did (the attention
dropout sits inside every recomputed region); ``test_a_different_mask_in_recomputation_is_caught`` shows they
do, with torch's checkpoint alone, which in dtensor_plus's default RNG mode redraws from the next op counter.

Memory: bytes alive at the end of forward per layer (benchmarks/activation_memory.py's ``LiveActivations``)
on tp=2 with sp, against Korthikanti et al.'s formula in fp32, term by term.
"""

import collections
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dtensor_plus as dtp
from dtensor_plus import DTensor
from dtensor_plus.layouts import context_parallel, loss_parallel
from dtensor_plus.layouts.recompute import checkpoint_modules
from dtensor_plus.testing import run_on_ranks

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.append(str(ROOT / "benchmarks"))  # last: benchmarks/kernels.py must not hide the kernels package

from gpt import GPT, PRESETS  # noqa: E402
from gpt_layouts import Layout, make_mesh, make_optimizer, place_batch, place_model  # noqa: E402

CONFIG = PRESETS["debug"].replace(dropout=0.1)
LR, TOL, STEPS, BATCH = 1e-3, 1e-5, 2, 4
PATTERNS = {"full": "blocks.*", "selective": "blocks.*.attn", "keep_attention": "blocks.*"}
LAYOUTS = {
    "tp2-sp": Layout(tp=2, sp=True),
    "dp2": Layout(dp=2),
    "zero2-dp2": Layout(dp=2, zero=2),
    "zero3-dp2": Layout(dp=2, zero=3),
    "cp2-ring": Layout(cp=2),
}


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _batches(config):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, config.vocab_size, (BATCH, config.block_size + 1), generator=g) for _ in range(STEPS)]


def _train(model, opt, batches, place, scope):
    losses, first_grads = [], None
    for window in batches:
        with scope(), loss_parallel():
            loss = model.loss(place(window[:, :-1]), place(window[:, 1:]))
            loss.backward()
        if first_grads is None:
            first_grads = {n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(_full(loss).item())
    return losses, first_grads


def _run_gpt(layout, policy):
    """Rank function: (max loss diff, max first-step gradient diff, gradients compared, max parameter diff)."""
    config = CONFIG.replace(attention="sdpa") if layout.cp > 1 else CONFIG
    mesh = make_mesh(layout)
    torch.manual_seed(0)
    model = GPT(config)
    reference = copy.deepcopy(model)
    place_model(model, mesh, layout)
    checkpoint_modules(model, PATTERNS[policy], policy)
    opt = make_optimizer(model, mesh, layout, LR)
    scope = (lambda: context_parallel("cp", "ring")) if layout.cp > 1 else _nothing
    dtp.manual_seed(1, strict=True)
    losses, grads = _train(model, opt, _batches(config), lambda t: place_batch(t, mesh), scope)

    torch.manual_seed(1)
    ref_losses, ref_grads = _train(reference, make_optimizer(reference, None, Layout(), LR), _batches(config),
                                   lambda t: t, _nothing)
    ref_params = dict(reference.named_parameters())
    return (max(abs(a - b) for a, b in zip(losses, ref_losses)),
            max((grads[n] - ref_grads[n]).abs().max().item() for n in grads) if grads else None, len(grads),
            max((_full(p) - ref_params[n]).abs().max().item() for n, p in model.named_parameters()))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# The default run samples the table (each policy, and each of tp+sp, ZeRO-3 and the cp ring once); -m slow runs all.
# "keep_attention" is sampled by test_recompute_keep_attention.py (cp 3, SDPA); here, under -m slow, on every layout
# (without cp the debug GPT writes attention out: no SDPA op to keep, so it recomputes as "full").
SAMPLE = {("tp2-sp", "full"), ("tp2-sp", "selective"), ("zero3-dp2", "selective"), ("cp2-ring", "full")}
CASES = [pytest.param(layout, policy, id=f"{name}-{policy}",
                      marks=() if (name, policy) in SAMPLE else pytest.mark.slow)
         for name, layout in LAYOUTS.items() for policy in ("full", "selective", "keep_attention")]


@pytest.mark.parametrize("layout, policy", CASES)
def test_recomputation_trains_like_one_device(layout, policy):
    loss_diff, grad_diff, n_grads, param_diff = run_on_ranks(layout.world, _run_gpt, layout, policy, timeout=120.0)[0]
    assert loss_diff <= TOL and param_diff <= TOL, (loss_diff, param_diff)
    if layout.zero != 2:  # ZeRO-2 reduce-scatters gradients into its optimizer's shards: checked through the steps
        assert n_grads == len(list(GPT(CONFIG).parameters())) and grad_diff <= TOL, (n_grads, grad_diff)


# -- a model no one here wrote --------------------------------------------------------------------------------


def _llama(attention_dropout=0.0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
        attention_dropout=attention_dropout,
        attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().train()
    with torch.no_grad():  # RMSNorm starts at 1; move it off so its gradients are checked honestly
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _run_llama(policy):
    """Rank function: tp=2 + sp Llama (GQA, eager attention) with recomputation against one device without.

    Without attention dropout here: examples/hf_plans.py runs HF's attention on local tensors (it reshapes with
    -1 heads), so its dropout is torch's own draw on each rank's heads, not a DTensor op that strict mode draws
    as one device would (``_run_llama_dropout`` checks those masks against the same layout instead).
    ``use_cache=False``, as HF's own gradient checkpointing sets: a recomputed layer would append its
    keys and values to the KV cache a second time."""
    from hf_plans import llama_tp_plan

    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    reference = _llama()
    model = copy.deepcopy(reference)
    llama_tp_plan(model, mesh, sequence_parallel=True)
    checkpoint_modules(model, {"full": "model.layers.*", "selective": "model.layers.*.self_attn"}[policy], policy)
    tokens = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    weights = torch.randn(64, generator=torch.Generator().manual_seed(2))
    dtp.manual_seed(5, strict=True)
    loss = (_full(model(tokens, use_cache=False).logits) * weights).sum()
    loss.backward()
    torch.manual_seed(5)
    ref_loss = (reference(tokens, use_cache=False).logits * weights).sum()
    ref_loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(_full(p.grad), reference.get_parameter(name).grad, atol=TOL, rtol=TOL,
                                   msg=lambda m: f"grad of {name}: {m}")
    return abs(loss.item() - ref_loss.item())


@pytest.mark.parametrize("policy", [pytest.param("full", marks=pytest.mark.slow), "selective"])
def test_hugging_face_llama_recomputes_like_one_device(policy):
    pytest.importorskip("transformers")
    loss_diff = run_on_ranks(2, _run_llama, policy, timeout=120.0)[0]
    assert loss_diff <= 1e-4, loss_diff  # a sum over 2 x 6 x 64 weighted logits



def _run_llama_dropout(policy):
    """Rank function: tp=2 + sp Llama with attention dropout 0.1 (drawn by torch on each rank's local heads, see
    _run_llama): the loss and whole gradients, with ``policy``'s recomputation or none."""
    from hf_plans import llama_tp_plan

    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    model = llama_tp_plan(_llama(attention_dropout=0.1), mesh, sequence_parallel=True)
    if policy != "none":
        checkpoint_modules(model, {"full": "model.layers.*", "selective": "model.layers.*.self_attn"}[policy], policy)
    tokens = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    dtp.manual_seed(5, strict=True)
    loss = _full(model(tokens, use_cache=False).logits).sum()
    loss.backward()
    return loss.item(), {n: _full(p.grad) for n, p in model.named_parameters()}


def test_hugging_face_attention_dropout_recomputes_the_same_masks():
    """The attention dropout sits in every recomputed region (full: the layer; selective: the core): the same
    layout with and without recomputation gives the same loss and gradients, so the masks were drawn again alike."""
    pytest.importorskip("transformers")
    (loss, grads), *others = (run_on_ranks(2, _run_llama_dropout, policy, timeout=120.0)[0]
                              for policy in ("none", "full", "selective"))
    for other_loss, other_grads in others:
        assert other_loss == loss
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")

# -- dropout masks in recomputation -----------------------------------------------------------------------------


def _torch_checkpoint_blocks(model):
    """torch.utils.checkpoint on each block, without checkpoint_modules' random tape."""
    for block in model.blocks:
        forward = block.forward
        block.forward = lambda x, forward=forward: torch.utils.checkpoint.checkpoint(forward, x, use_reentrant=False)


def _gradients_default_rng(how):
    """Rank function: tp=2 + sp, dtensor_plus's default RNG mode (each draw seeded by an op counter); the
    first-step gradients, whole."""
    layout = Layout(tp=2, sp=True)
    mesh = make_mesh(layout)
    torch.manual_seed(0)
    model = place_model(GPT(CONFIG), mesh, layout)
    if how == "checkpoint_modules":
        checkpoint_modules(model, "blocks.*", "full")
    elif how == "torch":
        _torch_checkpoint_blocks(model)
    dtp.manual_seed(1)
    window = _batches(CONFIG)[0]
    with loss_parallel():
        model.loss(place_batch(window[:, :-1], mesh), place_batch(window[:, 1:], mesh)).backward()
    return {n: _full(p.grad) for n, p in model.named_parameters()}


def test_a_different_mask_in_recomputation_is_caught():
    """Default RNG mode: checkpoint_modules' gradients equal those without recomputation, while torch's checkpoint
    alone (restoring torch's generator, not dtensor_plus's op counter) redraws other masks and is far off."""
    plain, ours, theirs = (run_on_ranks(2, _gradients_default_rng, how, timeout=120.0)[0]
                           for how in ("none", "checkpoint_modules", "torch"))
    ours_diff = max((ours[n] - plain[n]).abs().max().item() for n in plain)
    theirs_diff = max((theirs[n] - plain[n]).abs().max().item() for n in plain)
    assert ours_diff <= TOL, ours_diff
    assert theirs_diff > 100 * TOL, theirs_diff  # the comparison sees a different mask


def test_bad_arguments_are_named():
    model = GPT(CONFIG)
    with pytest.raises(ValueError, match="policy must be one of"):
        checkpoint_modules(model, "blocks.*", "attention")
    with pytest.raises(ValueError, match="no submodule matches 'layers.\\*'"):
        checkpoint_modules(model, "layers.*")
    checkpoint_modules(model, "blocks.*")
    with pytest.raises(ValueError, match="checkpointed already"):
        checkpoint_modules(model, "blocks.0", "selective")


# -- memory ---------------------------------------------------------------------------------------------------


def _per_layer(policy, tp, sp):
    from activation_memory import per_layer

    return per_layer(MEMORY_CONFIG, tp, sp, policy, MEMORY_BATCH)


MEMORY_CONFIG = PRESETS["debug"].replace(block_size=16, dim=16, num_heads=4, num_layers=1, dropout=0.1)
MEMORY_BATCH = 2


def test_recomputation_frees_activation_memory_as_the_paper_counts():
    """tp=2 + sp, bytes per layer on one rank: full keeps the layer's input (4 s·b·h/t bytes in fp32); none and
    selective are the paper's count (fp32, float masks) plus what sp keeps whole here -- the gathered inputs of
    the q/k/v and fc layers, where Megatron keeps the shard and gathers again in backward -- and, for selective,
    what the selective cache keeps of the row-parallel projection: its partial sum (whole: s·b·h) and its
    reduce-scatter output (s·b·h/t, the dropout's input), where the paper keeps the projection's input (s·b·h/t,
    recomputed here from the core); see benchmarks/activation_memory.py."""
    from activation_memory import formula_bytes

    s, b, h, a, t = MEMORY_CONFIG.block_size, MEMORY_BATCH, MEMORY_CONFIG.dim, MEMORY_CONFIG.num_heads, 2
    sbh_bytes = 4 * s * b * h
    gathered_inputs = 2 * sbh_bytes * (1 - 1 / t)
    measured = {policy: _per_layer(policy, t, True) for policy in ("none", "selective", "full")}
    assert measured["full"] < measured["selective"] < measured["none"], measured
    assert measured["full"] == formula_bytes(s, b, h, a, t, True, "full"), measured
    assert measured["none"] == formula_bytes(s, b, h, a, t, True, "none") + gathered_inputs, measured
    selective_extra = sbh_bytes + sbh_bytes / t - sbh_bytes / t  # partial sum + its reduce-scatter - proj input
    assert measured["selective"] == formula_bytes(s, b, h, a, t, True, "selective") + gathered_inputs + \
        selective_extra, measured


# -- communication ----------------------------------------------------------------------------------------------


class _C10dCalls(TorchDispatchMode):
    """c10d ops that really run (beneath the selective cache, which answers the ops it keeps without running
    them; ``comm_mode`` counts at dtensor_plus's Python level, before that cache)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self.calls[func.name()] += 1
        return func(*args, **(kwargs or {}))


def _backward_c10d_calls(policy):
    """Rank function: the c10d calls of one backward, tp=2 + sp, 2 layers."""
    layout = Layout(tp=2, sp=True)
    mesh = make_mesh(layout)
    torch.manual_seed(0)
    model = place_model(GPT(CONFIG), mesh, layout)
    if policy != "none":
        checkpoint_modules(model, PATTERNS[policy], policy)
    dtp.manual_seed(1)
    window = _batches(CONFIG)[0]
    with loss_parallel():
        loss = model.loss(place_batch(window[:, :-1], mesh), place_batch(window[:, 1:], mesh))
        with _C10dCalls() as counter:
            loss.backward()
    return dict(counter.calls)


def test_selective_recomputation_communicates_nothing_more():
    """The attention core needs no collective (heads are sharded): selective recomputation's backward runs the
    c10d calls of a backward without recomputation; full recomputation also runs each block's forward
    all-gathers and reduce-scatters (one each per sub-layer under sp: 2 + 2 per layer) again."""
    none, selective, full = (run_on_ranks(2, _backward_c10d_calls, policy, timeout=120.0)[0]
                             for policy in ("none", "selective", "full"))
    assert selective == none, (selective, none)
    layers = CONFIG.num_layers
    gather, scatter = "c10d::_allgather_base_", "c10d::_reduce_scatter_base_"
    assert full[gather] == none[gather] + 2 * layers and full[scatter] == none[scatter] + 2 * layers, (full, none)
