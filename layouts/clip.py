"""Global-norm gradient clipping across every layout: ``clip_grad_norm_`` (torch's name and signature).

This file owns one thing: the total norm of gradients that live in any mix of layouts (Replicate, Shard on
tp, Shard on dp after ZeRO, Partial), and the in-place scaling by ``max_norm / total``.

torch's own ``torch.nn.utils.clip_grad_norm_`` is already exact on our DTensor gradients (its default,
non-foreach path runs ``linalg.vector_norm`` per gradient; ``foreach=True`` runs ops/foreach.py's rules, which
ask the same per-tensor rules), but a p-norm over a
sharded dim is gathered (the root comes after the sum), so it all-gathers every sharded gradient: the
whole model's gradient bytes of traffic. This version moves only 0-d tensors: each gradient contributes
``sum |g|^p`` of its local block, which is Partial(sum) over the mesh dims that shard it; the per-tensor
sums add up as DTensors (Partial + Replicate stays Partial, no traffic) and one all-reduce per mesh dim of
one scalar makes the total. The inf-norm does the same with local maxima and Partial(max).

A Partial gradient (e.g. DP before its reduction) has no norm until it is reduced: it is reduced once, in
place, to Replicate on that mesh dim (an all-reduce, the same value), so the optimizer finds it reduced::

    total = clip_grad_norm_(model.parameters(), max_norm=1.0)   # a 0-d DTensor, Replicate
    opt.step()
"""

from __future__ import annotations

import math
import torch

from dtensor_plus.dtensor import DTensor
from dtensor_plus.placements import Partial, Replicate
from dtensor_plus.placement_tuples import replicated

__all__ = ["clip_grad_norm_", "get_total_norm"]


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
    """Scale the gradients of ``parameters`` in place so that their joint ``norm_type``-norm is at most
    ``max_norm``; return the norm before clipping (a Replicate 0-d DTensor; a plain 0-d tensor when the
    gradients live on several slices of one mesh, such as mesh["tp"] and mesh["dp"] of a (dp, tp) mesh, or when
    no gradient is a DTensor, which is torch's own function).

    Args:
        parameters: tensors (or one tensor) whose ``.grad`` to clip; those without a gradient are skipped.
        max_norm: the largest allowed total norm.
        norm_type: a finite p > 0, or ``inf``.
        error_if_nonfinite: raise if the total norm is nan or inf (as torch does).
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite)
    total = get_total_norm(params, norm_type)
    value = total._local_tensor if isinstance(total, DTensor) else total
    if error_if_nonfinite and not torch.isfinite(value).item():
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is {value.item()}; "
                           f"pass error_if_nonfinite=False to clip anyway")
    # As torch: coefficient clamped to 1 (never scale up); the +1e-6 guards a zero norm.
    coef = torch.clamp(max_norm / (value + 1e-6), max=1.0)
    with torch.no_grad():
        for g in (p.grad for p in params if p.grad is not None):  # after get_total_norm: Partial ones were reduced
            # A positive scalar on every rank's block: right for Shard, Replicate and every Partial kind.
            g._local_tensor.mul_(coef.to(g.dtype))
    return total


def get_total_norm(parameters, norm_type: float = 2.0) -> torch.Tensor:
    """The joint ``norm_type``-norm of the DTensor gradients of ``parameters``: Replicate on every mesh dim, or,
    when they live on several slices of one mesh, each slice's norm combined into a plain 0-d tensor.
    Reduces Partial gradients in place (see the module docstring)."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    norm_type = float(norm_type)
    if not (norm_type > 0):
        raise ValueError(f"clip_grad_norm_ takes norm_type > 0 (or inf), got {norm_type}")
    grads = [_reduced_grad(p) for p in params if p.grad is not None]
    if not grads:
        raise ValueError("clip_grad_norm_: no parameter has a gradient; call backward() first")
    by_mesh: dict = {}
    for g in grads:
        by_mesh.setdefault(g.device_mesh, []).append(g)
    with torch.no_grad():
        totals = [_inf_norm(gs, mesh) if math.isinf(norm_type) else _p_norm(gs, mesh, norm_type)
                  for mesh, gs in by_mesh.items()]
        if len(totals) == 1:
            return totals[0]
        return _combine(totals, list(by_mesh), norm_type)


def _combine(totals: list[DTensor], meshes: list, norm_type: float) -> torch.Tensor:
    """One norm from each mesh's (replicated) norm, for gradients on slices of one mesh: mesh["tp"] and
    mesh["dp"] of a (dp, tp) mesh, say. A DTensor on a slice is the same tensor in every other slice of the root
    (as if Replicate on the dims sliced away), so each rank's combination is the whole model's. Meshes built
    separately have no such relation: each rank would combine other norms and clip by another factor."""
    roots = [m._root for m in meshes]
    if any(root != roots[0] for root in roots):
        raise ValueError(
            f"clip_grad_norm_: gradients live on meshes that are not slices of one mesh ({meshes}); ranks would "
            f"combine different norms. Place them on one mesh (or slices of it), or clip each mesh's gradients "
            f"separately"
        )
    values = torch.stack([t._local_tensor.double() for t in totals])
    combined = values.max() if math.isinf(norm_type) else values.pow(norm_type).sum().pow(1.0 / norm_type)
    return combined.to(totals[0].dtype)


def _reduced_grad(p: torch.Tensor) -> DTensor:
    g = p.grad
    if not isinstance(g, DTensor):
        raise TypeError(f"a gradient of shape {tuple(g.shape)} is a plain tensor among DTensor gradients; "
                        f"place every parameter on the mesh (distribute_module / replicate)")
    if any(q.is_partial() for q in g.placements):
        g = g.redistribute(placements=[Replicate() if q.is_partial() else q for q in g.placements])
        p.grad = g
    return g


def _p_norm(grads: list[DTensor], mesh, p: float) -> DTensor:
    total = None
    for g in grads:
        local = g._local_tensor.detach().double()  # accumulate in float64; the result takes the grads' dtype
        power = local.abs().pow(p).sum() if local.numel() else local.new_zeros(())
        # Partial(sum) where g is sharded (each rank holds part of the sum), Replicate where it is replicated.
        placements = [Partial() if q.is_shard() else Replicate() for q in g.placements]
        term = DTensor.from_local(power, mesh, placements)
        total = term if total is None else total + term.to(total.dtype)  # Partial + Replicate: no traffic
    total = total.redistribute(placements=replicated(mesh.ndim))  # one 0-d all-reduce per Partial mesh dim
    return total.pow(1.0 / p).to(_result_dtype(grads))


def _result_dtype(grads) -> torch.dtype:
    dtype = grads[0].dtype
    for g in grads[1:]:
        dtype = torch.promote_types(dtype, g.dtype)
    return dtype


def _inf_norm(grads: list[DTensor], mesh) -> DTensor:
    # max over ranks of (max over tensors of the local max): a replicated block's max is the same on every
    # rank of that mesh dim, so it counts once; a value is Partial(max) on every mesh dim.
    local = torch.stack([
        g._local_tensor.detach().abs().amax().double() if g._local_tensor.numel() else torch.zeros((), dtype=torch.float64)
        for g in grads
    ]).amax()
    total = DTensor.from_local(local, mesh, [Partial("max")] * mesh.ndim)
    return total.redistribute(placements=replicated(mesh.ndim)).to(_result_dtype(grads))
