"""Scaled dot-product attention (the fused kernels F.scaled_dot_product_attention dispatches to), forward
and backward.

Attention mixes positions along the sequence and reduces along head_dim, but every (batch, head) pair is
independent, so batch- and head-sharded q, k, v run locally with no communication. Per mesh dim, q, k, v
(B, H, T|S, K) and everything shaped like them (out, logsumexp, grad_out, the grads) take one mode:

    q / k / v on this mesh dim              mode     q-like, k/v-like tensors       attn_mask (B?, H?, T, S)
    any Shard(0), batch sizes equal         batch    Shard(0)                       Shard its batch dim, else Replicate
    any Shard(1), heads split consistently  heads    Shard(1)                       Shard its head dim, else Replicate
    Shard(2|3) (sequence, head_dim), Partial, or neither of the above
                                            -        Replicate (context parallelism is a separate rule)

Heads split consistently: q and k/v have the same head count, or (GQA) both head counts divide evenly by
the number of head shards, so each rank's q heads attend to its own k/v heads. A mask dim of size 1
broadcasts, so it stays Replicate. Aux outputs of the CUDA kernels (cum_seq, rng state, philox seed and
offset) are per-rank scalars or empty tensors: Replicate.

The CPU kernel divides by zero on an empty head dim, so empty local blocks (uneven shards) skip it.
"""

from __future__ import annotations

import math

import torch

from dtensor_plus.placements import Placement, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule
from dtensor_plus.spec import DTensorSpec

from .common import aten, replicate_all

Q, KV, MASK, AUX = "q", "kv", "mask", "aux"  # roles: shaped like q, like k/v, an attention mask, other

# The role of each tensor argument, by its name in the schemas of the forward and backward ops below (the
# backward's grad_out, out and logsumexp are q-shaped; cum_seq_*, philox_* and the like are AUX).
_FORWARD_ROLES = {"query": Q, "key": KV, "value": KV, "attn_mask": MASK, "attn_bias": MASK}
_BACKWARD_ROLES = {"grad_out": Q, "grad_out_": Q, "query": Q, "key": KV, "value": KV, "out": Q, "logsumexp": Q,
                   "attn_mask": MASK, "attn_bias": MASK}


def _roles(op: OpSchema, roles: dict[str, str]) -> list[tuple[str, str, DTensorSpec]]:
    """(argument name, role, spec) for every DTensor argument; arguments ``roles`` does not name are AUX."""
    return [(name, roles.get(name, AUX), spec) for name, spec in zip(op.names, op.specs)]


def _modes(roles: list[tuple[str, str, DTensorSpec]], mesh_shape) -> list[int | None]:
    """Per mesh dim: the tensor dim (0 batch, 1 heads) that q, k, v all shard on it, or None (replicate)."""
    qkv = [s for _, role, s in roles if role in (Q, KV)]
    if any(s.ndim < 3 for s in qkv):  # dims 0 and 1 are batch and heads for all (logsumexp is 3-d)
        return [None] * len(mesh_shape)
    queries = [s for _, role, s in roles if role == Q]
    keys = [s for _, role, s in roles if role == KV]
    modes = []
    for mesh_dim in range(len(mesh_shape)):
        placements = [s.placements[mesh_dim] for s in qkv]
        mode = None
        for dim in (0, 1):
            if any(p.is_shard(dim) for p in placements) and len({s.shape[dim] for s in qkv}) == 1:
                mode = dim
                break
        if mode is None and any(p.is_shard(1) for p in placements):
            mode = 1  # GQA: checked below once the number of head shards is known
        modes.append(mode)
    head_shards = math.prod(n for n, m in zip(mesh_shape, modes) if m == 1)
    heads = {s.shape[1] for s in queries} | {s.shape[1] for s in keys}
    if len(heads) > 1 and any(h % head_shards for h in heads):
        modes = [None if m == 1 else m for m in modes]  # a q head's k/v head could live on another rank
    return modes


def _mask_placement(mode: int | None, mask: DTensorSpec, like: DTensorSpec) -> Placement:
    dim = None if mode is None else mode + mask.ndim - 4  # the mask broadcasts against (B, H, T, S)
    if dim is None or dim < 0 or mask.shape[dim] == 1 or mask.shape[dim] != like.shape[mode]:
        return Replicate()
    return Shard(dim)


