"""The OpInfo sweep through dtensor_plus and through torch.distributed.tensor, side by side.

    python benchmarks/op_sweep.py --full --out docs/op_coverage.md      # both libraries, same cases
    python benchmarks/op_sweep.py --ops add,mm,cumsum --out /tmp/cov.md

The engine is dtensor_plus.testing.opinfo; this file adds the peer backend (PyTorch's own DTensor, which the
library itself never imports) and passes it as ``--peer op_sweep:TORCH``. The ranks import this file by
that name: run it as a script from the repository root so benchmarks/ is on their sys.path.
"""

from __future__ import annotations

import contextlib

import torch


class _TorchDTensor:
    """The sweep's backend methods (mesh, distribute, is_distributed, full, layout, counting) for torch.distributed.tensor."""

    def __init__(self):
        self._meshes = {}

    def mesh(self, mesh_shape):
        from torch.distributed.device_mesh import init_device_mesh
        # torch creates new process groups for every mesh it builds: build each shape once per rank.
        if tuple(mesh_shape) not in self._meshes:
            self._meshes[tuple(mesh_shape)] = init_device_mesh("cpu", tuple(mesh_shape))
        return self._meshes[tuple(mesh_shape)]

    def distribute(self, tensor, mesh, layout):
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

        whole = tensor.detach()
        plain = [Shard(int(t[1:])) if t.startswith("S") else Replicate() for t in layout]
        dt = distribute_tensor(whole, mesh, plain, src_data_rank=None)
        if any(t.startswith("P") for t in layout):
            # rank 0 of each partial mesh dim holds the value; the others zeros (sum), the value (avg) or
            # the value moved away from the extreme (max: minus one, min: plus one)
            local = dt.to_local()
            for mesh_dim, token in enumerate(layout):
                if token.startswith("P") and mesh.get_local_rank(mesh_dim) != 0:
                    local = {"P": torch.zeros_like(local), "Pavg": local, "Pmax": local - 1, "Pmin": local + 1}[token]
            placements = [Partial(t[1:] or "sum") if t.startswith("P") else p for t, p in zip(layout, plain)]
            dt = DTensor.from_local(local, mesh, placements, shape=whole.shape, stride=whole.stride())
        return dt.detach().requires_grad_(tensor.requires_grad)

    def is_distributed(self, value) -> bool:
        from torch.distributed.tensor import DTensor
        return isinstance(value, DTensor)

    def full(self, value):
        return value.full_tensor() if self.is_distributed(value) else value

    def layout(self, value) -> tuple[str, ...]:
        from dtensor_plus.testing.opinfo_backend import layout_tokens
        return layout_tokens(value.placements)

    @contextlib.contextmanager
    def counting(self):
        yield lambda: set()  # no fallback path: an op without a strategy raises


TORCH = _TorchDTensor()


if __name__ == "__main__":
    import sys

    from dtensor_plus.testing.opinfo_table import main

    main(sys.argv[1:] + ([] if "--peer" in sys.argv else ["--peer", "op_sweep:TORCH"]))
