"""Rules read their arguments by schema name (issue 17): wherever an argument is passed, positionally or by
keyword, and whatever an overload calls it. Pure rule calls on metadata (no ranks): each case read the wrong
argument, or none, when rules addressed arguments by position."""

import dataclasses

import pytest

import torch

from dtensor_plus import Partial, Replicate, Shard, override_rule
from dtensor_plus.declared import AllReduce
from dtensor_plus.rules import OpSchema, Sharding, rule_for
from dtensor_plus.testing.rules import MeshShape, spec

aten = torch.ops.aten
R = Replicate()
MESH = MeshShape((4,))


def _answer(func, args, kwargs=None):
    """The rule's (inputs by spec, outputs) for ``func`` on ``args``/``kwargs`` holding specs."""
    kwargs = kwargs or {}
    specs = tuple(a for a in (*args, *kwargs.values()) if hasattr(a, "placements"))
    schema = OpSchema(func, tuple(args), kwargs, specs)
    sharding = rule_for(func)(schema)
    return list(sharding.inputs_for(schema)), sharding.outputs


def test_vdot_reads_its_second_argument_named_other():
    """dot calls it ``tensor``, vdot ``other``: by position both worked, by keyword vdot read nothing."""
    x, y = spec(MESH, (8,), (Shard(0),)), spec(MESH, (8,), (Shard(0),))
    for func, name in ((aten.dot.default, "tensor"), (aten.vdot.default, "other")):
        by_position = _answer(func, (x, y))
        by_keyword = _answer(func, (x,), {name: y})
        assert by_position == by_keyword == ([(Shard(0),), (Shard(0),)], ((Partial(),),)), func


def test_batch_norm_backward_reads_update_where_native_says_train():
    """batch_norm_backward's ``update`` is native_batch_norm_backward's ``train``: training gathers a batch Shard
    (the statistics sum over the batch), eval keeps it."""
    grad, x = spec(MESH, (8, 3), (Shard(0),)), spec(MESH, (8, 3), (Shard(0),))
    weight, reserve = spec(MESH, (3,), (R,)), spec(MESH, (0,), (R,), torch.uint8)
    stats = [spec(MESH, (3,), (R,)) for _ in range(4)]
    for train in (True, False):
        native = _answer(aten.native_batch_norm_backward.default,
                         (grad, x, weight, *stats, train, 1e-5, [True, True, True]))
        with_update = _answer(aten.batch_norm_backward.default, (grad, x, weight, *stats),
                              {"update": train, "eps": 1e-5, "output_mask": [True, True, True], "reserve": reserve})
        expected = (R,) if train else (Shard(0),)
        assert native[1][0] == with_update[1][0] == expected, (train, native, with_update)
        assert with_update[0][-1] == (R,)  # the reserve, by name


def test_attention_key_and_value_passed_by_keyword():
    """q, k, v head-sharded stay so; read by position, a keyword k and v were "other" tensors and gathered."""
    q, k, v = (spec(MESH, (2, 8, 5, 4), (Shard(1),)) for _ in range(3))
    func = aten._scaled_dot_product_flash_attention_for_cpu.default
    assert _answer(func, (q,), {"key": k, "value": v})[0] == [(Shard(1),)] * 3
    assert _answer(func, (q, k, v))[0] == [(Shard(1),)] * 3


def test_group_norm_weight_passed_by_keyword():
    x, weight = spec(MESH, (8, 6, 5), (Shard(0),)), spec(MESH, (6,), (Shard(0),))
    inputs, outputs = _answer(aten.native_group_norm.default, (x,),
                              {"weight": weight, "bias": None, "N": 8, "C": 6, "HxW": 5, "group": 3, "eps": 1e-5})
    assert inputs == [(Shard(0),), (R,)] and outputs[0] == (Shard(0),)


def test_an_optional_tensor_argument_passed_by_keyword():
    """nll_loss's class weight by keyword, or absent: the rule names only the DTensors the call has (inputs by
    name refuse a name that is no DTensor of the call, so naming an absent weight would raise)."""
    x, t = spec(MESH, (8, 5), (Shard(0),)), spec(MESH, (8,), (Shard(0),), torch.int64)
    w = spec(MESH, (5,), (Shard(0),))
    inputs, _ = _answer(aten.nll_loss_forward.default, (x, t), {"weight": w, "reduction": 2, "ignore_index": -100})
    assert inputs == [(Shard(0),), (Shard(0),), (R,)]
    inputs, _ = _answer(aten.nll_loss_forward.default, (x, t, None, 2, -100))
    assert inputs == [(Shard(0),), (Shard(0),)]


def test_foreach_norm_keeps_the_communication_its_elements_declare():
    """foreach_norm builds its answer from linalg_vector_norm's per element: a declared collective must survive
    (a Sharding rebuilt field by field dropped it), once, and the elements that declared it get ``comm``."""
    declared = AllReduce((0,))
    norm_rule = rule_for(aten.linalg_vector_norm.default)
    seen = []

    def element_local_op(t, ord=2, dtype=None, *, comm):
        seen.append(comm)
        return t

    def talking_norm_rule(op: OpSchema) -> Sharding:
        return dataclasses.replace(norm_rule(op), local_op=element_local_op, communication=(declared,))

    xs = [spec(MESH, (8,), (Shard(0),)), spec(MESH, (6,), (R,))]
    with override_rule({aten.linalg_vector_norm.default: talking_norm_rule}):
        schema = OpSchema(aten._foreach_norm.Scalar, (xs, 2), {}, tuple(xs))
        sharding = rule_for(aten._foreach_norm.Scalar)(schema)
    assert sharding.communication == (declared,)
    sharding.local_op([torch.ones(2), torch.ones(6)], 2, comm="the communicator")
    assert seen == ["the communicator", "the communicator"]


def test_by_name_ignores_absent_arguments_and_refuses_names_the_op_lacks():
    mesh = MeshShape((2,))
    a, b = spec(mesh, (4, 3), (Shard(0),)), spec(mesh, (3, 5), (Replicate(),))
    op = OpSchema(torch.ops.aten.addmm.default, (None, a, b), {}, (a, b))  # self is not a DTensor here
    assert op.by_name({"self": (Replicate(),), "mat2": (Shard(0),)}) == (None, (Shard(0),))
    with pytest.raises(ValueError, match="not arguments of this op.*mat1"):
        op.by_name({"mat3": (Replicate(),)})
