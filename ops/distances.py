"""p-norm distances: cdist (pairs of rows of two batched matrices), pdist (pairs of rows of one matrix) and dist
(one norm of a difference), forward and backward.

cdist(x1 (*B, P, M), x2 (*B, R, M), p) -> (*B, P, R); _cdist_backward(grad, x1, x2, p, cdist) -> grad_x1 (autograd
calls it twice, the second time with x1/x2 and grad/cdist transposed, for grad_x2). Per mesh dim, one "mode":

    mode        x1          x2          grad, cdist   forward out    grad_x1
    batch b     Shard(b)*   Shard(b)*   Shard(b)      Shard(b)       Shard(b), or Partial(sum) where x1 broadcasts
    P           Shard(P)    Replicate   Shard(P)      Shard(P)       Shard(P)
    R           Replicate   Shard(R)    Shard(R)      Shard(R)       Partial(sum): a sum over the rows of x2
    M           Shard(M)    Shard(M)    Replicate     Replicate **   Shard(M): no communication
    grad P(s|a) Replicate   Replicate   Partial/Repl. (backward)     Partial: linear in grad
    none        Replicate   Replicate   Replicate     Replicate      Replicate

    * Replicate where that input broadcasts (size 1) along b.
    ** the local op sums |x1 - x2|^p over its features, all-reduces those sums over the M mesh dims and takes the
       root (max for p = inf, a count for p = 0). Taken only where the all-reduce of the output moves less than
       gathering x1 and x2 would; otherwise M is gathered.

The mode is read from x1's placement, else x2's, else (backward) grad's. The backward gets every distance whole
from its ``cdist`` argument, so with the features split each rank's gradient of its features is exact.

pdist(x (N, M), p) -> the N(N-1)/2 distances of rows i < j, in row-major order:

    x           forward out          _pdist_backward(grad, x, p, pdist) -> grad_x
    Shard(1)    Replicate ** where   Shard(1), grad and pdist Replicate: no communication
                N - 1 <= M, else
                gathered
    Shard(0)    Replicate (gathered) Replicate (gathered)
    grad P                           Partial (x Replicate): linear in grad

A row shard is gathered: every row meets every other, and the output's chunks do not line up with row blocks, so
no sharded form beats one all-gather of x.

dist(a, b, p) = ||a - b||_p over all (broadcast) elements -> a 0-d tensor, Replicate. a and b are sharded alike
on the broadcast shape (an input that broadcasts along a dim is Replicate there); the local op reduces its block to
sum |a-b|^p (max, min, count for p = inf, -inf, 0), all-reduces over the sharding mesh dims and takes the root.
Partial inputs are reduced first (a norm of pieces is not a piece). Its backward decomposes into ops with rules.

``p`` is a float, which the plan cache keys by type only (except +-inf): local ops read it at run time. The
all-reduce of the powers is declared (``AllReduce`` in the rule's Sharding); the local op runs it through ``comm``.
"""

from __future__ import annotations

import math

import torch

from dtensor_plus.declared import AllReduce
from dtensor_plus.placements import Partial, Placement, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten, replicate_all, replicated, without_partial

# -- the p-norm of pieces ----------------------------------------------------------------------------------


def _powers(diff: torch.Tensor, p: float, dims) -> torch.Tensor:
    """This block's share of the norm over ``dims``: sum |diff|^p (max |diff| for p = inf, min for -inf, the
    count of nonzeros for p = 0). An empty block gives the identity of the combining reduction."""
    magnitude = diff.abs()
    if math.isinf(p):
        if magnitude.numel() == 0:  # torch refuses max/min over nothing; 0 (resp. inf) is the identity
            shape = [1 if d in dims else n for d, n in enumerate(magnitude.shape)]
            shape = [n for d, n in enumerate(shape) if d not in dims]
            return magnitude.new_full(shape, 0.0 if p > 0 else math.inf)
        return magnitude.amax(dims) if p > 0 else magnitude.amin(dims)
    if p == 0:
        return (magnitude != 0).sum(dims).to(magnitude.dtype)
    return magnitude.pow(p).sum(dims)


def _reduce_op(p: float) -> str:
    """How pieces' powers combine: max for p = inf, min for -inf, else a sum (p = 0 counts nonzeros)."""
    return ("max" if p > 0 else "min") if math.isinf(p) else "sum"


def _declared_all_reduce(mesh_dims, p: float) -> tuple:
    """The rule's communication: one all-reduce of the powers over ``mesh_dims``. +-inf is part of the plan
    cache key (a mode), so the reduction read from the rule's ``p`` holds for every call of the plan."""
    return (AllReduce(tuple(mesh_dims), (_reduce_op(p),)),)


def _combine(powers: torch.Tensor, p: float, comm) -> torch.Tensor:
    """All-reduce the pieces' powers over the declared mesh dims (``comm``), then take the root."""
    powers = comm.all_reduce(powers, _reduce_op(p))
    if math.isinf(p) or p == 0:
        return powers
    return powers.sqrt() if p == 2 else powers.pow(1.0 / p)


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t  # accumulate as torch does


