"""Ops that write into their arguments, when the plain plan cannot: each is a plan kind with ``run``.

- an in-place op whose ``self`` cannot keep its layout (``exp_`` on a Partial self): computed elsewhere,
  copied back into self in self's layout;
- an in-place view (``squeeze_``, ``t_``...) or ``resize_``: self takes the functional op's block, spec and sizes;
- an ``out=`` variant: the functional op under its own rule, then copied into ``out`` in out's layout.
"""

from __future__ import annotations

import torch

from .placements import Replicate
from .redistribute import redistribute_local

__all__ = ["OutOfPlacePlan", "InplaceViewPlan", "OutVariantPlan", "INPLACE_VIEWS", "is_inplace", "out_arguments"]


class OutOfPlacePlan:
    """An in-place op whose result cannot stay in ``self``'s layout: compute it elsewhere, copy back into self.

    Elsewhere is the functional twin (``add_`` -> ``add``) where aten has one; samplers such as ``normal_`` have
    none, so they run in place on a replicated copy of self instead."""

    __slots__ = ("func", "functional")

    def __init__(self, func):
        packet = getattr(torch.ops.aten, func.overloadpacket.__name__.rstrip("_"), None)
        self.func = func
        self.functional = getattr(packet, func._overloadname, None) if packet is not None else None

    def run(self, args, kwargs, dtensors, dtensor_cls):
        kwargs = kwargs or {}
        if self.functional is not None:
            result = self.functional(*args, **kwargs)
        else:
            this = args[0]
            replicate = (Replicate(),) * this._spec.mesh.ndim
            local = redistribute_local(this._local_tensor, this._spec, replicate).clone()
            result = self.func(dtensor_cls(local, this._spec.with_placements(replicate)), *args[1:], **kwargs)
        return args[0].copy_(result)


class InplaceViewPlan:
    """squeeze_, unsqueeze_, t_, transpose_, resize_ and resize_as_ change self's shape (a copy_ back cannot): run the
    functional op (its own rule: the view, or ``resize``), then self takes its block and spec, and its wrapper
    takes the new sizes the way torch's return_and_correct_aliasing does it (the op's meta kernel on the
    wrapper, dispatch off)."""

    __slots__ = ("func", "view")

    def __init__(self, func):
        self.func, self.view = func, getattr(torch.ops.aten, func.overloadpacket.__name__.rstrip("_"))

    def run(self, args, kwargs, dtensors, dtensor_cls):
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


INPLACE_VIEWS = (torch.ops.aten.squeeze_, torch.ops.aten.unsqueeze_, torch.ops.aten.t_, torch.ops.aten.transpose_,
                 torch.ops.aten.resize_, torch.ops.aten.resize_as_)


def is_inplace(func) -> bool:
    """Does the op write into its first argument (``add_``, ``copy_``, ``normal_``...)?"""
    schema = func._schema
    return bool(schema.arguments) and schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write


def out_arguments(func):
    """Names of the out= arguments, or () for an op without them."""
    return tuple(a.name for a in func._schema.arguments if a.is_out)


class OutVariantPlan:
    """``op(..., out=t)``: compute the functional op (its own rule), then copy into ``t`` in t's layout."""

    __slots__ = ("func", "out_names")

    def __init__(self, func, out_names):
        self.func, self.out_names = func, out_names

    def run(self, args, kwargs, dtensors, dtensor_cls):
        outs = [kwargs[name] for name in self.out_names]
        rest = {k: v for k, v in kwargs.items() if k not in self.out_names}
        result = self.func.overloadpacket(*args, **rest)
        results = result if isinstance(result, (tuple, list)) else (result,)
        for out, res in zip(outs, results):
            out.copy_(res)
        return outs[0] if len(outs) == 1 else tuple(outs)
