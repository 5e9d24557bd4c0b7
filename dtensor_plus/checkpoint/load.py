"""``load(state, path)``: fill a state dict in place from a checkpoint, resharding to the layout each target has.

Every rank reads and checks the index itself (index.py: its digest, keys, paths; loading never needs the
saving mesh). For each tensor in ``state`` the rank computes the runs its own block covers (geometry.py),
checks that the saved chunks overlapping them hold each of its entries exactly once, and reads each
overlapping box (reader.py checks the chunk against the index first: its file, dtype, shape and crc32). So
any save layout loads into any other layout, mesh or world size; a plain tensor (no DTensor, e.g. one process
without torch.distributed) receives the whole value. Nothing is unpickled: the index is JSON and tensors come
from safetensors.

With torch.distributed initialised, load is a collective, like save: after loading, the ranks exchange their
outcome (two small all-gathers), so a damaged chunk that only one rank reads fails the load on every rank,
instead of letting the others go on to train (or wait in a collective) beside a rank that failed.
"""

from __future__ import annotations

import os

import torch

from ..dtensor import DTensor
from . import atomic, errors, geometry, index, tree
from .errors import CheckpointCorruptError, CheckpointError, CheckpointKeyError, CheckpointMismatchError
from .reader import ChunkReader
from .world import World

__all__ = ["load"]

_SHOWN = 8  # keys listed in a missing/unexpected-keys message before "... and N more"


def load(state: dict, path: str | os.PathLike, *, strict: bool = True, verify: bool = True) -> None:
    """Load the checkpoint at ``path`` into ``state`` in place.

    Tensors (DTensors in any layout, or plain tensors) are overwritten in place with the saved values of the same
    global shape and dtype; other leaves (step counts, hyperparameters) are replaced by the saved values.

    Args:
        state: the same nesting of keys as was saved, e.g. ``{"model": model.state_dict(), ...}``.
        path: a checkpoint directory written by ``save``.
        strict: if False, keys the checkpoint has but ``state`` lacks are ignored (missing keys always raise).
        verify: check each chunk's crc32 before using it (reads each chunk this rank needs whole, once, rather
            than only the box it needs). The index's digest, file sizes, dtypes, shapes and coverage are always
            checked. ``verify=False`` also admits a format-1 checkpoint (written before checksums).

    Raises (on every rank, when any rank fails): ``CheckpointKeyError``, ``CheckpointMismatchError`` (the state
    does not fit the checkpoint), ``CheckpointCorruptError`` (the checkpoint was damaged or edited), all of them
    ``CheckpointError``, a ``ValueError``; ``FileNotFoundError`` where there is no checkpoint.

    Example::

        state = {"model": model.state_dict(), "step": 0}
        load(state, "ckpt/step100")        # model's parameters now hold the saved values; state["step"] == 100
    """
    path = os.fspath(path)
    world = World()
    error = None
    try:
        _load(state, path, strict, verify)
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the other ranks, then re-raised
        error = exc
    _fail_together(world, path, error)


def _load(state: dict, path: str, strict: bool, verify: bool) -> None:
    if not os.path.lexists(os.path.join(path, index.INDEX_NAME)):
        raise FileNotFoundError(atomic.missing_checkpoint_message(path))
    saved_index = index.read_index(path, verify)
    leaves, values = tree.flatten(state)
    saved = {tuple(e["path"]): e for e in saved_index["tensors"]}
    saved_values = {tuple(v["path"]): v["value"] for v in saved_index["values"]}
    _check_keys(path, leaves, values, saved, saved_values, strict)
    reader = ChunkReader(path, saved_index["files"], verify)
    with torch.no_grad():
        for key, target in leaves:
            _load_tensor(target, saved[key], reader)
    for key, _ in values:
        tree.set_value(state, key, saved_values[key])


def _fail_together(world: World, path: str, error: Exception | None) -> None:
    """Raise on every rank if the load failed on any: its own error where it failed, else one naming the ranks
    that failed and the first one's error, of the same class where that class is a plain checkpoint error."""
    reports = world.all_gather_json(None if error is None else [type(error).__name__, str(error)])
    if error is not None:
        raise error
    failed = [rank for rank, report in enumerate(reports) if report]
    if not failed:
        return
    kind, message = reports[failed[0]]
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, CheckpointError)) or cls is CheckpointKeyError:
        cls = CheckpointError  # a key error carries per-rank key lists; other errors are not the checkpoint's
    raise cls(f"loading {path} failed on rank(s) {failed} (this rank's state may be partly loaded; load again "
              f"once it is fixed): rank {failed[0]}: {kind}: {message}")


