"""An element-wise optimizer steps DTensor parameters on their local blocks: those ``replicate`` lays out (its
``local_compute``), ``ZeroRedundancyOptimizer``'s dp-sharded masters (ZeRO-1/2's inner step), and any other
DTensor parameter with no Partial in its layout once a layout installed the hooks (``parallelize_module``'s
tensor-parallel weights and the replicated rest).

Why: AdamW written per parameter (foreach=False) issues about ten ops per parameter; on DTensor parameters each
is a dispatch that only says "the same op on every block", which cost data parallelism several times DDP's
optimizer step. For an optimizer whose update of each element reads only that element (SGD, Adam, AdamW,
Adagrad, RMSprop, Adamax, NAdam, RAdam), the step on each block is the block of the step on the whole, whatever
the layout (Replicate, Shard on dp, uneven blocks), once each gradient and each state tensor is in its
parameter's layout: replicate's buckets and ZeRO's reduce-scatter leave every gradient reduced, not Partial. So
a global optimizer-step pre-hook swaps, for the step only, every DTensor parameter (none with a Partial
placement: a Partial block is no block of the whole) for its local block, its gradient and its state tensors
for theirs; the post-hook swaps back, wrapping state tensors the step created as DTensors in the parameter's
layout. The tag ``_dtp_local_step`` marks what a layout placed (replicate's parameters, ZeRO-1/2's masters).
Between steps nothing changed: parameters, gradients and optimizer state are DTensors in their layouts.

What the swap finds is remembered on the optimizer (``_Memo``) and checked each step by identity only, in
bulk: the same groups holding the same parameters, the same parameters holding gradients, each gradient in
its parameter's layout (the parameter's own spec object, as replicate's flat buckets give it), and per
parameter the same state dict holding the same values. The element-wise optimizers update their state
tensors in place (exp_avg.lerp_, step += 1), so the dicts of blocks handed to one step hold the blocks of
that state at the next: per step nothing is made but the step's record, and no Python runs per parameter
beyond setting and clearing its block's .grad. Anything else (a group added, a parameter replaced, a
gradient missing or in another layout, a state dict loaded or a state tensor set by hand, a state the step
created) fails a check and the step is worked out afresh, as above; a ``load_state_dict`` forgets the memo
at once (it holds the old state).
"""

from __future__ import annotations

from itertools import chain, compress
from operator import attrgetter, is_

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from dtensor_plus.dtensor import DTensor
from dtensor_plus.spec import DTensorSpec, TensorMeta

__all__ = ["TAG", "install", "ELEMENTWISE"]

TAG = "_dtp_local_step"  # on a Parameter's __dict__: replicate or ZeRO laid it out, its step may run on its block
_SWAPPED = "_dtp_local_step_swapped"  # on an optimizer during its step: (its _Swap, the gradients' blocks)
_MEMO = "_dtp_local_step_memo"  # on an optimizer: its _Memo (None once load_state_dict forgot it)
ELEMENTWISE = tuple(getattr(torch.optim, name) for name in
                    ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam"))
_PER_ELEMENT = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "grad_avg",
                          "sum", "exp_inf"})
_GRAD, _SPEC, _LOCAL = attrgetter("grad"), attrgetter("_spec"), attrgetter("_local_tensor")
_installed: list = []  # the two hook handles, once per process


def install() -> None:
    """Register the global step hooks (once)."""
    if not _installed:
        _installed.extend([register_optimizer_step_pre_hook(_pre_step), register_optimizer_step_post_hook(_post_step)])


def _same(a, b) -> bool:
    """Whether two sequences hold the same objects in the same order (identity: no tensor comparison)."""
    return len(a) == len(b) and all(map(is_, a, b))


def _values(dicts) -> tuple:
    """Every value of ``dicts`` (None for no dict skipped), in order: what a check of their contents compares."""
    return tuple(chain.from_iterable(map(dict.values, filter(None, dicts))))


class _Memo:
    """An optimizer's groups as the swap last found them (each group, its parameter list and that list's
    parameters), its DTensor parameters with their places, and the last step's swap (``last``)."""

    def __init__(self, optimizer):
        self.param_groups = optimizer.param_groups
        self.groups = [(group, group["params"], tuple(group["params"])) for group in self.param_groups]
        places = [(g, i) for g, (_, _, params) in enumerate(self.groups) for i, p in enumerate(params)
                  if isinstance(p, DTensor)]
        self.params = [self.groups[g][2][i] for g, i in places]
        self.places = places
        # A Partial parameter's blocks sum to it: an element-wise update of each is not the update of the sum.
        self.steppable = not any(p._spec.has_partial() for p in self.params)
        self.last: _Swap | None = None

    def fits(self, optimizer) -> bool:
        groups = optimizer.param_groups
        return groups is self.param_groups and len(groups) == len(self.groups) and all(
            group is held_group and group["params"] is params and _same(params, held)
            for group, (held_group, params, held) in zip(groups, self.groups))


