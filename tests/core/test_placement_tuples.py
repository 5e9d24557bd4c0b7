"""The placement-tuple helpers: one definition each, re-exported to the rule files unchanged."""

from dtensor_plus import placement_tuples
from dtensor_plus.ops import common
from dtensor_plus.placements import Partial, Replicate, Shard, StridedShard


def test_replicated_is_one_replicate_per_mesh_dim():
    assert placement_tuples.replicated(0) == ()
    assert placement_tuples.replicated(3) == (Replicate(),) * 3


def test_without_partial_reduces_every_partial_and_keeps_the_rest():
    placements = [Shard(1), Partial("sum"), Replicate(), Partial("max"), StridedShard(0, 2)]
    assert placement_tuples.without_partial(placements) == (Shard(1), Replicate(), Replicate(), Replicate(),
                                                            StridedShard(0, 2))
    assert placement_tuples.without_partial(iter([Partial("avg")])) == (Replicate(),)  # any iterable, a tuple out


def test_unshard_dims_gathers_the_named_dims_and_every_partial():
    placements = (Shard(0), Shard(2), Partial("sum"), Replicate())
    assert placement_tuples.unshard_dims(placements, {2}) == (Shard(0), Replicate(), Replicate(), Replicate())
    assert placement_tuples.unshard_dims(placements, ()) == (Shard(0), Shard(2), Replicate(), Replicate())


def test_the_rule_files_see_the_same_functions():
    for name in placement_tuples.__all__:
        assert getattr(common, name) is getattr(placement_tuples, name)
