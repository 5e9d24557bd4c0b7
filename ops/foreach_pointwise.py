"""Element-wise foreach and fused-optimizer ops: element i of every list keeps element i of the first list's layout.

What torch's multi-tensor optimizers call (``foreach=True``: ``_foreach_lerp_``, ``_foreach_addcmul_``,
``_foreach_sqrt``, ``_foreach_maximum_``...; ``fused=True``: ``_fused_adamw_``, ``_fused_adam_``, ``_fused_sgd_``,
``_fused_adagrad_``). They are element-wise within each element: element i of every list argument combines
only with element i of the others. So the rule lays every element-i tensor out like the first list's element
i (a parameter: Shard or Replicate on each mesh dim), a Partial gradient being reduced to it on the way (the
one collective data parallelism needs), and the op then runs once on the local lists: one multi-tensor kernel
per step, as on one device. Tensors outside the lists (a step count, a tensor learning rate) are replicated.

Written arguments (the parameters and optimizer states of an in-place op) must already be in that layout: a
copy could not be written back. ``torch.optim`` creates states with ``zeros_like(param)``, so they are; any
other case raises naming the element and the fix. Elements whose shapes differ from the first list's
(broadcasting) are replicated whole. The binary arithmetic (``_foreach_add``...) and ``_foreach_norm`` keep
their per-element rules in foreach.py, which know linear ops keep Partial.
"""

from __future__ import annotations

import torch

from dtensor_plus.rules import OpSchema, Sharding, register_rule
from dtensor_plus.spec import DTensorSpec

from .common import aten, replicated, without_partial

__all__ = ["elementwise_foreach_rule"]

# Not element-wise, or ruled elsewhere: reductions per tensor (max, norm) and foreach.py's binary arithmetic.
_RULED_ELSEWHERE = {"_foreach_norm", "_foreach_max", "_foreach_add", "_foreach_add_", "_foreach_sub", "_foreach_sub_",
                    "_foreach_mul", "_foreach_mul_", "_foreach_div", "_foreach_div_"}
_FUSED_OPTIMIZERS = ("_fused_adamw_", "_fused_adam_", "_fused_sgd_", "_fused_adagrad_")


def _spec_slots(op: OpSchema):
    """For each spec, in ``op.specs`` order: (its schema argument, element index in that list or None)."""
    arguments = {a.name: a for a in op.func._schema.arguments}
    return [(arguments[name], None) if isinstance(name, str) else (arguments[name[0]], name[1]) for name in op.names]


def _is_written(argument) -> bool:
    return argument.alias_info is not None and argument.alias_info.is_write


def _element_layouts(op: OpSchema, slots) -> list:
    """Element i's layout: the first list's element i with Partial reduced (Replicate where shapes differ)."""
    whole = replicated(op.mesh.ndim)
    layouts = []
    for i, first in enumerate(op.arg("self")):  # every multi-tensor op names its first list self
        aligned = isinstance(first, DTensorSpec) and all(
            spec.shape == first.shape for spec, (_, e) in zip(op.specs, slots) if e == i)
        layouts.append(without_partial(first.placements) if aligned else whole)
    return layouts


def elementwise_foreach_rule(op: OpSchema) -> Sharding:
    slots = _spec_slots(op)
    layouts = _element_layouts(op, slots)
    whole = replicated(op.mesh.ndim)
    inputs = {}
    for name, spec, (argument, element) in zip(op.names, op.specs, slots):
        want = whole if element is None else layouts[element]
        if want == spec.placements:
            continue
        if _is_written(argument):
            raise ValueError(
                f"{op.func}: {argument.name}[{element}] is {list(spec.placements)} but element {element} of "
                f"{op.func._schema.arguments[0].name} needs it {list(want)}; an in-place multi-tensor op cannot write "
                f"into a moved copy: redistribute it to {list(want)} first (optimizer states follow their parameter)"
            )
        inputs[name] = want
    returns = op.func._schema.returns
    outputs = tuple(layouts) if returns and len(returns) == 1 else ()
    return Sharding(inputs=inputs, outputs=outputs)


def _elementwise_ops() -> list:
    ops = []
    # Every registered aten op name (torch.ops.aten itself lists only the ops already looked up).
    names = {n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("aten::_foreach_")}
    for name in sorted(names - _RULED_ELSEWHERE):
        packet = getattr(torch.ops.aten, name)
        for overload in packet.overloads():
            func = getattr(packet, overload)
            returns = func._schema.returns
            lists_out = not returns or (len(returns) == 1 and str(returns[0].type) == "List[Tensor]")
            if lists_out and overload != "out":
                ops.append(func)
    for name in _FUSED_OPTIMIZERS:
        packet = getattr(aten, name, None)
        if packet is not None:
            ops += [getattr(packet, o) for o in packet.overloads() if o != "out"]
    return ops


register_rule(*_elementwise_ops())(elementwise_foreach_rule)
