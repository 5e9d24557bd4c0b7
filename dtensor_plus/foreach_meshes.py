"""Foreach and fused-optimizer ops over DTensors on several meshes: one call per mesh, results in list order.

Every other op needs all its DTensors on one mesh (dispatch.py raises otherwise). Multi-tensor ops are the
exception: torch groups tensors by device and dtype only, so one ``_foreach_norm`` from ``clip_grad_norm_``,
or one ``_fused_adamw_`` from an optimizer, may hold the gradients of ``mesh["tp"]`` and ``mesh["dp"]``
parameters, or of several pipeline stages. Their elements never combine with each other, so the op splits
into one call per mesh (element i of every list goes with element i of the first), each element keeps its
own mesh, and the outputs come back in the caller's order::

    norms = torch._foreach_norm([w_tp.grad, b_dp.grad], 2.0)   # norms[0] on mesh["tp"], norms[1] on mesh["dp"]
    torch._foreach_mul_([w_tp.grad, b_dp.grad], clip_coef)     # each scaled on its own mesh
"""

from __future__ import annotations

from .dtensor import DTensor

__all__ = ["PerMeshPlan"]


class PerMeshPlan:
    """The op run once per mesh of its first list's elements (each group in order of first appearance)."""

    def __init__(self, func):
        self.func = func

    def run(self, args, kwargs, dispatch):
        first = args[0]
        groups: dict = {}  # mesh -> indices of its elements in the first list
        for i, value in enumerate(first):
            groups.setdefault(value._spec.mesh if isinstance(value, DTensor) else None, []).append(i)
        results = []  # (indices, what the group's call returned)
        for indices in groups.values():
            pick = _picker(indices, len(first))
            out = dispatch(self.func, tuple(pick(a) for a in args), {k: pick(v) for k, v in (kwargs or {}).items()})
            results.append((indices, out))
        if results[0][1] is None:  # an in-place op returns nothing
            return None
        if isinstance(results[0][1], tuple):  # several lists (the functional _fused_adam): each back in order
            return tuple(_in_order([(indices, out[j]) for indices, out in results], len(first))
                         for j in range(len(results[0][1])))
        return _in_order(results, len(first))


def _in_order(results, num_elements: int) -> list:
    outputs: list = [None] * num_elements
    for indices, out in results:
        for i, value in zip(indices, out):
            outputs[i] = value
    return outputs


def _picker(indices: list[int], num_elements: int):
    """Keep only ``indices`` of every list argument as long as the first list; other arguments pass whole."""

    def pick(value):
        if type(value) in (list, tuple) and len(value) == num_elements:
            return type(value)(value[i] for i in indices)
        return value

    return pick
