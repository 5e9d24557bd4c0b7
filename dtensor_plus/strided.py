"""How rules meet StridedShard inputs: the dispatcher's one entry point, ``decide``.

A StridedShard (placements.py) appears when a view merges a sharded dim behind unsharded ones, as
``matmul`` does to (B, H, T, K) attention tensors whose heads are sharded: (B*H, T, K) for ``bmm``. Most
rules assume a Shard is one contiguous block (they slice, scan or offset by it), so each rule declares at
registration (``register_rule(strided=...)``) how it meets one:

    None          the input is gathered on that mesh dim first (Replicate); the rule never sees it
    "as_shard"    the rule sees Shard(dim) in its place and its answer is mapped back: a Shard of a dim of
                  the same size on that mesh dim becomes the StridedShard again. Right for rules that treat
                  each index of the dim on its own: elementwise ops, a matmul's batch, rows or contraction
                  (both operands then hold the same strided rows), permutes
    "native"      the rule reads StridedShard itself (views: merging makes it, splitting unmakes it)

"as_shard" needs, on each mesh dim with a StridedShard, the same ``outer``, ``zigzag`` and dim size for every
input and no plain Shard beside it; otherwise, or where the rule's answer would put the StridedShard on a dim
of another size, that input is gathered as for None. A zigzag StridedShard (placements.py) is one more
permutation of the rows, so as_shard rules (position-independent) keep it the same way.
"""

from __future__ import annotations

import dataclasses

from . import rules
from .placements import Replicate, Shard, StridedShard

__all__ = ["has_strided", "decide", "gathered", "with_specs"]


def has_strided(specs) -> bool:
    return any(p.is_strided_shard() for spec in specs for p in spec.placements)


def decide(rule, schema: rules.OpSchema, metas) -> rules.Sharding:
    mode = rules.strided_mode(schema.func)
    if mode == "native":
        return rule(schema)
    if mode == "as_shard":
        sharding = _as_shard(rule, schema, metas)
        if sharding is not None:
            return sharding
    return gathered(rule, schema)


def with_specs(schema: rules.OpSchema, new_specs) -> rules.OpSchema:
    """``schema`` with its specs replaced one for one (equal specs map to equal replacements)."""
    swap = dict(zip(schema.specs, new_specs))

    def sub(value):
        if type(value) is list or type(value) is tuple:
            return type(value)(sub(v) for v in value)
        return swap.get(value, value) if isinstance(value, type(schema.specs[0])) else value

    return rules.OpSchema(schema.func, sub(schema.args), {k: sub(v) for k, v in schema.kwargs.items()}, tuple(new_specs))


def gathered(rule, schema: rules.OpSchema) -> rules.Sharding:
    """The rule run on the inputs with every StridedShard gathered (Replicate on that mesh dim)."""
    plain = [
        spec.with_placements(tuple(Replicate() if p.is_strided_shard() else p for p in spec.placements))
        for spec in schema.specs
    ]
    sharding = rule(with_specs(schema, plain))
    inputs = tuple(
        want if want is not None or new.placements == old.placements else new.placements
        for want, new, old in zip(sharding.inputs_for(schema), plain, schema.specs)
    )
    return dataclasses.replace(sharding, inputs=inputs)


def _strided_mesh_dims(specs) -> dict[int, tuple[StridedShard, int]] | None:
    """{mesh dim: (a StridedShard, dim size)} where inputs hold StridedShards that can be read as Shards (same
    outer, zigzag and dim size on every input), else None."""
    found: dict[int, tuple[StridedShard, int]] = {}
    for k in range(len(specs[0].placements)):
        at_k = [(spec, spec.placements[k]) for spec in specs]
        strided = {(p.with_dim(0), spec.shape[p.dim]) for spec, p in at_k if p.is_strided_shard()}
        if not strided:
            continue
        if len(strided) > 1 or any(p.is_shard() for _, p in at_k):
            return None
        found[k] = strided.pop()
    return found


def _as_shard(rule, schema: rules.OpSchema, metas) -> rules.Sharding | None:
    strided = _strided_mesh_dims(schema.specs)
    if strided is None:
        return None
    aliased = [
        spec.with_placements(tuple(Shard(p.dim) if p.is_strided_shard() else p for p in spec.placements))
        for spec in schema.specs
    ]
    sharding = rule(with_specs(schema, aliased))
    inputs = [None if want is None else _unalias(want, spec.shape, strided) for want, spec in zip(sharding.inputs_for(schema), schema.specs)]
    outputs = [
        None if out is None or meta is None else _unalias(out, meta.shape, strided)
        for out, meta in zip(sharding.outputs, metas or [None] * len(sharding.outputs))
    ]
    if any(want is False for want in inputs + outputs):
        return None
    return dataclasses.replace(sharding, inputs=tuple(inputs), outputs=tuple(outputs))


def _unalias(placements, shape, strided: dict):
    """Shards on the strided mesh dims back to StridedShards; False where a Shard lands on a dim of another size."""
    out = list(placements)
    for k, (strided_shard, size) in strided.items():
        p = out[k]
        if isinstance(p, Shard):
            if shape[p.dim] != size:
                return False
            out[k] = strided_shard.with_dim(p.dim)
    return tuple(out)
