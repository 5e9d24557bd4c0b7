"""Bucketed collectives for ZeRO: ``redistribute_together`` packs single all-gathers (Shard(d) -> Replicate) and
single reduce-scatters (Partial -> Shard(d)) into one flat buffer and one collective per (mesh, mesh dim, dtype,
kind), and its results and bytes equal the per-tensor ``redistribute_local`` moves (uneven and empty shards,
1-D and 2-D meshes).
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.redistribute import plan_redistribute, redistribute_local, redistribute_together
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, placements_for, shapes


def _whole(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _check_together(mesh_shape, moves, seed):
    """``moves``: (shape, dtype, src, dst) per tensor. Bucketed results and bytes equal the per-tensor ones; every
    single-collective move of one (kind, mesh dim, dtype) shares one collective."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape, mesh_dim_names=("a", "b")[: len(mesh_shape)])
    dts = [make_dtensor(_whole(shape, dtype, seed + i), mesh, src) for i, (shape, dtype, src, _) in enumerate(moves)]
    dsts = [dst for *_, dst in moves]
    with dtp.comm_mode() as one_by_one:
        want = [redistribute_local(dt._local_tensor, dt._spec, tuple(dst)) for dt, dst in zip(dts, dsts)]
    with dtp.comm_mode() as bucketed:
        got = redistribute_together(dts, dsts)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w)
    assert bucketed.bytes() == one_by_one.bytes(), (bucketed, one_by_one)
    # Expected counts: one per non-empty bucket of single collectives, per-tensor counts for the rest.
    expected, buckets = {}, {}
    for dt, dst in zip(dts, dsts):
        spec = dt._spec
        steps = plan_redistribute(spec.placements, tuple(dst), mesh.shape, spec.shape.numel(), spec.dtype.itemsize)
        single = _single(spec, steps, mesh)
        with dtp.comm_mode() as alone:
            redistribute_local(dt._local_tensor, spec, tuple(dst))
        if single is None:
            for key, count in alone.counts.items():
                expected[key] = expected.get(key, 0) + count
        elif alone.bytes():
            buckets[single + (spec.dtype,)] = 1
    for kind, name, _ in buckets:
        expected[kind, name] = expected.get((kind, name), 0) + 1
    got_counts = {k: v for k, v in bucketed.counts.items() if v}
    assert got_counts == {k: v for k, v in expected.items() if v}, (got_counts, expected)


def _single(spec, steps, mesh):
    if len(steps) != 1 or mesh.shape[steps[0][0]] == 1:
        return None
    mesh_dim, new = steps[0]
    old = spec.placements[mesh_dim]
    if isinstance(old, Shard) and new.is_replicate():
        return ("all_gather", mesh.mesh_dim_name(mesh_dim))
    if old.is_partial() and isinstance(new, Shard):
        return ("reduce_scatter", mesh.mesh_dim_name(mesh_dim))
    return None


@st.composite
def _moves(draw, mesh_ndim):
    """A list of tensors, each with a source layout and a target that changes one mesh dim."""
    moves = []
    for _ in range(draw(st.integers(1, 5))):
        shape = draw(shapes(1, 3, 0, 7))
        src = draw(placements_for(len(shape), mesh_ndim, partial=True))
        src = tuple(Partial(p.reduce_op if p.reduce_op in ("sum", "avg") else "sum") if p.is_partial() else p for p in src)
        k = draw(st.integers(0, mesh_ndim - 1))
        if isinstance(src[k], Shard):
            new = Replicate()
        elif src[k].is_partial():
            new = Shard(draw(st.integers(0, len(shape) - 1)))
        else:
            new = src[k]
        dst = src[:k] + (new,) + src[k + 1 :]
        moves.append((shape, draw(st.sampled_from([torch.float64, torch.float32])), src, dst))
    return moves


@pytest.mark.parametrize("mesh_shape", [(4,), (2, 2)])
@settings(max_examples=25)
@given(data=st.data())
def test_together_equals_one_by_one(mesh_shape, data):
    moves = data.draw(_moves(len(mesh_shape)))
    run_on_ranks(4, _check_together, mesh_shape, moves, data.draw(st.integers(0, 2**16)))


