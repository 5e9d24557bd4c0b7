"""Any save layout loads into any load layout, bit for bit: hypothesis over the save world and mesh, each tensor's
save placements (Shard, uneven and empty, nested, Replicate, Partial, StridedShard, or a plain tensor), the load
world (including one process without torch.distributed) and mesh, and each tensor's load placements."""

import shutil
import tempfile

import torch
from hypothesis import given, settings, strategies as st

import dtensor_plus as dtp
from dtensor_plus import checkpoint
from dtensor_plus.placements import Partial, Replicate, Shard, StridedShard
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor

MESHES = {1: [(1,)], 2: [(2,)], 3: [(3,)], 4: [(4,), (2, 2)]}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int32": torch.int32}


def _whole(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == "int32":
        return torch.randint(-1000, 1000, shape, generator=g, dtype=torch.int32)
    return torch.randn(shape, generator=g).to(DTYPES[dtype])


def _bits(t):
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}.get(t.dtype, t.dtype))


@st.composite
def _placements(draw, shape, mesh_shape, partial):
    """None (a plain tensor) or one placement per mesh dim; StridedShard on a dim nothing else splits."""
    if draw(st.integers(0, 5)) == 0:
        return None
    out = []
    for _ in mesh_shape:
        dim = draw(st.integers(0, len(shape) - 1))
        kinds = ["shard", "shard", "replicate"] + (["partial"] if partial else [])
        if shape[dim] % 2 == 0 and not any(not p.is_replicate() and getattr(p, "dim", None) == dim for p in out):
            kinds.append("strided")
        kind = draw(st.sampled_from(kinds))
        if kind == "strided":
            out.append(StridedShard(dim, 2, draw(st.booleans())))
        elif kind == "shard" and not any(p.is_strided_shard() and p.dim == dim for p in out):
            out.append(Shard(dim))
        elif kind == "partial":
            out.append(Partial(draw(st.sampled_from(["sum", "max"]))))
        else:
            out.append(Replicate())
    return tuple(out)


@st.composite
def _cases(draw):
    save_world = draw(st.sampled_from([1, 2, 3, 4]))
    load_world = draw(st.sampled_from([0, 1, 2, 3, 4]))  # 0: this process, no torch.distributed
    save_mesh = draw(st.sampled_from(MESHES[save_world]))
    load_mesh = draw(st.sampled_from(MESHES[max(load_world, 1)]))
    tensors = []
    for i in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=1, max_size=3)))
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        tensors.append({"name": f"t{i}", "shape": shape, "dtype": dtype, "seed": draw(st.integers(0, 99)),
                        "save": draw(_placements(shape, save_mesh, partial=True)),
                        "load": draw(_placements(shape, load_mesh, partial=True)) if load_world else None})
    return save_world, save_mesh, load_world, load_mesh, tensors


def _state(tensors, mesh_shape, side, fill):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    state = {"nested": {}}
    for t in tensors:
        whole = _whole(t["shape"], t["dtype"], t["seed"]) if fill else torch.zeros(t["shape"], dtype=DTYPES[t["dtype"]])
        placements = t[side]
        if placements is not None and not fill:
            placements = [Replicate() if p.is_partial() else p for p in placements]  # zeros, then Partial below
            value = dtp.distribute_tensor(whole, mesh, placements, src_data_rank=None)
            if any(p.is_partial() for p in t[side]):
                value = dtp.DTensor.from_local(value._local_tensor, mesh, t[side], shape=whole.shape, stride=whole.stride())
        else:
            value = whole if placements is None else make_dtensor(whole, mesh, placements)
        state["nested"][t["name"]] = value
    return state


def _save_on_ranks(path, mesh_shape, tensors):
    checkpoint.save(_state(tensors, mesh_shape, "save", fill=True), path)


def _load_and_check(path, mesh_shape, tensors):
    state = _state(tensors, mesh_shape, "load", fill=False)
    checkpoint.load(state, path)
    for t in tensors:
        value = state["nested"][t["name"]]
        full = value.full_tensor() if isinstance(value, dtp.DTensor) else value
        want = _whole(t["shape"], t["dtype"], t["seed"])
        assert torch.equal(_bits(full), _bits(want)), f"{t}: loaded {full} != saved {want}"


@settings(max_examples=14)
@given(_cases())
def test_any_layout_loads_into_any_layout_bit_for_bit(case):
    save_world, save_mesh, load_world, load_mesh, tensors = case
    path = tempfile.mkdtemp(prefix="dtp_ckpt_") + "/ckpt"
    try:
        run_on_ranks(save_world, _save_on_ranks, path, save_mesh, tensors)
        if load_world:
            run_on_ranks(load_world, _load_and_check, path, load_mesh, tensors)
        else:
            state = {"nested": {t["name"]: torch.zeros(t["shape"], dtype=DTYPES[t["dtype"]]) for t in tensors}}
            checkpoint.load(state, path)
            for t in tensors:
                assert torch.equal(_bits(state["nested"][t["name"]]), _bits(_whole(t["shape"], t["dtype"], t["seed"])))
    finally:
        shutil.rmtree(path.rsplit("/", 1)[0], ignore_errors=True)


def _save_replicated_then_count(path):
    mesh = dtp.init_device_mesh("cpu", (2, 2))
    state = {f"w{i}": dtp.distribute_tensor(torch.full((4, 2), float(i)), mesh, [Replicate(), Shard(0)]) for i in range(8)}
    checkpoint.save(state, path)


def test_replicated_blocks_are_written_once_and_spread_over_replicas():
    path = tempfile.mkdtemp(prefix="dtp_ckpt_") + "/ckpt"
    try:
        run_on_ranks(4, _save_replicated_then_count, path)
        index = checkpoint.index.read_index(path)
        chunks = [c for e in index["tensors"] for c in e["chunks"]]
        assert len(chunks) == 8 * 2  # one writer per tp block, not one per rank
        assert len({c["file"] for c in chunks}) > 2  # both dp replicas write some (hash-spread)
    finally:
        shutil.rmtree(path.rsplit("/", 1)[0], ignore_errors=True)
