"""An element-wise optimizer steps DTensor parameters on their local blocks: those ``replicate`` lays out (its
``local_compute``) and ``ZeroRedundancyOptimizer``'s dp-sharded masters (ZeRO-1/2's inner step).

Why: AdamW written per parameter (foreach=False) issues about ten ops per parameter; on DTensor parameters each
is a dispatch that only says "the same op on every block", which cost data parallelism several times DDP's
optimizer step. For an optimizer whose update of each element reads only that element (SGD, Adam, AdamW,
Adagrad, RMSprop, Adamax, NAdam, RAdam), the step on each block is the block of the step on the whole, whatever
the layout (Replicate, Shard on dp, uneven blocks), once each gradient and each state tensor is in its
parameter's layout: replicate's buckets and ZeRO's reduce-scatter leave every gradient reduced, not Partial. So
a global optimizer-step pre-hook swaps, for the step only, every parameter a layout tagged (``_dtp_local_step``:
replicate's parameters, ZeRO-1/2's masters) for its local block, its gradient and its state tensors for
theirs; the post-hook swaps back, wrapping state tensors the step created as DTensors in the parameter's layout.
Between steps nothing changed: parameters, gradients and optimizer state are DTensors in their layouts.

An optimizer steps on DTensors as before when it is another class (LAMB's norms or Muon's matrices read more
than one element; ZeroRedundancyOptimizer itself reduce-scatters, its inner optimizer is the one stepped
here), when one of its parameters is a DTensor no layout tagged, when a gradient is not in its parameter's
layout (still Partial: reduce_in_backward=False without sync_gradients), so that the DTensor ops reduce it as
before, or when a state tensor is not in its parameter's layout (e.g. loaded from another layout's state dict).
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from dtensor_plus.dtensor import DTensor
from dtensor_plus.spec import DTensorSpec, TensorMeta

__all__ = ["TAG", "install", "ELEMENTWISE"]

TAG = "_dtp_local_step"  # on a Parameter's __dict__: replicate or ZeRO laid it out, its step may run on its block
_SWAPPED = "_dtp_local_step_swapped"  # on an optimizer during its step: what _stepped found
ELEMENTWISE = tuple(getattr(torch.optim, name) for name in
                    ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam"))
_PER_ELEMENT = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "grad_avg",
                          "sum", "exp_inf"})
_installed: list = []  # the two hook handles, once per process


def install() -> None:
    """Register the global step hooks (once)."""
    if not _installed:
        _installed.extend([register_optimizer_step_pre_hook(_pre_step), register_optimizer_step_post_hook(_post_step)])


def _stepped(optimizer) -> list | None:
    """What the step swaps, or None if it must stay on DTensors: per group (group, its parameter list, the
    list the step sees: each stepped parameter's local block in its place), then per stepped parameter (the
    parameter, its gradient's block, its state as a DTensor dict, that state's blocks). One pass, no mutation:
    a parameter that keeps the step on DTensors leaves everything as it was."""
    if type(optimizer) not in ELEMENTWISE:
        return None
    state, groups, found = optimizer.state, [], []
    for group in optimizer.param_groups:
        params = group["params"]
        seen = list(params)
        for i, p in enumerate(params):
            if not isinstance(p, DTensor):
                continue
            if not p.__dict__.get(TAG):
                return None
            grad = p.grad
            if grad is None:
                continue
            if not isinstance(grad, DTensor):
                return None
            if grad._spec is not p._spec and grad._spec.placements != p._spec.placements:  # `is`: replicate's
                return None
            before = state.get(p)
            blocks = _state_blocks(before, p) if before else None
            if before and blocks is None:
                return None
            seen[i] = p._local_tensor
            found.append((p, grad._local_tensor, before, blocks))
        groups.append((group, params, seen))
    return (groups, found) if found else None


def _state_blocks(state: dict, p: DTensor) -> dict | None:
    """``p``'s state with each tensor as its block, to step alongside ``p``'s: a DTensor in ``p``'s layout gives
    its block, a plain scalar (the step count) stays. None if a state is in another layout (or a plain whole
    tensor): the step stays on DTensors."""
    blocks = {}
    for key, value in state.items():
        if isinstance(value, DTensor):
            spec = value._spec
            if spec is not p._spec and (spec.placements != p._spec.placements or spec.shape != p._spec.shape
                                        or spec.mesh != p._spec.mesh):  # `is`: the common case, made below
                return None
            value = value._local_tensor
        elif isinstance(value, torch.Tensor) and value.ndim:
            return None
        blocks[key] = value
    return blocks


def _pre_step(optimizer, args, kwargs) -> None:
    stepped = _stepped(optimizer)
    if stepped is None:
        return
    groups, found = stepped
    state = optimizer.state
    for group, _, seen in groups:
        group["params"] = seen  # a new list: the user's list object comes back untouched after the step
    for p, grad, _, blocks in found:
        local = p._local_tensor
        local.grad = grad
        if blocks is not None:
            state[local] = blocks
    optimizer.__dict__[_SWAPPED] = stepped


def _post_step(optimizer, args, kwargs) -> None:
    swapped = optimizer.__dict__.pop(_SWAPPED, None)
    if swapped is None:
        return
    groups, found = swapped
    state = optimizer.state
    for group, params, _ in groups:
        group["params"] = params
    for p, _, before, _ in found:
        local = p._local_tensor
        local.grad = None
        after = state.pop(local, None)
        if not after:
            continue
        if before is None:
            before = state[p] = {}
        for key, value in after.items():
            held = before.get(key)
            # Updated in place (exp_avg.lerp_, step += 1): the DTensor (or scalar) held before holds it still
            if held is not value and not (isinstance(held, DTensor) and held._local_tensor is value):
                before[key] = _as_dtensor(key, value, local, p._spec)


def _as_dtensor(key: str, value, local: torch.Tensor, spec: DTensorSpec):
    """A state tensor shaped like the parameter's block (exp_avg, momentum_buffer) as a DTensor in the
    parameter's layout; anything else (the step count, NAdam's mu_product) as it is."""
    if not isinstance(value, torch.Tensor) or isinstance(value, DTensor) or value.shape != local.shape:
        return value
    if not value.ndim and key not in _PER_ELEMENT:  # a 0-d parameter: only its per-element state is laid out
        return value
    if value.dtype != spec.dtype:
        meta = spec.tensor_meta
        spec = DTensorSpec(spec.mesh, spec.placements, TensorMeta(meta.shape, meta.stride, value.dtype))
    return DTensor(value, spec)