def _check_exact_counts():
    """Mixed tensor dims, uneven (5 rows on 4 ranks) and empty (1 row) shards: one all-gather and one
    reduce-scatter in all, the per-tensor bytes."""
    mesh = dtp.init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
    shapes_ = [(5, 3), (2, 7), (1,), (0, 4), (8,)]
    sharded = [make_dtensor(_whole(s, torch.float64, i), mesh, [Shard(i % len(s))]) for i, s in enumerate(shapes_)]
    partial = [make_dtensor(_whole(s, torch.float64, i), mesh, [Partial()]) for i, s in enumerate(shapes_)]
    with dtp.comm_mode() as comm:
        wholes = redistribute_together(sharded, [[Replicate()]] * 5)
        shards = redistribute_together(partial, [[Shard(i % len(s))] for i, s in enumerate(shapes_)])
    assert comm.count("all_gather") == 1 and comm.count("reduce_scatter") == 1 and comm.count() == 2, comm
    for i, s in enumerate(shapes_):
        torch.testing.assert_close(wholes[i], _whole(s, torch.float64, i))
        want = _whole(s, torch.float64, i).chunk(4, dim=i % len(s)) if s[i % len(s)] else None
        if want is not None:
            index = mesh.get_local_rank(0)
            piece = want[index] if index < len(want) else torch.empty(0, dtype=torch.float64)
            torch.testing.assert_close(shards[i].reshape(-1), piece.reshape(-1))
    # Padding: each tensor's piece is ceil(size / 4) rows; the bucket sends 3/4 of the padded whole.
    padded = sum(-(-s[i % len(s)] // 4) * 4 * (torch.Size(s).numel() // max(s[i % len(s)], 1)) for i, s in enumerate(shapes_))
    assert comm.bytes("all_gather") == 3 * padded * 8 // 4 and comm.bytes("reduce_scatter") == 3 * padded * 8 // 4


def test_exact_counts_uneven_and_empty():
    run_on_ranks(4, _check_exact_counts)


def _check_2d_mesh_counts():
    """On a (dp, tp) mesh: dp all-gathers of tensors tp shards differently share one collective; reduce-scatters
    on dp whose tensors are Partial on tp too share one reduce-scatter and one tp all-reduce (they commute)."""
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    shapes_ = [(5, 6), (3, 4), (7,)]
    sharded = [
        make_dtensor(_whole((5, 6), torch.float64, 0), mesh, [Shard(1), Shard(0)]),
        make_dtensor(_whole((3, 4), torch.float64, 1), mesh, [Shard(0), Replicate()]),
        make_dtensor(_whole((7,), torch.float64, 2), mesh, [Shard(0), Replicate()]),
    ]
    gathered = [[Replicate(), Shard(0)], [Replicate(), Replicate()], [Replicate(), Replicate()]]
    partial = [make_dtensor(_whole(s, torch.float64, i), mesh, [Partial(), Partial()]) for i, s in enumerate(shapes_)]
    partial.append(make_dtensor(_whole((3, 4), torch.float64, 3), mesh, [Partial(), Replicate()]))
    scattered = [[Shard(0), Replicate()]] * 4
    for dts, dsts, counts in ((sharded, gathered, {("all_gather", "dp"): 1}),
                              (partial, scattered, {("reduce_scatter", "dp"): 1, ("all_reduce", "tp"): 1})):
        with dtp.comm_mode() as alone:
            want = [redistribute_local(dt._local_tensor, dt._spec, tuple(dst)) for dt, dst in zip(dts, dsts)]
        with dtp.comm_mode() as comm:
            got = redistribute_together(dts, dsts)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        assert {k: v for k, v in comm.counts.items() if v} == counts, comm
        assert comm.bytes() == alone.bytes(), (comm, alone)


def test_2d_mesh_counts():
    run_on_ranks(4, _check_2d_mesh_counts)
