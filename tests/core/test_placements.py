"""Placements are small frozen value types that own torch.chunk geometry."""

import pytest
import torch
from hypothesis import given, strategies as st

from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.placements import chunk_bounds
from dtensor_plus.spec import local_shape_and_offset


def test_repr_is_constructor_syntax_and_values_are_hashable():
    assert repr(Shard(1)) == "Shard(dim=1)" and repr(Replicate()) == "Replicate()"
    assert repr(Partial("max")) == "Partial(reduce_op='max')" and eval(repr(Partial("max"))) == Partial("max")
    assert len({Shard(0), Shard(0), Replicate(), Partial(), Partial("sum")}) == 3
    with pytest.raises(Exception):
        Shard(0).dim = 1


def test_bad_placements_name_the_fix():
    with pytest.raises(ValueError, match="use one of"):
        Partial("mean")
    with pytest.raises(TypeError, match="int tensor dimension"):
        Shard("0")
    with pytest.raises(ValueError, match="out of range"):
        Shard(2).normalized(2)
    assert Shard(-1).normalized(3) == Shard(2)


@given(size=st.integers(0, 40), n=st.integers(1, 9))
def test_chunk_bounds_follow_torch_chunk(size, n):
    pieces = [t.shape[0] for t in torch.arange(size).chunk(n)] if size else []
    pieces += [0] * (n - len(pieces))
    got = [chunk_bounds(size, n, i) for i in range(n)]
    assert [length for _, length in got] == pieces
    assert [offset for offset, _ in got] == [min(sum(pieces[:i]), size) for i in range(n)]


def test_nested_shards_split_in_mesh_dim_order():
    # rows 0..9 over a (2, 2) mesh, both mesh dims sharding dim 0: mesh dim 0 splits 5/5, mesh dim 1 3/2.
    assert local_shape_and_offset((10,), (2, 2), (Shard(0), Shard(0)), (1, 0)) == ((3,), (5,))
    assert local_shape_and_offset((10,), (2, 2), (Shard(0), Shard(0)), (1, 1)) == ((2,), (8,))
