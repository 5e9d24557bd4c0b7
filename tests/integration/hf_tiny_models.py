"""Tiny random-init causal LMs from transformers, one per architecture, for the tp-plan table
(test_hf_plans_table.py): 2 layers, hidden 32 or 48, a vocabulary of 97 (prime: no mesh divides it), head counts
the tp sizes 2 and 3 do not all divide, dense and mixture-of-experts, tied and untied embeddings.

    model = build("mixtral")        # the same weights on every call (seeded), fp32, eager attention

Every config sets what it must by its own field names; ``COMMON`` is the rest. Norm weights start at 1 and
biases at 0 in HF's init: ``build`` moves every parameter a little off its init, so that each gradient is
checked honestly.
"""

from __future__ import annotations

import torch

VOCAB = 97
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)

# architecture -> (config class name, model class name, overrides of COMMON)
ARCHITECTURES: dict[str, tuple[str, str, dict]] = {
    # dense, untied
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, num_attention_heads=5,
                                                            num_key_value_heads=5, head_dim=8, hidden_size=40)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=8)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(tie_word_embeddings=False)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(tie_word_embeddings=False, embedding_multiplier=2.0,
                                                            residual_multiplier=0.5, logits_scaling=2.0)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(tie_word_embeddings=False, residual_dropout=0.0,
                                                                     embedding_dropout=0.0)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(tie_word_embeddings=False)),
    # dense, tied embeddings
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(tie_word_embeddings=True, head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(tie_word_embeddings=True, head_dim=8, sliding_window=4)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(tie_word_embeddings=True, head_dim=8, sliding_window=4)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(tie_word_embeddings=True)),
    "glm": ("GlmConfig", "GlmForCausalLM", dict(tie_word_embeddings=False, head_dim=8)),
    # mixtures of experts
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(tie_word_embeddings=False, num_local_experts=4,
                                                            num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(tie_word_embeddings=False, num_experts=4, **MOE,
                                                                shared_expert_intermediate_size=24)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(tie_word_embeddings=False, num_experts=4, **MOE,
                                                                head_dim=8)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2,
                                                      intermediate_size=16)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        tie_word_embeddings=False, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)),
}
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
# transformers runs experts by grouped_mm where torch has it; OLMoE keeps its per-expert loop, so both paths run
EAGER_EXPERTS = ("olmoe",)


def build(arch: str, attn_implementation: str = "eager") -> torch.nn.Module:
    """The tiny ``arch`` model, fp32, in train mode with no dropout; the same weights on every call."""
    import transformers

    config_name, model_name, overrides = ARCHITECTURES[arch]
    kwargs = {**COMMON, **overrides}
    config = getattr(transformers, config_name)(**kwargs)
    config._attn_implementation = attn_implementation
    if arch in EAGER_EXPERTS:
        config._experts_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).float()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.train()
