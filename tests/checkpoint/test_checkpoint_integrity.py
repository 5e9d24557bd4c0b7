"""A checkpoint directory that was edited or damaged never loads wrong data: each fault is injected into a real
checkpoint (saved on the 4 ranks of a 2x2 (dp, tp) mesh, rows the mesh does not divide, an empty shard) and the
load, on 2 or 3 ranks, raises on every rank an error naming the tensor, the file and what is wrong.

Index edits are tried twice: as they come (the index's sha256 beside it refuses them), and with the digest
written anew, as a buggy writer would, so the checks behind the digest are proven too (coverage of every entry
exactly once, chunk keys, dtypes, crc32s bound to the chunk's place, paths inside the directory).
"""

import json
import os
import re
import shutil
import struct

import pytest
import torch

import dtensor_plus as dtp
from dtensor_plus import checkpoint
from dtensor_plus.checkpoint.index import DIGEST_NAME, INDEX_NAME, write_index
from dtensor_plus.placements import Replicate, Shard
from dtensor_plus.testing import run_on_ranks

# name: (shape, dtype, placements on the saving (dp, tp) mesh). "a" and "c" share their files (their keys hash
# to the same replica), "g" has four chunks of one shape, "e" has 1 row on 2 dp ranks (an empty shard).
SAVED = {
    "a": ((5, 3), torch.float32, [Shard(0), Replicate()]),
    "b": ((5, 3), torch.float32, [Shard(0), Replicate()]),
    "c": ((5, 3), torch.float32, [Shard(0), Replicate()]),
    "g": ((6, 2), torch.float32, [Shard(0), Shard(1)]),
    "e": ((1, 4), torch.int32, [Shard(0), Replicate()]),
    "h": ((3,), torch.bfloat16, [Replicate(), Shard(0)]),
}


def _whole(name, shape=None, dtype=None):
    saved_shape, saved_dtype, _ = SAVED[name]
    g = torch.Generator().manual_seed(ord(name))
    value = torch.randn(saved_shape, generator=g).mul(100).to(saved_dtype)
    return value if shape is None else torch.zeros(shape, dtype=dtype or saved_dtype)


def _save(path):
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    state = {name: dtp.distribute_tensor(_whole(name), mesh, placements, src_data_rank=None)
             for name, (_, _, placements) in SAVED.items()}
    checkpoint.save({**state, "step": 7}, path)


def _load(path, names, overrides, verify):
    """Load ``names`` into a 1-d mesh of every rank (dim 0 sharded, or dim 1 for "g" and "e"); per rank, the
    error's class and message, or what was loaded."""
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    state = {}
    for name in names:
        shape, dtype = overrides.get(name, (SAVED[name][0], SAVED[name][1]))
        placements = [Shard(1 if name in ("g", "e") else 0)]
        state[name] = dtp.distribute_tensor(torch.zeros(shape, dtype=dtype), mesh, placements, src_data_rank=None)
    try:
        checkpoint.load(state, path, strict=False, verify=verify)
    except checkpoint.CheckpointError as error:
        return type(error).__name__, str(error)
    return "loaded", {name: t.full_tensor() for name, t in state.items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("saved") / "ckpt")
    run_on_ranks(4, _save, path)
    return path


@pytest.fixture
def ckpt(saved, tmp_path):
    """A fresh copy of the saved checkpoint, to damage."""
    path = str(tmp_path / "ckpt")
    shutil.copytree(saved, path, symlinks=True)
    return path


def _load_on(world, path, names=tuple(SAVED), overrides=None, verify=True):
    return run_on_ranks(world, _load, path, list(names), overrides or {}, verify)


def _assert_refused(results, kind, pattern):
    """Every rank raised ``kind`` with a message matching ``pattern`` (a rank that read nothing bad relays it)."""
    for rank, (got, message) in enumerate(results):
        assert got == kind, f"rank {rank}: {got}, not {kind}: {message}"
        assert re.search(pattern, message), f"rank {rank}: {message!r} !~ {pattern!r}"


# -- helpers that damage a checkpoint ---------------------------------------------------------------------------


def _edit_index(path, change, redigest):
    with open(os.path.join(path, INDEX_NAME)) as f:
        index = json.load(f)
    change(index)
    if redigest:
        write_index(path, index)
    else:
        with open(os.path.join(path, INDEX_NAME), "w") as f:
            json.dump(index, f, separators=(",", ":"))


def _tensor(index, name):
    return next(e for e in index["tensors"] if e["path"] == [name])


def _read_file(file_path):
    data = open(file_path, "rb").read()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), length, data


def _rewrite_header(file_path, change):
    """Edit a safetensors header in place; the file keeps its size (the edit must not lengthen the header)."""
    header, length, data = _read_file(file_path)
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    with open(file_path, "wb") as f:
        f.write(data[:8] + text + b" " * (length - len(text)) + data[8 + length:])


def _chunk_file(path, name, row):
    """The file holding the chunk of tensor ``name`` that starts at ``row``."""
    with open(os.path.join(path, INDEX_NAME)) as f:
        entry = _tensor(json.load(f), name)
    return os.path.join(path, next(c["file"] for c in entry["chunks"] if c["runs"][0][0][0] == row))


