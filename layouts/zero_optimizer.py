"""ZeRO stages 1 and 2: ``ZeroRedundancyOptimizer`` steps any ``torch.optim`` optimizer on dp-sharded fp32 master
copies of ``Replicate`` parameters, so its state is sharded on the dp mesh dim.

Communication is bucketed (collectives.py's flat reduce-scatter and all-gather; each parameter's move decided
once, at ``add_param_group``, as ``redistribute_together`` would decide it every step; that function takes
the rest): stage 1 reduce-scatters every gradient in ``step()`` in one flat reduce-scatter per (mesh dim,
dtype) and all-gathers the updated shards back in one flat all-gather;
stage 2 reduce-scatters gradients during backward, a bucket at a time (post-accumulate-grad hooks collect
gradients until ``bucket_cap_mb`` fills: dtensor_plus/buckets.py's ``BackwardBuckets``; the end of backward
flushes the rest), and leaves the reduced shards on the masters (``opt.masters[i].grad``; the replicated
parameter's ``.grad`` is freed). Parameter groups work as in torch.optim: each becomes a group of the wrapped
optimizer on its masters, with the user's options. An element-wise wrapped optimizer (SGD, Adam, AdamW, ...)
steps the masters on their local blocks, with no per-op DTensor dispatch (layouts/local_step.py: the reduced
gradients and the state are in each master's layout, so each block's step is the block of the whole step)::

    replicate(model, mesh, reduce_in_backward=False)  # parameters Replicate on dp, gradients left Partial
    opt = ZeroRedundancyOptimizer(model.parameters(), mesh, torch.optim.AdamW, stage=2, lr=1e-3)
    model(x).sum().backward(); opt.step(); opt.zero_grad()

With an element-wise wrapped optimizer and no offload, the masters are views of one flat buffer per dtype
(layouts/zero_flat.py): the reduce-scatter's output is the flat gradient, the wrapped optimizer steps one
tensor per (group, dtype) instead of one per parameter (layouts/zero_flat_state.py; its state stays per
parameter, DTensor views of the flat state), and the all-gather sends the buffer itself.

``replicate(..., reduce_in_backward=False)`` runs forward and backward on each rank's rows, without DTensor dispatch
on dp (layouts/data_local.py), and leaves each gradient Partial on dp for ZeRO to reduce-scatter;
``distribute_module(model, mesh)`` gives the same steps with every op dispatched on the whole mesh.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from dtensor_plus import collectives
from dtensor_plus.buckets import BackwardBuckets, all_reduce_flat
from dtensor_plus.dtensor import DTensor
from dtensor_plus.placements import Partial
from dtensor_plus.redistribute import redistribute_together

from . import local_step
from .data_local import GRADIENT_OWNER
from .zero_flat import FlatMasters
from .zero_flat_state import FlatState
from .zero_placement import (
    CPUOffload, check_dp_placement, dp_mesh_dim_index, on_device, with_placement, zero_placement,
)

__all__ = ["ZeroRedundancyOptimizer"]


class ZeroRedundancyOptimizer(torch.optim.Optimizer):
    """ZeRO stage 1 or 2 around any ``torch.optim`` optimizer: it steps on dp-sharded master copies of
    ``Replicate`` parameters, so its state is sharded on the dp mesh dim.

    Args:
        params: the model's parameters, DTensors ``Replicate`` on the dp mesh dim (``distribute_module``), or
            parameter groups as torch.optim takes them: dicts with ``"params"`` and their own options
            (``{"params": no_decay, "weight_decay": 0.0}``). Parameters that do not require grad are left out.
        mesh: the device mesh.
        optimizer_class: e.g. ``torch.optim.AdamW``; built on the master shards with ``**defaults``.
        stage: 1 (gradients reduce-scattered in ``step``) or 2 (reduce-scattered in buckets during backward).
        mesh_dim: the data-parallel mesh dim, needed only on a mesh of more than one dim.
        bucket_cap_mb: stage 2: reduce-scatter once this many MiB of gradients wait (DDP's default, 25).
        offload: ``CPUOffload()``: the masters, their gradients and the optimizer state live in host memory and
            the optimizer steps there; reduced gradient shards are copied to the host, updated shards back to
            the parameters' device for the all-gather.

    It is a ``torch.optim.Optimizer``: ``param_groups`` hold the model's parameters and every option of the
    wrapped optimizer's groups, copied into them before each step, so an LR scheduler (or a hand-written
    ``group["lr"] = ...``) takes effect; ``state[p]`` is the wrapped optimizer's state of ``p``'s master shard.

    Traffic per step (bytes B per parameter): one reduce-scatter and one all-gather, each (n-1)/n x B, in
    one collective per bucket instead of one per parameter.

    Example::

        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        opt = ZeroRedundancyOptimizer(groups, mesh, torch.optim.AdamW, stage=2, lr=1e-3)
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
        local_step.install()  # the inner element-wise optimizer steps the masters on their blocks
        self.stage, self.mesh = stage, mesh
        self.mesh_dim = dp_mesh_dim_index(mesh, mesh_dim)
        self.optimizer_class, self._inner_defaults = optimizer_class, defaults
        self.optimizer = None  # the wrapped optimizer, built on the first group's masters
        self.params, self.masters, self._master_of = [], [], {}
        self._on_dp = {}  # id(parameter) -> its move on dp alone, decided once (``_dp_move``), or None
        self._after = {}  # (parameter spec, gradient spec) -> ``_reductions_after``'s answer
        self._listed = set()  # ids of every parameter given, frozen ones too (torch refuses them twice as well)
        # The flat master buffer (zero_flat.py): for an element-wise optimizer stepping on the mesh's device.
        self._flat_eligible = optimizer_class in local_step.ELEMENTWISE and offload is None and mesh.size(self.mesh_dim) > 1
        self._flat, self._flat_state, self._group_indices, self._index = None, None, [], {}
        # Stage 2: gradients reduce-scattered a full bucket at a time during backward, the rest when it ends.
        self._buckets = BackwardBuckets(bucket_cap_mb * 2**20,
                                        start=lambda _key, params: self._reduce_into_masters(params))
        super().__init__(params, defaults)  # calls add_param_group for each group
        self.defaults = self.optimizer.defaults  # every option, the wrapped class's own defaults included
        self.state = _StateByParam(self)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group of parameters with its own options (``torch.optim.Optimizer.add_param_group``), e.g. a
        layer unfrozen during fine-tuning: their master shards join the wrapped optimizer as a new group."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params, names = _params_and_names(param_group["params"])
        self._check_new(params)
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        params = [params[i] for i in trainable]
        masters = [self._master(p) for p in params]
        group = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
        group["params"] = masters if names is None else [(names[i], m) for i, m in zip(trainable, masters)]
        if self.optimizer is None:
            self.optimizer = self.optimizer_class([group], **self._inner_defaults)
        else:
            self.optimizer.add_param_group(group)
        # The user's group: the wrapped optimizer's options (its defaults filled in) around the model's parameters.
        self.param_groups.append({**self.optimizer.param_groups[-1], "params": params})
        self.params += params
        self.masters += masters
        self._master_of.update((id(p), m) for p, m in zip(params, masters))
        self._on_dp.update((id(p), self._dp_move(p, m)) for p, m in zip(params, masters))
        first = len(self.params) - len(params)  # this group's position in self.params
        self._group_indices.append(list(range(first, len(self.params))))
        self._index.update((id(p), first + k) for k, p in enumerate(params))
        for p in params:
            self._own_gradient(p)
        if self._flat_eligible:
            self._build_flat()

    def _build_flat(self) -> None:
        """Lay the masters out in flat buffers (again, when a group joins): their values and any gradient
        already reduced move into the new buffers; the state is copied into flat form at the next step."""
        old = self._flat
        self._flat = FlatMasters(self.params, self.masters, self._group_indices,
                                 [self._on_dp[id(p)] for p in self.params], self.mesh, self.mesh_dim)
        self._flat_state = FlatState(self._flat)
        if old is None:
            return
        for m in old.members:
            if m is not None and old.received[m.index]:
                self._flat.add_shard(m.index, m.view(old.grads[m.dtype]))
                master = self.masters[m.index]
                if master.grad is not None:
                    master.grad = self._flat.grad_dtensor(m.index, master._spec)

    def _own_gradient(self, p: DTensor) -> None:
        """Stage 2: reduce-scatter ``p``'s gradient into our master from its post-accumulate-grad hook. The newest
        optimizer built on a parameter owns its gradient: an older one's hook (a ZeroRedundancyOptimizer built
        again on the same model, e.g. to load a state dict) is removed, or it would take the gradient away."""
        old = getattr(p, "_zero_grad_hook", None)
        if old is not None:
            old.remove()
        # Under replicate(reduce_in_backward=False) ``p`` computes through a local leaf whose gradient reaches it
        # Partial on dp, hooks run as autograd's would (layouts/data_local.py): no autograd Function per parameter
        p.__dict__[GRADIENT_OWNER] = True
        p._zero_grad_hook = p.register_post_accumulate_grad_hook(self._add_to_bucket) if self.stage == 2 else None

    def _check_new(self, params) -> None:
        # One master and one optimizer state per parameter: a parameter listed twice would be stepped twice.
        position = {}
        for k, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"a parameter group holds {type(p).__name__} at position {k}; it takes tensors (parameters)")
            if id(p) in self._listed:
                raise ValueError(
                    f"some parameters appear in more than one parameter group: the parameter of shape "
                    f"{tuple(p.shape)} at position {k} of the new group is in an earlier group; list each parameter once"
                )
            if id(p) in position:
                raise ValueError(
                    f"a parameter group lists the parameter of shape {tuple(p.shape)} twice (positions "
                    f"{position[id(p)]} and {k}); list it once (model.parameters() lists tied weights once)"
                )
            position[id(p)] = k
        for p in params:
            if not p.requires_grad:
                continue
            if not isinstance(p, DTensor):
                raise TypeError("ZeroRedundancyOptimizer needs DTensor parameters; place the model with distribute_module(model, mesh)")
            check_dp_placement(p, self.mesh_dim, "ZeroRedundancyOptimizer")
        self._listed.update(position)

    def _master(self, p: DTensor) -> nn.Parameter:
        # Replicate -> Shard is a local chunk: no communication; clone so the master owns its storage.
        shard = p.detach().redistribute(placements=with_placement(p.placements, self.mesh_dim, zero_placement(p, self.mesh_dim)))
        master = DTensor(shard._local_tensor.clone(), shard._spec)
        if self.offload is not None:
            master = on_device(master, "cpu", self.offload.pin_memory)
        master = nn.Parameter(master)
        # Its gradient arrives reduced in its layout, so an element-wise inner optimizer steps it on its block
        master.__dict__[local_step.TAG] = True
        return master

    def _dp_move(self, p: DTensor, master: DTensor):
        """(tensor dim d, p's size on d) when ``p``'s master is Shard(d) on dp, so the master comes back by ONE
        all-gather on dp and a gradient Partial(sum) on dp reaches it by one reduce-scatter of the local block
        along d (no other mesh dim splits d: zero_placement picks such a d, so the local block is whole on d);
        None for a Replicate master. Made once: the specs are fixed, and redistribute_together would plan
        every tensor's move again each step."""
        placement = master.placements[self.mesh_dim]
        if not placement.is_shard() or self.mesh.size(self.mesh_dim) == 1:
            return None
        d = placement.normalized(p.ndim).dim
        return d, p.shape[d]

    def _reductions_after(self, grad: DTensor, master: DTensor):
        """The all-reduces (mesh dim, op) that follow the reduce-scatter on dp for ``grad`` to reach ``master``'s
        layout (a norm's weight under sequence parallelism: Partial on tp too), or None when it takes another
        move than those (left to redistribute_together)."""
        got, want, after = grad._spec.placements, master._spec.placements, []
        for k, (g, m) in enumerate(zip(got, want)):
            if k == self.mesh_dim:
                if g != Partial():
                    return None
            elif g != m:
                if not (g.is_partial() and m.is_replicate()):
                    return None
                after.append((k, g.reduce_op))
        return tuple(after)

    def _reduce_scatter(self, params) -> list:
        """The gradients of ``params`` reduce-scattered onto their masters' layouts as redistribute_together
        would (one flat reduce-scatter on dp per dtype, then the all-reduces on other mesh dims bucketed by
        kind: the same collectives and bytes), with each parameter's decision made once."""
        direct, other, out = {}, [], [None] * len(params)
        for i, p in enumerate(params):
            move, grad = self._on_dp[id(p)], p.grad
            after = None
            if move is not None:
                key = (p._spec, grad._spec)  # both hashed once: replicate's leaves reuse one gradient spec
                after = self._after.get(key, self)
                if after is self:
                    after = self._after[key] = self._reductions_after(grad, self._master_of[id(p)])
            if after is None:
                other.append(i)
            else:
                direct.setdefault(grad.dtype, []).append((i, move[0], after))
        for members in direct.values():
            index, dims, afters = zip(*members)
            grads = [params[i].grad._local_tensor for i in index]
            for i, shard in zip(index, collectives.reduce_scatter_flat(grads, self.mesh, self.mesh_dim, dims, "sum")):
                out[i] = shard
            by_kind: dict = {}
            for i, after in zip(index, afters):
                if after:
                    by_kind.setdefault(after, []).append(i)
            for after, kind in by_kind.items():
                for i, shard in zip(kind, all_reduce_flat([out[i] for i in kind], self.mesh, after)):
                    out[i] = shard
        if other:
            targets = [self._master_of[id(params[i])].placements for i in other]
            for i, shard in zip(other, redistribute_together([params[i].grad for i in other], targets)):
                out[i] = shard
        return out

    def _all_gather(self) -> list:
        """The updated master shards gathered back into every parameter's layout (one all-gather per dtype;
        the offloaded shards copied to the parameters' device first)."""
        direct, other, out = {}, [], [None] * len(self.params)
        for i, (p, m) in enumerate(zip(self.params, self.masters)):
            move = self._on_dp[id(p)]
            (direct.setdefault(m.dtype, []) if move is not None else other).append(i)
        sources = self.masters if self.offload is None else [on_device(m, p.device) for p, m in zip(self.params, self.masters)]
        for members in direct.values():
            dims, sizes = zip(*[self._on_dp[id(self.params[i])] for i in members])
            wholes = collectives.all_gather_flat([sources[i]._local_tensor for i in members], self.mesh, self.mesh_dim,
                                                 dims, sizes)
            for i, whole in zip(members, wholes):
                out[i] = whole
        if other:
            for i, whole in zip(other, redistribute_together([sources[i] for i in other], [self.params[i].placements for i in other])):
                out[i] = whole
        return out

    # -- stage 2: gradients reduce-scattered in buckets during backward ------------------------------------

    def _add_to_bucket(self, p: DTensor) -> None:
        # One bucket for every gradient (key None): _reduce_scatter splits it by dtype (and move).
        self._buckets.add(None, p, p.grad._local_tensor.numel() * p.grad.element_size())

    def _reduce_into_masters(self, params) -> None:
        """Reduce-scatter the gradients of ``params`` (one collective per bucket) and add each reduced shard to
        its master's gradient (accumulation across backwards); the whole gradient is freed."""
        params = [p for p in params if p.grad is not None]
        if self._flat is not None:
            return self._reduce_into_flat(params)
        masters = [self._master_of[id(p)] for p in params]
        for p, master, shard in zip(params, masters, self._reduce_scatter(params)):
            p.grad = None
            if self.offload is not None or shard.dtype != master.dtype:
                shard = shard.to(master.device, master.dtype)  # offload: the device-to-host copy
            if master.grad is None:
                master.grad = DTensor(shard, master._spec)
            else:
                master.grad._local_tensor.add_(shard)

    def _reduce_into_flat(self, params) -> None:
        """``_reduce_into_masters`` with the flat buffer: gradients Partial on dp of packed masters in one
        reduce-scatter per dtype straight into the flat gradient; any other move by redistribute_together."""
        direct, other = [], []
        for p in params:
            i, grad = self._index[id(p)], p.grad
            after = None
            if self._flat.members[i].dim is not None:
                key = (p._spec, grad._spec)
                after = self._after.get(key, self)
                if after is self:
                    after = self._after[key] = self._reductions_after(grad, self.masters[i])
            (other.append(i) if after is None else direct.append((i, grad._local_tensor, after)))
        self._flat.reduce_scatter(direct)
        if other:
            moved = redistribute_together([self.params[i].grad for i in other], [self.masters[i].placements for i in other])
            for i, shard in zip(other, moved):
                self._flat.add_shard(i, shard)  # a local block
        for p in params:
            p.grad = None
        if self.stage == 2:  # the reduced shards on the masters, as without the flat buffer
            for i in [i for i, _, _ in direct] + other:
                self.masters[i].grad = self._flat.grad_dtensor(i, self.masters[i]._spec)

    def _gather_unpacked(self) -> None:
        """The masters the flat buffer does not pack (Replicate on dp) back into their parameters."""
        unpacked = self._flat.unpacked
        if unpacked:
            wholes = redistribute_together([self.masters[i] for i in unpacked], [self.params[i].placements for i in unpacked])
            for i, whole in zip(unpacked, wholes):
                self.params[i]._local_tensor.copy_(whole)  # a local block

    @torch.no_grad()
    def step(self, closure=None):
        """Reduce-scatter the gradients still whole (stage 1: all of them), step the wrapped optimizer on the
        shards with the options of ``param_groups``, all-gather the updated shards into the parameters (one
        collective per bucket)."""
        if closure is not None:
            raise ValueError("ZeroRedundancyOptimizer.step does not take a closure; call backward before step()")
        self._buckets.flush()
        self._reduce_into_masters(self.params)
        _copy_options(self.param_groups, self.optimizer.param_groups)  # an LR scheduler changed ours
        if self._flat is not None:
            self._flat_state.step(self.optimizer, self.masters)
            self._flat.all_gather_into(self.params)
            self._gather_unpacked()
            return
        self.optimizer.step()
        for p, whole in zip(self.params, self._all_gather()):  # all-gather on dp (offload: host-to-device first)
            p._local_tensor.copy_(whole)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        if self._flat is not None:
            self._flat.clear_grads(set_to_none)
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict (its groups and indices are ours: the same order), with the options
        of ``param_groups``; the state tensors are the master shards' (DTensors, Shard on dp)."""
        _copy_options(self.param_groups, self.optimizer.param_groups)
        state_dict = self.optimizer.state_dict()
        if self._flat is not None:  # a segment's scalars are one tensor: each parameter gets its own copy
            state_dict["state"] = {i: {k: v.clone() if type(v) is torch.Tensor and not v.ndim else v for k, v in s.items()}
                                   for i, s in state_dict["state"].items()}
        return state_dict

    def load_state_dict(self, state_dict) -> None:
        """Load the wrapped optimizer's state and the groups' options; the master shards are re-taken from the
        parameters, which a checkpoint load has just filled in place (a local chunk each, no communication):
        otherwise the next step would start from the stale masters and overwrite the loaded parameters."""
        self.optimizer.load_state_dict(state_dict)
        _copy_options(self.optimizer.param_groups, self.param_groups)
        with torch.no_grad():
            for p, master in zip(self.params, self.masters):
                master._local_tensor.copy_(self._master(p)._local_tensor)


