"""Declared communication (dtensor_plus/declared.py): rules name the collectives their local ops need in
Sharding(communication=...) and the local ops run them through the ``comm`` the executor hands them.

Checked here: what the converted rules declare (pure decisions, no ranks); that the declarations' cost terms
are the collectives actually counted (ring attention, real ranks); that a Communicator runs what was declared
and refuses the rest, on every rank alike, before any collective; and that no rule module (ops/, the
loss-parallel and context-parallel layouts) imports a collective at all.
"""

import ast
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

import dtensor_plus as dtp
from dtensor_plus import Replicate, Shard, rules
from dtensor_plus.declared import AllReduce, RingShift, UndeclaredCommunication, cost_terms
from dtensor_plus.layouts.context_parallel import context_parallel
from dtensor_plus.layouts.loss import loss_parallel
from dtensor_plus.rules import OpSchema, Sharding
from dtensor_plus.spec import DTensorSpec
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.testing.rules import spec

aten = torch.ops.aten
ROOT = pathlib.Path(__file__).resolve().parents[2]


class _Mesh:
    """Enough of a mesh for the rules here, which read its shape and dim sizes."""

    def __init__(self, shape):
        self.shape, self.ndim = tuple(shape), len(shape)

    def size(self, mesh_dim=None):
        return math.prod(self.shape) if mesh_dim is None else self.shape[mesh_dim]


def _decision(func, *args, mesh_shape=(4,), **kwargs) -> Sharding:
    """``func``'s rule in force on (shape, placements[, dtype]) arguments; anything else passes through."""
    mesh = _Mesh(mesh_shape)
    args = tuple(spec(mesh, *a) if isinstance(a, tuple) and len(a) in (2, 3) and isinstance(a[1], tuple) else a
                 for a in args)
    specs = tuple(a for a in args if isinstance(a, DTensorSpec))
    return rules.rule_for(func)(OpSchema(func, args, kwargs, specs))


# -- what the rules declare ---------------------------------------------------------------------------------

M = (Shard(1),)  # the features of (rows, features) split on a 4-rank mesh


@pytest.mark.parametrize("p, reduce_op", [(2.0, "sum"), (0.0, "sum"), (math.inf, "max"), (-math.inf, "min")])
def test_distances_declare_one_all_reduce_of_their_powers(p, reduce_op):
    expected = (AllReduce((0,), (reduce_op,)),)
    assert _decision(aten._cdist_forward.default, ((3, 16), M), ((2, 16), M), p, None).communication == expected
    assert _decision(aten._pdist_forward.default, ((3, 16), M), p).communication == expected
    assert _decision(aten.dist.default, ((8, 3), (Shard(0),)), ((8, 3), (Shard(0),)), p).communication == expected
    # features not split: no communication, so no comm argument either
    assert _decision(aten._cdist_forward.default, ((8, 4), (Shard(0),)), ((2, 4), (Replicate(),)), p, None).communication == ()


def test_nll_mean_declares_the_total_weight_all_reduce():
    logits, target = ((8, 5), (Replicate(), Shard(0))), ((8,), (Replicate(), Shard(0)), torch.int64)
    mean = _decision(aten.nll_loss_forward.default, logits, target, None, 1, -100, mesh_shape=(2, 2))
    assert mean.communication == (AllReduce((1,), ("sum",)),)
    summed = _decision(aten.nll_loss_forward.default, logits, target, None, 2, -100, mesh_shape=(2, 2))
    assert summed.communication == ()  # Partial(sum) outputs: nothing to combine inside the op


def test_loss_parallel_declares_its_statistics():
    logits = ((6, 7), (Shard(0), Shard(1)))
    with loss_parallel():
        forward = _decision(aten._log_softmax.default, logits, 1, False, mesh_shape=(2, 4))
        backward = _decision(aten._log_softmax_backward_data.default, logits, logits, 1, torch.float32, mesh_shape=(2, 4))
        nll = _decision(aten.nll_loss_forward.default, logits, ((6,), (Shard(0), Replicate()), torch.int64), None, 1,
                        -100, mesh_shape=(2, 4))
    assert forward.communication == (AllReduce((1,), ("max", "sum")),)
    assert cost_terms(forward.communication, _Mesh((2, 4))) == [("all_reduce", 4)] * 2  # max, then sum
    assert backward.communication == (AllReduce((1,), ("sum",)),)
    assert nll.communication == (AllReduce((0,), ("sum",)),)  # the total weight over the batch shards only
    # outside the block the default rule gathers the classes and declares nothing
    assert _decision(aten._log_softmax.default, logits, 1, False, mesh_shape=(2, 4)).communication == ()


# -- no rule module calls a collective itself ---------------------------------------------------------------

_RULE_MODULES = sorted((ROOT / "ops").glob("*.py")) + [ROOT / "layouts" / "loss.py", ROOT / "layouts" / "context_parallel.py"]
_COLLECTIVE_MODULES = {"collectives", "point_to_point", "torch.distributed", "dtensor_plus.collectives",
                       "dtensor_plus.point_to_point", "torch.distributed._functional_collectives"}