# -- the faults --------------------------------------------------------------------------------------------------


def test_the_undamaged_checkpoint_loads_equal_on_3_ranks(ckpt):
    for got, loaded in _load_on(3, ckpt):
        assert got == "loaded", loaded
        for name, value in loaded.items():
            assert torch.equal(value, _whole(name)), name


@pytest.mark.parametrize("redigest", [False, True])
def test_a_grown_shape_is_refused_not_left_unfilled(ckpt, redigest):
    _edit_index(ckpt, lambda index: _tensor(index, "a").update(shape=[7, 3]), redigest)
    results = _load_on(3, ckpt, overrides={"a": ((7, 3), torch.float32)})
    if redigest:
        _assert_refused(results, "CheckpointCorruptError", r"index\.json: tensor a of shape \[7, 3\]: its chunks hold the "
                                                           r"entry at \[[56], 0\] 0 times \(every entry must be held "
                                                           r"exactly once\)")  # rows 3-5 | 6 on ranks 1 | 2
    else:
        _assert_refused(results, "CheckpointCorruptError", rf"index\.json: its sha256 is .* but .*{DIGEST_NAME} says .*"
                                                           r"edited or damaged after save")


def test_moved_chunk_runs_are_refused(ckpt):
    def move(index):  # the dp1 chunk (rows 3-4) now claims rows 2-3: row 2 twice, row 4 never
        chunk = next(c for c in _tensor(index, "a")["chunks"] if c["runs"][0] == [[3, 2]])
        chunk["runs"][0] = [[2, 2]]
    _edit_index(ckpt, move, redigest=True)
    results = _load_on(2, ckpt)  # rows 0-2 on rank 0, 3-4 on rank 1: each finds the fault in its own rows
    _assert_refused(results[:1], "CheckpointCorruptError", r"tensor a of shape \[5, 3\]: its chunks hold the entry at "
                                                           r"\[2, 0\] 2 times")
    _assert_refused(results[1:], "CheckpointCorruptError", r"tensor a of shape \[5, 3\]: its chunks hold the entry at "
                                                           r"\[4, 0\] 0 times")


@pytest.mark.parametrize("verify", [True, False])
def test_chunk_runs_swapped_between_two_chunks(ckpt, verify):
    """Two equal chunks trade places: coverage is still exact, so only the crc32 (bound to the runs) can tell;
    and the index digest, which is what verify=False relies on."""
    def swap(index):
        first, second = [c for c in _tensor(index, "g")["chunks"] if c["runs"][1] == [[0, 1]]]
        first["runs"], second["runs"] = second["runs"], first["runs"]
    _edit_index(ckpt, swap, redigest=verify)
    if verify:
        _assert_refused(_load_on(2, ckpt), "CheckpointCorruptError",
                        r"rank0000\d\.safetensors, chunk \[\"g\"\] of tensor g \(runs .*\): crc32 \w+ differs from the "
                        r"index's \w+: .*moved")
    else:
        _assert_refused(_load_on(2, ckpt, verify=False), "CheckpointCorruptError", r"index\.json: its sha256 is")


@pytest.mark.parametrize("redigest", [False, True])
def test_a_dtype_relabelled_in_the_index_is_not_cast(ckpt, redigest):
    _edit_index(ckpt, lambda index: _tensor(index, "a").update(dtype="int32"), redigest)
    results = _load_on(3, ckpt, overrides={"a": ((5, 3), torch.int32)}, verify=False)
    if redigest:
        _assert_refused(results, "CheckpointCorruptError", r"rank0000\d\.safetensors, chunk \[\"a\"\] of tensor a: the "
                                                           r"file holds dtype F32, the index says int32 \(I32\)")
    else:
        _assert_refused(results, "CheckpointCorruptError", r"index\.json: its sha256 is")


def test_a_dtype_relabelled_in_a_safetensors_header_is_not_cast(ckpt):
    file_path = _chunk_file(ckpt, "a", 3)
    _rewrite_header(file_path, lambda header: header['["a"]'].update(dtype="I32"))
    # every loading rank but rank 0 reads rows 3-4; verify=False: the dtype is checked even then
    results = _load_on(3, ckpt, names=["a"], verify=False)
    name = os.path.basename(file_path)
    _assert_refused(results[1:], "CheckpointCorruptError", rf"{name}, chunk \[\"a\"\] of tensor a: the file holds "
                                                           r"dtype I32, the index says float32 \(F32\)")
    _assert_refused(results[:1], "CheckpointCorruptError", rf"loading .* failed on rank\(s\) \[1, 2\] .*: rank 1: "
                                                           rf"CheckpointCorruptError: .*{name}.*tensor a.*dtype I32")


@pytest.mark.parametrize("redigest", [False, True])
def test_chunk_keys_swapped_in_the_index(ckpt, redigest):
    def swap(index):
        a, b = _tensor(index, "a")["chunks"], _tensor(index, "b")["chunks"]
        for x, y in zip(a, b):
            x["key"], y["key"] = y["key"], x["key"]
    _edit_index(ckpt, swap, redigest)
    pattern = (r"tensor a: a chunk in rank0000\d\.safetensors is keyed '\[\"b\"\]', not the tensor's own key "
               r"'\[\"a\"\]' \(keys swapped" if redigest else r"index\.json: its sha256 is")
    _assert_refused(_load_on(2, ckpt, verify=False), "CheckpointCorruptError", pattern)