def _placements(modes, role: str, spec: DTensorSpec, query: DTensorSpec) -> tuple[Placement, ...]:
    if role == AUX:
        return tuple(Replicate() for _ in modes)
    if role == MASK:
        return tuple(_mask_placement(m, spec, query) for m in modes)
    return tuple(Replicate() if m is None else Shard(m) for m in modes)


def _attention_sharding(op, roles_by_name: dict[str, str], out_roles, local_op=None) -> Sharding:
    """``roles_by_name``: the role of each tensor argument by name (q-shaped, k/v-shaped, a mask); others AUX."""
    roles = _roles(op, roles_by_name)
    modes = _modes(roles, op.mesh_shape)
    query = next(s for _, role, s in roles if role == Q)
    inputs = {name: _placements(modes, role, s, query) for name, role, s in roles}
    mask = next((s for _, role, s in roles if role == MASK), None)
    outputs = tuple(_placements(modes, AUX if mask is None else role, mask, query) if role == MASK
                    else _placements(modes, role, query, query) for role in out_roles)
    return Sharding(inputs=inputs, outputs=outputs, local_op=local_op)


# -- CPU --------------------------------------------------------------------------------------------------


def _cpu_forward(query, key, value, *args, **kwargs):
    if min(query.numel(), key.numel(), value.numel()) == 0:  # the kernel divides by zero on 0 heads
        metas = aten._scaled_dot_product_flash_attention_for_cpu(
            *(t.to("meta") for t in (query, key, value)), *args,
            **{k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        return tuple(torch.zeros(m.shape, dtype=m.dtype, device=query.device) for m in metas)
    return aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, *args, **kwargs)


def _cpu_backward(grad_out, query, key, value, *args, **kwargs):
    if min(query.numel(), key.numel(), value.numel()) == 0:
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(grad_out, query, key, value, *args, **kwargs)


@register_rule(aten._scaled_dot_product_flash_attention_for_cpu.default)
def cpu_flash_rule(op: OpSchema) -> Sharding:
    """(query, key, value, dropout_p, is_causal, *, attn_mask, scale) -> (output, logsumexp)."""
    return _attention_sharding(op, _FORWARD_ROLES, (Q, Q), _cpu_forward)


@register_rule(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
def cpu_flash_backward_rule(op: OpSchema) -> Sharding:
    """(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask, scale) -> grads."""
    return _attention_sharding(op, _BACKWARD_ROLES, (Q, KV, KV), _cpu_backward)


# -- CUDA (same algebra; schemas read from torch 2.13, exercised only on GPU) ------------------------------


@register_rule(aten._scaled_dot_product_flash_attention.default)
def cuda_flash_rule(op: OpSchema) -> Sharding:
    """-> (output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused, debug_attn_mask)."""
    if op.arg("return_debug_mask", False):  # (B, H, T, S) debug mask: rare; keep it simple
        return replicate_all(op, num_outputs=7)
    return _attention_sharding(op, _FORWARD_ROLES, (Q, Q, AUX, AUX, AUX, AUX, AUX))


@register_rule(aten._scaled_dot_product_flash_attention_backward.default)
def cuda_flash_backward_rule(op: OpSchema) -> Sharding:
    """(grad_out, q, k, v, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
    philox_seed, philox_offset, *, scale) -> grads."""
    return _attention_sharding(op, _BACKWARD_ROLES, (Q, KV, KV))


@register_rule(aten._scaled_dot_product_efficient_attention.default)
def cuda_efficient_rule(op: OpSchema) -> Sharding:
    """(q, k, v, attn_bias, compute_log_sumexp, ...) -> (output, log_sumexp, philox_seed, philox_offset).
    log_sumexp is (B, H, ceil32(T)) when computed, else empty: only its leading dims are shared with q."""
    lse = Q if op.arg("compute_log_sumexp", False) else AUX
    return _attention_sharding(op, _FORWARD_ROLES, (Q, lse, AUX, AUX))


@register_rule(aten._scaled_dot_product_efficient_attention_backward.default)
def cuda_efficient_backward_rule(op: OpSchema) -> Sharding:
    """(grad_out, q, k, v, attn_bias, out, logsumexp, philox_seed, philox_offset, ...) -> (gq, gk, gv, gbias)."""
    return _attention_sharding(op, _BACKWARD_ROLES, (Q, KV, KV, MASK))
