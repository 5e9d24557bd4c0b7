"""Flat indexing: ``take`` and ``put`` / ``put_``, which address ``self`` as if it were viewed as 1-d (row-major
over its global shape). Their backward is made of the same two ops (take's is ``new_zeros(...).put_(index, grad,
accumulate=True)``, put's source gradient is ``grad.take(index)``).

A flat index names one element of the *global* tensor; a rank holding a block of it (any Shard layout, on any
dims) unravels the index over the global shape, keeps the entries that fall inside its block and turns them into
flat indices of its block. Per mesh dim:

take(self, index) -> output of index's shape
    self        index       output          why
    Replicate   Shard(d)    Shard(d)        each rank takes its own indices from the whole self
    Shard(d)    Replicate   Partial(sum)    each rank takes the indices inside its block, 0 for the others: one
                                            nonzero term per entry, so the sum is exact (bool: no sum, gathered)
    Shard       Shard       the smaller of the two is gathered (self whole: Shard(d); index whole: Partial(sum))
    Partial(r)  Replicate   Partial(r)      a selection commutes with every reduction (with a masked mesh dim
                                            only sum is kept: its zeros would not survive max/min)
    anything else           Replicate

put(self, index, source, accumulate) -> output of self's shape
    self        index, source       output          why
    Shard(d)    Replicate           Shard(d)        each rank writes the entries inside its block, in order, so
                                                    duplicates resolve as on one device (the last write wins)
    Replicate   Shard(d), same      Partial(sum)    accumulate only (linear in source): self is partitioned
    /P(sum)       shapes                            (rank 0 keeps it), each rank adds its own part of source
    Partial(r)  index Replicate,    Partial(r)      jointly in (self, source): accumulate: sum | avg (floating);
                source Partial(r)                   overwrite (a selection): any r
    anything else                   Replicate
"""

from __future__ import annotations

import dataclasses
import math

import torch

from dtensor_plus.placements import Partial, Replicate
from dtensor_plus.rules import OpSchema, Sharding, register_rule
from dtensor_plus.spec import DTensorSpec

from .common import aten, replicate_all
from .indexing import _ANY, _partial


def localize(index: torch.Tensor, shape, sizes, offsets) -> tuple[torch.Tensor, torch.Tensor]:
    """(inside, local): which flat indices of a ``shape`` tensor (negative ones wrap, as in take/put) fall in the
    block of ``sizes`` at ``offsets``, and their flat index within that block (meaningless where not inside)."""
    numel = math.prod(shape)
    # NOTE: device-to-host sync, for the error one device raises (a rank holding no bad index goes on, as with
    # the unsharded op on the ranks whose index shard is fine)
    if index.numel() and (bool((index < -numel).any()) or bool((index >= numel).any())):
        raise IndexError(f"out of range: a flat index outside [-{numel}, {numel}) for a tensor of shape {tuple(shape)}")
    index = torch.where(index < 0, index + numel, index)
    coords = torch.unravel_index(index.clamp(0, max(numel - 1, 0)), tuple(shape))
    inside = torch.ones_like(index, dtype=torch.bool)
    local = torch.zeros_like(index)
    for coord, size, offset in zip(coords, sizes, offsets):
        inside &= (coord >= offset) & (coord < offset + size)
        local = local * size + (coord - offset)
    return inside, local


def local_block(spec: DTensorSpec):
    """(sizes, offsets) of this rank's block of ``spec`` (the only rank-dependent input, read at run time)."""
    coordinate = spec.mesh.get_coordinate()
    if coordinate is None:  # a rank outside the mesh holds nothing
        return (0,) * spec.ndim, (0,) * spec.ndim
    return spec.local_shape_and_offset(coordinate)


def _specs_or_none(op: OpSchema, *names: str):
    """The specs of the arguments ``names``, or None where one is not a DTensor (a plain 0-d tensor)."""
    specs = [op.spec(name) for name in names]
    return None if None in specs else specs


# -- take -------------------------------------------------------------------------------------------------------