class _Swap:
    """What one step swaps: the parameters holding gradients (``present`` per DTensor parameter of the memo),
    their blocks, per group with one of them the list the step sees (each one's block in its
    place), per DTensor parameter its state dict (None: none) and every value those held, and per stepped
    parameter the dict of its state's blocks handed to the step (None: the step creates the state)."""

    def __init__(self, memo: _Memo, present: list, helds: list, blocks: list):
        self.present, self.helds, self.blocks = present, helds, blocks
        self.stepped = list(compress(memo.params, present))
        self.locals = list(map(_LOCAL, self.stepped))
        self.held_values, self.block_values = _values(helds), _values(blocks)
        self.with_state = [(local, b) for local, b in zip(self.locals, blocks) if b is not None]
        seen: dict = {}
        for (g, i), local in zip(compress(memo.places, present), self.locals):
            group, params, _ = memo.groups[g]
            if g not in seen:
                seen[g] = (group, params, list(params))
            seen[g][2][i] = local
        self.seen = list(seen.values())

    def holds(self, grads: list, helds: list) -> bool:
        """Whether this step finds what the last one did (the module docstring's checks, by identity)."""
        if [g is not None for g in grads] != self.present or not _same(helds, self.helds):
            return False
        try:  # each gradient in its parameter's layout by identity: its spec the parameter's own
            in_layout = _same(list(map(_SPEC, compress(grads, self.present))), list(map(_SPEC, self.stepped)))
        except AttributeError:  # a plain tensor: no spec
            return False
        return (in_layout and _same(_values(helds), self.held_values)
                and _same(list(map(_LOCAL, self.stepped)), self.locals))


def _memo(optimizer) -> _Memo:
    """The optimizer's memo, made again when its groups changed (a group added, a parameter replaced)."""
    memo = optimizer.__dict__.get(_MEMO, False)
    if memo is False:  # its first step here: a load_state_dict will forget the memo (and the old state it holds)
        optimizer.register_load_state_dict_pre_hook(_forget)
    if not memo or not memo.fits(optimizer):
        memo = optimizer.__dict__[_MEMO] = _Memo(optimizer)
    return memo


def _forget(optimizer, state_dict) -> None:
    optimizer.__dict__[_MEMO] = None


def _stepped(optimizer) -> tuple | None:
    """What the step swaps (the last step's _Swap while it holds, else a new one) and the gradients' blocks;
    None if the step must stay on DTensors. No mutation of the optimizer."""
    if type(optimizer) not in ELEMENTWISE:
        return None
    memo = _memo(optimizer)
    if not memo.steppable:
        return None
    grads, helds = list(map(_GRAD, memo.params)), list(map(optimizer.state.get, memo.params))
    swap = memo.last
    if swap is None or not swap.holds(grads, helds):
        swap = memo.last = _find(memo, grads, helds)
        if swap is None:
            return None
    return swap, list(map(_LOCAL, compress(grads, swap.present)))


def _find(memo: _Memo, grads: list, helds: list) -> _Swap | None:
    """The step's swap worked out parameter by parameter: None if one keeps the step on DTensors (a gradient
    not in its parameter's layout, a state tensor not in it) or none holds a gradient."""
    present, blocks = [], []
    for p, grad, held in zip(memo.params, grads, helds):
        present.append(grad is not None)
        if grad is None:
            continue
        if not isinstance(grad, DTensor) or (grad._spec is not p._spec and grad._spec.placements != p._spec.placements):
            return None
        state_blocks = _state_blocks(held, p) if held else None
        if held and state_blocks is None:
            return None
        blocks.append(state_blocks)
    return _Swap(memo, present, helds, blocks) if blocks else None


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
    swap, grads = stepped
    for group, _, seen in swap.seen:
        group["params"] = seen  # another list: the user's list object comes back untouched after the step
    for local, grad in zip(swap.locals, grads):
        local.grad = grad
    optimizer.state.update(swap.with_state)
    optimizer.__dict__[_SWAPPED] = stepped


def _post_step(optimizer, args, kwargs) -> None:
    stepped = optimizer.__dict__.pop(_SWAPPED, None)
    if stepped is None:
        return
    swap, state = stepped[0], optimizer.state
    for group, params, _ in swap.seen:
        group["params"] = params
    for local in swap.locals:
        local.grad = None
    afters = [state.pop(local, None) for local in swap.locals]
    if _same(afters, swap.blocks) and _same(_values(afters), swap.block_values):
        return  # every state tensor updated in place: the DTensors held before hold them still
    for p, local, before, after in zip(swap.stepped, swap.locals, compress(swap.helds, swap.present), afters):
        if not after:
            continue
        if before is None:
            before = state[p] = {}
        for key, value in after.items():
            held = before.get(key)
            # Updated in place (exp_avg.lerp_, step += 1): the DTensor (or scalar) held before holds it still
            if held is not value and not (isinstance(held, DTensor) and held._local_tensor is value):
                before[key] = _as_dtensor(key, value, local, p._spec)
    optimizer.__dict__[_MEMO].last = None  # the step made state: the next step checks it afresh


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
