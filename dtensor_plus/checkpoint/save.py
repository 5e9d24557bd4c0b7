"""``save(state, path)``: every rank writes only its own shards (one safetensors file), rank 0 the index.

Steps, all ranks together (it is a collective: every rank calls it, with its own part of the state):

1. Describe: each tensor leaf becomes its global metadata and the runs of this rank's block (geometry.py). A
   Partial DTensor is reduced first (a collective on its mesh: the checkpoint holds values, not partial sums).
   A plain tensor's crc32 goes into the description (holders that disagree on its value fail the save).
2. Plan: every rank's description goes to every rank (JSON over ``World``); each rank merges them alike and
   checks them (same shape and dtype everywhere, equal values), so an error is raised on all ranks at once
   instead of leaving some waiting in a collective. Ranks holding the same block write it once: the replicas
   of a Replicate mesh dim, of a DTensor on a sub-mesh (``mesh["tp"]`` of a (dp, tp) mesh: each dp row holds
   the whole tensor) and of a plain tensor alike. The writer is picked by a hash of the key, so replicated
   state spreads over the replicas. The distinct blocks must hold each entry exactly once.
3. Write: this rank's chunks into ``<path>.tmp-<id>/rankNNNNN.safetensors``, each chunk's crc32 (digest.py).
4. Publish (atomic.py): checksums go to rank 0, which writes the index and its digest last and renames the
   directory into place; a status broadcast ends the save on every rank (a failure anywhere fails it everywhere).

A replica is trusted to hold its block's values, as a Replicate DTensor promises; which replica writes is not
specified (checking every replica would hash the whole state on every rank).

``async_save=True`` copies the chunks to host memory, runs step 3 in a background thread and returns an
``AsyncSave``; its ``wait()`` (a collective: call it on every rank, e.g. before the next save) runs step 4.
"""

from __future__ import annotations

import json
import os
import threading
import zlib

import torch

from ..dispatcher import DISPATCHER
from ..dtensor import DTensor
from ..placements import Replicate
from . import atomic, digest, geometry, index, tree, writer
from .errors import CheckpointSaveError
from .world import World

__all__ = ["save", "AsyncSave"]



def save(state: dict, path: str | os.PathLike, *, async_save: bool = False) -> AsyncSave | None:
    """Save a state dict of DTensors, plain tensors and JSON values as a sharded checkpoint directory.

    Args:
        state: nested dicts/lists, e.g. ``{"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7}``
            (``get_state_dict(model, optimizer)`` builds one keyed by parameter names). Collective: every rank
            calls save with its own state; DTensors may have any layout on any mesh.
        path: the checkpoint directory; replaced atomically if it exists.
        async_save: write in a background thread; returns an ``AsyncSave`` whose ``wait()`` publishes.

    Example::

        save({"model": model.state_dict(), "step": step}, f"ckpt/step{step}")
    """
    for pending in list(DISPATCHER.pending_saves):
        pending.wait()
    path = os.fspath(path)
    world = World()
    described, values, temp, error = [], [], None, None
    try:  # errors up to the exchange are reported to every rank there, so none is left waiting on this one
        leaves, values = tree.flatten(state)
        for p, t in leaves:  # checked before any collective (a Partial's reduction) runs
            index.dtype_name(t.dtype, f"tensor {index.path_name(p)}")
        temp = atomic.new_temp_dir(path) if world.rank == 0 else None
        described = [_describe(p, t) for p, t in leaves]
    except (TypeError, ValueError, OSError) as exc:
        error = f"rank {world.rank}: {type(exc).__name__}: {exc}"
    meshes: list[dict] = []  # each mesh once per rank: tensors refer to it by position
    for meta, _ in described:
        if meta.get("mesh") is not None:
            meta["mesh"] = _intern(meshes, meta["mesh"])
    mine = {"temp": temp, "error": error, "meshes": meshes, "tensors": [meta for meta, _ in described],
            "values": [{"path": list(p), "value": v} for p, v in values]}
    everyone = world.all_gather_json(mine)
    temp = everyone[0]["temp"]
    try:
        plan = _plan(everyone)
    except Exception:
        if world.rank == 0 and temp:
            atomic.discard(temp)
        raise
    chunks = _my_chunks(plan, described, world.rank)
    job = _Job(world, path, temp, plan)
    if not async_save:
        job.write(_host_copies(chunks, copy=False))
        job.publish()
        return None
    copies = _host_copies(chunks, copy=True)  # NOTE: device-to-host copy; training may mutate the originals
    handle = AsyncSave(job, copies)
    DISPATCHER.pending_saves.append(handle)
    return handle