# -- cdist ----------------------------------------------------------------------------------------------


def _batch_dim(out_dim: int, out_ndim: int, shape) -> int | None:
    """The dim of an input of ``shape`` feeding batch dim ``out_dim`` of the output, None where it broadcasts."""
    dim = out_dim - (out_ndim - len(shape))
    return dim if dim >= 0 and shape[dim] != 1 else None


def _cdist_mode(p1: Placement, p2: Placement, x1, x2, out_ndim: int, grad: Placement | None, allow_m: bool = True):
    """(mode, out dim) on one mesh dim, per the table; out dim indexes the output for batch modes. Without
    ``allow_m`` a feature shard is passed over (gathered)."""
    n1, n2 = len(x1.shape), len(x2.shape)
    for placement, shape, rows, mode in ((p1, x1.shape, n1 - 2, "P"), (p2, x2.shape, n2 - 2, "R")):
        if not isinstance(placement, Shard):
            continue
        ndim = len(shape)
        if placement.dim == rows:
            return mode, None
        if placement.dim == ndim - 1:
            if allow_m:
                return "M", None
            continue
        out_dim = placement.dim + out_ndim - ndim
        if shape[placement.dim] != 1:
            return "batch", out_dim
    if isinstance(grad, Shard):
        if grad.dim == out_ndim - 2:
            return "P", None
        if grad.dim == out_ndim - 1:
            return "R", None
        shapes_ok = any(_batch_dim(grad.dim, out_ndim, s) is not None for s in (x1.shape, x2.shape))
        return ("batch", grad.dim) if shapes_ok else ("none", None)
    if grad is not None and grad.is_partial() and grad.reduce_op in ("sum", "avg"):
        return "partial", grad.reduce_op
    return "none", None


def _cdist_targets(mode, out_dim, x1, x2, out_ndim):
    """(x1, x2, grad/cdist, forward out, grad_x1) placements for one mesh dim."""
    n1, n2, r = len(x1.shape), len(x2.shape), Replicate()
    if mode == "batch":
        d1, d2 = _batch_dim(out_dim, out_ndim, x1.shape), _batch_dim(out_dim, out_ndim, x2.shape)
        s1 = Shard(d1) if d1 is not None else r
        s2 = Shard(d2) if d2 is not None else r
        return s1, s2, Shard(out_dim), Shard(out_dim), s1 if d1 is not None else Partial("sum")
    if mode == "P":
        return Shard(n1 - 2), r, Shard(out_ndim - 2), Shard(out_ndim - 2), Shard(n1 - 2)
    if mode == "R":
        return r, Shard(n2 - 2), Shard(out_ndim - 1), Shard(out_ndim - 1), Partial("sum")
    if mode == "M":
        return Shard(n1 - 1), Shard(n2 - 1), r, r, Shard(n1 - 1)
    if mode == "partial":
        return r, r, Partial(out_dim), None, Partial(out_dim)
    return r, r, r, r, r


def _cdist_local(x1, x2, p, compute_mode=None, *, comm):
    """cdist where mesh dims split the features: per-pair powers of the local features, combined."""
    diff = _wide(x1).unsqueeze(-2) - _wide(x2).unsqueeze(-3)  # (*B, P, R, M_local)
    return _combine(_powers(diff, p, (diff.ndim - 1,)), p, comm).to(x1.dtype)


@register_rule(aten._cdist_forward.default)
def cdist_rule(op: OpSchema) -> Sharding:
    x1, x2 = op.spec("x1"), op.spec("x2")
    out_ndim = max(len(x1.shape), len(x2.shape))
    batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    out_numel = math.prod(batch) * x1.shape[-2] * x2.shape[-2]
    m_pays = 2 * out_numel <= x1.shape.numel() + x2.shape.numel()  # all-reduce of out vs gathering the inputs
    t1, t2, out, m_dims = [], [], [], []
    for k, (p1, p2) in enumerate(zip(x1.placements, x2.placements)):
        mode, out_dim = _cdist_mode(p1, p2, x1, x2, out_ndim, None, allow_m=m_pays)
        a, b, _, o, _ = _cdist_targets(mode, out_dim, x1, x2, out_ndim)
        t1.append(a), t2.append(b), out.append(o)
        if mode == "M" and op.mesh_shape[k] > 1:
            m_dims.append(k)
    inputs = {"x1": tuple(t1), "x2": tuple(t2)}
    if not m_dims:
        return Sharding(inputs=inputs, outputs=(tuple(out),))
    return Sharding(inputs=inputs, outputs=(tuple(out),), local_op=_cdist_local,
                    communication=_declared_all_reduce(m_dims, op.arg("p")))


