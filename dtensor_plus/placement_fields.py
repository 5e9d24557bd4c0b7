"""Placements as plain data and back: a dict of JSON-able fields, checked field by field on the way in.

Whatever crosses a process or file boundary carries its placements this way, never as pickled objects: the
checkpoint index (``checkpoint/index.py``), the header a pipeline stage sends the next (``layouts/pipeline/
header.py``) and ``torch.save`` of a DTensor (``serialization.py``). One encoding, one validator::

    to_fields(StridedShard(1, 3))           # {"kind": "strided_shard", "dim": 1, "outer": 3, "zigzag": False}
    from_fields(fields, ndim=2, where="pipeline header")   # ValueError naming `where` on anything else
"""

from __future__ import annotations

from types import MappingProxyType

from .placements import REDUCE_OPS, Partial, Placement, Replicate, Shard, StridedShard

__all__ = ["to_fields", "from_fields"]

_FIELDS = {"shard": {"kind", "dim"}, "strided_shard": {"kind", "dim", "outer", "zigzag"},
           "partial": {"kind", "reduce_op"}, "replicate": {"kind"}}
_FIELDS = MappingProxyType(_FIELDS)  # read-only: a constant table


def to_fields(p: Placement) -> dict:
    if isinstance(p, Shard):
        return {"kind": "shard", "dim": p.dim}
    if isinstance(p, StridedShard):
        return {"kind": "strided_shard", "dim": p.dim, "outer": p.outer, "zigzag": p.zigzag}
    if isinstance(p, Partial):
        return {"kind": "partial", "reduce_op": p.reduce_op}
    if isinstance(p, Replicate):
        return {"kind": "replicate"}
    raise TypeError(f"placement {p!r} has no data form; use Shard, StridedShard, Partial or Replicate")


def from_fields(fields, ndim: int, where: str) -> Placement:
    """The placement ``fields`` describe for a tensor of ``ndim`` dims; ValueError naming ``where`` otherwise."""
    kind = fields.get("kind") if isinstance(fields, dict) else None
    if kind not in _FIELDS or set(fields) != _FIELDS[kind]:
        raise ValueError(f"{where}: placement {fields!r} is not one of {sorted(_FIELDS)} with its fields")
    if "dim" in fields and not (type(fields["dim"]) is int and 0 <= fields["dim"] < ndim):
        raise ValueError(f"{where}: placement {fields!r} names a dim outside the tensor's {ndim}")
    if kind == "shard":
        return Shard(fields["dim"])
    if kind == "replicate":
        return Replicate()
    if kind == "partial":
        if fields["reduce_op"] not in REDUCE_OPS:
            raise ValueError(f"{where}: placement {fields!r} has an unknown reduce_op; known: {list(REDUCE_OPS)}")
        return Partial(fields["reduce_op"])
    if type(fields["outer"]) is not int or fields["outer"] < 1 or type(fields["zigzag"]) is not bool:
        raise ValueError(f"{where}: placement {fields!r} needs a positive int outer and a bool zigzag")
    return StridedShard(fields["dim"], fields["outer"], fields["zigzag"])
