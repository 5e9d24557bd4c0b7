"""Models no one here wrote: Hugging Face's Llama and GPT-2 (transformers, random init, no download),
parallelized by the plans in examples/hf_plans.py, with and without sequence parallelism, equal one device in
logits and every parameter gradient, with the Megatron collective counts and no op falling back; and Llama
on 2-D meshes: (dp, tp) with and without sp, and (dp, cp) with the sequence sharded through attention.

Legend: B batch, T sequence, V vocabulary.
"""

import contextlib
import copy
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dtensor_plus as dtp  # noqa: E402
from dtensor_plus import DTensor, Replicate, Shard  # noqa: E402
from dtensor_plus.placements import StridedShard  # noqa: E402
from dtensor_plus.layouts import ColwiseParallel, RowwiseParallel, context_parallel, parallelize_module  # noqa: E402
from dtensor_plus.layouts.data import replicate  # noqa: E402
from dtensor_plus.testing import run_on_ranks  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from hf_plans import gpt2_tp_plan, llama_mesh_plan, llama_tp_plan  # noqa: E402

B, T, V, LAYERS = 2, 6, 64, 2


def _llama(kv_heads: int):
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=32, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():  # RMSNorm starts at 1; move it off so its gradients are checked honestly
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _compare_with_reference(model, reference, seq_len: int, may_stay_plain, reference_grad):
    """Forward and backward of the placed ``model`` and of ``reference`` on the same tokens: logits and every
    gradient equal (fp32, 1e-5). Returns the forward and backward CommCounters."""
    tokens_BT = torch.randint(0, V, (B, seq_len), generator=torch.Generator().manual_seed(1))
    weights_V = torch.randn(V, generator=torch.Generator().manual_seed(2))
    with dtp.comm_mode() as forward:
        logits_BTV = model(tokens_BT).logits
    assert not isinstance(logits_BTV, DTensor)  # the head gathers whole logits, as plain tensors
    with dtp.comm_mode() as backward:
        (logits_BTV * weights_V).sum().backward()
    ref_BTV = reference(tokens_BT).logits
    (ref_BTV * weights_V).sum().backward()

    torch.testing.assert_close(logits_BTV, ref_BTV, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor) or may_stay_plain(name), f"{name} was not distributed"
        grad = p.grad.full_tensor() if isinstance(p, DTensor) else p.grad
        torch.testing.assert_close(grad, reference_grad(reference, name), atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"grad of {name}: {m}")
    return forward, backward


def _run_llama(kv_heads: int, sp: bool = False):
    """Rank function: tp = 2 Llama vs the same weights on one device. Returns (forward counts, fallbacks,
    backward counts)."""
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    reference = _llama(kv_heads)
    model = copy.deepcopy(reference)
    llama_tp_plan(model, mesh, sequence_parallel=sp)
    forward, backward = _compare_with_reference(
        model, reference, T, lambda name: not sp and "norm" in name, lambda ref, name: ref.get_parameter(name).grad)
    return dict(forward.counts), dict(forward.fallbacks) | dict(backward.fallbacks), dict(backward.counts)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_llama_tp_matches_one_device_with_no_fallback(kv_heads):
    for counts, fallbacks, backward in run_on_ranks(2, _run_llama, kv_heads, False):
        assert not fallbacks, fallbacks
        # Megatron: the vocabulary-sharded embedding, then per layer one all-reduce after attention and one
        # after the MLP; the head all-gathers its logit columns. Backward: one all-reduce per column-wise
        # region (q/k/v share their input, gate/up too) and one for the head.
        assert counts == {("all_reduce", "tp"): 1 + 2 * LAYERS, ("all_gather", "tp"): 1}, counts
        assert backward == {("all_reduce", "tp"): 1 + 2 * LAYERS}, backward


def _reject_one_kv_head():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    model = _llama(kv_heads=1)  # one key/value head cannot be split over two ranks
    with pytest.raises(ValueError, match="must divide"):
        llama_tp_plan(model, mesh)
    return all(not isinstance(p, DTensor) for p in model.parameters())  # checked before anything is placed