@register_rule(aten._cdist_backward.default)
def cdist_backward_rule(op: OpSchema) -> Sharding:
    """(grad, x1, x2, p, cdist) -> grad_x1."""
    grad, x1, x2 = op.spec("grad"), op.spec("x1"), op.spec("x2")
    out_ndim = grad.ndim
    tg, t1, t2, out = [], [], [], []
    for g, p1, p2 in zip(grad.placements, x1.placements, x2.placements):
        mode, out_dim = _cdist_mode(p1, p2, x1, x2, out_ndim, g)
        a, b, c, _, o = _cdist_targets(mode, out_dim, x1, x2, out_ndim)
        tg.append(c), t1.append(a), t2.append(b), out.append(o)
    dist_target = without_partial(tg)  # the distances themselves are whole
    return Sharding(inputs={"grad": tuple(tg), "x1": tuple(t1), "x2": tuple(t2), "cdist": dist_target},
                    outputs=(tuple(out),))


# -- pdist ----------------------------------------------------------------------------------------------


def _pdist_local(x, p=2.0, *, comm):
    rows, cols = torch.triu_indices(x.shape[0], x.shape[0], 1, device=x.device)
    diff = _wide(x)[rows] - _wide(x)[cols]  # (N(N-1)/2, M_local)
    return _combine(_powers(diff, p, (1,)), p, comm).to(x.dtype)


@register_rule(aten._pdist_forward.default)
def pdist_rule(op: OpSchema) -> Sharding:
    spec = op.spec("self")
    n, m = spec.shape
    m_pays = n * (n - 1) <= n * m  # all-reduce of N(N-1)/2 distances vs all-gather of x
    target = tuple(p if p.is_shard(1) and m_pays else Replicate() for p in spec.placements)
    m_dims = [k for k, p in enumerate(target) if p.is_shard() and op.mesh_shape[k] > 1]
    out = (replicated(len(op.mesh_shape)),)
    if not m_dims:
        return Sharding(inputs=(target,), outputs=out)
    return Sharding(inputs=(target,), outputs=out, local_op=_pdist_local,
                    communication=_declared_all_reduce(m_dims, op.arg("p", 2.0)))


@register_rule(aten._pdist_backward.default)
def pdist_backward_rule(op: OpSchema) -> Sharding:
    """(grad, x, p, pdist) -> grad_x: features keep their shard (each distance comes whole from ``pdist``)."""
    grad, x = op.spec("grad"), op.spec("self")
    tg, tx, out = [], [], []
    for g, p in zip(grad.placements, x.placements):
        if p.is_shard(1):
            tg.append(Replicate()), tx.append(p), out.append(p)
        elif g.is_partial() and g.reduce_op in ("sum", "avg"):
            tg.append(g), tx.append(Replicate()), out.append(Partial(g.reduce_op))
        else:
            tg.append(Replicate()), tx.append(Replicate()), out.append(Replicate())
    return Sharding(inputs={"grad": tuple(tg), "self": tuple(tx), "pdist": replicated(len(op.mesh_shape))},
                    outputs=(tuple(out),))


# -- dist -----------------------------------------------------------------------------------------------


def _dist_local(globally_empty: bool):
    def local_op(a, b, p=2.0, *, comm):
        if globally_empty:
            return aten.dist.default(a, b, p)  # raises (inf norms) or gives 0 as on one device
        diff = _wide(a) - _wide(b)
        out_dtype = torch.empty(0, dtype=a.dtype).abs().dtype  # complex -> real
        return _combine(_powers(diff, p, tuple(range(diff.ndim))), p, comm).to(out_dtype)

    return local_op


@register_rule(aten.dist.default)
def dist_rule(op: OpSchema) -> Sharding:
    a, b = op.spec("self"), op.spec("other")
    if a is None or b is None:  # a 0-d plain tensor beside one DTensor: gather and run as on one device
        return replicate_all(op)
    shape = torch.broadcast_shapes(a.shape, b.shape)
    ta, tb, mesh_dims = [], [], []
    for k, (pa, pb) in enumerate(zip(a.placements, b.placements)):
        out_dim = None
        for placement, spec in ((pa, a), (pb, b)):
            if out_dim is None and isinstance(placement, Shard):
                dim = placement.dim + len(shape) - spec.ndim
                out_dim = dim if _batch_dim(dim, len(shape), spec.shape) is not None else None
        if out_dim is None:
            ta.append(Replicate()), tb.append(Replicate())
            continue
        for spec, targets in ((a, ta), (b, tb)):
            dim = _batch_dim(out_dim, len(shape), spec.shape)
            targets.append(Shard(dim) if dim is not None else Replicate())
        if op.mesh_shape[k] > 1:
            mesh_dims.append(k)
    r = replicated(len(op.mesh_shape))
    inputs = {"self": tuple(ta), "other": tuple(tb)}
    if not mesh_dims:
        return Sharding(inputs=inputs, outputs=(r,))
    return Sharding(inputs=inputs, outputs=(r,), local_op=_dist_local(shape.numel() == 0),
                    communication=_declared_all_reduce(mesh_dims, op.arg("p", 2.0)))
