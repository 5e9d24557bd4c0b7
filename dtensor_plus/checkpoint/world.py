"""The few whole-world exchanges a save needs: every rank's JSON metadata to every rank, and one status int.

They go through ``collectives.py`` on a 1-d mesh over all ranks (the default group, so no new process group),
as uint8 tensors holding JSON: no pickle crosses the wire either. Without torch.distributed (or on one rank)
they are local no-ops, so a single process saves and loads with no process group at all.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from .. import collectives
from ..mesh import DeviceMesh

__all__ = ["World"]


class World:
    """This process's rank and world size, and the metadata collectives over the whole world."""

    def __init__(self):
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.size = dist.get_world_size() if self.distributed else 1
        # NCCL moves only CUDA tensors; the metadata then travels through the GPU (a few KiB)
        device_type = "cuda" if self.distributed and dist.get_backend() == "nccl" else "cpu"
        self.device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
        self.mesh = DeviceMesh(device_type, list(range(self.size)), ["world"]) if self.size > 1 else None

    def all_gather_json(self, obj) -> list:
        """Every rank's ``obj`` (JSON-able), in rank order, on every rank: two all-gathers (sizes, bytes)."""
        if self.mesh is None:
            return [json.loads(json.dumps(obj))]
        data = json.dumps(obj, separators=(",", ":")).encode()
        sizes = collectives.all_gather_sizes([len(data)], self.mesh, 0)[:, 0].tolist()
        longest = max(sizes)
        buffer = torch.zeros(longest, dtype=torch.uint8)
        buffer[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else buffer[:0]
        gathered = collectives.all_gather(buffer.to(self.device), self.mesh, 0, 0, longest * self.size).cpu()
        rows = gathered.view(self.size, longest)
        return [json.loads(rows[r, : sizes[r]].numpy().tobytes()) for r in range(self.size)]

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (also the barrier that ends a save)."""
        if self.mesh is None:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        return int(collectives.broadcast(t, self.mesh, 0, 0).item())