def test_llama_tp_sp_matches_one_device_with_no_fallback():
    for counts, fallbacks, _ in run_on_ranks(2, _run_llama, 2, True):
        assert not fallbacks, fallbacks
        # Megatron-SP: the embedding and every o/down projection reduce-scatter to sequence shards; each
        # attention and MLP all-gathers once on entry; the head gathers its input sequence and its logit columns.
        assert counts == {("reduce_scatter", "tp"): 1 + 2 * LAYERS, ("all_gather", "tp"): 2 * LAYERS + 2}, counts


def test_plan_rejects_heads_that_do_not_split():
    assert all(run_on_ranks(2, _reject_one_kv_head))


# -- GPT-2: Conv1D weights stored (in, out), a fused c_attn split into q/k/v, a learned position embedding ----

GPT2_HIDDEN, GPT2_T = 32, 8  # T divides by 4 ranks for sequence parallelism


def _gpt2(attn_implementation: str):
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=32, n_embd=GPT2_HIDDEN, n_layer=LAYERS, n_head=4, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).float()
    with torch.no_grad():  # LayerNorm starts at (1, 0) and Conv1D biases at 0: move them so their gradients matter
        for name, p in model.named_parameters():
            if "ln_" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _reference_grad(reference, name: str) -> torch.Tensor:
    """The one-device gradient for ``name``; the plan's ``c_attn.q`` (k, v) is a column block of ``c_attn``."""
    parts = name.split(".")
    if "c_attn" in parts and parts[-2] in ("q", "k", "v"):
        fused = reference.get_parameter(".".join(parts[:-2] + parts[-1:])).grad
        return fused.chunk(3, dim=-1)["qkv".index(parts[-2])]
    return reference.get_parameter(name).grad


def _run_gpt2(world: int, sp: bool, attn_implementation: str):
    """Rank function: GPT-2 on tp = ``world`` vs the same weights on one device. Returns (forward counts,
    backward counts, fallbacks)."""
    mesh = dtp.init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    reference = _gpt2(attn_implementation)
    model = copy.deepcopy(reference)
    gpt2_tp_plan(model, mesh, sequence_parallel=sp)
    # plain: with tp only the norms and wpe (replicated inputs); with sp only wpe (see the plan)
    forward, backward = _compare_with_reference(
        model, reference, GPT2_T, lambda name: "wpe" in name or (not sp and "ln_" in name), _reference_grad)
    return dict(forward.counts), dict(backward.counts), dict(forward.fallbacks) | dict(backward.fallbacks)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp_sp"])
def test_gpt2_matches_one_device_with_no_fallback(world, sp):
    for forward, backward, fallbacks in run_on_ranks(world, _run_gpt2, world, sp, "eager"):
        assert not fallbacks, fallbacks
        if not sp:
            # Megatron: the embedding, then per layer one all-reduce after attention and one after the MLP; the
            # head gathers its logit columns. Backward: one all-reduce per column-wise region (q/k/v share
            # their input), layers and head.
            assert forward == {("all_reduce", "tp"): 1 + 2 * LAYERS, ("all_gather", "tp"): 1}, forward
            assert backward == {("all_reduce", "tp"): 1 + 2 * LAYERS}, backward
        else:
            assert forward == {("reduce_scatter", "tp"): 1 + 2 * LAYERS, ("all_gather", "tp"): 2 * LAYERS + 2}, forward
            # the duals, plus wpe's whole gradient (one all-gather) and one all-reduce per LayerNorm parameter
            # (ln_1, ln_2: weight and bias; ln_f) whose gradient comes from sequence shards
            assert backward == {
                ("reduce_scatter", "tp"): 1 + 2 * LAYERS, ("all_gather", "tp"): 2 * LAYERS + 2,
                ("all_reduce", "tp"): 4 * LAYERS + 2,
            }, backward


def test_gpt2_sdpa_attention_matches_one_device():
    for _, _, fallbacks in run_on_ranks(2, _run_gpt2, 2, True, "sdpa"):
        assert not fallbacks, fallbacks


def _reject_bad_gpt2_layouts():
    mesh = dtp.init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
    config = transformers.GPT2Config(vocab_size=V, n_embd=24, n_layer=1, n_head=6, tie_word_embeddings=False)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match="must divide"):
        gpt2_tp_plan(model, mesh)
    conv = transformers.pytorch_utils.Conv1D(8, 4)  # weight (4, 8); the layout is never guessed from shapes
    with pytest.raises(TypeError, match="weight_output_dim"):
        ColwiseParallel().apply(conv, mesh)
    return all(not isinstance(p, DTensor) for p in [*model.parameters(), *conv.parameters()])


