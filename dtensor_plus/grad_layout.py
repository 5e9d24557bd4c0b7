"""The gradient of a DTensor leaf comes back in the leaf's own layout.

Backward formulas pick their output placements for their own reasons: the gradient of ``x.sum()`` is an
``expand`` of a replicated scalar, so a Shard(0) ``x`` would get a Replicate gradient; ``x @ w`` over a
sharded contraction gives a Partial one. A user expects ``x.grad`` laid out like ``x`` (an optimizer then
updates each shard with its own gradient shard, and ``grad.to_local()`` lines up with ``x.to_local()``). A
hook on every DTensor leaf that requires grad moves its gradient, once per backward (after autograd summed
every contribution) and for ``torch.autograd.grad`` as well as ``.grad``, to the leaf's placements, per
mesh dim:

    leaf          gradient becomes
    Shard(d)      Shard(d)   (from Replicate: free, a local slice; from Partial: one reduce-scatter;
                  a StridedShard leaf, the zigzag of context parallelism, alike)
    Replicate     Replicate, except a Partial gradient stays Partial: data parallelism (layouts/data.py)
                  and ZeRO reduce those in buckets, and an optimizer op would reduce it anyway
    Partial       Replicate  (d(sum of pieces)/d(piece) is the whole gradient: ``placement_tuples.without_partial``)

Leaves are DTensors created with ``requires_grad=True`` (``distribute_tensor``, the factories, unpickling)
or made to require grad with ``requires_grad_()`` (which ``nn.Parameter`` calls) or ``x.requires_grad = True``.

A *plain* tensor that joins DTensors as Replicate (``plain_tensors.py``: a plain ``nn.Parameter`` beside
DTensor activations, or the block ``to_local()`` returned) would otherwise get a DTensor gradient, often
Partial: every optimizer op on it would then plan its own all-reduce (25 per AdamW step on a small model),
and ``to_local()``'s backward would wrap it into a DTensor again (a DTensor inside a DTensor). So the tensor
that joins gets a hook too (``keep_plain_gradient``): its gradient, summed over every op it joined, becomes
the plain whole tensor one device computes, reduced once per backward.
"""

from __future__ import annotations

import torch

from .placements import Placement, Replicate
from .placement_tuples import replicated
from .redistribute import redistribute_local

__all__ = ["follow_layout", "keep_leaf_layout", "keep_plain_gradient", "leaf_grad_placements", "plain_gradient"]

_HOOKED = "_dtensor_plus_grad_layout_hook"  # attribute marking a leaf that already has the hook


def leaf_grad_placements(leaf: tuple[Placement, ...], grad: tuple[Placement, ...]) -> tuple[Placement, ...]:
    """Where a gradient laid out as ``grad`` goes for a leaf laid out as ``leaf`` (the table above)."""
    return tuple(
        p if p.is_shard() or p.is_strided_shard() else g if g.is_partial() and not p.is_partial() else Replicate()
        for p, g in zip(leaf, grad)
    )


def keep_leaf_layout(tensor) -> None:
    """Install the hook on ``tensor`` (a DTensor leaf that requires grad) unless it has it already."""
    if getattr(tensor, _HOOKED, None) is not None or tensor.grad_fn is not None or not tensor.requires_grad:
        return
    # The hook holds the leaf's placements, not the leaf: a tensor its own hook kept alive would never be freed,
    # and a weak reference to it would stop nn.Module.to() from swapping it (torch swaps traceable subclasses).
    layout = [tensor._spec.placements]  # follow_layout updates it when `.data =` gives the leaf another layout

    def to_leaf_layout(grad):
        if not hasattr(grad, "_spec"):
            return grad
        target = leaf_grad_placements(layout[0], grad._spec.placements)
        if target == grad._spec.placements:
            return grad
        if torch.is_grad_enabled():  # create_graph=True: the move itself must be differentiable
            return grad.redistribute(placements=target)
        # The common case, without an autograd Function around the move (a Replicate -> Shard slice of a small
        # gradient would cost more in the Function than in the move)
        return type(grad)(redistribute_local(grad._local_tensor, grad._spec, target), grad._spec.with_placements(target))

    tensor.register_hook(to_leaf_layout)
    setattr(tensor, _HOOKED, layout)


def follow_layout(tensor) -> None:
    """After ``tensor``'s spec changed in place (``.data = other``), its hook moves gradients to the new layout."""
    layout = getattr(tensor, _HOOKED, None)
    if layout is not None:
        layout[0] = tensor._spec.placements


_PLAIN_HOOKED = "_dtensor_plus_plain_grad_hook"


def plain_gradient(grad):
    """``grad`` as a plain tensor: a DTensor gradient of a plain tensor becomes its whole value (a Partial one
    all-reduced, a Shard one all-gathered, a Replicate one as it is); a plain gradient stays as it is."""
    if not hasattr(grad, "_spec"):
        return grad
    if torch.is_grad_enabled():  # create_graph=True: the reduction itself must be differentiable
        return grad.full_tensor()
    whole = replicated(grad._spec.mesh.ndim)
    return redistribute_local(grad._local_tensor, grad._spec, whole)


def keep_plain_gradient(tensor) -> None:
    """Hook ``tensor`` (a plain tensor that requires grad and joins DTensors) so its gradient comes back
    plain (``plain_gradient``). A hook on a leaf or a non-leaf runs once per backward, after autograd summed
    every op's contribution, so the gradient of a tensor used in several ops is reduced once."""
    if getattr(tensor, _PLAIN_HOOKED, False):
        return
    tensor.register_hook(plain_gradient)
    setattr(tensor, _PLAIN_HOOKED, True)
