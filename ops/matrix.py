"""Matrix products: one rule builder from einsum notation, registered for mm, bmm, dot, vdot, mv and add* forms.

A product is written in einsum notation ("mk,kn->mn"). A letter in the output is *free*, a letter that is
not is *summed*. Per mesh dim the product splits one of four ways (n = the mesh dim's size):

    strategy              operands                                         output
    free letter l         Shard(dim of l) where l occurs, else Replicate   Shard(dim of l)
    summed letter l       Shard(dim of l) where l occurs, else Replicate   Partial(sum)
    Partial operand i     Partial(r) on operand i, Replicate on the rest   Partial(r), r in sum | avg
    replicate             Replicate                                        Replicate

A product is linear in each operand, so one Partial(sum) or Partial(avg) operand may stay Partial; two Partial
operands, or a Partial(max|min) one, must be reduced first (the planner reduces them). The Partial-operand
strategy is offered for an operand that is Partial(r) now, or that is Replicate while the bias is Partial(r).

The add* forms compute ``beta * bias + alpha * product``; the bias follows the output layout:

    output Shard(d)       bias Shard(its dim under d), or Replicate where the bias broadcasts along d
    output Partial(r)     bias Partial(r): a Replicate bias is partitioned for free (zeros on all but one rank
                          for sum, the same value for avg), since beta * bias is linear in the bias
    output Replicate      bias Replicate

The layout is chosen jointly over the mesh dims (every combination of the per-mesh-dim strategies): the one
whose inputs the planner can reach for the fewest bytes (``redistribute_cost``) wins; on
a tie, the one that changes the fewest inputs, then the earlier candidate (free letters, summed letters,
Partial operands, Replicate). In-place forms add the cost of moving the result back into ``self``.

matmul, linear and einsum are composite in aten: they reach us as these ops plus views and permutes.
"""

from __future__ import annotations

import dataclasses
import itertools

from dtensor_plus.placements import Partial, Placement, Replicate, Shard
from dtensor_plus.redistribute import redistribute_cost
from dtensor_plus.rules import OpSchema, Sharding, register_rule
from dtensor_plus.spec import DTensorSpec

from .common import aten, replicate_all

__all__ = ["einsum_rule", "parse_equation"]

_LINEAR_REDUCE_OPS = ("sum", "avg")


def parse_equation(equation: str) -> tuple[tuple[str, ...], str]:
    """``"mk,kn->mn"`` -> ``(("mk", "kn"), "mn")``; letters only, no ellipsis, no repeated letter per operand."""
    if equation.count("->") != 1:
        raise ValueError(f"einsum equation {equation!r} needs exactly one '->', e.g. 'mk,kn->mn'")
    lhs, out = equation.replace(" ", "").split("->")
    operands = tuple(lhs.split(","))
    for term in operands + (out,):
        if not term.isalpha() and term != "" or len(set(term)) != len(term):
            raise ValueError(f"einsum equation {equation!r}: term {term!r} must be distinct letters, e.g. 'bmk'")
    if set(out) - set("".join(operands)):
        raise ValueError(f"einsum equation {equation!r}: output letters {set(out) - set(''.join(operands))} "
                         f"occur in no operand")
    return operands, out


# -- candidates per mesh dim ------------------------------------------------------------------------------


def _letter_candidate(letter: str, operands, out: str):
    """Operand placements and output placement when ``letter`` is split over one mesh dim."""
    ins = tuple(Shard(term.index(letter)) if letter in term else Replicate() for term in operands)
    return ins, Shard(out.index(letter)) if letter in out else Partial("sum")


def _partial_candidates(operands_now: list[Placement], bias_now: Placement | None):
    """One operand stays Partial(r) (r linear), the others Replicate: for an operand that is Partial(r) now, or,
    when the bias is Partial(r), for an operand that is Replicate now (partitioned for free)."""
    for i, now in enumerate(operands_now):
        for reduce_op in _LINEAR_REDUCE_OPS:
            here = now == Partial(reduce_op) or (now.is_replicate() and bias_now == Partial(reduce_op))
            if here:
                ins = tuple(Partial(reduce_op) if j == i else Replicate() for j in range(len(operands_now)))
                yield ins, Partial(reduce_op)


def _mesh_dim_candidates(operands, out: str, operands_now, bias_now, allow_partial: bool):
    letters = list(dict.fromkeys(out + "".join(operands)))  # free letters first, then summed ones
    candidates = [_letter_candidate(letter, operands, out) for letter in letters]
    candidates += list(_partial_candidates(operands_now, bias_now))
    candidates.append(((Replicate(),) * len(operands), Replicate()))
    if not allow_partial:
        candidates = [c for c in candidates if not c[1].is_partial()]
    return candidates


# -- the bias of the add* forms ---------------------------------------------------------------------------


def _bias_placement(want: Placement, bias: DTensorSpec, out_shape) -> Placement:
    if isinstance(want, Shard):
        dim = want.dim - (len(out_shape) - bias.ndim)
        broadcast = dim < 0 or (bias.shape[dim] == 1 and out_shape[want.dim] != 1)
        return Replicate() if broadcast else Shard(dim)
    return want  # Partial(r) (a Replicate bias is partitioned locally) or Replicate


# -- cost -------------------------------------------------------------------------------------------------


def _cost(spec: DTensorSpec, dst: tuple, mesh_shape: tuple) -> float:
    return redistribute_cost(spec.placements, dst, mesh_shape, spec.shape.numel(), spec.dtype.itemsize)