def test_chunk_keys_swapped_in_a_safetensors_header(ckpt):
    file_path = _chunk_file(ckpt, "a", 0)
    assert file_path == _chunk_file(ckpt, "c", 0), "the test needs a and c in one file (their keys' hash)"

    def swap(header):
        header['["a"]'], header['["c"]'] = header['["c"]'], header['["a"]']
    _rewrite_header(file_path, swap)
    _assert_refused(_load_on(2, ckpt), "CheckpointCorruptError",
                    rf"{os.path.basename(file_path)}, chunk \[\"[ac]\"\] of tensor [ac] \(runs .*\): crc32 \w+ differs")


def test_byte_runs_moved_inside_a_chunk_file(ckpt):
    """The rows of a's chunk trade places in the file: same size, a valid file, other values."""
    file_path = _chunk_file(ckpt, "a", 0)
    header, length, data = _read_file(file_path)
    begin, end = header['["a"]']["data_offsets"]
    row = (end - begin) // 3
    body = bytearray(data)
    start = 8 + length + begin
    body[start:start + 2 * row] = body[start + row:start + 2 * row] + body[start:start + row]
    open(file_path, "wb").write(bytes(body))
    _assert_refused(_load_on(2, ckpt), "CheckpointCorruptError",
                    rf"{os.path.basename(file_path)}, chunk \[\"a\"\] of tensor a \(runs \[\[\[0, 3\]\], \[\[0, 3\]\]\]\): "
                    r"crc32 \w+ differs from the index's")


@pytest.mark.parametrize("which", [INDEX_NAME, DIGEST_NAME])
def test_index_or_digest_that_is_a_symlink_out_of_the_directory(ckpt, tmp_path, which):
    outside = tmp_path / f"outside-{which}"
    shutil.copy(os.path.join(ckpt, which), outside)  # the very same bytes: only where they live is wrong
    os.remove(os.path.join(ckpt, which))
    os.symlink(outside, os.path.join(ckpt, which))
    _assert_refused(_load_on(2, ckpt), "CheckpointCorruptError",
                    rf"file name '{which}' would read outside the checkpoint directory")


@pytest.mark.parametrize("escape", ["dotdot", "absolute"])
def test_chunk_file_names_that_leave_the_directory(ckpt, tmp_path, escape):
    name = os.path.basename(_chunk_file(ckpt, "a", 0))
    shutil.copy(os.path.join(ckpt, name), tmp_path / name)
    bad = f"../{name}" if escape == "dotdot" else str(tmp_path / name)

    def rename(index):
        index["files"][bad] = index["files"].pop(name)
        for entry in index["tensors"]:
            for chunk in entry["chunks"]:
                chunk["file"] = bad if chunk["file"] == name else chunk["file"]
    _edit_index(ckpt, rename, redigest=True)
    _assert_refused(_load_on(2, ckpt), "CheckpointCorruptError", rf"file name '{bad}' would read outside")


def test_a_truncated_chunk_file_fails_every_rank(ckpt):
    """Only the ranks reading rows 3-4 meet the damage; rank 0 fails with them instead of going on alone."""
    file_path = _chunk_file(ckpt, "a", 3)
    os.truncate(file_path, os.path.getsize(file_path) - 4)
    results = _load_on(3, ckpt, names=["a"], verify=False)
    name = os.path.basename(file_path)
    _assert_refused(results[1:], "CheckpointCorruptError", rf"{name} \(holding tensor a\) has \d+ bytes, its index says")
    _assert_refused(results[:1], "CheckpointCorruptError", rf"failed on rank\(s\) \[1, 2\] .*{name} \(holding tensor a\)")


def test_a_missing_digest_is_refused(ckpt):
    os.remove(os.path.join(ckpt, DIGEST_NAME))
    _assert_refused(_load_on(2, ckpt), "CheckpointCorruptError",
                    rf"{DIGEST_NAME} is missing, so the index beside it cannot be verified")


def test_a_version_1_checkpoint_loads_only_unverified(ckpt):
    """Format 1 predates checksums: refused unless the caller asks for an unchecked load, which still checks
    coverage, keys, dtypes and paths."""
    def downgrade(index):
        index["version"] = 1
        for entry in index["tensors"]:
            for chunk in entry["chunks"]:
                del chunk["crc32"]
    _edit_index(ckpt, downgrade, redigest=False)
    os.remove(os.path.join(ckpt, DIGEST_NAME))
    _assert_refused(_load_on(2, ckpt), "CheckpointVersionError", r"format version 1, written before checkpoints had "
                                                                 r"checksums.*verify=False")
    for got, loaded in _load_on(2, ckpt, verify=False):
        assert got == "loaded", loaded
        assert all(torch.equal(value, _whole(name)) for name, value in loaded.items())
