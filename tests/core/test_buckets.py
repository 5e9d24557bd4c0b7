"""The one bucketing module (dtensor_plus/buckets.py): grouping by key under a byte cap, flat packing that cuts
back into the same tensors, and ``all_reduce_flat``, whose one collective per reduction gives exactly what one
all-reduce per tensor gives, with the same bytes, on real gloo ranks (2 ranks, and a 2x2 mesh reducing over
both dims); ``BackwardBuckets`` starts full buckets inside backward and the rest at its end.
"""

import pytest
import torch

import dtensor_plus as dtp
from dtensor_plus import collectives
from dtensor_plus.buckets import BackwardBuckets, Buckets, all_reduce_flat, flatten, unflatten
from dtensor_plus.testing import run_on_ranks


def test_buckets_close_at_the_cap_and_drain_in_opening_order():
    buckets = Buckets(cap_bytes=10)
    assert buckets.add("a", 1, 4) is None
    assert buckets.add("b", 2, 4) is None
    assert buckets.add("a", 3, 6) == [1, 3]  # 4 + 6 reaches the cap: the bucket comes back, closed
    assert buckets.add("a", 4, 1) is None  # ... and "a" opens a new one, after "b"'s
    assert buckets.add("c", 5, 11) == [5]  # one item over the cap is a bucket of its own
    assert len(buckets) == 2
    assert buckets.drain() == [("b", [2]), ("a", [4])]
    assert buckets.drain() == [] and len(buckets) == 0


def test_buckets_without_a_cap_close_only_at_drain():
    buckets = Buckets()
    assert all(buckets.add(k % 2, k, 2**40) is None for k in range(5))
    assert buckets.drain() == [(0, [0, 2, 4]), (1, [1, 3])]


def test_flatten_then_unflatten_gives_views_of_one_buffer_shaped_like_the_tensors():
    tensors = [torch.arange(6.0).view(2, 3), torch.tensor(7.0), torch.empty(0, 4), torch.arange(3.0).expand(2, 3).t()]
    flat = flatten(tensors)
    assert flat.shape == (6 + 1 + 0 + 6,)
    back = unflatten(flat, tensors)
    for got, want in zip(back, tensors):
        assert got.shape == want.shape and torch.equal(got, want)
        assert got.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


def _reduced_as_one_by_one(mesh_shape, names, dtype, reduce_op, async_op):
    mesh = dtp.init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    rank = torch.distributed.get_rank()
    g = torch.Generator().manual_seed(rank)  # every rank holds other values: a reduction that skipped one shows
    shapes = [(3, 5), (), (0, 2), (7,), (2, 2, 2)]
    tensors = [(torch.randn(s, generator=g) * 10).to(dtype) for s in shapes]
    reductions = [(k, reduce_op) for k in range(mesh.ndim)]
    with dtp.comm_mode() as one_by_one:
        want = []
        for t in tensors:
            for k, op in reductions:
                if mesh.size(k) > 1:
                    t = collectives.all_reduce(t, mesh, k, op)
            want.append(t)
    with dtp.comm_mode() as flat:
        got = all_reduce_flat(tensors, mesh, reductions, async_op=async_op)
        got = got.wait() if async_op else got
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), (a, b)
    reducing = sum(mesh.size(k) > 1 for k in range(mesh.ndim))
    assert flat.count("all_reduce") == reducing, flat  # one per reduction, not one per tensor
    assert flat.bytes() == one_by_one.bytes(), (flat, one_by_one)
    return True


@pytest.mark.parametrize("async_op", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("mesh_shape, names, dtype, reduce_op", [
    ((2,), ("dp",), torch.float32, "sum"),
    ((2,), ("dp",), torch.float64, "avg"),
    ((2,), ("dp",), torch.int64, "max"),
    ((2, 2), ("dp", "tp"), torch.float32, "sum"),  # two all-reduces of one buffer, the last one in flight
    ((1, 2), ("dp", "tp"), torch.int16, "sum"),  # a mesh dim of one rank is skipped; int16 goes wide on gloo
], ids=["dp2-sum", "dp2-avg", "dp2-int-max", "2x2-sum", "1x2-int16"])
def test_all_reduce_flat_equals_one_all_reduce_per_tensor(mesh_shape, names, dtype, reduce_op, async_op):
    world = mesh_shape[0] * (mesh_shape[1] if len(mesh_shape) > 1 else 1)
    assert all(run_on_ranks(world, _reduced_as_one_by_one, mesh_shape, names, dtype, reduce_op, async_op))


def test_all_reduce_flat_with_nothing_to_reduce_moves_nothing():
    class OneRank:  # a mesh whose only dim has one rank: nothing to reduce, so no process group is needed
        def size(self, mesh_dim):
            return 1

    tensors = [torch.ones(2), torch.arange(3.0)]
    with dtp.comm_mode() as comm:
        for got in (all_reduce_flat(tensors, OneRank(), [(0, "sum")]),
                    all_reduce_flat(tensors, OneRank(), [(0, "sum")], async_op=True).wait()):
            for a, b in zip(got, tensors, strict=True):  # equal values in new memory: the caller may write into it
                assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
        assert all_reduce_flat([], OneRank(), [(0, "sum")], async_op=True).wait() == []
        assert all_reduce_flat([], OneRank(), []) == []
    assert comm.count() == 0


def test_backward_buckets_start_full_buckets_in_backward_and_the_rest_at_its_end():
    events = []
    buckets = BackwardBuckets(cap_bytes=8, start=lambda key, items: events.append(("start", key, items)),
                              finish=lambda: events.append(("finish",)))
    leaves = [torch.ones(2, requires_grad=True) for _ in range(4)]  # 8 bytes of gradient each
    small = torch.ones(1, requires_grad=True)  # 4 bytes
    for i, leaf in enumerate(leaves):
        leaf.register_post_accumulate_grad_hook(lambda p, i=i: buckets.add("big", i, 8))
    small.register_post_accumulate_grad_hook(lambda p: buckets.add("small", "s", 4))
    x = leaves[0] * leaves[1] * leaves[2] * leaves[3]
    (x.sum() + small.sum()).backward()
    starts = [e for e in events if e[0] == "start"]
    assert sorted(i for _, key, items in starts if key == "big" for i in items) == [0, 1, 2, 3]
    assert all(len(items) == 1 for _, key, items in starts if key == "big")  # each filled the 8-byte cap alone
    assert ("start", "small", ["s"]) in events  # left open by the hooks: started when backward ended
    assert events[-1] == ("finish",) and events.count(("finish",)) == 1
    events.clear()
    (leaves[0] * 2).sum().backward()  # the next backward queues its own end
    assert events == [("start", "big", [0]), ("finish",)]
