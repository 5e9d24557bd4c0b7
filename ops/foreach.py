"""Foreach ops (``torch._foreach_*``): each list element follows the rule of its own per-tensor op.

What torch's ``clip_grad_norm_(..., foreach=True)`` and foreach optimizers call: ``_foreach_norm`` and the
binary arithmetic ``_foreach_{add,sub,mul,div}[_]``. The dispatcher hands a rule one spec per DTensor, in
order (a list of k DTensors gives k specs), so a foreach rule asks the per-tensor rule about each element
(``_foreach_mul_.Tensor(xs, s)`` -> ``mul_.Tensor(xs[i], s)``; ``_foreach_norm(xs, p)`` ->
``linalg_vector_norm(xs[i], p)``) and concatenates the answers::

    torch._foreach_norm([g_shard_tp, g_replicated], 2.0)   # each as linalg_vector_norm would do it

An in-place element must keep its layout (one list op cannot move some elements and write back): an
element whose rule would move it, e.g. a Partial(max) tensor scaled in place, raises and names the fix.
"""

from __future__ import annotations

from dtensor_plus.rules import OpSchema, Sharding, register_rule, rule_for
from dtensor_plus.spec import DTensorSpec

from .common import aten

# foreach overload -> the per-element overload of the functional op (in-place ops map to in-place ones).
_BINARY = ("add", "sub", "mul", "div")
_ELEMENT_OVERLOAD = {"Scalar": "Scalar", "Tensor": "Tensor", "List": "Tensor", "ScalarList": "Scalar"}


def _element_func(func):
    name = func.overloadpacket.__name__.removeprefix("_foreach_")
    return getattr(getattr(aten, name), _ELEMENT_OVERLOAD[func._overloadname])


def _element_schemas(op: OpSchema):
    """(per-tensor OpSchema, indices of its specs in op.specs) for each list element."""
    selves, other, rest = op.args[0], op.arg(1), tuple(op.args[2:])
    k = len(selves)
    func = _element_func(op.func)
    shared = isinstance(other, DTensorSpec)  # the Tensor overload: one DTensor for every element
    for i, spec in enumerate(selves):
        o = other[i] if isinstance(other, (list, tuple)) else other
        indices = [i]
        if isinstance(o, DTensorSpec):
            indices.append(k if shared else k + i)
        specs = tuple(op.specs[j] for j in indices)
        yield OpSchema(func, (spec, o, *rest), op.kwargs, specs), indices


def _merge(op: OpSchema, answers) -> tuple[list, list]:
    """Each element's input placements written into one list over op.specs; a shared input (the Tensor
    overload's scalar tensor) takes the first element's request."""
    inputs: list = [None] * len(op.specs)
    outputs: list = []
    for (schema, indices), sharding in answers:
        for j, want in zip(indices, sharding.inputs):
            if inputs[j] is None:
                inputs[j] = want
        outputs.extend(sharding.outputs)
    return inputs, outputs


def _binary_rule(op: OpSchema) -> Sharding:
    answers = [(e, rule_for(e[0].func)(e[0])) for e in _element_schemas(op)]
    inputs, outputs = _merge(op, answers)
    if op.func._schema.returns:  # functional: k outputs
        return Sharding(inputs=tuple(inputs), outputs=tuple(outputs))
    for i, spec in enumerate(op.args[0]):  # in place: each element must stay where it is
        want = inputs[i]
        if (want is not None and tuple(want) != spec.placements) or tuple(outputs[i]) != spec.placements:
            raise ValueError(
                f"{op.func}: element {i} ({spec.placements}) cannot be updated in place in its layout; "
                f"redistribute it first (e.g. to Replicate), or use the per-tensor op"
            )
        inputs[i] = None
    return Sharding(inputs=tuple(inputs), outputs=())


def _register_binary():
    ops = []
    for name in _BINARY:
        for packet in (getattr(aten, f"_foreach_{name}"), getattr(aten, f"_foreach_{name}_")):
            ops += [getattr(packet, o) for o in packet.overloads() if o in _ELEMENT_OVERLOAD]
    register_rule(*ops)(_binary_rule)


_register_binary()


@register_rule(aten._foreach_norm.Scalar)
def foreach_norm_rule(op: OpSchema) -> Sharding:
    ord_, dtype = op.arg(1, "ord", 2), op.arg(2, "dtype")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    rule = rule_for(aten.linalg_vector_norm.default)
    answers = [rule(OpSchema(aten.linalg_vector_norm.default, (spec, ord_), kwargs, (spec,))) for spec in op.specs]
    local_ops = [a.local_op for a in answers]
    local_op = None
    if any(local_ops):
        def local_op(tensors, ord=2, dtype=None):  # noqa: A002 (aten's name)
            norm = aten.linalg_vector_norm.default
            return [(f or norm)(t, ord, dtype=dtype) for f, t in zip(local_ops, tensors)]
    return Sharding(inputs=tuple(a.inputs[0] for a in answers), outputs=tuple(a.outputs[0] for a in answers),
                    local_op=local_op)
