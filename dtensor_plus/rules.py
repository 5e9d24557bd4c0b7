"""The one registry of sharding rules.

A rule is a pure function of metadata: it receives an ``OpSchema`` (the op, the input specs in place of the
DTensor arguments, the other arguments, the mesh) and returns a ``Sharding``: the placements each DTensor
input must have and the placements of each output. It never sees tensor values or process groups, which
is what lets the dispatcher cache its answer.

    @register_rule(aten.mm.default)
    def mm_rule(op: OpSchema) -> Sharding: ...

Registering an op twice raises. A layout that needs a different rule for a while (loss parallel, context
parallel) installs it with ``override_rule`` for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .dispatcher import DISPATCHER, RuleEntry
from .op_record import record_of
from .placements import Placement
from .spec import DTensorSpec

__all__ = ["OpSchema", "Sharding", "register_rule", "register_rules", "register_meta", "rule_for", "override_rule",
           "registered_ops"]


@dataclass(frozen=True, slots=True)
class OpSchema:
    """What a rule sees of one op call. ``args``/``kwargs`` hold DTensorSpecs where DTensors were passed.

    A rule reads arguments by their schema names: ``op.arg("dim")`` (wherever it was passed, positionally or by
    keyword), ``op.spec("weight")`` (the spec of a DTensor argument, None when that argument is not a DTensor),
    and may answer ``Sharding(inputs={"input": ..., "weight": ...})`` by name too."""

    func: torch._ops.OpOverload
    args: tuple
    kwargs: dict
    specs: tuple[DTensorSpec, ...]  # the DTensor arguments in order of appearance (args, then kwargs)

    @property
    def mesh(self):
        return self.specs[0].mesh

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return self.specs[0].mesh.shape

    @property
    def record(self):
        """The op's facts (op_record.OpRecord): argument names, in place or not, its functional twin..."""
        return record_of(self.func)

    @property
    def names(self) -> tuple:
        """The argument name of each spec in ``specs`` ((name, index) for an element of a list argument)."""
        return self.record.names_of(self.args, self.kwargs, _is_spec)

    def arg(self, index: int | str, name: str | None = None, default=None):
        """An argument by schema name (``op.arg("dim")``, ``op.arg("dim", default=0)``), wherever it was passed;
        or by position ``index``, else keyword ``name``, else ``default``."""
        if isinstance(index, str):
            name, default = index, name if default is None else default
            names = self.record.arg_names
            index = names.index(name) if name in names else len(self.args)
        if index < len(self.args):
            return self.args[index]
        return self.kwargs.get(name, default) if name else default

    def spec(self, name: str) -> DTensorSpec | None:
        """The spec of DTensor argument ``name``, or None when it is not a DTensor (None, a plain scalar)."""
        value = self.arg(name)
        return value if isinstance(value, DTensorSpec) else None

    def by_name(self, targets: dict) -> tuple:
        """``Sharding.inputs`` in ``specs`` order from a dict {argument name: placements}; an element of a list
        argument takes its (name, index) entry, else its name's. Unnamed inputs stay as they are (None), and a
        named argument that is not a DTensor in this call is ignored."""
        names = self.names
        # A schema argument that is not a DTensor in this call (weight=None) is simply not moved; a name the schema
        # does not have is a rule's typo.
        unknown = [n for n in targets if (n[0] if type(n) is tuple else n) not in self.record.arg_names]
        if unknown:
            raise ValueError(f"{self.func}: the rule names inputs {unknown}, which are not arguments of this op "
                             f"(its schema names {list(self.record.arg_names)}); name arguments as in the op's schema")
        return tuple(targets.get(n, targets.get(n[0]) if type(n) is tuple else None) for n in names)


def _is_spec(value) -> bool:
    return isinstance(value, DTensorSpec)


@dataclass(frozen=True, slots=True)
class Sharding:
    """A rule's decision.

    Args:
        inputs: one entry per DTensor input (``OpSchema.specs`` order): the placements it must have, or
            None to leave it as it is; or a dict {argument name: placements} (unnamed inputs are left as they are).
        outputs: one entry per tensor output (flattened in order): its placements, or None for a tensor
            output that is not a DTensor (never used by core rules).
        shape_arg: index of a positional argument holding a shape (view, expand, new_zeros...): the
            dispatcher replaces it by the local shape of output 0 on each rank.
        local_op: what to run on the local blocks instead of the op itself, called with the same
            (localised) arguments. For ops whose local form differs from the global one, e.g. a mean over
            a sharded dim is a local sum divided by the global count, giving Partial(sum). It may close over
            metadata (global sizes, specs) but must give the same answer for the same cache key.
        communication: the collectives ``local_op`` needs beside the input moves, declared
            (``dtensor_plus.declared``: AllReduce, RingShift, Redistribution); the local op is then called with
            ``comm=`` a Communicator that runs exactly these. A rule never calls a collective itself.
        whole_batch_of: the name of a DTensor argument whose global value the local op may read instead of
            communicating: it is then also called with ``whole_batch=`` that argument's whole as every rank holds
            it (a batch cut by ``shard_batch``, through views: ``dtensor_plus.whole_batch``), or None.
    """

    inputs: tuple[tuple[Placement, ...] | None, ...] | dict
    outputs: tuple[tuple[Placement, ...] | None, ...]
    shape_arg: int | None = None
    local_op: Callable | None = None
    communication: tuple = ()
    whole_batch_of: str | None = None

    def inputs_for(self, op: OpSchema) -> tuple:
        """``inputs`` as one entry per spec of ``op`` (a dict by name resolved)."""
        return op.by_name(self.inputs) if isinstance(self.inputs, dict) else tuple(self.inputs)


