"""DTensorSpec = mesh + placements + global tensor metadata. Hashable: the material of every cache key.

The spec also answers the geometric questions every layer asks: which slice of the global tensor a
mesh coordinate holds (``local_shape_and_offset``), with several mesh dims sharding one tensor dim nested in
mesh-dim order (the earlier mesh dim splits first; the later one splits each piece again).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .placements import Placement, Replicate, Shard, StridedShard, chunk_bounds
from .torch_interop import check_mesh_is_ours, is_torch_placement, placement_from_torch

__all__ = ["TensorMeta", "DTensorSpec", "normalize_placements", "local_shape_and_offset", "replicate_all"]


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Global shape, stride and dtype of a distributed tensor."""

    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype

    @staticmethod
    def of(tensor: torch.Tensor) -> TensorMeta:
        return TensorMeta(tensor.shape, tensor.stride(), tensor.dtype)


class DTensorSpec:
    """Where a distributed tensor lives (mesh, one placement per mesh dim) and what it is (TensorMeta)."""

    __slots__ = ("mesh", "placements", "tensor_meta", "_hash")

    def __init__(self, mesh, placements: tuple[Placement, ...], tensor_meta: TensorMeta):
        self.mesh = mesh
        self.placements = placements
        self.tensor_meta = tensor_meta
        self._hash = hash((mesh, placements, tensor_meta))

    @property
    def shape(self) -> torch.Size:
        return self.tensor_meta.shape

    @property
    def ndim(self) -> int:
        return len(self.tensor_meta.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor_meta.dtype

    def with_placements(self, placements: Sequence[Placement]) -> DTensorSpec:
        return DTensorSpec(self.mesh, tuple(placements), self.tensor_meta)

    def sharded_mesh_dims(self, dim: int) -> list[int]:
        """Mesh dims that shard tensor dim ``dim``, outermost first."""
        return [k for k, p in enumerate(self.placements) if p.is_shard(dim)]

    def has_partial(self) -> bool:
        return any(p.is_partial() for p in self.placements)

    def local_shape_and_offset(self, coordinate=None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shape and global offset of the block held at ``coordinate`` (default: this rank's)."""
        coordinate = self.mesh.get_coordinate() if coordinate is None else coordinate
        return local_shape_and_offset(self.shape, self.mesh.shape, self.placements, coordinate)

    def __eq__(self, other) -> bool:
        return self is other or (
            isinstance(other, DTensorSpec)
            and self._hash == other._hash
            and self.placements == other.placements
            and self.tensor_meta == other.tensor_meta
            and self.mesh == other.mesh
        )

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"DTensorSpec({list(self.placements)}, shape={tuple(self.shape)}, {self.dtype})"


def local_shape_and_offset(shape, mesh_shape, placements, coordinate) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Pure geometry: the block of a ``shape`` tensor that ``coordinate`` holds under ``placements``.

    A StridedShard dim has a local size but no single offset (its rows are strided): its offset stays 0.
    """
    sizes, offsets = list(shape), [0] * len(shape)
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            d = placement.dim
            start, length = chunk_bounds(sizes[d], mesh_shape[mesh_dim], coordinate[mesh_dim])
            sizes[d], offsets[d] = length, offsets[d] + start
        elif isinstance(placement, StridedShard):
            d = placement.dim
            sizes[d] = placement.local_size(sizes[d], mesh_shape[mesh_dim], coordinate[mesh_dim])
    return tuple(sizes), tuple(offsets)


def normalize_placements(placements: Sequence[Placement], mesh, ndim: int) -> tuple[Placement, ...]:
    """Validate user placements against a mesh and a tensor rank; negative Shard dims become positive."""
    if isinstance(placements, Placement) or is_torch_placement(placements):
        raise TypeError(f"placements must be a sequence with one placement per mesh dim, e.g. [{placements!r}]")
    placements = tuple(placements)
    if len(placements) != mesh.ndim:
        raise ValueError(
            f"{len(placements)} placements {list(placements)} given for a {mesh.ndim}-d mesh {mesh.shape}; "
            f"give exactly one placement per mesh dim"
        )
    check_mesh_is_ours(mesh)
    out = []
    for p in placements:
        if not isinstance(p, Placement):
            p = placement_from_torch(p) or p  # torch.distributed.tensor's Shard/Replicate/Partial mean the same
        if not isinstance(p, Placement):
            raise TypeError(
                f"{p!r} (a {type(p).__module__}.{type(p).__qualname__}) is not a placement; use dtensor_plus's "
                f"Shard(dim), Replicate() or Partial(reduce_op)"
            )
        out.append(p.normalized(ndim) if isinstance(p, Shard) else p)
    return tuple(out)


def replicate_all(mesh) -> tuple[Placement, ...]:
    return (Replicate(),) * mesh.ndim

