"""The header that crosses a stage boundary once: the spec of the activation, as data only (JSON), never a pickle.

A pickle from the previous rank would let that peer run code on this one; a header here is a fixed-size uint8
buffer holding a 4-byte little-endian length and a UTF-8 JSON object of ints, strings, lists and null::

    {"format": "dtensor_plus.pipeline.header", "version": 1, "local_shape": [2, 6], "dtype": "float32",
     "global_shape": [4, 6], "stride": [6, 1], "mesh_dim_names": ["tp"], "placements": [{"kind": "shard", "dim": 0}]}

``decode`` accepts nothing else: every field is checked for its type and range, dtypes and placement kinds come
from fixed tables, and anything off raises ``ValueError`` naming the field (what a corrupt or hostile header gets).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from dtensor_plus.dtensor import DTensor
from dtensor_plus.placement_fields import from_fields, to_fields

__all__ = ["ActivationMeta", "HEADER_BYTES"]

HEADER_BYTES = 2048  # an activation spec of a few placements is ~200 bytes of JSON
_FORMAT, _VERSION = "dtensor_plus.pipeline.header", 1
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


@dataclass(frozen=True)
class ActivationMeta:
    """What the receiver of a stage boundary must know to rebuild the activation from its local shard."""

    local_shape: tuple[int, ...]
    dtype: torch.dtype
    global_shape: tuple[int, ...] | None = None  # None: a plain tensor (no DTensor layout)
    stride: tuple[int, ...] | None = None
    mesh_dim_names: tuple[str, ...] | None = None
    placements: tuple | None = None

    @staticmethod
    def of(t: torch.Tensor) -> ActivationMeta:
        if not isinstance(t, DTensor):
            return ActivationMeta(tuple(t.shape), t.dtype)
        spec = t._spec
        if not spec.mesh.mesh_dim_names:
            raise ValueError("an activation crossing a pipeline stage must live on a mesh with named dims")
        return ActivationMeta(tuple(t._local_tensor.shape), t.dtype, tuple(spec.shape), tuple(spec.tensor_meta.stride),
                              tuple(spec.mesh.mesh_dim_names), tuple(spec.placements))

    def encode(self) -> torch.Tensor:
        """The header buffer (``HEADER_BYTES`` uint8) carrying this spec as JSON."""
        fields = {"format": _FORMAT, "version": _VERSION, "local_shape": list(self.local_shape),
                  "dtype": str(self.dtype).removeprefix("torch."),
                  "global_shape": None if self.global_shape is None else list(self.global_shape),
                  "stride": None if self.stride is None else list(self.stride),
                  "mesh_dim_names": None if self.mesh_dim_names is None else list(self.mesh_dim_names),
                  "placements": None if self.placements is None else [to_fields(p) for p in self.placements]}
        payload = json.dumps(fields, separators=(",", ":")).encode()
        if len(payload) + 4 > HEADER_BYTES:
            raise ValueError(f"activation spec encodes to {len(payload)} bytes, more than the {HEADER_BYTES}-byte header")
        header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
        header[:4] = torch.tensor(list(len(payload).to_bytes(4, "little")), dtype=torch.uint8)
        header[4 : 4 + len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        return header

    @staticmethod
    def decode(header: torch.Tensor) -> ActivationMeta:
        """The spec in a received header; ``ValueError`` for anything but a well-formed one."""
        raw = bytes(header.to(torch.uint8).flatten().tolist())
        length = int.from_bytes(raw[:4], "little")
        if len(raw) < 4 or not 0 < length <= len(raw) - 4:
            raise ValueError(f"pipeline header: length field {length} does not fit a {len(raw)}-byte header "
                             "(not a dtensor_plus pipeline header, or one from another version)")
        try:
            fields = json.loads(raw[4 : 4 + length].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"pipeline header is not JSON ({error}); the previous stage must run this version of "
                             "dtensor_plus, which sends its activation spec as JSON, never as a pickle") from None
        return _meta_from_fields(fields)


def _meta_from_fields(fields) -> ActivationMeta:
    if not isinstance(fields, dict) or fields.get("format") != _FORMAT or fields.get("version") != _VERSION:
        head = repr(fields)[:80]
        raise ValueError(f"pipeline header {head} is not a {_FORMAT} version {_VERSION} header")
    known = {"format", "version", "local_shape", "dtype", "global_shape", "stride", "mesh_dim_names", "placements"}
    if set(fields) != known:
        raise ValueError(f"pipeline header has fields {sorted(fields)}; expected exactly {sorted(known)}")
    dtype = fields["dtype"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(f"pipeline header: dtype {dtype!r} is not a torch dtype name")
    local_shape = _ints(fields["local_shape"], "local_shape")
    layout = [fields[k] for k in ("global_shape", "stride", "mesh_dim_names", "placements")]
    if all(v is None for v in layout):
        return ActivationMeta(local_shape, _DTYPES[dtype])
    if any(v is None for v in layout):
        raise ValueError("pipeline header: global_shape, stride, mesh_dim_names and placements come all or none")
    global_shape, stride = _ints(layout[0], "global_shape"), _ints(layout[1], "stride")
    names = layout[2]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ValueError(f"pipeline header: mesh_dim_names {names!r} must be a list of distinct strings")
    if not isinstance(layout[3], list) or len(layout[3]) != len(names):
        raise ValueError(f"pipeline header: placements {layout[3]!r} must be a list, one per mesh dim {names}")
    if not len(local_shape) == len(global_shape) == len(stride):
        raise ValueError(f"pipeline header: local_shape {local_shape}, global_shape {global_shape} and stride {stride} "
                         "must have one entry per tensor dim")
    placements = tuple(from_fields(p, len(global_shape), "pipeline header") for p in layout[3])
    return ActivationMeta(local_shape, _DTYPES[dtype], global_shape, stride, tuple(names), placements)


def _ints(value, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise ValueError(f"pipeline header: {name} {value!r} must be a list of non-negative ints")
    return tuple(value)