def _collective_imports(path: pathlib.Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name in _COLLECTIVE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            found += [f"{module}.{a.name}" for a in node.names
                      if module in _COLLECTIVE_MODULES or a.name in _COLLECTIVE_MODULES | {"redistribute_local"}]
    return found


def test_no_rule_module_imports_a_collective():
    offenders = {str(p.relative_to(ROOT)): names for p in _RULE_MODULES if (names := _collective_imports(p))}
    assert not offenders, (f"rules must declare their communication (dtensor_plus.declared) and run it through "
                           f"comm, not call collectives: {offenders}")


# -- a Communicator runs exactly what was declared -----------------------------------------------------------


def _sum_rule(declared, reduce_op):
    def local_op(x, dtype=None, *, comm):
        return comm.all_reduce(x.sum(), reduce_op)

    def rule(op):
        return Sharding(inputs=((Shard(0),),), outputs=((Replicate(),),), local_op=local_op, communication=declared)

    return rule


def _communicator_cases():
    mesh = dtp.init_device_mesh("cpu", (3,))
    whole = torch.arange(10.0)
    x = dtp.distribute_tensor(whole, mesh, [Shard(0)])
    with rules.override_rule({aten.sum.default: _sum_rule((AllReduce((0,), ("sum",)),), "sum")}), \
            dtp.comm_mode() as comm:
        total = x.sum()
    assert total.placements == (Replicate(),) and total.to_local().item() == whole.sum().item()
    assert comm.count() == comm.count("all_reduce") == 1, comm
    errors = []
    for declared in [(AllReduce((0,), ("sum",)),), (RingShift(0, 2),)]:  # asks for max: neither declares it
        with rules.override_rule({aten.sum.default: _sum_rule(declared, "max")}), dtp.comm_mode() as comm:
            with pytest.raises(UndeclaredCommunication) as error:
                x.sum()
        assert comm.count() == 0, comm  # refused before anything was sent
        errors.append(str(error.value))
    return errors


def test_communicator_runs_what_was_declared_and_refuses_the_rest():
    for errors in run_on_ranks(3, _communicator_cases):
        for message in errors:
            assert "aten.sum.default" in message and "all_reduce('max')" in message, message
            assert "Sharding(communication=...)" in message, message
        assert "AllReduce(mesh_dims=(0,), reduce_ops=('sum',))" in errors[0]
        assert "RingShift(mesh_dim=0, steps=2)" in errors[1]


# -- declarations are what runs: ring attention --------------------------------------------------------------


def _ring_declarations_match_counts(cp):
    mesh = dtp.init_device_mesh("cpu", (cp,), mesh_dim_names=("cp",))
    dtp.manual_seed(0)
    q, k, v = (dtp.distribute_tensor(torch.randn(1, 2, 7, 4, generator=torch.Generator().manual_seed(i)), mesh,
                                     [Shard(2)]).requires_grad_() for i in range(3))
    seen = {}
    with context_parallel(mesh_dim="cp", kind="ring"):
        ops = (aten._scaled_dot_product_flash_attention_for_cpu.default,
               aten._scaled_dot_product_flash_attention_for_cpu_backward.default)

        def spy(rule, name):
            def watched(op):
                sharding = rule(op)
                seen[name] = sharding.communication
                return sharding
            return watched

        with rules.override_rule({op: spy(rules.rule_for(op), name) for op, name in zip(ops, ("forward", "backward"))},
                                 strided="native"):
            with dtp.comm_mode() as forward:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            with dtp.comm_mode() as backward:
                out.backward(torch.ones_like(out))
    assert seen["forward"] == (RingShift(0, cp - 1),) and seen["backward"] == (RingShift(0, 2 * (cp - 1)),), seen
    assert len(cost_terms(seen["forward"], mesh)) == forward.count("ring_shift") == cp - 1, forward
    assert len(cost_terms(seen["backward"], mesh)) == backward.count("ring_shift") == 2 * (cp - 1), backward


def test_ring_declarations_are_the_shifts_that_run():
    run_on_ranks(3, _ring_declarations_match_counts, 3)


def _attribution(world_size):
    mesh = dtp.init_device_mesh("cpu", (world_size,))
    x = dtp.distribute_tensor(torch.randn(6, 5), mesh, [Shard(0)])
    with dtp.comm_mode() as comm:
        torch.renorm(x, 2.0, 1, 1.0)  # norms per column over sharded rows: the declared all-reduce
        x.full_tensor()  # a move asked for by name, outside any op
        x @ dtp.distribute_tensor(torch.randn(5, 3), mesh, [Replicate()]).redistribute(placements=[Shard(0)])
    return {(str(op), collective, name): n for (op, collective, name), n in comm.by_op.items()}  # picklable


def test_each_collective_is_attributed_to_the_op_that_issued_it():
    by_op = run_on_ranks(2, _attribution, 2)[0]
    assert by_op["aten.renorm.default", "all_reduce", "0"] == 1, by_op
    assert by_op["None", "all_gather", "0"] == 1, by_op  # full_tensor: no op of ours asked
    assert sum(n for (op, _, _), n in by_op.items() if op == "aten.mm.default") >= 1, by_op  # mm's input move
