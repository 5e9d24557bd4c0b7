"""ZeRO stages 1 and 2: ``ZeroRedundancyOptimizer`` steps any ``torch.optim`` optimizer on dp-sharded fp32 master
copies of ``Replicate`` parameters, so its state is sharded on the dp mesh dim.

Communication is bucketed (``redistribute_together``): stage 1 reduce-scatters every gradient in ``step()`` in
one flat reduce-scatter per (mesh dim, dtype) and all-gathers the updated shards back in one flat all-gather;
stage 2 reduce-scatters gradients during backward, a bucket at a time (post-accumulate-grad hooks collect
gradients until ``bucket_cap_mb`` fills; the end of backward flushes the rest), and leaves the reduced shards
on the masters (``opt.masters[i].grad``; the replicated parameter's ``.grad`` is freed)::

    distribute_module(model, mesh)                  # parameters Replicate on dp
    opt = ZeroRedundancyOptimizer(model.parameters(), mesh, torch.optim.AdamW, stage=2, lr=1e-3)
    model(x).sum().backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import torch
from torch import nn

from dtensor_plus.dtensor import DTensor
from dtensor_plus.redistribute import redistribute_together

from .zero_placement import CPUOffload, check_dp_placement, dp_mesh_dim, on_device, with_placement, zero_placement

__all__ = ["ZeroRedundancyOptimizer"]


class ZeroRedundancyOptimizer:
    """ZeRO stage 1 or 2 around any ``torch.optim`` optimizer: it steps on dp-sharded master copies of
    ``Replicate`` parameters, so its state is sharded on the dp mesh dim.

    Args:
        params: the model's parameters, DTensors ``Replicate`` on the dp mesh dim (``distribute_module``); plain
            tensors are taken as replicated.
        mesh: the device mesh.
        optimizer_class: e.g. ``torch.optim.AdamW``; built on the master shards with ``**defaults``.
        stage: 1 (gradients reduce-scattered in ``step``) or 2 (reduce-scattered in buckets during backward).
        mesh_dim: the data-parallel mesh dim, needed only on a mesh of more than one dim.
        bucket_cap_mb: stage 2: reduce-scatter once this many MiB of gradients wait (DDP's default, 25).
        offload: ``CPUOffload()``: the masters, their gradients and the optimizer state live in host memory and
            the optimizer steps there; reduced gradient shards are copied to the host, updated shards back to
            the parameters' device for the all-gather.

    Traffic per step (bytes B per parameter): one reduce-scatter and one all-gather, each (n-1)/n x B, in
    one collective per bucket instead of one per parameter.

    Example::

        opt = ZeroRedundancyOptimizer(model.parameters(), mesh, torch.optim.AdamW, stage=2, lr=1e-3)
        model(x).sum().backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, params, mesh, optimizer_class=torch.optim.AdamW, *, stage: int = 2, mesh_dim=None,
                 bucket_cap_mb: float = 25, offload: CPUOffload | None = None, **defaults):
        if stage not in (1, 2):
            raise ValueError(f"ZeroRedundancyOptimizer takes stage=1 or 2, got {stage}; for stage 3 use fully_shard(module, mesh)")
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
        if offload is not None and not isinstance(offload, CPUOffload):
            raise TypeError(f"offload must be a CPUOffload, got {type(offload).__name__}")
        self.offload = offload
        self.stage, self.mesh = stage, mesh
        self.mesh_dim = dp_mesh_dim(mesh, mesh_dim)
        self.params = [p for p in params if p.requires_grad]
        for p in self.params:
            if not isinstance(p, DTensor):
                raise TypeError("ZeroRedundancyOptimizer needs DTensor parameters; place the model with distribute_module(model, mesh)")
            check_dp_placement(p, self.mesh_dim, "ZeroRedundancyOptimizer")
        self.masters = [self._master(p) for p in self.params]
        self._master_of = {id(p): m for p, m in zip(self.params, self.masters)}
        self.optimizer = optimizer_class(self.masters, **defaults)
        self._cap_bytes, self._waiting, self._waiting_bytes = bucket_cap_mb * 2**20, [], 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._add_to_bucket) for p in self.params] if stage == 2 else []

    def _master(self, p: DTensor) -> nn.Parameter:
        # Replicate -> Shard is a local chunk: no communication; clone so the master owns its storage.
        shard = p.detach().redistribute(placements=with_placement(p.placements, self.mesh_dim, zero_placement(p, self.mesh_dim)))
        master = DTensor(shard._local_tensor.clone(), shard._spec)
        if self.offload is not None:
            master = on_device(master, "cpu", self.offload.pin_memory)
        return nn.Parameter(master)

    # -- stage 2: gradients reduce-scattered in buckets during backward ------------------------------------

    def _add_to_bucket(self, p: DTensor) -> None:
        # Hooks fire in the same order on every rank (same graph), so every rank flushes the same buckets.
        if not self._waiting:  # the end of this backward flushes whatever is left
            torch.autograd.Variable._execution_engine.queue_callback(self._flush)
        self._waiting.append(p)
        self._waiting_bytes += p.grad._local_tensor.numel() * p.grad.element_size()
        if self._waiting_bytes >= self._cap_bytes:
            self._flush()

    def _flush(self) -> None:
        params, self._waiting, self._waiting_bytes = self._waiting, [], 0
        self._reduce_into_masters(params)

    def _reduce_into_masters(self, params) -> None:
        """Reduce-scatter the gradients of ``params`` (one collective per bucket) and add each reduced shard to
        its master's gradient (accumulation across backwards); the whole gradient is freed."""
        params = [p for p in params if p.grad is not None]
        masters = [self._master_of[id(p)] for p in params]
        shards = redistribute_together([p.grad for p in params], [m.placements for m in masters])
        for p, master, shard in zip(params, masters, shards):
            p.grad = None
            shard = shard.to(master.device, master.dtype)  # offload: the device-to-host copy
            if master.grad is None:
                master.grad = DTensor(shard, master._spec)
            else:
                master.grad._local_tensor.add_(shard)

    @torch.no_grad()
    def step(self, closure=None):
        """Reduce-scatter the gradients still whole (stage 1: all of them), step the wrapped optimizer on the
        shards, all-gather the updated shards into the parameters (one collective per bucket)."""
        if closure is not None:
            raise ValueError("ZeroRedundancyOptimizer.step does not take a closure; call backward before step()")
        self._flush()
        self._reduce_into_masters(self.params)
        self.optimizer.step()
        sources = [on_device(m, p.device) for p, m in zip(self.params, self.masters)]  # offload: host-to-device
        wholes = redistribute_together(sources, [p.placements for p in self.params])  # all-gather on dp
        for p, whole in zip(self.params, wholes):
            p._local_tensor.copy_(whole)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        """Load the inner optimizer's state; the master shards are re-taken from the parameters, which a
        checkpoint load has just filled in place (a local chunk each, no communication): otherwise the next
        step would start from the stale masters and overwrite the loaded parameters."""
        self.optimizer.load_state_dict(state_dict)
        with torch.no_grad():
            for p, master in zip(self.params, self.masters):
                master._local_tensor.copy_(self._master(p)._local_tensor)