def _check_keys(path, leaves, values, saved, saved_values, strict: bool) -> None:
    for key, target in leaves:
        if key in saved_values:
            raise CheckpointMismatchError(f"{index.path_name(key)}: the state holds a tensor but the checkpoint at {path} "
                                          f"a plain value ({saved_values[key]!r:.80}); load it into a non-tensor")
    for key, value in values:
        if key in saved:
            raise CheckpointMismatchError(f"{index.path_name(key)}: the state holds {value!r:.80} but the checkpoint at "
                                          f"{path} a tensor; put a tensor of shape {saved[key]['shape']} there")
    wanted = {key for key, _ in leaves} | {key for key, _ in values}
    have = set(saved) | set(saved_values)
    missing = sorted(index.path_name(k) for k in wanted - have)
    unexpected = sorted(index.path_name(k) for k in have - wanted) if strict else []
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} keys of the state are not in the checkpoint: {_list(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} keys of the checkpoint are not in the state: {_list(unexpected)}")
    hint = ("; build the state the way it was built for save (an optimizer has no state before its first step: "
            "get_state_dict(model, optimizer) creates it), or pass strict=False to ignore keys only the checkpoint has")
    raise CheckpointKeyError(f"cannot load {path}: " + "; ".join(parts) + hint, missing, unexpected)


def _list(names: list[str]) -> str:
    more = f" ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _load_tensor(target: torch.Tensor, entry: dict, reader: ChunkReader) -> None:
    name = index.path_name(entry["path"])
    if list(target.shape) != entry["shape"]:
        raise CheckpointMismatchError(
            f"tensor {name}: the checkpoint holds shape {entry['shape']}, the state {list(target.shape)}; load into "
            f"a tensor of the saved global shape (its layout may differ, its global shape may not)")
    if target.dtype != index.DTYPES[entry["dtype"]]:
        raise CheckpointMismatchError(
            f"tensor {name}: the checkpoint holds {entry['dtype']}, the state {target.dtype}; load into a "
            f"{entry['dtype']} tensor and cast afterwards (load never casts silently)")
    if isinstance(target, DTensor):
        spec = target._spec
        coordinate = spec.mesh.get_coordinate()
        if coordinate is None:
            return  # this rank holds no block of it
        runs, local = geometry.local_runs(spec.shape, spec.mesh.shape, spec.placements, coordinate), target._local_tensor
    else:
        runs, local = geometry.whole_runs(target.shape), target
    overlaps = [(chunk, geometry.overlap(runs, chunk["runs"])) for chunk in entry["chunks"]]
    pieces = [(chunk, triples) for chunk, triples in overlaps if triples is not None]  # a 0-d tensor's is []
    _check_cover(entry, runs, [triples for _, triples in pieces], reader.directory)
    for chunk, triples in pieces:
        _copy_overlap(local, triples, lambda box, chunk=chunk: reader.read(entry, chunk, box))
    if isinstance(target, DTensor):
        _partial_blocks(local, spec, coordinate)


def _check_cover(entry: dict, runs, pieces: list, directory: str) -> None:
    """The chunks overlapping a target block must fill each of its entries exactly once, before any is copied: a
    gap would leave an entry as it was, an overlap would let the later chunk win (an edited or damaged index)."""
    local = [[[(dst, n) for dst, _, n in dim] for dim in triples] for triples in pieces]
    problem = geometry.cover_error(geometry.local_shape(runs), local, target=runs)
    if problem is not None:
        raise CheckpointCorruptError(
            f"{os.path.join(directory, index.INDEX_NAME)}: tensor {index.path_name(entry['path'])} of shape "
            f"{entry['shape']}: {problem}; the index is damaged or was not written by save: restore the "
            f"checkpoint from a copy")


def _partial_blocks(local: torch.Tensor, spec, coordinate) -> None:
    """A Partial target holds, per rank, a block whose reduction is the saved value (Partial.partition)."""
    for mesh_dim, p in enumerate(spec.placements):
        if p.is_partial():
            block = p.partition(local, spec.mesh.shape[mesh_dim], coordinate[mesh_dim])
            if block is not local:
                local.copy_(block)


def _copy_overlap(local: torch.Tensor, triples, read) -> None:
    """Copy the saved entries ``triples`` name (per dim: (dst, src, length) runs) into ``local``: one box read,
    then a slice copy, or an indexed one where a dim has several runs (strided blocks)."""
    lows = [min(src for _, src, _ in dim) for dim in triples]
    values = read(tuple(slice(lo, max(src + n for _, src, n in dim)) for lo, dim in zip(lows, triples)))
    dst_index = []
    for d, (lo, dim) in enumerate(zip(lows, triples)):
        if len(dim) == 1:
            dst, src, n = dim[0]
            values = values.narrow(d, src - lo, n)
            dst_index.append(slice(dst, dst + n))
        else:
            values = values.index_select(d, torch.cat([torch.arange(src - lo, src - lo + n) for _, src, n in dim]))
            dst_index.append(torch.cat([torch.arange(dst, dst + n) for dst, _, n in dim]))
    if all(isinstance(i, slice) for i in dst_index):
        local[tuple(dst_index)].copy_(values)
        return
    ndim = len(dst_index)
    grid = []
    for d, i in enumerate(dst_index):
        i = torch.arange(i.start, i.stop) if isinstance(i, slice) else i
        grid.append(i.view([-1 if k == d else 1 for k in range(ndim)]).to(local.device))
    local.index_put_(tuple(grid), values.to(local.device))
