"""The dispatcher object: the one place the core keeps state between calls.

``DISPATCHER`` owns the rule set in force (an immutable ``RuleSet``, whose identity keys the plan cache), the
plan caches, each op's record (``op_record.OpRecord``, facts computed once), and every switch or scratch
record the rest of the core needs between calls: the modes users enter with ``with`` blocks (explicit
communication, strict random numbers, implicit replication, divergence checking), the communication counters
of ``comm_mode`` blocks, the op being dispatched. No other core module keeps mutable state at module level;
each reads and writes its own attribute here, so one object says what the process has switched on, and a
tracer (torch.compile) can guard on a handful of attributes of one object.

This module imports nothing of the core but ``RuleSet``'s value types: every other module may import it.
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections import Counter
from types import MappingProxyType

__all__ = ["DISPATCHER", "Dispatcher", "RuleSet", "RuleEntry"]

_EMPTY = MappingProxyType({})


class RuleEntry:
    """One op's rule, how it meets StridedShard inputs (``rules.register_rule``'s ``strided``), and whether the
    communication it declares counts as asked for in explicit mode (the rules of a layout entered by name)."""

    __slots__ = ("rule", "strided", "asked_for")

    def __init__(self, rule, strided: str | None, asked_for: bool = False):
        self.rule, self.strided, self.asked_for = rule, strided, asked_for


class RuleSet:
    """An immutable mapping op -> RuleEntry, plus op -> metadata function for ops torch has no meta kernel for.

    Registering makes a new set (``with_rules``); an override scope makes a child (``overridden``), interned by
    the dispatcher so that entering the same scope again gives back the same set, and so the same plan cache.
    Equal identity means the same rule for every op: the plan cache is keyed by it."""

    __slots__ = ("_entries", "_metas", "parent", "__weakref__")

    def __init__(self, entries=_EMPTY, metas=_EMPTY, parent: RuleSet | None = None):
        self._entries = MappingProxyType(dict(entries))
        self._metas = MappingProxyType(dict(metas))
        self.parent = parent  # the set this one overrides (None for the registered set)

    def entry(self, op) -> RuleEntry | None:
        return self._entries.get(op)

    def rule(self, op):
        entry = self._entries.get(op)
        return None if entry is None else entry.rule

    def meta(self, op):
        return self._metas.get(op)

    def ops(self) -> tuple:
        return tuple(self._entries)

    def with_rules(self, entries: dict, metas: dict = _EMPTY) -> RuleSet:
        """A new set: this one plus ``entries``/``metas`` (ops already here raise: one op, one rule)."""
        for op in entries:
            if op in self._entries:
                raise ValueError(f"{op} already has the rule {self._entries[op].rule.__qualname__}; one op, one rule")
        for op in metas:
            if op in self._metas:
                raise ValueError(f"{op} already has the metadata function {self._metas[op].__qualname__}")
        return RuleSet({**self._entries, **entries}, {**self._metas, **metas}, self.parent)

    def overridden(self, entries: dict) -> RuleSet:
        """A child: ``entries`` in place of this set's rules for their ops."""
        return RuleSet({**self._entries, **entries}, self._metas, self)


class Dispatcher:
    """Everything the core remembers between calls; see the module docstring. One instance: ``DISPATCHER``."""

    def __init__(self):
        # -- rules and plans (rules.py, dispatch.py)
        self.registered = RuleSet()  # every rule registered with register_rule / register_meta
        self.rule_set = self.registered  # the set in force: registered, or an override scope's child
        self.scopes: dict = {}  # (parent set, override identity) -> interned child set
        self.caches: dict = {}  # rule set -> its plan cache (key -> plan)
        self.cache: dict = self.caches.setdefault(self.rule_set, {})  # the plan cache of the set in force
        self.stats = {"hits": 0, "misses": 0}
        self.records: dict = {}  # aten op -> its OpRecord (op_record.py), made at first sight
        self.warned: set = set()  # ops whose fallback or plain-tensor warning was shown once
        # -- modes entered with `with` blocks
        self.explicit_depth = 0  # explicit_communication() nesting (explicit.py)
        self.explicit_op = None  # "plain" while a plain tensor joining DTensors is checked, in explicit mode
        self.explicit_tracker = None  # torch's ModuleTracker while explicit mode is on
        self.implicit_replication = 0  # implicit_replication() nesting (plain_tensors.py)
        self.check_divergence = os.environ.get("DTENSOR_PLUS_CHECK_DIVERGENCE", "") not in ("", "0")  # debug.py
        # -- random numbers (random.py)
        self.rng_seed: int | None = None
        self.rng_counter = 0
        self.rng_strict = False
        # -- what is running (debug.py, collectives.py, local_blocks.py, dtensor.py)
        self.op_stack: list = []  # (op, its DTensor inputs) being dispatched, innermost last
        self.comm_counters: list = []  # the CommCounters of the comm_mode blocks entered
        self.calls_per_group: Counter = Counter()  # collectives issued per group while checking divergence
        self.failures_per_group: Counter = Counter()  # failures seen per group: fresh store keys for each
        self.unchecked_blocks = 0  # from_local DTensors whose guessed global shape is not checked yet
        self.created = itertools.count()  # DTensors made so far: their order is the same on every rank
        self.pending_saves: list = []  # at most one unpublished async checkpoint save; the next save waits for it
        # -- meshes and process groups (mesh.py)
        self.process_groups: dict = {}  # (backend, use, ranks) -> process group: the one cache, mesh.PROCESS_GROUPS
        self.world_timeout: list = []  # [the default group, its timeout before we touched it]: read once
        self.entered_meshes: list = []  # meshes entered with `with mesh:`, innermost last
        self.live_meshes = weakref.WeakValueDictionary()  # (device_type, shape, ranks, names) -> mesh (torch.load)
        # -- the executor: dispatch.dispatch, installed when dispatch.py is imported (DTensor.__torch_dispatch__
        # calls it here, so the class needs no import of the executor, which builds DTensors: no import circle)
        self.execute = _not_installed

    # -- rule sets ------------------------------------------------------------------------------------

    def use_rules(self, rule_set: RuleSet) -> None:
        """Put ``rule_set`` in force; the plan cache follows it."""
        self.rule_set = rule_set
        self.cache = self.caches.setdefault(rule_set, {})

    def register(self, entries: dict, metas: dict = _EMPTY) -> None:
        """Add rules to the registered set. Plans and override scopes made from the old set are dropped
        (a plan may have used the fallback the new rule replaces)."""
        if self.rule_set is not self.registered:
            raise RuntimeError("register_rule inside an override_rule block: register at import time, outside it")
        self.registered = self.registered.with_rules(entries, metas)
        self.scopes.clear()
        self.caches.clear()
        self.use_rules(self.registered)

    def child_set(self, identity, entries: dict) -> RuleSet:
        """The interned child of the set in force with ``entries`` overriding (same identity, same set)."""
        key = (self.rule_set, identity)
        child = self.scopes.get(key)
        if child is None:
            child = self.scopes[key] = self.rule_set.overridden(entries)
        return child

    def clear_plans(self) -> None:
        for cache in self.caches.values():
            cache.clear()


def _not_installed(func, args, kwargs):
    raise RuntimeError(f"{func} on a DTensor before dtensor_plus.dispatch was imported: `import dtensor_plus` first")


DISPATCHER = Dispatcher()
