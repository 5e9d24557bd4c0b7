"""Tensor-parallel plans for Hugging Face ``transformers`` models, written only with dtensor_plus.layouts
(no edits to transformers, no torch.distributed.tensor).

    from examples.hf_plans import llama_tp_plan
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    model = LlamaForCausalLM(LlamaConfig(..., attn_implementation="eager"))
    llama_tp_plan(model, mesh)          # in place; returns model
    logits = model(input_ids).logits    # plain, replicated on every rank

Megatron layout (as in PyTorch's TP tutorial): q/k/v and gate/up column-wise, o/down row-wise, the token
embedding row-wise (vocabulary shards), the head column-wise gathered to whole logits. Every style returns
local tensors (``use_local_output=True``), so HF's attention and MLP bodies run on plain tensors holding this
rank's heads: the rotary cos/sin, position ids and causal masks HF builds inside forward never meet a DTensor.
Norms stay plain parameters: their inputs are replicated, so each rank computes the full gradient.
"""

from __future__ import annotations

from torch import nn

from dtensor_plus import Replicate, Shard
from dtensor_plus.layouts import (
    ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel, parallelize_module,
)

__all__ = ["llama_tp_plan", "llama_plan", "llama_sp_plan"]


def llama_plan(model: nn.Module, sequence_parallel: bool = False) -> dict:
    """The plan dict for a ``LlamaForCausalLM`` (or a bare ``LlamaModel``)."""
    prefix = "model." if hasattr(model, "lm_head") else ""
    if sequence_parallel:
        return llama_sp_plan(prefix)
    plan = {
        f"{prefix}embed_tokens": RowwiseParallel(),
        f"{prefix}layers.*.self_attn.[qkv]_proj": ColwiseParallel(),
        f"{prefix}layers.*.self_attn.o_proj": RowwiseParallel(),
        f"{prefix}layers.*.mlp.gate_proj": ColwiseParallel(),
        f"{prefix}layers.*.mlp.up_proj": ColwiseParallel(),
        f"{prefix}layers.*.mlp.down_proj": RowwiseParallel(),
    }
    if prefix:
        # whole logits on every rank; with loss_parallel keep Shard(-1) (output_layouts=Shard(-1)) instead
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def llama_sp_plan(prefix: str = "model.") -> dict:
    """Megatron sequence parallelism: the residual stream and the norms hold sequence shards, Shard(1).

    The residual stream stays a DTensor (``use_local_output=False``), so HF reads the global sequence length
    from its shape when it builds position ids, rotary cos/sin and the causal mask (plain tensors that then
    meet only the local q/k inside attention). HF passes the attention its input as the keyword argument
    ``hidden_states``: PrepareModuleInput's keyword layouts all-gather it once for q, k and v together.
    """
    plan = {
        f"{prefix}embed_tokens": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        f"{prefix}layers.*.input_layernorm": SequenceParallel(),
        f"{prefix}layers.*.self_attn": PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": Shard(1)}, desired_input_kwarg_layouts={"hidden_states": Replicate()}
        ),
        f"{prefix}layers.*.self_attn.[qkv]_proj": ColwiseParallel(),
        f"{prefix}layers.*.self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        f"{prefix}layers.*.post_attention_layernorm": SequenceParallel(),
        # the MLP takes its input positionally: one all-gather for gate and up together
        f"{prefix}layers.*.mlp": PrepareModuleInput(input_layouts=Shard(1), desired_input_layouts=Replicate()),
        f"{prefix}layers.*.mlp.gate_proj": ColwiseParallel(),
        f"{prefix}layers.*.mlp.up_proj": ColwiseParallel(),
        f"{prefix}layers.*.mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        f"{prefix}norm": SequenceParallel(),
    }
    if prefix:
        plan["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    return plan


def llama_tp_plan(model: nn.Module, tp_mesh, sequence_parallel: bool = False) -> nn.Module:
    """Parallelize a HF Llama in place on the 1-D mesh ``tp_mesh``; returns ``model``.

    ``sequence_parallel=True`` also shards the sequence (dim 1) of the residual stream and the norms; the
    sequence length must then divide by the tp size.

    The head counts must divide by the tp size (each rank keeps whole heads, and rank r's query heads share
    its key/value heads). HF's Llama attention reshapes with ``-1`` heads, so local tensors need no edits to
    the module's fields; the attributes that are head counts are scaled anyway, for code that reads them.
    """
    config = model.config
    tp = tp_mesh.size()
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if config.num_attention_heads % tp or kv_heads % tp:
        raise ValueError(
            f"tensor parallel size {tp} must divide num_attention_heads={config.num_attention_heads} and "
            f"num_key_value_heads={kv_heads}; pick a tp size that divides both"
        )
    if tp_mesh.size() > 1 and config.tie_word_embeddings:
        raise ValueError(
            "tie_word_embeddings=True shares one weight between the row-wise embedding and the column-wise "
            "head; build the model with tie_word_embeddings=False"
        )
    parallelize_module(model, tp_mesh, llama_plan(model, sequence_parallel))
    for module in model.modules():
        _localize_head_counts(module, tp)
    return model


def _localize_head_counts(module: nn.Module, tp: int) -> None:
    # Older transformers (< 4.48) views with self.num_heads / self.hidden_size: those must be the local counts,
    # as in PyTorch's TP tutorial. num_key_value_groups (q heads per kv head) is unchanged by an even split.
    for field in ("num_heads", "num_key_value_heads", "hidden_size"):
        if isinstance(getattr(module, field, None), int) and hasattr(module, "q_proj"):
            setattr(module, field, getattr(module, field) // tp)
