"""A decoder-only GPT (nanoGPT style) written as ordinary single-device torch, and its Megatron plan.

This file owns the model (``GPT``), its configuration (``GPTConfig`` and the named ``PRESETS``) and
``tp_plan``: the ``parallelize_module`` plan that lays it out for tensor (and sequence) parallelism. With
``moe_experts`` > 0 every ``moe_every``-th block's MLP is a mixture of experts (``MoEMLP``: the
``dtensor_plus.layouts.moe.MoE`` layer, top-``moe_top_k``), whose load-balancing and z-losses ``loss`` adds;
``expert_parallel(model, mesh, ep_mesh_dim="dp")`` then shards the experts over the data-parallel ranks. The
model never mentions DTensor: the same code runs on one device and, once placed, on a mesh::

    from examples.gpt import GPT, PRESETS, tp_plan
    model = GPT(PRESETS["debug"])
    parallelize_module(model, mesh["tp"], tp_plan(model.config, sequence_parallel=True))

Legend: B batch, T sequence (<= block_size), D model width, H heads, K head width (D // H), F MLP width
(4 D), V vocabulary.

Two choices keep every tensor a DTensor once the model is placed (a plain tensor other than a 0-d one cannot
meet a DTensor): the position embedding is a Parameter sliced to T (no index tensor to place), and the causal
mask is a buffer (``distribute_module`` / ``replicate`` place buffers too). Attention is written with
matmul / masked_fill / softmax so that benchmarks/train_step.py can run PyTorch's own stack on the same model:
torch 2.13's DTensor has no sharding strategy for the CPU kernel of ``F.scaled_dot_product_attention``
(``_scaled_dot_product_flash_attention_for_cpu``), and with dropout CPU SDPA takes its matmul path anyway.
dtensor_plus keeps batch and heads sharded through either form: its SDPA rule (ops/attention.py), and for
the 4-d matmul here, which flattens (B, H) for ``bmm``, a StridedShard of the flattened dim.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPTConfig", "PRESETS", "GPT", "MoEMLP", "tp_plan"]


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Shape of a GPT.

    Args:
        vocab_size: V (256 for bytes).
        block_size: the longest sequence T the position embedding covers.
        num_layers, num_heads, dim: depth, H and D (D must divide by H).
        dropout: probability for the embedding, attention and residual dropouts.
        bias: whether Linear layers and LayerNorms have biases.
        attention: "matmul" (written out: q @ k^T, mask, softmax, dropout, @ v) or "sdpa"
            (``F.scaled_dot_product_attention``, causal, without dropout on the attention probabilities, as
            most current LLMs train; what context parallelism shards along the sequence).
        moe_experts: 0 (default) for dense MLPs everywhere; else E, the experts of each MoE MLP.
        moe_top_k: experts per token. moe_every: every moe_every-th block (blocks moe_every - 1,
            2 moe_every - 1, ...) is MoE (2: every other block, as GShard and Switch do).
        moe_capacity_factor: None for dropless routing, else the GShard capacity factor.
        moe_aux_loss_coef, moe_z_loss_coef: weights of the load-balancing loss and the router z-loss.
        moe_balance_rate: DeepSeek-V3's auxiliary-loss-free routing bias, moved by this much per
            ``MoE.update_balance_bias()`` (examples/moe_balancing.py calls it per step); None for none.
    """

    vocab_size: int = 256
    block_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    dim: int = 16
    dropout: float = 0.0
    bias: bool = True
    attention: str = "matmul"
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_every: int = 2
    moe_capacity_factor: float | None = None
    moe_aux_loss_coef: float = 0.01
    moe_z_loss_coef: float = 0.001
    moe_balance_rate: float | None = None

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "num_layers", "num_heads", "dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.num_heads:
            raise ValueError(
                f"dim({self.dim}) must divide by num_heads({self.num_heads}); "
                f"try dim={self.num_heads * max(1, self.dim // self.num_heads)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attention not in ("matmul", "sdpa"):
            raise ValueError(f"attention must be 'matmul' or 'sdpa', got {self.attention!r}")
        if self.moe_experts:
            if not isinstance(self.moe_experts, int) or self.moe_experts < 1:
                raise ValueError(f"moe_experts must be 0 (dense) or a positive int, got {self.moe_experts!r}")
            if not 1 <= self.moe_top_k <= self.moe_experts:
                raise ValueError(f"moe_top_k({self.moe_top_k}) must be between 1 and moe_experts({self.moe_experts})")
            if not 1 <= self.moe_every <= self.num_layers:
                raise ValueError(f"moe_every({self.moe_every}) must be between 1 and num_layers({self.num_layers}), "
                                 f"or no block would be MoE")

    def is_moe_block(self, layer: int) -> bool:
        """Whether block ``layer`` (from 0) has a mixture-of-experts MLP."""
        return self.moe_experts > 0 and layer % self.moe_every == self.moe_every - 1

    def replace(self, **changes) -> GPTConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, GPTConfig] = {
    "debug": GPTConfig(vocab_size=256, block_size=8, num_layers=2, num_heads=4, dim=16),
    "small": GPTConfig(vocab_size=256, block_size=128, num_layers=4, num_heads=4, dim=128),
    # GPT-2 small's body (12 layers, 12 heads, 768 wide, 1024 positions) with the byte vocabulary of
    # train_gpt.py: 86M parameters (GPT-2's 124M counts its tied 50257-token embedding).
    "gpt2-124m": GPTConfig(vocab_size=256, block_size=1024, num_layers=12, num_heads=12, dim=768),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        D = config.dim
        self.num_heads, self.dropout, self.kind = config.num_heads, config.dropout, config.attention
        # Separate q, k, v: each can be split column-wise on its own, so every rank holds whole heads.
        self.q = nn.Linear(D, D, bias=config.bias)
        self.k = nn.Linear(D, D, bias=config.bias)
        self.v = nn.Linear(D, D, bias=config.bias)
        self.proj = nn.Linear(D, D, bias=config.bias)
        T = config.block_size
        self.register_buffer("causal_TT", torch.ones(T, T, dtype=torch.bool).triu(1), persistent=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        H, K = self.num_heads, D // self.num_heads
        # (B, T, D) -> (B, H, T, K): heads as a view; with q/k/v colwise the split dim D is sharded by heads.
        q_BHTK, k_BHTK, v_BHTK = (lin(x_BTD).view(B, T, H, K).transpose(1, 2) for lin in (self.q, self.k, self.v))
        if self.kind == "sdpa":
            y_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, is_causal=True)
        else:
            scores_BHTT = q_BHTK @ k_BHTK.transpose(-2, -1) / math.sqrt(K)
            scores_BHTT = scores_BHTT.masked_fill(self.causal_TT[:T, :T], float("-inf"))
            probs_BHTT = F.dropout(scores_BHTT.softmax(-1), self.dropout, self.training)
            y_BHTK = probs_BHTT @ v_BHTK
        y_BTD = y_BHTK.transpose(1, 2).reshape(B, T, D)
        return F.dropout(self.proj(y_BTD), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.dim, 4 * config.dim, bias=config.bias)
        self.out = nn.Linear(4 * config.dim, config.dim, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        h_BTF = F.gelu(self.fc(x_BTD))
        return F.dropout(self.out(h_BTF), self.dropout, self.training)


class MoEMLP(nn.Module):
    """The MLP as a mixture of ``moe_experts`` experts of width 4 D each (top-``moe_top_k`` routing)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        from dtensor_plus.layouts.moe import MoE  # the layer is ordinary torch on plain tensors

        self.moe = MoE(config.dim, 4 * config.dim, config.moe_experts, config.moe_top_k,
                       capacity_factor=config.moe_capacity_factor, aux_loss_coef=config.moe_aux_loss_coef,
                       z_loss_coef=config.moe_z_loss_coef, balance_rate=config.moe_balance_rate)
        self.dropout = config.dropout

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.moe(x_BTD), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, moe: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.dim, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.dim, bias=config.bias)
        self.mlp = MoEMLP(config) if moe else MLP(config)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.ln1(x_BTD))
        return x_BTD + self.mlp(self.ln2(x_BTD))


class GPT(nn.Module):
    """Token + position embedding, ``num_layers`` pre-norm blocks, final LayerNorm, lm head (untied: a tied
    head would share one Parameter between a row-wise embedding and a column-wise head, two layouts).

    ``forward(tokens_BT)`` returns the logits (B, T, V); ``loss(tokens_BT, targets_BT)`` the mean cross-entropy.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        D = config.dim
        self.tok_emb = nn.Embedding(config.vocab_size, D)
        self.pos_emb = nn.Parameter(torch.randn(config.block_size, D) * 0.02)
        self.blocks = nn.ModuleList(Block(config, config.is_moe_block(i)) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(D, bias=config.bias)
        self.head = nn.Linear(D, config.vocab_size, bias=False)
        self.apply(_init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * layers), so the residual stream keeps its variance.
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "out.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * config.num_layers))

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        T = tokens_BT.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size({self.config.block_size})")
        x_BTD = self.tok_emb(tokens_BT) + self.pos_emb[:T]
        x_BTD = F.dropout(x_BTD, self.config.dropout, self.training)
        for block in self.blocks:
            x_BTD = block(x_BTD)
        return self.head(self.ln_f(x_BTD))  # (B, T, V)

    def loss(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        logits_BTV = self(tokens_BT)
        loss = F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten(0, 1))
        for moe in self.moe_layers():
            loss = loss + moe.aux_loss  # load-balancing + z-loss of the forward just run
        return loss

    def moe_layers(self) -> list:
        """The ``MoE`` layers, in block order (empty for a dense model)."""
        return [block.mlp.moe for block in self.blocks if isinstance(block.mlp, MoEMLP)]

    def moe_load_line(self) -> str:
        """Assignments per expert in each MoE layer over the last forward's global batch, and max / mean of the
        tokens per ep rank under the layer's expert placement, e.g. for a progress line:
        "load b1 [12 9 14 ...] ep max/mean 1.21" (1.00: even, and always so without an ep mesh dim)."""
        from moe_balancing import layer_imbalance  # examples/: the figure train_gpt.py reports

        return "  ".join(f"load b{i} {block.mlp.moe.load.tolist()}".replace(",", "")
                         + f" ep max/mean {layer_imbalance(block.mlp.moe):.2f}"
                         for i, block in enumerate(self.blocks) if isinstance(block.mlp, MoEMLP))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def tp_plan(config: GPTConfig, sequence_parallel: bool) -> dict:
    """The Megatron plan for ``parallelize_module(model, mesh["tp"], plan)``.

    q, k, v and fc column-wise (whole heads per rank: num_heads must divide by the tp size), proj and out
    row-wise: one all-reduce per sub-layer in forward and one in backward. With ``sequence_parallel`` the
    norms run on sequence shards (Shard(1)) and each all-reduce becomes an all-gather (entering attention
    once for q, k and v, fc, head) plus a reduce-scatter (leaving proj, out): same bytes, norm activations
    divided by tp.

    The token embedding is row-wise (vocabulary split); the position embedding, the norms (when not
    sequence parallel) and the causal mask stay replicated (place them with ``distribute_module`` or
    ``replicate``). The head is column-wise, its logits stay vocab-sharded (Shard(-1)): compute the loss
    inside ``dtensor_plus.layouts.loss_parallel()`` so the (B, T, V) logits are never gathered.

    Every style keeps DTensor outputs (``use_local_output=False``): the model reads global shapes
    (``view(B, T, H, K)``), and on a (dp, tp) mesh a local block could not be re-wrapped on the 2-D mesh.
    """
    from dtensor_plus.layouts import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput, RowwiseParallel,
                                      SequenceParallel)
    from dtensor_plus.placements import Replicate, Shard

    act = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream (B, T, D)
    colwise = dict(input_layouts=act, use_local_output=False)
    rowwise = dict(output_layouts=act, use_local_output=False)
    plan = {"tok_emb": RowwiseParallel(input_layouts=Replicate(), **rowwise)}
    # One boundary per tensor-parallel region: under sp the attention input is gathered once for q, k and v
    # together; without sp its gradient (and the MLP's, and the head's) is all-reduced once there, before the
    # norm's backward, so the norms' gradients come out whole (Megatron's "f").
    plan["blocks.*.attn"] = PrepareModuleInput(input_layouts=act, desired_input_layouts=Replicate(), use_local_output=False)
    if not sequence_parallel:
        plan["blocks.*.mlp"] = PrepareModuleInput(input_layouts=act, desired_input_layouts=act, use_local_output=False)
        plan["ln_f"] = PrepareModuleOutput(output_layouts=act, desired_output_layouts=act, use_local_output=False)
    for name in ("q", "k", "v"):
        plan[f"blocks.*.attn.{name}"] = ColwiseParallel(input_layouts=Replicate(), use_local_output=False)
    plan["blocks.*.attn.proj"] = RowwiseParallel(**rowwise)
    plan["blocks.*.mlp.fc"] = ColwiseParallel(**colwise)
    plan["blocks.*.mlp.out"] = RowwiseParallel(**rowwise)
    if sequence_parallel:
        plan["blocks.*.ln*"] = SequenceParallel()
        plan["ln_f"] = SequenceParallel()
    plan["head"] = ColwiseParallel(**colwise)
    return plan
