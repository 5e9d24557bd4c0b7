"""A model no one here wrote: Hugging Face's Llama (transformers, random init, no download), parallelized by
the plan in examples/hf_plans.py on tp = 2, with and without sequence parallelism, equals one device in logits and every parameter gradient, with
the Megatron collective counts and no op falling back.

Legend: B batch, T sequence, V vocabulary.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dtensor_plus as dtp  # noqa: E402
from dtensor_plus import DTensor  # noqa: E402
from dtensor_plus.testing import run_on_ranks  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from hf_plans import llama_tp_plan  # noqa: E402

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


def _run_llama(kv_heads: int, sp: bool = False):
    """Rank function: tp = 2 Llama vs the same weights on one device. Returns (forward counts, fallbacks)."""
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    reference = _llama(kv_heads)
    model = copy.deepcopy(reference)
    llama_tp_plan(model, mesh, sequence_parallel=sp)
    tokens_BT = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
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
        assert isinstance(p, DTensor) or (not sp and "norm" in name), f"{name} was not distributed"
        grad = p.grad.full_tensor() if isinstance(p, DTensor) else p.grad
        ref = reference.get_parameter(name).grad
        torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"grad of {name}: {m}")
    return dict(forward.counts), dict(forward.fallbacks) | dict(backward.fallbacks)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_llama_tp_matches_one_device_with_no_fallback(kv_heads):
    for counts, fallbacks in run_on_ranks(2, _run_llama, kv_heads, False):
        assert not fallbacks, fallbacks
        # Megatron: the vocabulary-sharded embedding, then per layer one all-reduce after attention and one
        # after the MLP; the head all-gathers its logit columns.
        assert counts == {("all_reduce", "tp"): 1 + 2 * LAYERS, ("all_gather", "tp"): 1}, counts


def _reject_one_kv_head():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    model = _llama(kv_heads=1)  # one key/value head cannot be split over two ranks
    with pytest.raises(ValueError, match="must divide"):
        llama_tp_plan(model, mesh)
    return all(not isinstance(p, DTensor) for p in model.parameters())  # checked before anything is placed


def test_llama_tp_sp_matches_one_device_with_no_fallback():
    for counts, fallbacks in run_on_ranks(2, _run_llama, 2, True):
        assert not fallbacks, fallbacks
        # Megatron-SP: the embedding and every o/down projection reduce-scatter to sequence shards; each
        # attention and MLP all-gathers once on entry; the head gathers its input sequence and its logit columns.
        assert counts == {("reduce_scatter", "tp"): 1 + 2 * LAYERS, ("all_gather", "tp"): 2 * LAYERS + 2}, counts


def test_plan_rejects_heads_that_do_not_split():
    assert all(run_on_ranks(2, _reject_one_kv_head))