# -- the rule builder -------------------------------------------------------------------------------------


def _out_shape(operands, out: str, specs) -> tuple[int, ...]:
    sizes = {letter: spec.shape[i] for term, spec in zip(operands, specs) for i, letter in enumerate(term)}
    return tuple(sizes[letter] for letter in out)


def _choose(operands, out, specs, bias, mesh_shape, allow_partial: bool, inplace: bool):
    """The cheapest joint layout: (placements per operand, bias placements or None, output placements)."""
    out_shape = _out_shape(operands, out, specs)
    per_mesh_dim = [
        _mesh_dim_candidates(operands, out, [s.placements[k] for s in specs],
                             bias.placements[k] if bias is not None else None, allow_partial)
        for k in range(len(mesh_shape))
    ]
    best = None
    for index, combo in enumerate(itertools.product(*per_mesh_dim)):
        ins = [tuple(c[0][i] for c in combo) for i in range(len(operands))]
        output = tuple(c[1] for c in combo)
        bias_target = None if bias is None else tuple(_bias_placement(p, bias, out_shape) for p in output)
        targets = list(zip(specs, ins)) + ([(bias, bias_target)] if bias is not None else [])
        cost = sum(_cost(spec, dst, mesh_shape) for spec, dst in targets)
        if inplace:  # the result is copied back into self's layout
            cost += redistribute_cost(output, bias.placements, mesh_shape, bias.shape.numel(), bias.dtype.itemsize)
        key = (cost, sum(dst != spec.placements for spec, dst in targets), index)
        if best is None or key < best[0]:
            best = (key, ins, bias_target, output)
    return best[1:]


def einsum_rule(equation: str, operand_names: tuple[str, ...], bias_name: str | None = None):
    """A rule for an op computing ``equation`` over its tensor arguments named ``operand_names``, plus
    ``beta * bias`` for the argument named ``bias_name`` (the add* forms)."""
    operands, out = parse_equation(equation)
    if len(operands) != len(operand_names):
        raise ValueError(f"{equation!r} has {len(operands)} operands but {len(operand_names)} operand names were given")

    def rule(op: OpSchema) -> Sharding:
        specs = tuple(op.arg(name) for name in operand_names)
        for spec, term in zip(specs, operands):
            assert isinstance(spec, DTensorSpec) and spec.ndim == len(term), (op.func, spec, term)
        bias = op.arg(bias_name) if bias_name is not None else None
        # A plain (0-d) bias is added whole on every rank, so the output may not be Partial then.
        plain_bias = bias is not None and not isinstance(bias, DTensorSpec)
        bias = None if plain_bias else bias
        inplace = bias is not None and op.record.inplace
        ins, bias_target, output = _choose(operands, out, specs, bias, op.mesh_shape, not plain_bias, inplace)
        inputs = dict(zip(operand_names, ins))
        if bias is not None:
            inputs[bias_name] = bias_target
        return Sharding(inputs=inputs, outputs=(output,))

    rule.__qualname__ = rule.__name__ = f"einsum_rule({equation!r})"
    return rule


# -- registrations ----------------------------------------------------------------------------------------

register_rule(aten.mm.default, strided="as_shard")(einsum_rule("mk,kn->mn", ("self", "mat2")))
register_rule(aten.bmm.default, strided="as_shard")(einsum_rule("bmk,bkn->bmn", ("self", "mat2")))
register_rule(aten.dot.default)(einsum_rule("k,k->", ("self", "tensor")))
register_rule(aten.vdot.default)(einsum_rule("k,k->", ("self", "other")))  # dot's second argument, named otherwise
register_rule(aten.mv.default)(einsum_rule("mk,k->m", ("self", "vec")))
register_rule(aten.addmm.default, aten.addmm_.default, strided="as_shard")(
    einsum_rule("mk,kn->mn", ("mat1", "mat2"), "self"))
register_rule(aten.baddbmm.default, aten.baddbmm_.default, strided="as_shard")(
    einsum_rule("bmk,bkn->bmn", ("batch1", "batch2"), "self"))
register_rule(aten.addbmm.default, aten.addbmm_.default)(einsum_rule("bmk,bkn->mn", ("batch1", "batch2"), "self"))

_addmv = einsum_rule("mk,k->m", ("mat", "vec"), "self")


def _addmv_local(bias, mat, vec, **kwargs):
    return aten.addmv.default(bias.expand(mat.shape[:1]), mat, vec, **kwargs)


@register_rule(aten.addmv.default, aten.addmv_.default)
def addmv_rule(op: OpSchema) -> Sharding:
    # NOTE: torch quirk: with an empty matrix (m == 0 or k == 0) addmv returns beta * bias in the *bias's*
    # shape, () or (1,), rather than (m,). Globally: nothing to compute, replicate. Locally (an empty block
    # of a non-empty matrix): expand the bias to the block's rows first, so each block has its true shape.
    mat, bias = op.arg("mat"), op.arg("self")
    full_bias = isinstance(bias, DTensorSpec) and tuple(bias.shape) == (mat.shape[0],)
    if mat.shape.numel() == 0 and not full_bias:
        return replicate_all(op)
    sharding = _addmv(op)
    if full_bias or op.record.inplace:
        return sharding
    return dataclasses.replace(sharding, local_op=_addmv_local)


register_rule(aten.addr.default, aten.addr_.default)(einsum_rule("m,n->mn", ("vec1", "vec2"), "self"))
