"""Mixed precision as a layout detail: fp32 master parameters, compute in ``param_dtype``, gradients reduced
in ``reduce_dtype`` (FSDP2's ``MixedPrecisionPolicy`` field names).

This file owns the casts around each module's forward. The parameters the optimizer sees stay the fp32
DTensor leaves; just before a module's forward each of its parameters (or the whole one ``fully_shard``
bound for that forward) is cast to ``param_dtype`` and bound in its place, and unbound after. The cast is an
autograd Function: its backward turns the low-precision (possibly Partial on dp) gradient into
``reduce_dtype``, reduces it to the parameter's placements there (only for a leaf placed by ``replicate`` /
``distribute_module``), then casts it to the master's dtype::

    replicate(model, mesh)
    mixed_precision(model, MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    loss = model(x).float().sum(); loss.backward()           # fp32 gradients on the fp32 leaves

For ZeRO-3 use ``fully_shard(module, mesh, mp_policy=MixedPrecision(...))`` instead (layouts/zero_stage3.py):
it casts each shard before its all-gather (half the bytes in bf16) and reduce-scatters in ``reduce_dtype``,
which a cast after the gather, as here, cannot do. ZeRO-1/2 (``ZeroRedundancyOptimizer``): pass
``reduce_gradients=False``; its reduce-scatter runs in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dtensor_plus.dtensor import DTensor

from .data_local import DTENSOR_PATH

__all__ = ["MixedPrecision", "mixed_precision"]


@dataclass(frozen=True)
class MixedPrecision:
    """param_dtype: the compute dtype of parameters (None: leave them). reduce_dtype: the dtype gradients are
    reduced in (None: param_dtype)."""

    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None


class _Cast(torch.autograd.Function):
    """``x.to(dtype)`` whose backward reduces the gradient in ``reduce_dtype`` (when ``reduce``) and returns it
    in x's dtype."""

    @staticmethod
    def forward(ctx, x, dtype, reduce_dtype, reduce):
        ctx.x_dtype, ctx.reduce_dtype, ctx.reduce = x.dtype, reduce_dtype, reduce
        ctx.placements = x.placements if isinstance(x, DTensor) else None
        return x.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.to(ctx.reduce_dtype)
        if ctx.reduce and ctx.placements is not None and tuple(grad.placements) != tuple(ctx.placements):
            grad = grad.redistribute(placements=ctx.placements)  # the reduction, in reduce_dtype
        return grad.to(ctx.x_dtype), None, None, None


def mixed_precision(module: nn.Module, policy: MixedPrecision, *, reduce_gradients: bool = True) -> nn.Module:
    """Compute ``module`` in ``policy.param_dtype`` with its parameters kept as they are (fp32 masters).

    Call it after ``replicate`` / ``distribute_module`` / ``fully_shard`` (its hooks must run after theirs).
    Floating tensor arguments of ``module``'s forward are cast to ``param_dtype`` too (as FSDP2 does).
    Returns ``module``, changed in place (forward hooks on every module that owns parameters).

    reduce_gradients: reduce each replicated parameter's gradient in the cast's backward, in reduce_dtype
    (DP: the one all-reduce, so ``replicate``'s own hook finds it reduced). Pass False under
    ``ZeroRedundancyOptimizer``, whose reduce-scatter (in the master dtype) must see the Partial gradient.
    """
    if not isinstance(policy, MixedPrecision):
        raise TypeError(f"mixed_precision takes a MixedPrecision policy, got {type(policy).__name__}")
    if policy.param_dtype is None:
        return module
    reduce_dtype = policy.reduce_dtype or policy.param_dtype
    sharded = any(hasattr(m, "_zero_state") for m in module.modules())
    if (sharded or not reduce_gradients) and reduce_dtype != torch.float32:
        raise ValueError(
            f"mixed_precision with fully_shard or reduce_gradients=False reduces in float32 only (got reduce_dtype="
            f"{reduce_dtype}); pass reduce_dtype=torch.float32 (see layouts/precision.py for why)"
        )
    module.register_forward_pre_hook(lambda mod, args: _cast_inputs(args, policy.param_dtype))
    for owner in module.modules():
        owner.__dict__[DTENSOR_PATH] = True  # replicate's local compute would reduce in the masters' dtype
        names = [n for n, p in owner._parameters.items() if p is not None and p.is_floating_point()]
        if names:
            _install(owner, names, policy.param_dtype, reduce_dtype, reduce_gradients)
    return module


def _cast_inputs(args, dtype: torch.dtype):
    # As FSDP2's cast_forward_inputs: floating inputs of the root enter in the compute dtype.
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _install(owner: nn.Module, names: list[str], dtype: torch.dtype, reduce_dtype: torch.dtype, reduce: bool) -> None:
    saved: list[dict] = []  # a stack: the bindings each (possibly re-entrant) forward replaced

    def cast(mod, args):
        previous = {}
        for name in names:
            bound = mod.__dict__.get(name)  # fully_shard's gathered whole, when there is one
            previous[name] = bound
            leaf = mod._parameters[name] if bound is None else bound
            # Reduce here only for a leaf; a gathered whole's gradient is reduce-scattered by the gather.
            mod.__dict__[name] = _Cast.apply(leaf, dtype, reduce_dtype, reduce and bound is None)
        saved.append(previous)

    def restore(mod, args, out):
        for name, bound in saved.pop().items():
            if bound is None:
                mod.__dict__.pop(name, None)
            else:
                mod.__dict__[name] = bound  # a second call in the same outer forward finds the gather again

    owner.register_forward_pre_hook(cast)
    owner.register_forward_hook(restore, always_call=True)
