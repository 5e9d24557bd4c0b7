"""geometry.py: the runs a mesh coordinate holds are exactly the entries the placements' own chunk() gives it,
for Shard (uneven, empty, nested), StridedShard (zigzag too); overlap() copies what two blocks share;
cover_error() agrees with counting every entry."""

import re

import torch
from hypothesis import given, settings, strategies as st

from dtensor_plus.checkpoint import geometry
from dtensor_plus.checkpoint.load import _copy_overlap
from dtensor_plus.placements import Replicate, Shard, StridedShard
from dtensor_plus.spec import local_shape_and_offset


@st.composite
def layouts(draw, max_mesh=(2, 3)):
    """(shape, mesh_shape, placements), StridedShard only on a dim no other mesh dim splits (its only legal use
    on a whole dim) with a size divisible by its outer factor."""
    mesh_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    shape = list(draw(st.lists(st.integers(0, 7), min_size=1, max_size=3)))
    placements = []
    for _ in mesh_shape:
        kind = draw(st.sampled_from(["shard", "replicate", "strided"]))
        dim = draw(st.integers(0, len(shape) - 1))
        used = {p.dim for p in placements if not p.is_replicate()}
        if kind == "strided" and dim not in used:
            outer = draw(st.sampled_from([1, 2, 3]))
            shape[dim] = outer * draw(st.integers(0, 4))
            placements.append(StridedShard(dim, outer, draw(st.booleans())))
        elif kind == "shard" and not any(p.is_strided_shard() and p.dim == dim for p in placements):
            placements.append(Shard(dim))
        else:
            placements.append(Replicate())
    return tuple(shape), mesh_shape, tuple(placements)


def _by_chunk(whole, mesh_shape, placements, coordinate):
    block = whole
    for mesh_dim, p in enumerate(placements):
        if not p.is_replicate():
            block = p.chunk(block, mesh_shape[mesh_dim], coordinate[mesh_dim])
    return block


def _by_runs(whole, runs):
    index = [torch.cat([torch.arange(s, s + n) for s, n in dim]) if dim else torch.zeros(0, dtype=torch.long) for dim in runs]
    block = whole
    for d, i in enumerate(index):
        block = block.index_select(d, i)
    return block


@settings(max_examples=150)
@given(layouts())
def test_runs_are_the_placements_chunks(layout):
    shape, mesh_shape, placements = layout
    whole = torch.arange(max(1, torch.Size(shape).numel()))[: torch.Size(shape).numel()].reshape(shape)
    for coordinate in torch.cartesian_prod(*[torch.arange(n) for n in mesh_shape]).reshape(-1, len(mesh_shape)).tolist():
        runs = geometry.local_runs(shape, mesh_shape, placements, coordinate)
        want = _by_chunk(whole, mesh_shape, placements, coordinate)
        assert geometry.local_shape(runs) == tuple(want.shape)
        assert torch.equal(_by_runs(whole, runs), want), (coordinate, runs)
        sizes, offsets = local_shape_and_offset(shape, mesh_shape, placements, coordinate)
        assert geometry.local_shape(runs) == sizes
        for d, dim_runs in enumerate(runs):  # a plain Shard block is one run starting at the spec's offset
            if len(dim_runs) == 1 and not any(p.is_strided_shard() and p.dim == d for p in placements):
                assert dim_runs[0][0] == offsets[d]


@settings(max_examples=80)
@given(layouts(), layouts())
def test_overlap_copies_every_shared_entry(src_layout, dst_layout):
    """Filling a dst block from every src block of another layout of the same tensor reproduces it exactly."""
    shape, src_mesh, src_placements = src_layout
    _, dst_mesh, dst_placements = dst_layout
    if len(dst_layout[0]) != len(shape) or dst_layout[0] != shape:
        dst_mesh, dst_placements = (1,), (Replicate(),)
    whole = torch.randn(shape)
    coords = lambda mesh: torch.cartesian_prod(*[torch.arange(n) for n in mesh]).reshape(-1, len(mesh)).tolist()  # noqa: E731
    sources = [(geometry.local_runs(shape, src_mesh, src_placements, c), _by_chunk(whole, src_mesh, src_placements, c))
               for c in coords(src_mesh)]
    for c in coords(dst_mesh):
        runs = geometry.local_runs(shape, dst_mesh, dst_placements, c)
        block = torch.full(geometry.local_shape(runs), float("nan"))
        for src_runs, src_block in sources:
            triples = geometry.overlap(runs, src_runs)
            if triples is not None:
                _copy_overlap(block, triples, lambda box, b=src_block: b[box])
        assert torch.equal(block, _by_chunk(whole, dst_mesh, dst_placements, c))


def _count_by_entry(shape, blocks):
    """How many blocks hold each entry, one entry at a time: the naive check cover_error must agree with."""
    counts = torch.zeros(shape, dtype=torch.int64)
    for runs in blocks:
        index = [torch.cat([torch.arange(s, s + n) for s, n in dim]) if dim else torch.zeros(0, dtype=torch.long)
                 for dim in runs]
        counts[torch.meshgrid(*index, indexing="ij") if index else ()] += 1
    return counts


@settings(max_examples=80)
@given(layouts(), st.data())
def test_cover_error_agrees_with_counting_every_entry(layout, data):
    """A layout's distinct blocks hold every entry once; a block dropped, repeated or shifted is found, as the
    entry-by-entry count finds it, naming an entry held the wrong number of times."""
    shape, mesh_shape, placements = layout
    coords = torch.cartesian_prod(*[torch.arange(n) for n in mesh_shape]).reshape(-1, len(mesh_shape)).tolist()
    blocks = []
    for c in coords:
        runs = [list(dim) for dim in geometry.local_runs(shape, mesh_shape, placements, c)]
        if runs not in blocks:
            blocks.append(runs)
    assert geometry.cover_error(shape, blocks) is None
    if not blocks:
        return
    i = data.draw(st.integers(0, len(blocks) - 1))
    edit = data.draw(st.sampled_from(["drop", "repeat", "shift"]))
    if edit == "drop":
        blocks = blocks[:i] + blocks[i + 1:]
    elif edit == "repeat":
        blocks = blocks + [blocks[i]]
    elif shape and blocks[i][0] and blocks[i][0][0][0] > 0:  # one row earlier: a row twice, another never
        blocks[i] = [[(blocks[i][0][0][0] - 1, blocks[i][0][0][1])] + blocks[i][0][1:]] + blocks[i][1:]
    counts = _count_by_entry(shape, blocks)
    problem = geometry.cover_error(shape, blocks)
    if bool((counts == 1).all()):
        assert problem is None
    else:
        entry, times = re.fullmatch(r"its chunks hold the entry at \[([\d, ]*)\] (\d+) times .*", problem).groups()
        at = tuple(int(x) for x in entry.split(",")) if entry else ()
        assert counts[at] == int(times) != 1, (problem, counts)