Rule = Callable[[OpSchema], Sharding]

STRIDED_MODES = ("native", "as_shard")


def register_rule(*ops: torch._ops.OpOverload, strided: str | None = None) -> Callable[[Rule], Rule]:
    """Decorator registering one rule for one or more aten overloads. A second registration raises.

    ``strided`` says how the rule meets a StridedShard input (see ``dtensor_plus.strided``): None (the
    default), it never sees one: the dispatcher gathers it first; ``"as_shard"``, the rule treats every dim
    independently of its neighbours' order (elementwise, a matmul's rows, batch or contraction, a permute),
    so it may read a StridedShard as a Shard of the same dim; ``"native"``, the rule handles it itself
    (views).
    """
    _check_strided("register_rule", strided)

    def decorate(rule: Rule) -> Rule:
        for op in ops:
            if not isinstance(op, torch._ops.OpOverload):
                raise TypeError(f"register_rule takes aten overloads such as aten.mm.default, got {op!r}")
        DISPATCHER.register({op: RuleEntry(rule, strided) for op in ops})
        return rule

    return decorate


def register_rules(table: dict, *, strided: str | None = None) -> None:
    """Register a table {aten overload: rule} at once: an op family's file ends with one such table."""
    _check_strided("register_rules", strided)
    DISPATCHER.register({op: RuleEntry(rule, strided) for op, rule in table.items()})


def register_meta(*ops: torch._ops.OpOverload) -> Callable:
    """Decorator giving the output metadata of aten overloads torch has no meta kernel for: ``fn`` takes the op's
    arguments with meta tensors in place of DTensors and returns its outputs as meta tensors. The dispatcher
    needs the outputs' global shapes to plan; ours, not torch's (torch's own registry is left alone)."""

    def decorate(fn: Callable) -> Callable:
        DISPATCHER.register({}, {op: fn for op in ops})
        return fn

    return decorate


def meta_for(op: torch._ops.OpOverload) -> Callable | None:
    return DISPATCHER.rule_set.meta(op)


def rule_for(op: torch._ops.OpOverload) -> Rule | None:
    return DISPATCHER.rule_set.rule(op)


def strided_mode(op: torch._ops.OpOverload) -> str | None:
    """How ``op``'s rule meets StridedShard inputs: register_rule's ``strided``, or override_rule's for an op
    it overrides."""
    entry = DISPATCHER.rule_set.entry(op)
    return None if entry is None else entry.strided


def registered_ops() -> Sequence[torch._ops.OpOverload]:
    return DISPATCHER.registered.ops()


def _check_strided(where: str, strided) -> None:
    if strided not in (None, *STRIDED_MODES):
        raise ValueError(f"{where}(strided={strided!r}): use None or one of {STRIDED_MODES}")


def _identity(rule):
    """What makes two rules the same rule: the function, or a partial's function and arguments."""
    if isinstance(rule, functools.partial):
        keywords = tuple(sorted((k, _identity(v)) for k, v in rule.keywords.items()))
        return (_identity(rule.func), tuple(_identity(a) for a in rule.args), keywords)
    return rule


@contextlib.contextmanager
def override_rule(rules: dict[torch._ops.OpOverload, Rule], *, strided: str | None = None, asked_for: bool = False):
    """Use ``rules`` in place of the ones in force inside the block (scoped; nests; cache-safe: entering the
    same rules again finds the same rule set, so the same plans). ``strided``: how these rules meet
    StridedShard inputs, as in ``register_rule``. ``asked_for``: the block is a layout users enter by name
    (``loss_parallel()``, ``context_parallel()``), so the communication these rules declare runs in
    ``explicit_communication()`` too."""
    _check_strided("override_rule", strided)
    identity = (frozenset((op, _identity(r)) for op, r in rules.items()), strided, asked_for)
    outer = DISPATCHER.rule_set
    entries = {op: RuleEntry(r, strided, asked_for) for op, r in rules.items()}
    DISPATCHER.use_rules(DISPATCHER.child_set(identity, entries))
    try:
        yield
    finally:
        DISPATCHER.use_rules(outer)