def test_gpt2_plan_rejects_heads_that_do_not_split_and_conv1d_without_weight_output_dim():
    with pytest.raises(ValueError, match="weight_output_dim must be 0"):
        RowwiseParallel(weight_output_dim=2)
    assert all(run_on_ranks(4, _reject_bad_gpt2_layouts))  # checked before anything is placed


def _run_llama_on_2d_mesh(attn_implementation: str, inner: str, sp: bool):
    """Rank function: Llama on a 2x2 mesh, ("dp", "tp") with llama_mesh_plan (sp or not) or ("dp", "cp")
    (tokens sharded on the sequence, attention under context_parallel), forward inside implicit_replication:
    loss and every gradient equal one device."""
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", inner))
    reference = _llama(kv_heads=2)
    reference.config._attn_implementation = attn_implementation
    model = copy.deepcopy(reference)
    if inner == "tp":
        parallelize_module(model, mesh["tp"], llama_mesh_plan(sequence_parallel=sp))
    replicate(model, mesh)
    tokens_BT = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(1))
    # cp: the sequence sharded, or with sp=True zigzag-sharded (load-balanced causal ring)
    sequence = StridedShard(1, 1, zigzag=True) if sp else Shard(1)
    placed = dtp.distribute_tensor(tokens_BT, mesh, [Shard(0), sequence if inner == "cp" else Replicate()],
                                   src_data_rank=None)
    scope = context_parallel("cp") if inner == "cp" else contextlib.nullcontext()
    with dtp.implicit_replication(), scope, dtp.comm_mode() as comm:
        loss = model(placed, use_cache=False).logits.pow(2).mean()  # a KV cache would concatenate the sequence
        loss.backward()
    ref = reference(tokens_BT).logits.pow(2).mean()
    ref.backward()
    torch.testing.assert_close(loss.full_tensor(), ref, atol=1e-6, rtol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), reference.get_parameter(name).grad, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"grad of {name}: {m}")
    return dict(comm.fallbacks), dict(comm.counts)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("inner,sp", [("tp", False), ("tp", True), ("cp", False), ("cp", True)],
                         ids=["dp-tp", "dp-tp-sp", "dp-cp", "dp-cp-balanced"])
def test_llama_on_a_2d_mesh_matches_one_device(attn, inner, sp):
    fallbacks, counts = run_on_ranks(4, _run_llama_on_2d_mesh, attn, inner, sp, timeout=120.0)[0]
    assert not fallbacks, fallbacks
    if inner == "cp" and attn == "sdpa":  # ring attention: per layer 1 shift forward, 2 backward (cp = 2)
        # ... and nothing gathers the sequence (rotary cos/sin, rotate_half's slices follow its sharding)
        assert counts[("ring_shift", "cp")] == 3 * LAYERS and ("all_gather", "cp") not in counts, counts


def _gpt2_dp_with_labels():
    """Hugging Face computes the loss inside forward when given labels=: replicate's local path cannot put a
    scalar back as the global batch, reruns that call on the DTensor path (warned once) and stays exact."""
    import warnings

    from transformers import GPT2Config, GPT2LMHeadModel

    from dtensor_plus.layouts.data import shard_batch

    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=101, n_positions=16, n_embd=24, n_layer=2, n_head=3, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    single = GPT2LMHeadModel(config)
    model = replicate(copy.deepcopy(single), mesh)
    ids = torch.randint(0, 101, (5, 8), generator=torch.Generator().manual_seed(1))  # 3 + 2 rows
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(input_ids=shard_batch(ids, mesh), labels=shard_batch(ids, mesh))
    out.loss.backward()
    want = single(input_ids=ids, labels=ids)
    want.loss.backward()
    torch.testing.assert_close(out.loss.full_tensor(), want.loss)
    for p, q in zip(model.parameters(), single.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad)
    return sum("DTensor path from now on" in str(w.message) for w in caught)


def test_gpt2_data_parallel_with_labels_inside_forward_matches_one_device():
    assert run_on_ranks(2, _gpt2_dp_with_labels) == [1, 1]
