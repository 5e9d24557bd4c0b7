"""Ops that write into their arguments: plans derived from the functional op's, by combinators.

``in_place(record, plan, dtensors)`` takes the plan decided for an in-place op and keeps it when ``self`` can keep
its layout (``mul_`` on a Shard self); otherwise it gives one of:

- ``OutOfPlacePlan``: the result cannot stay in ``self``'s layout (``exp_`` on a Partial self): computed by the
  functional twin under its own rule, copied back into self in self's layout;
- ``InplaceViewPlan``: an in-place view (``squeeze_``, ``t_``...) or ``resize_``: self takes the functional op's
  block, spec and sizes.

``OutVariantPlan`` serves ``out=`` variants: the functional op under its own rule, then copied into ``out`` in
out's layout. Every functional twin comes from the op's record (op_record.py).
"""

from __future__ import annotations

import torch

from .dtensor import DTensor
from .placement_tuples import replicated
from .redistribute import redistribute_local

__all__ = ["in_place", "OutOfPlacePlan", "InplaceViewPlan", "OutVariantPlan"]


def in_place(record, plan, dtensors):
    """The plan of an in-place op whose functional decision is ``plan``, or None when ``plan`` serves as is."""
    if record.inplace_view:
        return InplaceViewPlan(record)
    if not record.inplace:
        return None
    out_specs = plan.out_specs
    # An in-place foreach op (_foreach_mul_) returns nothing (out_specs == ()); its rule keeps every element.
    if plan.input_targets[0] is not None or (out_specs and out_specs[0].placements != dtensors[0]._spec.placements):
        return OutOfPlacePlan(record)
    return None


class OutOfPlacePlan:
    """An in-place op whose result cannot stay in ``self``'s layout: compute it elsewhere, copy back into self.

    Elsewhere is the functional twin (``add_`` -> ``add``) where aten has one; samplers such as ``normal_`` have
    none, so they run in place on a replicated copy of self instead."""

    __slots__ = ("func", "functional")

    def __init__(self, record):
        self.func, self.functional = record.func, record.functional

    def run(self, args, kwargs, dtensors):
        kwargs = kwargs or {}
        if self.functional is not None:
            result = self.functional(*args, **kwargs)
        else:
            this = args[0]
            replicate = replicated(this._spec.mesh.ndim)
            local = redistribute_local(this._local_tensor, this._spec, replicate).clone()
            result = self.func(DTensor(local, this._spec.with_placements(replicate)), *args[1:], **kwargs)
        return args[0].copy_(result)


class InplaceViewPlan:
    """squeeze_, unsqueeze_, t_, transpose_, resize_ and resize_as_ change self's shape (a copy_ back cannot): run the
    functional op (its own rule: the view, or ``resize``), then self takes its block and spec, and its wrapper
    takes the new sizes the way torch's return_and_correct_aliasing does it (the op's meta kernel on the
    wrapper, dispatch off)."""

    __slots__ = ("func", "view")

    def __init__(self, record):
        self.func, self.view = record.func, record.functional

    def run(self, args, kwargs, dtensors):
        result = self.view(*args, **(kwargs or {}))
        target = args[0]
        target._local_tensor, target._spec = result._local_tensor, result._spec
        with torch.utils._mode_utils.no_dispatch():
            meta_in_tls = torch._C._meta_in_tls_dispatch_include()
            torch._C._set_meta_in_tls_dispatch_include(True)
            try:
                self.func(*args, **(kwargs or {}))
            finally:
                torch._C._set_meta_in_tls_dispatch_include(meta_in_tls)
        return target


class OutVariantPlan:
    """``op(..., out=t)``: compute the functional op (its own rule), then copy into ``t`` in t's layout."""

    __slots__ = ("functional", "out_names")

    def __init__(self, record):
        self.functional, self.out_names = record.functional, record.out_names

    def run(self, args, kwargs, dtensors):
        outs = [kwargs[name] for name in self.out_names]
        rest = {k: v for k, v in kwargs.items() if k not in self.out_names}
        result = self.functional(*args, **rest)
        results = result if isinstance(result, (tuple, list)) else (result,)
        for out, res in zip(outs, results):
            out.copy_(res)
        return outs[0] if len(outs) == 1 else tuple(outs)