def _params_and_names(params) -> tuple[list, list | None]:
    """A group's parameters as a list, and their names when given as (name, tensor) pairs (as torch.optim takes)."""
    if isinstance(params, torch.Tensor):
        return [params], None
    if isinstance(params, set):
        raise TypeError("optimizer parameters need to be an ordered collection (a list), not a set: a set's order "
                        "differs between runs and ranks")
    params = list(params)
    named = [isinstance(p, tuple) for p in params]
    if not any(named):
        return params, None
    if not all(named):
        raise ValueError("a parameter group mixes (name, tensor) pairs and bare tensors; give names to all or none")
    return [p for _, p in params], [name for name, _ in params]


def _copy_options(source_groups, target_groups) -> None:
    """Every option but the parameters, group by group (ours and the wrapped optimizer's are in the same order)."""
    for source, target in zip(source_groups, target_groups):
        target.update((k, v) for k, v in source.items() if k != "params")


class _StateByParam(Mapping):
    """The wrapped optimizer's state keyed by the model's parameters (as torch.optim's is keyed by those in its
    ``param_groups``) as well as by the master shards it steps; read through on every access, so it follows
    a ``load_state_dict`` that replaces the wrapped optimizer's state."""

    def __init__(self, zero: ZeroRedundancyOptimizer):
        self._zero = zero

    def __getitem__(self, param):
        master = self._zero._master_of.get(id(param))
        if master is None and any(param is m for m in self._zero.masters):  # keyed by the master itself
            master = param
        if master is None:
            raise KeyError(f"no optimizer state for a tensor of shape {tuple(param.shape)}: not one of this "
                           f"optimizer's parameters")
        return self._zero.optimizer.state[master]

    def __iter__(self):
        state = self._zero.optimizer.state
        return iter([p for p, m in zip(self._zero.params, self._zero.masters) if m in state])

    def __len__(self) -> int:
        return sum(1 for _ in self)
