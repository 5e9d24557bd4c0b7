"""Membership and sorted search: isin (Tensor_Tensor), searchsorted (Tensor), bucketize (Tensor). Their outputs
are bool or integer positions: no gradient, so no backward ops.

Each value is looked up on its own, so the values (isin's ``elements``, searchsorted's ``self``, bucketize's
``self``) keep any shard. The table to search (``test_elements``, ``sorted_sequence``, ``boundaries``) is read
whole by every value, except that searchsorted's answer is a count: searchsorted(seq, v) is the number of
entries of seq below v (left: < v; right: <= v), and bucketize(v, b) is searchsorted(b, v) with the same
``right``. A count over a sharded sequence is the sum of the counts over its sorted blocks: each rank searches
its own block and the output is Partial(sum), exact in the integer dtype. Per mesh dim:

    op            values     table (and sorter)                output          why
    any           Shard(d)   Replicate, or Shard(d) where d    Shard(d)        values looked up one by one;
                             is a leading (batch) dim of an                    a batched sequence is sliced
                             N-d sorted_sequence                               alike on its leading dims
    searchsorted  Replicate  Shard(d), d leading (N-d seq)     Shard(d)        the values are sliced for free
      (no sorter) Replicate  Shard(last dim)                   Partial(sum)    count over the blocks
    bucketize     Replicate  Shard(0)                          Partial(sum)    the same count
    anything else            Replicate                         Replicate

A Partial value or table is reduced first (a lookup is not linear). A sorter holds positions in the whole
last dim of the sequence, so it keeps only leading-dim shards, and none of the count form.

NOTE: a floating sequence holding NaN is not sorted for torch's binary search (it steps right past a NaN, yet
sort puts NaN last), so its single-device answer depends on the probe path and is no count: the count form
differs from it there. NaN among the values is fine (every block counts it past its end, as the whole does).
"""

from __future__ import annotations

from dtensor_plus.placements import Partial, Placement, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten, replicate_all


def _decide(values: Placement, table: Placement, num_leading: int, counts: bool):
    """(values target, table target, output) on one mesh dim. ``num_leading``: the leading dims shared by the
    values and a batched table (0 for a 1-d table); ``counts``: a shard of the table's last dim may give
    Partial(sum)."""
    if isinstance(values, Shard):
        return values, values if values.dim < num_leading else Replicate(), values
    if isinstance(table, Shard) and table.dim < num_leading:
        return table, table, table
    if isinstance(table, Shard) and counts and table.dim == num_leading:
        return Replicate(), table, Partial("sum")
    return Replicate(), Replicate(), Replicate()


def _rule(op: OpSchema, values_name: str, table_name: str, num_leading: int, counts: bool) -> Sharding:
    """The table above, for the arguments named ``values_name`` and ``table_name`` (a sorter follows the table)."""
    values, table = op.spec(values_name), op.spec(table_name)
    if values is None or table is None:  # a plain 0-d tensor beside a DTensor: nothing to split
        return replicate_all(op)
    values_t, table_t, outputs = [], [], []
    for k in range(len(op.mesh_shape)):
        v, t, out = _decide(values.placements[k], table.placements[k], num_leading, counts)
        values_t.append(v)
        table_t.append(t)
        outputs.append(out)
    inputs = {values_name: tuple(values_t), table_name: tuple(table_t)}
    if op.spec("sorter") is not None:
        inputs["sorter"] = tuple(table_t)
    return Sharding(inputs=inputs, outputs=(tuple(outputs),))


@register_rule(aten.isin.Tensor_Tensor)
def isin_rule(op: OpSchema) -> Sharding:
    """isin(elements, test_elements): elements keep their shard, test_elements whole. assume_unique stays true
    of a block of unique elements."""
    return _rule(op, "elements", "test_elements", 0, counts=False)


@register_rule(aten.searchsorted.Tensor)
def searchsorted_rule(op: OpSchema) -> Sharding:
    """searchsorted(sorted_sequence, self, *, out_int32, right, side, sorter): an N-d sequence is batched, its
    leading dims matching the values'."""
    table, sorter = op.arg("sorted_sequence"), op.arg("sorter")
    return _rule(op, "self", "sorted_sequence", table.ndim - 1, counts=sorter is None)


@register_rule(aten.bucketize.Tensor)
def bucketize_rule(op: OpSchema) -> Sharding:
    """bucketize(self, boundaries): boundaries are 1-d, a sorted sequence searched with the same ``right``."""
    return _rule(op, "self", "boundaries", 0, counts=True)
