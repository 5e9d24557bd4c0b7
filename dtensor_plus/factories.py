"""DTensor factories that build each rank's block locally, never the whole tensor (except strict-random)."""

from __future__ import annotations

from typing import Sequence

import torch

from . import random
from .dtensor import DTensor
from .mesh import mesh_or_current
from .placement_tuples import replicated
from .placements import Placement
from .redistribute import redistribute_local
from .spec import DTensorSpec, TensorMeta, normalize_placements

__all__ = ["zeros", "ones", "empty", "full", "rand", "randn"]


def _spec(size, device_mesh, placements, dtype) -> DTensorSpec:
    device_mesh = mesh_or_current(device_mesh, "a DTensor factory")
    shape = torch.Size(size[0] if len(size) == 1 and isinstance(size[0], (list, tuple, torch.Size)) else size)
    placements = placements if placements is not None else replicated(device_mesh.ndim)
    placements = normalize_placements(placements, device_mesh, len(shape))
    if any(p.is_partial() for p in placements):
        raise ValueError(f"factories build Shard/Replicate tensors, not {list(placements)}")
    dtype = dtype or torch.get_default_dtype()
    stride = torch.empty(shape, device="meta").stride()
    return DTensorSpec(device_mesh, placements, TensorMeta(shape, stride, dtype))


def _device(mesh) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device("cpu")


def _build(fill, size, device_mesh, placements, dtype, requires_grad) -> DTensor:
    spec = _spec(size, device_mesh, placements, dtype)
    device_mesh = spec.mesh  # the entered one when none was passed
    local_shape = spec.local_shape_and_offset()[0] if device_mesh.get_coordinate() is not None else (0,)
    local = fill(local_shape, dtype=spec.dtype, device=_device(device_mesh))
    return DTensor(local, spec, requires_grad=requires_grad)


def zeros(*size, device_mesh=None, placements: Sequence[Placement] | None = None, dtype=None, requires_grad=False):
    return _build(torch.zeros, size, device_mesh, placements, dtype, requires_grad)


def ones(*size, device_mesh=None, placements: Sequence[Placement] | None = None, dtype=None, requires_grad=False):
    return _build(torch.ones, size, device_mesh, placements, dtype, requires_grad)


def empty(*size, device_mesh=None, placements: Sequence[Placement] | None = None, dtype=None, requires_grad=False):
    return _build(torch.empty, size, device_mesh, placements, dtype, requires_grad)


def full(size, fill_value, *, device_mesh=None, placements: Sequence[Placement] | None = None, dtype=None, requires_grad=False):
    def fill(shape, dtype, device):
        return torch.full(shape, fill_value, dtype=dtype, device=device)

    return _build(fill, (size,), device_mesh, placements, dtype, requires_grad)


def _random(draw, size, device_mesh, placements, dtype, requires_grad) -> DTensor:
    spec = _spec(size, device_mesh, placements, dtype)
    device_mesh = spec.mesh  # the entered one when none was passed
    if random.is_strict():  # the single-device draw, then this rank's block of it
        whole = draw(spec.shape, dtype=spec.dtype, device=_device(device_mesh))
        local = redistribute_local(whole, spec.with_placements(replicated(device_mesh.ndim)), spec.placements)
        return DTensor(local.clone(), spec, requires_grad=requires_grad)
    with random.rng_for((spec,)):
        local = draw(spec.local_shape_and_offset()[0], dtype=spec.dtype, device=_device(device_mesh))
    return DTensor(local, spec, requires_grad=requires_grad)


def rand(*size, device_mesh=None, placements: Sequence[Placement] | None = None, dtype=None, requires_grad=False):
    return _random(torch.rand, size, device_mesh, placements, dtype, requires_grad)


def randn(*size, device_mesh=None, placements: Sequence[Placement] | None = None, dtype=None, requires_grad=False):
    return _random(torch.randn, size, device_mesh, placements, dtype, requires_grad)
