"""Ulysses attention (DeepSpeed-Ulysses): sequence-sharded q, k, v meet as head-sharded ones.

With q, k, v (B, H, T|S, D) sharded on the sequence (``Shard(2)``) on mesh dim ``mesh_dim``, attention
cannot run locally: every query needs every key. Ulysses swaps the split: one all-to-all per tensor turns
``Shard(2)`` into ``Shard(1)`` (each rank gets whole sequences for H/n heads), attention runs locally, and
one all-to-all turns the output back into ``Shard(2)``. ``ulysses_rules(mesh_dim)`` returns the rules that
do this, for ``rules.override_rule``:

    op (CPU; CUDA flash/efficient alike)   on mesh_dim
    sdpa forward     inputs   q, k, v Shard(1)
                     local    attention on whole sequences, then out -> Shard(2)
                     outputs  out Shard(2), logsumexp Shard(1)
    sdpa backward    inputs   grad_out, q, k, v, out Shard(1) (logsumexp already is)
                     local    attention backward, then each grad -> Shard(2)
                     outputs  grad_q, grad_k, grad_v Shard(2)

The rule only asks for ``Shard(1)``; the planner turns ``Shard(2)`` into it with one all-to-all each, and
the local op hands the head-sharded results back through the planner too: the rule declares each move
(``Redistribution(head-sharded spec, sequence-sharded placements)``) and the local op runs it through the
``comm`` the executor hands it, so every collective is counted and attributed to the op. Forward: 3 all-to-alls in (q, k, v) + 1 out, the reference 4·s·h/n per link.
Backward: autograd saved q, k, v and out as the sequence-sharded DTensors the forward received, so they
move again: 5 in (grad_out, q, k, v, out) + 3 out, twice the traffic of DeepSpeed's backward, which keeps
the head-sharded copies from the forward. A rule sees one aten op and cannot keep them (no hidden state).
``ulysses_attention(q, k, v, mesh_dim)`` does the same moves as differentiable redistributes around
``F.scaled_dot_product_attention`` instead, so autograd saves the head-sharded tensors and the backward is
the exact mirror (1 all-to-all in, 3 out); it needs the call site, where the rules need only a ``with`` block.

Other mesh dims keep the default attention rule (ops/attention.py): batch-sharded dp stays, heads sharded
by tp on an *outer* mesh dim stay and Ulysses splits each tp block of heads further (H/tp/n heads per rank).
Heads split like torch.chunk: uneven counts and empty blocks (H < n) are exact. The rule falls back to the
default (which gathers the sequence, exact, with a warning naming the reason) when:

- GQA with a kv head count (or q head count) not divisible by the number of head shards (n times tp):
  a rank's q heads would need kv heads held by another rank;
- a mesh dim *inside* ``mesh_dim`` (a higher index) also shards heads or sequence in the head-sharded
  layout: the all-to-all would scramble the nesting order; put the sequence mesh dim last.

Example::

    with rules.override_rule(ulysses_rules(mesh_dim=1)):   # mesh ("dp", "cp"); q, k, v [Shard(0), Shard(2)]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # out [Shard(0), Shard(2)]
        out.sum().backward()
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import torch
import torch.nn.functional as F

from dtensor_plus import rules
from dtensor_plus.dtensor import DTensor
from dtensor_plus.placements import Shard
from dtensor_plus.declared import Redistribution
from dtensor_plus.rules import OpSchema, Sharding
from dtensor_plus.spec import DTensorSpec, TensorMeta

from .common import aten

__all__ = ["ulysses_rules", "ulysses_attention"]

HEADS, SEQ = 1, 2  # dims of (B, H, T, D)

QKV = ("query", "key", "value")  # their argument names in every attention op below, forward and backward

# op -> how many leading outputs return sequence-sharded (the forward's out; the backward's three gradients)
_SEQUENCE_OUTPUTS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: 1,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: 3,
    aten._scaled_dot_product_flash_attention.default: 1,
    aten._scaled_dot_product_flash_attention_backward.default: 3,
    aten._scaled_dot_product_efficient_attention.default: 1,
    aten._scaled_dot_product_efficient_attention_backward.default: 3,
}


def ulysses_rules(mesh_dim: int) -> dict:
    """Rules running attention Ulysses-style on mesh dim ``mesh_dim`` when q, k, v are sequence-sharded there.

    Each falls back to the rule in force when this is called (normally ops/attention.py) for any other
    layout. Use with ``rules.override_rule``; the result is equal (and cache-equal) for equal ``mesh_dim``.

    Args:
        mesh_dim: the mesh dim (index) sharding the sequence dim (dim 2) of q, k, v.

    Example::

        with rules.override_rule(ulysses_rules(0)):
            out = F.scaled_dot_product_attention(q, k, v)   # q, k, v Shard(2) -> out Shard(2)
    """
    if not isinstance(mesh_dim, int) or isinstance(mesh_dim, bool) or mesh_dim < 0:
        raise TypeError(f"ulysses_rules(mesh_dim={mesh_dim!r}): mesh_dim must be a non-negative int mesh dim index")
    return {
        op: functools.partial(_ulysses_rule, mesh_dim=mesh_dim, num_seq_outputs=num_seq, default=rules.rule_for(op))
        for op, num_seq in _SEQUENCE_OUTPUTS.items()
    }


def _ulysses_rule(op: OpSchema, *, mesh_dim: int, num_seq_outputs: int, default) -> Sharding:
    if mesh_dim >= len(op.mesh_shape):
        raise ValueError(f"{op.func}: ulysses_rules(mesh_dim={mesh_dim}) on a {len(op.mesh_shape)}-d mesh; "
                         f"pass the index of the mesh dim that shards the sequence")
    q, k, v = (op.arg(name) for name in QKV)
    if not _sequence_sharded((q, k, v), mesh_dim):
        return default(op)
    decided = default(_with_heads_for_sequence(op, mesh_dim))
    reason = _why_not(decided, op, num_seq_outputs, mesh_dim)
    if reason:
        warnings.warn(f"dtensor_plus: ulysses on mesh dim {mesh_dim} for {op.func}: {reason}; "
                      f"gathering the sequence instead (exact, more traffic)")
        return default(op)
    out_metas = _sequence_output_metas(q, k, v, num_seq_outputs)
    head_specs = tuple(DTensorSpec(op.mesh, tuple(p), meta) for p, meta in zip(decided.outputs, out_metas))
    seq_placements = tuple(_swap(spec.placements, mesh_dim, Shard(SEQ)) for spec in head_specs)
    local_op = functools.partial(_attend_then_return_sequences, attend=decided.local_op or op.func,
                                 attend_communicates=bool(decided.communication), head_specs=head_specs,
                                 seq_placements=seq_placements)
    outputs = seq_placements + tuple(decided.outputs[num_seq_outputs:])
    moves = tuple(Redistribution(spec, target) for spec, target in zip(head_specs, seq_placements))
    return dataclasses.replace(decided, outputs=outputs, local_op=local_op,
                               communication=tuple(decided.communication) + moves)


def _sequence_sharded(specs, mesh_dim: int) -> bool:
    if not all(isinstance(s, DTensorSpec) and s.ndim == 4 for s in specs):
        return False
    return any(s.placements[mesh_dim].is_shard(SEQ) for s in specs)


def _swap(placements, mesh_dim: int, new) -> tuple:
    return tuple(new if k == mesh_dim else p for k, p in enumerate(placements))


def _with_heads_for_sequence(op: OpSchema, mesh_dim: int) -> OpSchema:
    """``op`` as if every (B, H, T, D) argument sequence-sharded on ``mesh_dim`` were head-sharded there:
    the default rule then decides the head-sharded layout (and every other mesh dim) for us."""

    def swap(value):
        if isinstance(value, DTensorSpec) and value.ndim == 4 and value.placements[mesh_dim].is_shard(SEQ):
            return value.with_placements(_swap(value.placements, mesh_dim, Shard(HEADS)))
        return value

    args = tuple(swap(a) for a in op.args)
    kwargs = {name: swap(v) for name, v in op.kwargs.items()}
    return OpSchema(op.func, args, kwargs, tuple(swap(s) for s in op.specs))


def _why_not(decided: Sharding, op: OpSchema, num_seq_outputs: int, mesh_dim: int) -> str | None:
    """Why the head-sharded layout cannot be reached and left with one all-to-all each; None if it can."""
    by_name = dict(zip(op.names, decided.inputs_for(op)))
    targets = [by_name[name] for name in QKV]
    if any(t is None or not t[mesh_dim].is_shard(HEADS) for t in targets):
        heads = sorted({op.arg(name).shape[HEADS] for name in QKV})
        return (f"heads {heads} do not split across the head shards so that each rank's q heads meet their own "
                f"k/v heads (GQA needs every head count divisible by the number of head shards)")
    for placements in targets + [tuple(p) for p in decided.outputs[:num_seq_outputs]]:
        inner = [k for k in range(mesh_dim + 1, len(placements))
                 if placements[k].is_shard(HEADS) or placements[k].is_shard(SEQ)]
        if inner:
            return (f"mesh dim {inner[0]}, inside it, also shards heads or sequence ({list(placements)}); "
                    f"give Ulysses the last (innermost) of the mesh dims that shard heads or sequence")
    return None


def _sequence_output_metas(q: DTensorSpec, k: DTensorSpec, v: DTensorSpec, num_seq_outputs: int):
    """Global metadata of the outputs that go back to sequence-sharded: out (B, H, T, Dv), or the grads."""
    if num_seq_outputs == 1:
        shape = torch.Size((*q.shape[:-1], v.shape[-1]))
        return (TensorMeta(shape, torch.empty(shape, device="meta").stride(), q.dtype),)
    return (q.tensor_meta, k.tensor_meta, v.tensor_meta)


def _attend_then_return_sequences(*args, attend, attend_communicates: bool, head_specs, seq_placements, comm,
                                  **kwargs):
    """Attention on whole sequences of this rank's heads; then the first outputs go back to sequence-sharded
    (the declared Redistributions: one all-to-all each, chosen and counted by the planner)."""
    outs = list(attend(*args, comm=comm, **kwargs) if attend_communicates else attend(*args, **kwargs))
    for i, (spec, target) in enumerate(zip(head_specs, seq_placements)):
        outs[i] = comm.redistribute(outs[i], spec, target)
    return tuple(outs)


def ulysses_attention(query, key, value, mesh_dim: int, **sdpa_kwargs):
    """``F.scaled_dot_product_attention`` on q, k, v sequence-sharded on ``mesh_dim``, Ulysses-style, with
    the all-to-alls as differentiable redistributes: forward 3 in + 1 out, backward 1 in + 3 out (the
    mirror). Attention itself runs under whatever rule is in force (the default keeps heads local).

    Example::

        out = ulysses_attention(q, k, v, mesh_dim=0, is_causal=True)   # q, k, v Shard(2) -> out Shard(2)
    """

    def to_heads(t):
        if not isinstance(t, DTensor) or not t.placements[mesh_dim].is_shard(SEQ):  # plain: one device
            return t
        return t.redistribute(placements=_swap(t.placements, mesh_dim, Shard(HEADS)))

    out = F.scaled_dot_product_attention(to_heads(query), to_heads(key), to_heads(value), **sdpa_kwargs)
    if not isinstance(out, DTensor):
        return out
    return out.redistribute(placements=_swap(out.placements, mesh_dim, Shard(SEQ)))
