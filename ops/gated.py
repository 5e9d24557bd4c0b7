"""Gated elementwise ops: glu (one half of ``dim`` gates the other) and prelu (a learned slope per channel),
forward and backward.

glu(x, dim) -> a * sigmoid(b), a and b the halves of ``dim``; glu_backward(grad, x, dim) -> grad_x. Per mesh dim:

    x / grad              out, grad_x
    Shard(d), d != dim    Shard(d): every element meets its gate on the same rank
    Shard(dim)            Replicate: a rank's block would pair the wrong halves, so ``dim`` is gathered
    Partial               Replicate (not linear)

_prelu_kernel(x, weight) -> where(x > 0, x, weight * x), weight broadcast against x (F.prelu reshapes a
per-channel weight to (1, C, 1, ...), a single weight to (1,)); _prelu_kernel_backward(grad, x, weight) ->
(grad_x, grad_weight), grad_weight of the weight's shape (summed over its broadcast dims). Per mesh dim:

    x / grad              weight        out, grad_x   grad_weight
    Shard(d), weight      Replicate     Shard(d)      Partial(sum): a sum over the split dim
      broadcasts along d
    Shard(d), weight      Shard(d')     Shard(d)      Shard(d'): each rank owns its channels
      spans d (channels)
    grad Partial(s|a),    Replicate     Partial       Partial: both grads are linear in grad
      x Replicate
    else                  Replicate     Replicate     Replicate

The mode is read from x's placement, else the grad's (backward).
"""

from __future__ import annotations

from dtensor_plus.placements import Partial, Placement, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten, normalize_dim

# -- glu ------------------------------------------------------------------------------------------------


def _glu_placement(p: Placement, dim: int) -> Placement:
    return p if isinstance(p, Shard) and p.dim != dim else Replicate()


@register_rule(aten.glu.default, strided="as_shard")  # elementwise along every dim but ``dim``
def glu_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    dim = normalize_dim(op.arg("dim", -1), spec.ndim)
    target = tuple(_glu_placement(p, dim) for p in spec.placements)
    return Sharding(inputs=(target,), outputs=(target,))


@register_rule(aten.glu_backward.default)
def glu_backward_rule(op: OpSchema) -> Sharding:
    """(grad, x, dim): grad (half of ``dim``) and x share every other dim, so they share the Shard."""
    grad, x = op.spec("grad_output"), op.spec("self")
    dim = normalize_dim(op.arg("dim"), x.ndim)
    target = []
    for g, p in zip(grad.placements, x.placements):
        keep = _glu_placement(p, dim)
        target.append(keep if keep.is_shard() else _glu_placement(g, dim))
    target = tuple(target)
    return Sharding(inputs={"grad_output": target, "self": target}, outputs=(target,))


# -- prelu ----------------------------------------------------------------------------------------------


def _weight_dim(x_dim: int, x, weight) -> int | None:
    """The weight dim aligned with x dim ``x_dim`` (broadcasting from the right), None where it broadcasts."""
    dim = x_dim - (x.ndim - weight.ndim)
    return dim if dim >= 0 and weight.shape[dim] == x.shape[x_dim] and weight.shape[dim] != 1 else None


def _prelu_mesh_dim(p: Placement, g: Placement | None, x, weight):
    """(x/grad target, weight target, out, grad_weight) on one mesh dim."""
    shard = p if isinstance(p, Shard) else (g if isinstance(g, Shard) else None)
    if shard is not None:
        w_dim = _weight_dim(shard.dim, x, weight)
        if w_dim is None:
            return shard, Replicate(), shard, Partial("sum")
        return shard, Shard(w_dim), shard, Shard(w_dim)
    r = Replicate()
    if g is not None and g.is_partial() and g.reduce_op in ("sum", "avg"):
        return g, r, Partial(g.reduce_op), Partial(g.reduce_op)
    return r, r, r, r


@register_rule(aten._prelu_kernel.default, strided="as_shard")  # elementwise with a broadcast weight
def prelu_rule(op: OpSchema) -> Sharding:
    x, weight = op.spec("self"), op.spec("weight")
    tx, tw = [], []
    for p in x.placements:
        a, w, _, _ = _prelu_mesh_dim(p, None, x, weight)
        tx.append(a), tw.append(w)
    return Sharding(inputs={"self": tuple(tx), "weight": tuple(tw)}, outputs=(tuple(tx),))


@register_rule(aten._prelu_kernel_backward.default)
def prelu_backward_rule(op: OpSchema) -> Sharding:
    """(grad, x, weight) -> (grad_x, grad_weight)."""
    grad, x, weight = op.spec("grad_output"), op.spec("self"), op.spec("weight")
    tg, tx, tw, out_x, out_w = [], [], [], [], []
    for g, p in zip(grad.placements, x.placements):
        a, w, o, ow = _prelu_mesh_dim(p, g, x, weight)
        tg.append(a), tx.append(Replicate() if a.is_partial() else a), tw.append(w), out_x.append(o), out_w.append(ow)
    local_op = _prelu_backward_local if x.shape.numel() else None
    return Sharding(inputs={"grad_output": tuple(tg), "self": tuple(tx), "weight": tuple(tw)},
                    outputs=(tuple(out_x), tuple(out_w)), local_op=local_op)


def _prelu_backward_local(grad, x, weight):
    grad_x, grad_weight = aten._prelu_kernel_backward.default(grad, x, weight)
    if grad_weight.shape != weight.shape:  # an empty block: torch returns the broadcast shape, not the weight's
        grad_weight = grad_weight.sum_to_size(weight.shape)
    return grad_x, grad_weight
