"""The checkpoint index: ``index.json``, the one file that says what a checkpoint holds. JSON only (never a pickle).

Layout (format version 2)::

    {"format": "dtensor_plus.checkpoint", "version": 2, "world_size": 4,
     "files":   {"rank00000.safetensors": {"bytes": 4096}, ...},
     "meshes":  [{"shape": [4], "dim_names": ["dp"], "ranks": [0, 1, 2, 3], "device_type": "cpu"}],
     "tensors": [{"path": ["model", "fc.weight"], "shape": [8, 6], "dtype": "float32",
                  "placements": [{"kind": "shard", "dim": 0}], "mesh": 0,      # informational; null: plain tensor
                  "chunks": [{"file": "rank00000.safetensors", "key": "[\"model\",\"fc.weight\"]",
                              "runs": [[[0, 2]], [[0, 6]]], "crc32": "9a0b51f2"}, ...]}],
     "values":  [{"path": ["optimizer", "param_groups", 0, "lr"], "value": 0.001}, ...]}

and beside it ``index.json.sha256``, the sha256 of the index's bytes (digest.py).

A path is the list of keys (str or int) from the state's root to the leaf. A chunk's ``runs`` are, per tensor
dim, the (global_start, length) runs of the block it holds (geometry.py); its ``key`` names the tensor in the
safetensors ``file`` and is the tensor's path as JSON (``chunk_key``); its ``crc32`` is digest.py's. Placements
and mesh are informational: loading reads only shapes, dtypes and runs, so it never needs the saving mesh.

``read_index`` believes nothing it has not checked: the index and its digest are files inside the checkpoint
directory (symlinks resolved), the index's bytes match the digest, every file name is a bare name inside the
directory, every chunk's key is its tensor's and its runs lie inside the tensor. (That the chunks a target block
overlaps fill it exactly once is load.py's check, per block: it costs only the chunks that block reads.)
Version 1 (before checksums) reads only with ``verify=False``.
"""

from __future__ import annotations

from types import MappingProxyType

import collections
import json
import os

import torch

from ..placement_fields import to_fields
from . import digest
from .errors import CheckpointCorruptError, CheckpointVersionError

__all__ = ["FORMAT", "VERSION", "INDEX_NAME", "DIGEST_NAME", "DTYPES", "dtype_name", "encode_placement",
           "encode_mesh", "chunk_key", "path_name", "write_index", "read_index", "safe_file_path"]

FORMAT, VERSION, INDEX_NAME = "dtensor_plus.checkpoint", 2, "index.json"
DIGEST_NAME = INDEX_NAME + ".sha256"
_UNCHECKED_VERSION = 1  # written before checksums: no chunk crc32s, no index digest

# Names as safetensors spells its dtypes' torch counterparts; the table is the whitelist a load accepts.
DTYPES = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
                 "float8_e4m3fn", "float8_e5m2")
    if hasattr(torch, name)
}
DTYPES = MappingProxyType(DTYPES)  # read-only: a constant table
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_NAMES = MappingProxyType(_NAMES)  # read-only: a constant table


def dtype_name(dtype: torch.dtype, where: str) -> str:
    if dtype not in _NAMES:
        raise TypeError(f"{where}: dtype {dtype} cannot be stored in a checkpoint (safetensors); supported: {sorted(DTYPES)}")
    return _NAMES[dtype]


def encode_placement(p) -> dict:
    return to_fields(p)  # informational in the index: loading reads the chunks' runs, not the saved layout


def encode_mesh(mesh) -> dict:
    return {"shape": list(mesh.shape), "dim_names": list(mesh.mesh_dim_names or []), "ranks": mesh.mesh.tolist(),
            "device_type": mesh.device_type}


def chunk_key(path) -> str:
    """A tensor's name inside a safetensors file: its path as JSON (unique, unlike a dotted name)."""
    return json.dumps(list(path), separators=(",", ":"))


def write_index(directory: str, index: dict) -> None:
    """Write ``index.json``, then its digest (both flushed to disk before they count: the publish rename comes
    after)."""
    data = json.dumps(index, separators=(",", ":")).encode()
    _write_synced(os.path.join(directory, INDEX_NAME), data)
    _write_synced(os.path.join(directory, DIGEST_NAME), digest.index_digest_line(data, INDEX_NAME).encode())


