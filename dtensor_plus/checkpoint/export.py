"""``export_safetensors(model, file)``: a model's whole weights as one safetensors file, as Hugging Face's
``model.safetensors``, whatever the layout that trained it.

The sharded checkpoint (save.py) is for resuming: one file per rank, an index, any layout back into any layout.
An export is for the world outside: one file of whole tensors under the model's own ``state_dict`` names, which
``safetensors.torch.load_file`` reads back equal to the model's state dict on one device and ``from_pretrained``
loads. Every DTensor is made whole (``full_tensor``: a collective on its mesh, Partial ones reduced), one entry
at a time in the state dict's order, and rank 0 alone writes (writer.py: the same writer the checkpoint uses),
into a temporary file renamed into place, so the file is the old one or the new one, never a piece.

It is a collective: every rank calls it with its own model (the same keys; pipeline stages, which hold different
keys, save with ``save``). Rank 0 holds the whole model in host memory while writing. Tied weights (one tensor
under several names, as a T5's shared embedding and head) are written under each name, as ``state_dict`` lists
them. The file's metadata holds ``{"format": "pt"}``, which ``from_pretrained`` expects.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..dtensor import DTensor
from . import index, writer
from .world import World

__all__ = ["export_safetensors"]


def export_safetensors(model: nn.Module | dict, file: str | os.PathLike) -> None:
    """Write ``model``'s state dict (or a flat ``{name: tensor}`` dict) as whole tensors to one safetensors ``file``.

    Raises:
        ValueError: on every rank, if the ranks hold different keys, a value is not a tensor or has a dtype
            safetensors cannot store.
        OSError: on every rank, if rank 0 cannot write the file.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    world = World()
    problem = _problem(state)
    keys_everywhere = world.all_gather_json({"keys": list(state), "problem": problem})
    problems = [f"rank {r}: {k['problem']}" for r, k in enumerate(keys_everywhere) if k["problem"]]
    if problems:
        raise ValueError(f"export_safetensors: {'; '.join(problems)}")
    if any(k["keys"] != keys_everywhere[0]["keys"] for k in keys_everywhere):
        raise ValueError("export_safetensors: the ranks hold different state dict keys (pipeline stages?); every rank "
                         "must pass the whole model's keys, or save a sharded checkpoint with checkpoint.save")
    whole = {}
    for name, t in state.items():  # in the same order on every rank: each full_tensor is a collective
        t = t.detach()
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if world.rank == 0:
            whole[name] = t.cpu().contiguous()
    failure = None
    if world.rank == 0:
        try:
            _write(os.fspath(file), whole)
        except OSError as error:
            failure = error
    if world.broadcast_int(int(failure is not None)):  # no rank returns before the file is in place, or fails alone
        raise failure or OSError(f"export_safetensors: rank 0 could not write {os.fspath(file)!r} (its error says why)")


def _problem(state: dict) -> str | None:
    """What makes ``state`` unexportable on this rank, or None; told to every rank before any collective."""
    for name, t in state.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            return f"entry {name!r} is a {type(t).__name__}, not a tensor under a string name"
        try:
            index.dtype_name(t.dtype, f"tensor {name!r}")  # a dtype safetensors cannot hold
        except TypeError as error:
            return str(error)
    return None


def _write(file: str, tensors: dict[str, torch.Tensor]) -> None:
    temp = f"{file}.tmp-{os.getpid()}"
    try:
        writer.write_safetensors(temp, tensors, dict.fromkeys(tensors, 0), metadata={"format": "pt"})
        os.replace(temp, file)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
