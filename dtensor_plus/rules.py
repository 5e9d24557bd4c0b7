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

from .placements import Placement
from .spec import DTensorSpec

__all__ = ["OpSchema", "Sharding", "register_rule", "rule_for", "override_rule", "registered_ops"]


@dataclass(frozen=True, slots=True)
class OpSchema:
    """What a rule sees of one op call. ``args``/``kwargs`` hold DTensorSpecs where DTensors were passed."""

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

    def arg(self, index: int, name: str | None = None, default=None):
        """Positional argument ``index``, else keyword ``name``, else ``default``."""
        if index < len(self.args):
            return self.args[index]
        return self.kwargs.get(name, default) if name else default


@dataclass(frozen=True, slots=True)
class Sharding:
    """A rule's decision.

    Args:
        inputs: one entry per DTensor input (``OpSchema.specs`` order): the placements it must have, or
            None to leave it as it is.
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
    """

    inputs: tuple[tuple[Placement, ...] | None, ...]
    outputs: tuple[tuple[Placement, ...] | None, ...]
    shape_arg: int | None = None
    local_op: Callable | None = None
    communication: tuple = ()


Rule = Callable[[OpSchema], Sharding]

_RULES: dict[torch._ops.OpOverload, Rule] = {}
_OVERRIDES: list[dict] = []
_OVERRIDE_STRIDED: list[str | None] = []  # each scope's ``strided`` mode, beside _OVERRIDES
_GENERATION = [0]  # bumped whenever the registry changes: every cached plan is stale then
# The rule set in force, as a hashable value: (generation, one id per active override scope). Entering an
# override with the same rules as before gives back the same value, so the dispatcher keeps one plan cache
# per rule set and a `with loss_parallel():` block every step re-plans nothing.
_SCOPE_IDS: dict = {}
_SCOPE_STACK: list[int] = []
_RULE_SETS: dict = {}
_RULE_SET = [(0, ())]


_STRIDED: dict[torch._ops.OpOverload, str] = {}
STRIDED_MODES = ("native", "as_shard")


def register_rule(*ops: torch._ops.OpOverload, strided: str | None = None) -> Callable[[Rule], Rule]:
    """Decorator registering one rule for one or more aten overloads. A second registration raises.

    ``strided`` says how the rule meets a StridedShard input (see ``dtensor_plus.strided``): None (the
    default), it never sees one: the dispatcher gathers it first; ``"as_shard"``, the rule treats every dim
    independently of its neighbours' order (elementwise, a matmul's rows, batch or contraction, a permute),
    so it may read a StridedShard as a Shard of the same dim; ``"native"``, the rule handles it itself
    (views).
    """
    if strided not in (None, *STRIDED_MODES):
        raise ValueError(f"register_rule(strided={strided!r}): use None or one of {STRIDED_MODES}")

    def decorate(rule: Rule) -> Rule:
        for op in ops:
            if not isinstance(op, torch._ops.OpOverload):
                raise TypeError(f"register_rule takes aten overloads such as aten.mm.default, got {op!r}")
            if op in _RULES:
                raise ValueError(f"{op} already has the rule {_RULES[op].__qualname__}; one op, one rule")
            _RULES[op] = rule
            if strided is not None:
                _STRIDED[op] = strided
        _GENERATION[0] += 1
        _refresh_rule_set()
        return rule

    return decorate


_META: dict = {}


def register_meta(*ops: torch._ops.OpOverload) -> Callable:
    """Decorator giving the output metadata of aten overloads torch has no meta kernel for: ``fn`` takes the op's
    arguments with meta tensors in place of DTensors and returns its outputs as meta tensors. The dispatcher
    needs the outputs' global shapes to plan; ours, not torch's (torch's own registry is left alone)."""

    def decorate(fn: Callable) -> Callable:
        for op in ops:
            if op in _META:
                raise ValueError(f"{op} already has the metadata function {_META[op].__qualname__}")
            _META[op] = fn
        return fn

    return decorate


def meta_for(op: torch._ops.OpOverload) -> Callable | None:
    return _META.get(op)


def rule_for(op: torch._ops.OpOverload) -> Rule | None:
    for overrides in reversed(_OVERRIDES):
        if op in overrides:
            return overrides[op]
    return _RULES.get(op)


def strided_mode(op: torch._ops.OpOverload) -> str | None:
    """How ``op``'s rule meets StridedShard inputs: register_rule's ``strided``, or override_rule's for an op
    it overrides."""
    for overrides, mode in zip(reversed(_OVERRIDES), reversed(_OVERRIDE_STRIDED)):
        if op in overrides:
            return mode
    return _STRIDED.get(op)


def registered_ops() -> Sequence[torch._ops.OpOverload]:
    return tuple(_RULES)


def generation() -> int:
    return _GENERATION[0]


def rule_set():
    """The rule set in force: equal values mean the same rule for every op (the dispatcher's cache key)."""
    return _RULE_SET[0]


def _refresh_rule_set() -> None:
    value = (_GENERATION[0], tuple(_SCOPE_STACK))
    _RULE_SET[0] = _RULE_SETS.setdefault(value, value)  # interned: the dispatcher compares by identity


def _identity(rule):
    """What makes two rules the same rule: the function, or a partial's function and arguments."""
    if isinstance(rule, functools.partial):
        keywords = tuple(sorted((k, _identity(v)) for k, v in rule.keywords.items()))
        return (_identity(rule.func), tuple(_identity(a) for a in rule.args), keywords)
    return rule


@contextlib.contextmanager
def override_rule(rules: dict[torch._ops.OpOverload, Rule], *, strided: str | None = None):
    """Use ``rules`` in place of the registered ones inside the block (scoped; nests; cache-safe).
    ``strided``: how these rules meet StridedShard inputs, as in ``register_rule``."""
    if strided not in (None, *STRIDED_MODES):
        raise ValueError(f"override_rule(strided={strided!r}): use None or one of {STRIDED_MODES}")
    scope = dict(rules)
    identity = (frozenset((op, _identity(r)) for op, r in scope.items()), strided)
    scope_id = _SCOPE_IDS.setdefault(identity, len(_SCOPE_IDS))
    _OVERRIDES.append(scope)
    _OVERRIDE_STRIDED.append(strided)
    _SCOPE_STACK.append(scope_id)
    _refresh_rule_set()
    try:
        yield
    finally:
        at = next(i for i, s in enumerate(_OVERRIDES) if s is scope)
        del _OVERRIDES[at], _OVERRIDE_STRIDED[at]
        _SCOPE_STACK.remove(scope_id)
        _refresh_rule_set()