class AsyncSave:
    """A save whose files are being written in the background. ``wait()`` (collective) publishes it."""

    def __init__(self, job: _Job, copies: dict):
        self._job, self._done = job, False
        self._thread = threading.Thread(target=job.write, args=(copies,), name="dtensor_plus-checkpoint-write", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Finish writing, then publish (every rank must call it: it exchanges checksums). Idempotent."""
        if self._done:
            return
        self._done = True
        if self in DISPATCHER.pending_saves:
            DISPATCHER.pending_saves.remove(self)
        self._thread.join()
        self._job.publish()


class _Job:
    """Steps 3 and 4 of one save on this rank."""

    def __init__(self, world: World, path: str, temp: str, plan: dict):
        self.world, self.path, self.temp, self.plan = world, path, temp, plan
        self.info: dict = {}

    def write(self, tensors: dict) -> None:
        name = _file_name(self.world.rank)
        try:
            if tensors:
                seeds = {c["key"]: digest.chunk_seed(c["key"], entry["dtype"], c["runs"])
                         for entry in self.plan["tensors"] for c in entry["chunks"] if c["file"] == name}
                crcs, size = writer.write_safetensors(os.path.join(self.temp, name), tensors, seeds)
                self.info = {"file": name, "bytes": size, "crc32": crcs}
            else:
                self.info = {"file": None}
        except Exception as exc:  # noqa: BLE001 - reported to every rank by publish()
            self.info = {"error": f"rank {self.world.rank} writing {name}: {type(exc).__name__}: {exc}"}

    def publish(self) -> None:
        infos = self.world.all_gather_json(self.info)
        errors = [info["error"] for info in infos if "error" in info]
        status, failure = (1, "; ".join(errors)) if errors else (0, "")
        if self.world.rank == 0:
            if not errors:
                try:
                    written = {i["file"]: i for i in infos if i.get("file")}
                    for entry in self.plan["tensors"]:
                        for chunk in entry["chunks"]:
                            chunk["crc32"] = written[chunk["file"]]["crc32"][chunk["key"]]
                    files = {name: {"bytes": i["bytes"]} for name, i in written.items()}
                    index.write_index(self.temp, {**self.plan, "files": files})
                    atomic.publish(self.temp, self.path)
                except Exception as exc:  # noqa: BLE001 - turned into the status every rank raises on
                    status, failure = 2, f"rank 0 publishing {self.path}: {type(exc).__name__}: {exc}"
            if status:
                atomic.discard(self.temp)
        status = self.world.broadcast_int(status)
        if status:
            failure = failure or "rank 0 could not publish the checkpoint (its error says why)"
            raise CheckpointSaveError(f"save to {self.path} failed, nothing was published (the previous checkpoint "
                                      f"there, if any, is untouched): {failure}")


# -- step 1: describe this rank's tensors -----------------------------------------------------------------------


def _describe(path: tuple, t: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
    """(JSON metadata with the runs of this rank's block, None where it holds none; the local tensor)."""
    name = index.path_name(path)
    meta = {"path": list(path), "shape": list(t.shape), "dtype": index.dtype_name(t.dtype, f"tensor {name}"),
            "dtensor": isinstance(t, DTensor)}
    if not isinstance(t, DTensor):  # saved once: its crc32 lets the plan check every holder has the same value
        local = t.detach()
        crc = zlib.crc32(local.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return {**meta, "runs": geometry.whole_runs(t.shape), "crc32": crc}, local
    t = t.detach()
    spec = t._spec
    if spec.has_partial():  # the checkpoint holds values: reduce partial sums first (a collective on its mesh)
        t = t.redistribute(placements=[Replicate() if p.is_partial() else p for p in spec.placements])
        spec = t._spec
    mesh, coordinate = spec.mesh, spec.mesh.get_coordinate()
    meta.update(placements=[index.encode_placement(p) for p in spec.placements], mesh=index.encode_mesh(mesh))
    if coordinate is None:
        return {**meta, "runs": None}, None
    return {**meta, "runs": geometry.local_runs(spec.shape, mesh.shape, spec.placements, coordinate)}, t._local_tensor


# -- step 2: merge every rank's description into the index's tensors and values --------------------------------


def _plan(everyone: list[dict]) -> dict:
    errors = [r["error"] for r in everyone if r["error"]]
    if errors:
        raise CheckpointSaveError("save failed before writing anything: " + "; ".join(errors))
    tensors: dict[tuple, dict] = {}
    holders: dict[tuple, list[tuple[int, dict]]] = {}
    meshes: list[dict] = []
    for rank, report in enumerate(everyone):
        for meta in report["tensors"]:
            key = tuple(meta["path"])
            if key not in tensors:
                tensors[key] = {k: meta.get(k) for k in ("path", "shape", "dtype", "placements")}
                tensors[key]["mesh"] = None if meta.get("mesh") is None else _intern(meshes, report["meshes"][meta["mesh"]])
            _check_same(meta, holders.get(key, [(rank, meta)])[0], rank)
            holders.setdefault(key, []).append((rank, meta))
    for key, entry in tensors.items():
        entry["chunks"] = _one_writer_per_block(key, holders[key])
        # One copy of a mesh partitions the tensor (geometry.py) and any other distinct block adds to the sum, so
        # sizes adding up is the check; cover_error (costlier, on every rank) then names the entry. Load checks
        # exact coverage itself, per target block, in any case.
        covered = sum(geometry.num_elements(c["runs"]) for c in entry["chunks"])
        if covered != _numel(entry["shape"]):
            problem = geometry.cover_error(entry["shape"], [c["runs"] for c in entry["chunks"]])
            raise CheckpointSaveError(
                f"tensor {index.path_name(key)} of shape {entry['shape']}: {problem}, held on ranks "
                f"{[r for r, _ in holders[key]]}; every rank holding part of a tensor must pass it to save(), "
                f"with the same layout on every copy of its mesh")
    return {"format": index.FORMAT, "version": index.VERSION, "world_size": len(everyone), "meshes": meshes,
            "tensors": list(tensors.values()), "values": _merge_values(everyone, set(tensors))}


def _one_writer_per_block(key: tuple, held: list[tuple[int, dict]]) -> list[dict]:
    """The chunks of a tensor: one per distinct non-empty block, written by one of the ranks holding it."""
    holders_of: dict[str, list[int]] = {}
    for rank, meta in held:
        if meta["runs"] is not None and geometry.num_elements(meta["runs"]):
            holders_of.setdefault(json.dumps(meta["runs"]), []).append(rank)
    # every block takes the same position among its holders: a tensor's blocks come from one replica, so a load
    # opens fewer files, while the key's hash spreads different tensors over the replicas
    pick = zlib.crc32(index.chunk_key(key).encode())
    return [{"file": _file_name(ranks[pick % len(ranks)]), "key": index.chunk_key(key), "runs": json.loads(runs)}
            for runs, ranks in holders_of.items()]


def _intern(table: list, item) -> int:
    """Position of ``item`` in ``table``, appended if new."""
    if item not in table:
        table.append(item)
    return table.index(item)


def _file_name(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def _check_same(meta: dict, first: tuple[int, dict], rank: int) -> None:
    for field in ("shape", "dtype", "dtensor"):
        if first[1][field] != meta[field]:
            what = {"dtensor": "a DTensor"}.get(field, f"global {field}")
            raise CheckpointSaveError(
                f"tensor {index.path_name(meta['path'])}: {field} is {meta[field]} on rank {rank} but {first[1][field]} "
                f"on rank {first[0]}; every rank must pass the same tensor (same {what}) under one key")
    if not meta["dtensor"] and first[1].get("crc32") != meta["crc32"]:
        raise CheckpointSaveError(
            f"plain tensor {index.path_name(meta['path'])} differs between rank {first[0]} and rank {rank}; a plain "
            f"tensor is saved once, as the value every rank holds: make it a DTensor, or save per-rank values under "
            f"per-rank keys")


def _merge_values(everyone: list[dict], tensor_keys: set) -> list[dict]:
    values: dict[tuple, dict] = {}
    for rank, report in enumerate(everyone):
        for item in report["values"]:
            key = tuple(item["path"])
            if key in tensor_keys:
                raise CheckpointSaveError(
                    f"{index.path_name(key)} is a tensor on some ranks and a plain value on rank {rank}; make it one or the other")
            seen = values.setdefault(key, item)
            if json.dumps(seen["value"]) != json.dumps(item["value"]):  # as text, so NaN equals NaN
                raise CheckpointSaveError(
                    f"value {index.path_name(key)} differs across ranks ({seen['value']!r} vs {item['value']!r} on rank "
                    f"{rank}); a checkpoint stores one value per key: make it equal, or store per-rank values under "
                    f"per-rank keys")
    return list(values.values())


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


# -- step 3: the tensors this rank writes ----------------------------------------------------------------------


def _my_chunks(plan: dict, described: list, rank: int) -> dict[str, torch.Tensor]:
    mine = _file_name(rank)
    writes = {c["key"] for entry in plan["tensors"] for c in entry["chunks"] if c["file"] == mine}
    keyed = ((index.chunk_key(meta["path"]), local) for meta, local in described)
    return {key: local for key, local in keyed if key in writes}


def _host_copies(chunks: dict, copy: bool) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; ``copy`` forces fresh copies (async save: the caller goes on mutating its own)."""
    return {key: torch.empty(t.shape, dtype=t.dtype).copy_(t) if copy or t.device.type != "cpu" else t.contiguous()
            for key, t in chunks.items()}
