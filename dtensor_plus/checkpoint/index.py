"""The checkpoint index: ``index.json``, the one file that says what a checkpoint holds. JSON only (never a pickle).

Layout (format version 1)::

    {"format": "dtensor_plus.checkpoint", "version": 1, "world_size": 4,
     "files":   {"rank00000.safetensors": {"crc32": "1c291ca3", "bytes": 4096}, ...},
     "meshes":  [{"shape": [4], "dim_names": ["dp"], "ranks": [0, 1, 2, 3], "device_type": "cpu"}],
     "tensors": [{"path": ["model", "fc.weight"], "shape": [8, 6], "dtype": "float32",
                  "placements": [{"kind": "shard", "dim": 0}], "mesh": 0,      # informational; null: plain tensor
                  "chunks": [{"file": "rank00000.safetensors", "key": "...", "runs": [[[0, 2]], [[0, 6]]]}, ...]}],
     "values":  [{"path": ["optimizer", "param_groups", 0, "lr"], "value": 0.001}, ...]}

A path is the list of keys (str or int) from the state's root to the leaf. A chunk's ``runs`` are, per tensor
dim, the (global_start, length) runs of the block it holds (geometry.py); its ``key`` names the tensor in the
safetensors ``file``. Placements and mesh are informational: loading reads only shapes, dtypes and runs, so it
never needs the saving mesh. ``read_index`` validates everything it returns, and that every file name is a bare
name inside the checkpoint directory (an index cannot make a load read outside it).
"""

from __future__ import annotations

import json
import os

import torch

from ..placements import Partial, Replicate, Shard, StridedShard
from .errors import CheckpointCorruptError, CheckpointVersionError

__all__ = ["FORMAT", "VERSION", "INDEX_NAME", "DTYPES", "dtype_name", "encode_placement", "encode_mesh", "write_index",
           "read_index", "safe_file_path"]

FORMAT, VERSION, INDEX_NAME = "dtensor_plus.checkpoint", 1, "index.json"

# Names as safetensors spells its dtypes' torch counterparts; the table is the whitelist a load accepts.
DTYPES = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
                 "float8_e4m3fn", "float8_e5m2")
    if hasattr(torch, name)
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype, where: str) -> str:
    if dtype not in _NAMES:
        raise TypeError(f"{where}: dtype {dtype} cannot be stored in a checkpoint (safetensors); supported: {sorted(DTYPES)}")
    return _NAMES[dtype]


def encode_placement(p) -> dict:
    if isinstance(p, Shard):
        return {"kind": "shard", "dim": p.dim}
    if isinstance(p, StridedShard):
        return {"kind": "strided_shard", "dim": p.dim, "outer": p.outer, "zigzag": p.zigzag}
    if isinstance(p, Partial):
        return {"kind": "partial", "reduce_op": p.reduce_op}
    assert isinstance(p, Replicate), p
    return {"kind": "replicate"}


def encode_mesh(mesh) -> dict:
    return {"shape": list(mesh.shape), "dim_names": list(mesh.mesh_dim_names or []), "ranks": mesh.mesh.tolist(),
            "device_type": mesh.device_type}


def write_index(directory: str, index: dict) -> None:
    """Write ``index.json`` (flushed to disk before it counts: the publish rename comes after)."""
    target = os.path.join(directory, INDEX_NAME)
    with open(target, "w", encoding="utf-8") as f:
        json.dump(index, f, separators=(",", ":"))
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
            f"{where}: file name {name!r} would read outside the checkpoint directory {directory!r}; an index may "
            f"name only files inside its own directory. Refusing to load: this index was not written by save()"
        )
    return path


def read_index(directory: str) -> dict:
    """The validated index of the checkpoint in ``directory``."""
    where = os.path.join(directory, INDEX_NAME)
    try:
        with open(where, encoding="utf-8") as f:
            index = json.load(f)
    except json.JSONDecodeError as error:
        raise CheckpointCorruptError(
            f"{where} is not valid JSON ({error}); the checkpoint is damaged, restore it from a copy") from error
    _check(isinstance(index, dict) and index.get("format") == FORMAT, where, f"is not a {FORMAT} index")
    version = index.get("version")
    _check(isinstance(version, int), where, "has no integer 'version'")
    if version > VERSION:
        raise CheckpointVersionError(
            f"{where} has format version {version}, newer than this dtensor_plus reads ({VERSION}); "
            f"upgrade dtensor_plus to load it"
        )
    files = index.get("files")
    _check(isinstance(files, dict), where, "has no 'files' table")
    for name, info in files.items():
        safe_file_path(directory, name, where)
        _check(isinstance(info, dict) and isinstance(info.get("crc32"), str) and _is_count(info.get("bytes")),
               where, f"has a malformed entry for file {name!r}")
    _check(isinstance(index.get("tensors"), list) and isinstance(index.get("values"), list), where, "lacks 'tensors' or 'values'")
    for entry in index["tensors"]:
        _check_tensor(entry, files, where)
    for entry in index["values"]:
        _check(isinstance(entry, dict) and _is_path(entry.get("path")) and "value" in entry, where,
               f"has a malformed value {entry!r:.200}")
    return index


def _check_tensor(entry, files, where: str) -> None:
    _check(isinstance(entry, dict) and _is_path(entry.get("path")), where, f"has a malformed tensor entry {entry!r:.200}")
    name = path_name(entry["path"])
    shape = entry.get("shape")
    _check(isinstance(shape, list) and all(_is_count(s) for s in shape), where, f"tensor {name}: malformed shape {shape!r}")
    _check(entry.get("dtype") in DTYPES, where, f"tensor {name}: unknown dtype {entry.get('dtype')!r} (known: {sorted(DTYPES)})")
    _check(isinstance(entry.get("chunks"), list), where, f"tensor {name}: no chunk list")
    for chunk in entry["chunks"]:
        _check(isinstance(chunk, dict) and chunk.get("file") in files and isinstance(chunk.get("key"), str), where,
               f"tensor {name}: a chunk names no file of the files table ({chunk!r:.200})")
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


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise CheckpointCorruptError(f"{where} {what}; the index is damaged or not written by dtensor_plus.checkpoint.save")