def _write_synced(file_path: str, data: bytes) -> None:
    with open(file_path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def safe_file_path(directory: str, name, where: str) -> str:
    """``directory/name`` for a bare file name that stays inside ``directory`` (symlinks resolved); else raise."""
    bad = (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
           or os.path.isabs(name))
    path = os.path.join(directory, name) if not bad else ""
    root = os.path.realpath(directory)
    if bad or os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise CheckpointCorruptError(
            f"{where}: file name {name!r} would read outside the checkpoint directory {directory!r}; a checkpoint "
            f"may name only files inside its own directory (a symlink out of it counts as outside). Refusing to load"
        )
    return path


def read_index(directory: str, verify: bool = True) -> dict:
    """The validated index of the checkpoint in ``directory`` (``verify=False`` admits a version-1 index, which
    has no digest)."""
    where = os.path.join(directory, INDEX_NAME)
    with open(safe_file_path(directory, INDEX_NAME, where), "rb") as f:
        data = f.read()  # parsed from these bytes, the ones the digest covers
    try:
        index = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointCorruptError(
            f"{where} is not valid JSON ({error}); the checkpoint is damaged, restore it from a copy") from error
    _check(isinstance(index, dict) and index.get("format") == FORMAT, where, f"is not a {FORMAT} index")
    version = index.get("version")
    _check(_is_count(version) and version >= 1, where, f"has no format version (a positive integer): {version!r:.40}")
    if version > VERSION:
        raise CheckpointVersionError(
            f"{where} has format version {version}, newer than this dtensor_plus reads ({VERSION}); "
            f"upgrade dtensor_plus to load it"
        )
    # a newer version may keep its digest elsewhere: "upgrade" is said first, then the digest is checked
    if not _check_digest(directory, data) and (version != _UNCHECKED_VERSION or verify):
        _missing_digest(directory, version)
    _check_body(index, directory, where, checksummed=version != _UNCHECKED_VERSION)
    return index


def _check_digest(directory: str, data: bytes) -> bool:
    """Whether the index has a digest file; raise if that file says other bytes than ``data``."""
    where = os.path.join(directory, DIGEST_NAME)
    if not os.path.lexists(where):
        return False
    with open(safe_file_path(directory, DIGEST_NAME, where), "rb") as f:
        line = f.read(4096).decode("utf-8", "replace")
    want, have = digest.digest_of_line(line), digest.index_digest_line(data, INDEX_NAME).split(" ", 1)[0]
    if want != have:
        raise CheckpointCorruptError(
            f"{os.path.join(directory, INDEX_NAME)}: its sha256 is {have}, but {where} says "
            f"{want or repr(line[:80])}: the index was edited or damaged after save wrote it. Refusing to load: "
            f"restore the checkpoint from a copy")
    return True


def _missing_digest(directory: str, version: int) -> None:
    where = os.path.join(directory, DIGEST_NAME)
    if version == _UNCHECKED_VERSION:
        raise CheckpointVersionError(
            f"{os.path.join(directory, INDEX_NAME)} has format version {version}, written before checkpoints had "
            f"checksums, so it cannot be verified; load(..., verify=False) reads it unchecked, and a save then "
            f"writes it with checksums")
    raise CheckpointCorruptError(
        f"{where} is missing, so the index beside it cannot be verified (save writes both); restore the "
        f"checkpoint from a copy")


def _check_body(index: dict, directory: str, where: str, checksummed: bool) -> None:
    files = index.get("files")
    _check(isinstance(files, dict), where, "has no 'files' table")
    for name, info in files.items():
        safe_file_path(directory, name, where)
        _check(isinstance(info, dict) and _is_count(info.get("bytes")), where,
               f"has a malformed entry for file {name!r}")
    _check(isinstance(index.get("tensors"), list) and isinstance(index.get("values"), list), where, "lacks 'tensors' or 'values'")
    for entry in index["tensors"]:
        _check_tensor(entry, files, where, checksummed)
    for entry in index["values"]:
        _check(isinstance(entry, dict) and _is_path(entry.get("path")) and "value" in entry, where,
               f"has a malformed value {entry!r:.200}")
    counts = collections.Counter(chunk_key(e["path"]) for e in index["tensors"] + index["values"])
    twice = sorted(key for key, n in counts.items() if n > 1)
    _check(not twice, where, f"lists the paths {twice[:3]} more than once")


def _check_tensor(entry, files, where: str, checksummed: bool) -> None:
    _check(isinstance(entry, dict) and _is_path(entry.get("path")), where, f"has a malformed tensor entry {entry!r:.200}")
    name = path_name(entry["path"])
    shape = entry.get("shape")
    _check(isinstance(shape, list) and all(_is_count(s) for s in shape), where, f"tensor {name}: malformed shape {shape!r}")
    _check(entry.get("dtype") in DTYPES, where, f"tensor {name}: unknown dtype {entry.get('dtype')!r} (known: {sorted(DTYPES)})")
    _check(isinstance(entry.get("chunks"), list), where, f"tensor {name}: no chunk list")
    key = chunk_key(entry["path"])
    for chunk in entry["chunks"]:
        _check(isinstance(chunk, dict) and chunk.get("file") in files, where,
               f"tensor {name}: a chunk names no file of the files table ({chunk!r:.200})")
        _check(chunk.get("key") == key, where, f"tensor {name}: a chunk in {chunk['file']} is keyed "
               f"{chunk.get('key')!r:.200}, not the tensor's own key {key!r} (keys swapped between tensors?)")
        _check(not checksummed or _is_crc32(chunk.get("crc32")), where,
               f"tensor {name}: the chunk in {chunk['file']} has no crc32 (8 hex digits): {chunk.get('crc32')!r:.80}")
        runs = chunk.get("runs")
        _check(isinstance(runs, list) and len(runs) == len(shape), where,
               f"tensor {name}: chunk runs do not match its {len(shape)} dims")
        for dim_runs, size in zip(runs, shape):
            _check(isinstance(dim_runs, list) and all(
                isinstance(r, list) and len(r) == 2 and _is_count(r[0]) and _is_count(r[1]) and r[0] + r[1] <= size
                for r in dim_runs), where, f"tensor {name}: chunk runs {dim_runs!r:.200} fall outside its shape {shape}")


def path_name(path) -> str:
    """A path as people read it: ``optimizer.state.fc.weight.exp_avg``."""
    return ".".join(str(p) for p in path)


def _is_path(path) -> bool:
    return isinstance(path, list) and all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in path)


def _is_crc32(value) -> bool:
    return isinstance(value, str) and len(value) == 8 and all(c in "0123456789abcdef" for c in value)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise CheckpointCorruptError(f"{where} {what}; the index is damaged or not written by dtensor_plus.checkpoint.save")
