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

On a mesh of more than one dim (dp x tp, with or without sp), use ``llama_mesh_plan``: every style keeps
DTensors (global shapes: no head counts to localise), the model is then lifted with ``replicate(model, mesh)``,
and forward runs inside ``dtensor_plus.implicit_replication()``, so the position ids, rotary cos/sin and masks
HF builds as plain tensors join as Replicate. The same holds for context parallelism (tokens sharded on the
sequence over a "cp" mesh dim): the rotary cos/sin of the whole sequence meet each rank's q/k block sharded
alike, so positions follow the sequence sharding, and with ``attn_implementation="sdpa"`` under
``context_parallel("cp")`` attention is ring attention. Train with ``use_cache=False``: HF's KV cache
concatenates keys along the sequence, a gather under cp.

GPT-2 (``gpt2_tp_plan``) uses the same layout as ``llama_tp_plan``. Its linear layers are transformers' Conv1D, whose weight is
stored (in, out): the styles take ``weight_output_dim=1``. Its fused ``c_attn`` (one Conv1D with output
[q | k | v]) is split by module surgery into three Conv1D pieces ``c_attn.q/.k/.v``, each column-wise, whose
local outputs are concatenated: rank r then holds [q_r | k_r | v_r], its own heads of all three, which is
what HF's ``split(split_size)`` needs (with ``split_size`` made local). A plain Shard of the 3*hidden
columns would give rank 0 all of q and part of k instead; permuting the fused columns so a plain Shard works
would change the global parameter (checkpoints, optimizers). (A ``StridedShard(1, 3)`` of the fused weight,
the (3, hidden) columns with the hidden factor split, is now expressible too; the split keeps each piece an
ordinary, checkpointable Conv1D that any loader understands.)
"""

from __future__ import annotations

import torch
from torch import nn

from dtensor_plus import Replicate, Shard
from dtensor_plus.layouts import (
    ColwiseParallel, PrepareModuleInput, PrepareModuleOutput, RowwiseParallel, SequenceParallel, parallelize_module,
)

__all__ = ["llama_tp_plan", "llama_plan", "llama_sp_plan", "llama_mesh_plan", "gpt2_tp_plan", "gpt2_plan", "SplitQKV"]


def llama_plan(model: nn.Module, sequence_parallel: bool = False) -> dict:
    """The plan dict for a ``LlamaForCausalLM`` (or a bare ``LlamaModel``)."""
    prefix = "model." if hasattr(model, "lm_head") else ""
    if sequence_parallel:
        return llama_sp_plan(prefix)
    replicated = Replicate()
    plan = {
        f"{prefix}embed_tokens": RowwiseParallel(),
        # One DTensor input shared by q, k and v (and by gate and up): their input gradients add up as Partial
        # and are all-reduced once per block in backward, instead of once per projection.
        f"{prefix}layers.*.self_attn": PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": replicated}, desired_input_kwarg_layouts={"hidden_states": replicated}
        ),
        f"{prefix}layers.*.mlp": PrepareModuleInput(input_layouts=replicated, desired_input_layouts=replicated),
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


def llama_mesh_plan(sequence_parallel: bool = False, prefix: str = "model.") -> dict:
    """The plan dict for a ``LlamaForCausalLM`` whose activations stay DTensors (for ``mesh["tp"]`` of a
    multi-dim mesh): Megatron tp, with ``sequence_parallel`` the residual stream and norms on Shard(1).

        parallelize_module(model, mesh["tp"], llama_mesh_plan(sequence_parallel=True))
        replicate(model, mesh)                       # dp (and cp) mesh dims; gradients reduced in buckets
        with dtp.implicit_replication():             # HF's plain position ids, rotary cos/sin, masks
            logits = model(shard_batch(input_ids, mesh)).logits    # a DTensor, Replicate on tp
    """
    replicated = Replicate()
    act = Shard(1) if sequence_parallel else replicated
    dtensors = dict(use_local_output=False)
    plan = {
        f"{prefix}embed_tokens": RowwiseParallel(input_layouts=replicated, output_layouts=act, **dtensors),
        f"{prefix}layers.*.self_attn": PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": act}, desired_input_kwarg_layouts={"hidden_states": replicated}
        ),
        f"{prefix}layers.*.mlp": PrepareModuleInput(input_layouts=act, desired_input_layouts=replicated),
        f"{prefix}layers.*.self_attn.[qkv]_proj": ColwiseParallel(**dtensors),
        f"{prefix}layers.*.self_attn.o_proj": RowwiseParallel(output_layouts=act, **dtensors),
        f"{prefix}layers.*.mlp.gate_proj": ColwiseParallel(**dtensors),
        f"{prefix}layers.*.mlp.up_proj": ColwiseParallel(**dtensors),
        f"{prefix}layers.*.mlp.down_proj": RowwiseParallel(output_layouts=act, **dtensors),
        "lm_head": ColwiseParallel(input_layouts=act, output_layouts=replicated, **dtensors),
    }
    if sequence_parallel:
        for norm in ("layers.*.input_layernorm", "layers.*.post_attention_layernorm", "norm"):
            plan[f"{prefix}{norm}"] = SequenceParallel()
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


# -- GPT-2 -------------------------------------------------------------------------------------------------


class SplitQKV(nn.Module):
    """GPT-2's fused ``c_attn`` as three Conv1D pieces ``q``, ``k``, ``v`` whose outputs are concatenated.

    Same function as the fused layer; each piece can then be split column-wise on its own, so each rank keeps
    whole heads of q, k and v. ``SplitQKV.of(c_attn)`` copies the fused weight's column blocks.
    """

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module):
        super().__init__()
        self.q, self.k, self.v = q, k, v

    @classmethod
    def of(cls, fused: nn.Module) -> SplitQKV:
        hidden = fused.weight.shape[0]  # Conv1D weight (hidden, 3 * hidden)
        pieces = []
        for i in range(3):
            piece = type(fused)(hidden, hidden)  # Conv1D(nf, nx)
            with torch.no_grad():
                piece.weight.copy_(fused.weight[:, i * hidden:(i + 1) * hidden])
                piece.bias.copy_(fused.bias[i * hidden:(i + 1) * hidden])
            pieces.append(piece.to(fused.weight.device, fused.weight.dtype))
        return cls(*pieces)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, 3 * local D)
        return torch.cat([self.q(hidden_states), self.k(hidden_states), self.v(hidden_states)], dim=-1)


def gpt2_plan(model: nn.Module, sequence_parallel: bool = False) -> dict:
    """The plan dict for a ``GPT2LMHeadModel`` (or a bare ``GPT2Model``) whose ``c_attn`` are ``SplitQKV``."""
    prefix = "transformer." if hasattr(model, "lm_head") else ""
    if sequence_parallel:
        return _gpt2_sp_plan(prefix)
    col, row = ColwiseParallel(weight_output_dim=1), RowwiseParallel(weight_output_dim=1)
    plan = {
        f"{prefix}wte": RowwiseParallel(),
        # one DTensor input shared by q, k and v: their input gradients add up as Partial and are all-reduced
        # once in backward, not once per piece
        f"{prefix}h.*.attn.c_attn": PrepareModuleInput(input_layouts=Replicate(), desired_input_layouts=Replicate()),
        f"{prefix}h.*.attn.c_attn.[qkv]": col,
        f"{prefix}h.*.attn.c_proj": row,
        f"{prefix}h.*.mlp.c_fc": col,
        f"{prefix}h.*.mlp.c_proj": row,
    }
    if prefix:
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def _gpt2_sp_plan(prefix: str) -> dict:
    """Megatron-SP for GPT-2, as ``llama_sp_plan``. The learned position embedding ``wpe`` is looked up whole
    (HF builds its position ids inside forward) and its output cut to this rank's sequence shard, no
    communication; its weight stays a plain parameter whose gradient arrives whole (one all-gather in backward).
    The fused q/k/v and the MLP take their input positionally: one all-gather each on entry."""
    sequence_in = PrepareModuleInput(input_layouts=Shard(1), desired_input_layouts=Replicate())
    col = ColwiseParallel(weight_output_dim=1)
    row_sp = RowwiseParallel(output_layouts=Shard(1), use_local_output=False, weight_output_dim=1)
    plan = {
        f"{prefix}wte": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        f"{prefix}wpe": PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=Shard(1), use_local_output=False
        ),
        f"{prefix}h.*.ln_1": SequenceParallel(),
        f"{prefix}h.*.attn.c_attn": sequence_in,
        f"{prefix}h.*.attn.c_attn.[qkv]": col,
        f"{prefix}h.*.attn.c_proj": row_sp,
        f"{prefix}h.*.ln_2": SequenceParallel(),
        f"{prefix}h.*.mlp": sequence_in,
        f"{prefix}h.*.mlp.c_fc": col,
        f"{prefix}h.*.mlp.c_proj": row_sp,
        f"{prefix}ln_f": SequenceParallel(),
    }
    if prefix:
        plan["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    return plan


def gpt2_tp_plan(model: nn.Module, tp_mesh, sequence_parallel: bool = False) -> nn.Module:
    """Parallelize a HF GPT-2 in place on the 1-D mesh ``tp_mesh``; returns ``model``.

    Each ``attn.c_attn`` is first replaced by ``SplitQKV`` (so its parameters are named ``c_attn.q.weight``
    and so on; concatenate the three on the last dim to get the fused tensor back). ``n_head`` must divide by
    the tp size; with ``sequence_parallel=True`` the sequence length must too.
    """
    config = model.config
    tp = tp_mesh.size()
    if config.num_attention_heads % tp:
        raise ValueError(
            f"tensor parallel size {tp} must divide num_attention_heads={config.num_attention_heads}; "
            f"pick a tp size that divides it"
        )
    if tp > 1 and config.tie_word_embeddings:
        raise ValueError(
            "tie_word_embeddings=True shares one weight between the row-wise embedding and the column-wise "
            "head; build the model with tie_word_embeddings=False"
        )
    attentions = [m for m in model.modules() if hasattr(m, "c_attn") and hasattr(m, "split_size")]
    if any(getattr(m, "is_cross_attention", False) for m in attentions):
        raise ValueError("cross-attention GPT-2 layers (add_cross_attention=True) are not covered by this plan")
    for attention in attentions:
        if not isinstance(attention.c_attn, SplitQKV):
            attention.c_attn = SplitQKV.of(attention.c_attn)
    parallelize_module(model, tp_mesh, gpt2_plan(model, sequence_parallel))
    for attention in attentions:
        # HF splits c_attn's output with split_size and views heads with -1: the local hidden size is enough.
        # num_heads and embed_dim are scaled too, for code that reads them.
        for field in ("split_size", "num_heads", "embed_dim"):
            setattr(attention, field, getattr(attention, field) // tp)
    return model
