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
    """(per-tensor OpSchema, the names in ``op`` of its DTensors) for each list element."""
    # The second argument is other (List, Tensor), scalar or scalars by overload: named by the op's schema.
    other_name = op.record.arg_names[1]
    selves, other, rest = op.arg("self"), op.arg(other_name), tuple(op.args[2:])
    func = _element_func(op.func)
    listed = isinstance(other, (list, tuple))  # else one value (the Tensor overload's DTensor) for every element
    for i, spec in enumerate(selves):
        o = other[i] if listed else other
        names, specs = [("self", i)], [spec]
        if isinstance(o, DTensorSpec):
            names.append((other_name, i) if listed else other_name)
            specs.append(o)
        yield OpSchema(func, (spec, o, *rest), op.kwargs, tuple(specs)), names


def _merge(answers) -> tuple[dict, list]:
    """Each element's input placements by name in the foreach op; a shared input (the Tensor overload's scalar
    tensor) takes the first element's request."""
    inputs: dict = {}
    outputs: list = []
    for (schema, names), sharding in answers:
        for name, want in zip(names, sharding.inputs_for(schema)):
            if inputs.get(name) is None:
                inputs[name] = want
        outputs.extend(sharding.outputs)
    return inputs, outputs


def _binary_rule(op: OpSchema) -> Sharding:
    answers = [(e, rule_for(e[0].func)(e[0])) for e in _element_schemas(op)]
    inputs, outputs = _merge(answers)
    if op.func._schema.returns:  # functional: k outputs
        return Sharding(inputs=inputs, outputs=tuple(outputs))
    for i, spec in enumerate(op.arg("self")):  # in place: each element must stay where it is
        want = inputs.get(("self", i))
        if (want is not None and tuple(want) != spec.placements) or tuple(outputs[i]) != spec.placements:
            raise ValueError(
                f"{op.func}: element {i} ({spec.placements}) cannot be updated in place in its layout; "
                f"redistribute it first (e.g. to Replicate), or use the per-tensor op"
            )
        inputs[("self", i)] = None
    return Sharding(inputs=inputs, outputs=())


def _register_binary():
    ops = []
    for name in _BINARY:
        for packet in (getattr(aten, f"_foreach_{name}"), getattr(aten, f"_foreach_{name}_")):
            ops += [getattr(packet, o) for o in packet.overloads() if o in _ELEMENT_OVERLOAD]
    register_rule(*ops)(_binary_rule)


_register_binary()


@register_rule(aten._foreach_norm.Scalar)
def foreach_norm_rule(op: OpSchema) -> Sharding:
    ord_, dtype = op.arg("ord", 2), op.arg("dtype")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    norm = aten.linalg_vector_norm.default
    rule = rule_for(norm)
    schemas = [OpSchema(norm, (spec, ord_), kwargs, (spec,)) for spec in op.arg("self")]
    answers = [rule(schema) for schema in schemas]
    inputs = {("self", i): a.inputs_for(schema)[0] for i, (schema, a) in enumerate(zip(schemas, answers))}
    # The elements' declared communication, each once: the Communicator handed to the list's local op serves
    # the elements that declared some (a Sharding rebuilt without it would drop it silently).
    declared: list = []
    for a in answers:
        declared += [d for d in a.communication if d not in declared]
    local_ops = [(a.local_op, bool(a.communication)) for a in answers]
    local_op = None
    if any(f for f, _ in local_ops):
        def local_op(tensors, ord=2, dtype=None, **comm):  # noqa: A002 (aten's name); comm: where declared
            return [(f or norm)(t, ord, dtype=dtype, **(comm if talks else {}))
                    for (f, talks), t in zip(local_ops, tensors)]
    return Sharding(inputs=inputs, outputs=tuple(a.outputs[0] for a in answers), local_op=local_op,
                    communication=tuple(declared))