@register_rule(aten.take.default)
def take_rule(op: OpSchema) -> Sharding:
    specs = _specs_or_none(op, "self", "index")
    if specs is None:
        return replicate_all(op)
    spec, index = specs
    summable = spec.dtype != torch.bool
    self_t, index_t, output = [], [], []
    for p, q in zip(spec.placements, index.placements):
        keep_index = q.is_shard() and not (p.is_shard() and summable and spec.shape.numel() > index.shape.numel())
        if keep_index:
            row = (Replicate(), q, q)
        elif p.is_shard() and summable:
            row = (p, Replicate(), Partial())
        elif p.is_partial():
            row = (p, Replicate(), p)
        else:
            row = (Replicate(), Replicate(), Replicate())
        for column, value in zip((self_t, index_t, output), row):
            column.append(value)
    masked = any(p.is_shard() for p in self_t)
    if masked:  # a mesh dim's zeros for "not mine" survive only sums: reduce the other Partial kinds first
        for k, p in enumerate(self_t):
            if p.is_partial() and p.reduce_op != "sum":
                self_t[k], output[k] = Replicate(), Replicate()
    sharding = Sharding(inputs={"self": tuple(self_t), "index": tuple(index_t)}, outputs=(tuple(output),))
    if not masked:
        return sharding
    target, shape = spec.with_placements(tuple(self_t)), tuple(spec.shape)

    def masked_take(x, index):
        sizes, offsets = local_block(target)
        inside, local = localize(index, shape, sizes, offsets)
        if x.numel() == 0:
            return x.new_zeros(index.shape)
        out = aten.take.default(x, torch.where(inside, local, 0))
        return torch.where(inside, out, out.new_zeros(()))

    return dataclasses.replace(sharding, local_op=masked_take)


# -- put ----------------------------------------------------------------------------------------------------------


def _linear(spec: DTensorSpec, accumulate: bool) -> tuple[str, ...]:
    if not accumulate:
        return _ANY  # self written over by a selection of source
    floating = spec.dtype.is_floating_point or spec.dtype.is_complex
    return ("sum", "avg") if floating else ("sum",)  # an integer avg floors each piece


def _put_row(p, q, s, spec, index, source, accumulate):
    """(self, index, source, output) targets on one mesh dim: the table above, top row first."""
    R = Replicate()
    if p.is_shard():
        return p, R, R, p
    shard = q if q.is_shard() else s if s.is_shard() else None
    if (accumulate and shard is not None and spec.dtype != torch.bool and index.shape == source.shape
            and q in (R, shard) and s in (R, shard) and p in (R, Partial())):
        return Partial(), shard, shard, Partial()
    kept = _partial([p, s], _linear(spec, accumulate))
    if kept is not None:
        return kept, R, kept, kept
    return R, R, R, R


@register_rule(aten.put.default, aten.put_.default)
def put_rule(op: OpSchema) -> Sharding:
    specs = _specs_or_none(op, "self", "index", "source")
    if specs is None:
        return replicate_all(op)
    spec, index, source = specs
    accumulate = bool(op.arg("accumulate", False))
    rows = [_put_row(p, q, s, spec, index, source, accumulate)
            for p, q, s in zip(spec.placements, index.placements, source.placements)]
    self_t, index_t, source_t, output = (tuple(column) for column in zip(*rows))
    masked = any(p.is_shard() for p in self_t)
    func = op.func
    inputs = {"self": self_t, "index": index_t, "source": source_t}
    if not masked:
        return Sharding(inputs=inputs, outputs=(output,))
    target, shape = spec.with_placements(self_t), tuple(spec.shape)

    def masked_put(x, index, source, accumulate=False):
        sizes, offsets = local_block(target)
        inside, local = localize(index.reshape(-1), shape, sizes, offsets)
        return func(x, local[inside], source.reshape(-1)[inside], accumulate)

    return Sharding(inputs=inputs, outputs=(output,), local_op=masked_put)
