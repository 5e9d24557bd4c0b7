"""index.Tensor and index_put (ops/advanced_indexing.py): outputs and gradients against one device on 2 and 3
ranks (uneven and empty blocks) and a 2x2 mesh, the output placements the rule promises, and no fallback."""

import math

import pytest
import torch

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor

R, P = Replicate(), Partial("sum")
IDX = torch.tensor([4, -1, 0, 4, 2])  # repeated and negative entries
ROWS = torch.tensor([[0], [5], [-2], [1]])  # (4, 1): broadcasts against COLS
COLS = torch.tensor([3, 0, 1])

# (name, call(x, *index tensors), self shape, index tensors, self placement, index placements, output placement)
INDEX_CASES = [
    ("indexed dim sharded: masked", lambda x, i: x[i], (6, 5, 4), [IDX], Shard(0), [R], P),
    ("other dim sharded", lambda x, i: x[i], (6, 5, 4), [IDX], Shard(1), [R], Shard(1)),
    ("middle dim indexed", lambda x, i: x[:, i], (6, 5, 4), [IDX], Shard(2), [R], Shard(2)),
    ("index sharded", lambda x, i: x[:, i], (6, 5, 4), [IDX], R, [Shard(0)], Shard(1)),
    ("non-adjacent, other dim", lambda x, i, j: x[i, :, j], (6, 5, 4), [ROWS, COLS], Shard(1), [R, R], Shard(2)),
    ("non-adjacent, masked", lambda x, i, j: x[i, :, j], (6, 5, 4), [ROWS, COLS], Shard(2), [R, R], P),
    ("broadcast index sharded", lambda x, i, j: x[i, :, j], (6, 5, 4), [ROWS, COLS], R, [Shard(0), R],
     Shard(0)),
    ("partial self", lambda x, i: x[:, :, i], (6, 5, 4), [IDX % 4], Partial("sum"), [R], Partial("sum")),
]

VALUES = torch.arange(15, dtype=torch.float64).view(5, 3) / 7

# (name, call(x, values, *index tensors), self shape, index tensors, values shape, self, values placements, output)
PUT_CASES = [
    ("overwrite (distinct rows), other dim", lambda x, v, i: x.index_put((i,), v), (6, 3),
     [torch.tensor([3, 0, -1, 1, 4])], (5, 3), Shard(1), Shard(1), Shard(1)),
    ("accumulate, indexed dim sharded", lambda x, v, i: x.index_put((i,), v, accumulate=True), (6, 3), [IDX],
     (5, 3), Shard(0), R, Shard(0)),
    ("accumulate, broadcast values", lambda x, v, i: x.index_put((i,), v, accumulate=True), (6, 3), [IDX],
     (3,), Shard(1), R, Shard(1)),
    ("accumulate, partial", lambda x, v, i: x.index_put((i,), v, accumulate=True), (6, 3), [IDX],
     (5, 3), Partial("sum"), R, Partial("sum")),
]


def _check(mesh_shape):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    g = torch.Generator().manual_seed(0)
    on_all = lambda p: [p] * len(mesh_shape)  # noqa: E731
    for name, call, shape, indices, x_p, index_ps, expected in INDEX_CASES:
        x = make_dtensor(torch.randn(shape, generator=g, dtype=torch.float64), mesh, on_all(x_p), requires_grad=True)
        index = [make_dtensor(t, mesh, on_all(p)) for t, p in zip(indices, index_ps)]
        with dtp.comm_mode() as comm:
            out = assert_spmd_equal(call, x, *index)
        assert not comm.fallbacks, (name, comm.fallbacks)
        assert tuple(out.placements) == tuple(on_all(expected)), (name, out.placements)
    for name, call, shape, indices, values_shape, x_p, v_p, expected in PUT_CASES:
        x = make_dtensor(torch.randn(shape, generator=g, dtype=torch.float64), mesh, on_all(x_p), requires_grad=True)
        v = make_dtensor(VALUES[:values_shape[0]] if len(values_shape) == 2 else VALUES[0], mesh, on_all(v_p),
                         requires_grad=True)
        index = [make_dtensor(t, mesh, on_all(R)) for t in indices]
        with dtp.comm_mode() as comm:
            out = assert_spmd_equal(call, x, v, *index)
        assert not comm.fallbacks, (name, comm.fallbacks)
        assert tuple(out.placements) == tuple(on_all(expected)), (name, out.placements)


@pytest.mark.parametrize("mesh_shape", [(2,), (3,), (2, 2)])
def test_advanced_indexing_matches_one_device(mesh_shape):
    run_on_ranks(math.prod(mesh_shape), _check, mesh_shape)


def _mask_put():
    """A bool mask on dim 0 leaves dim 1 local; the count of selected rows never needs to be known."""
    mesh = dtp.init_device_mesh("cpu", (2,))
    whole = torch.randn(6, 3, generator=torch.Generator().manual_seed(3))
    mask, values = torch.tensor([1, 0, 1, 1, 0, 0]).bool(), torch.tensor([1.0, 2.0, 3.0])
    x = make_dtensor(whole, mesh, [Shard(1)])
    with dtp.comm_mode() as comm:
        out = x.index_put((make_dtensor(mask, mesh, [R]),), make_dtensor(values, mesh, [Shard(0)]))
    assert not comm.fallbacks and not comm.counts, comm
    assert torch.equal(out.full_tensor(), whole.index_put((mask,), values))
    return tuple(out.placements)


def test_mask_index_put_keeps_the_other_dim_sharded():
    assert run_on_ranks(2, _mask_put) == [(Shard(1),)] * 2
