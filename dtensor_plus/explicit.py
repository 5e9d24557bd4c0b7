"""Explicit communication: a mode in which no collective happens that the user's code did not ask for by name.

Users who audit a plan before training it (where does this model communicate, and why?) run a step inside
``with explicit_communication():``. There, communication the user asked for runs as usual: ``redistribute``,
``full_tensor``, ``distribute_tensor``, the layouts (parallel styles' input/output hooks, data parallel's
gradient reduction, ZeRO's gathers), and the collectives of a layout entered by name (``loss_parallel()``,
``context_parallel()``). What the op dispatcher would decide on its own raises ``ImplicitCommunicationError``
on every rank alike (the decision is a pure function of the specs, so every rank raises at the same op, and
none is left waiting in a collective), naming the op, the module it ran in, the placements in and out, and
the collectives it would have run:

  * an op whose rule needs an input moved (``x @ w`` with a Shard(1) ``x`` and a Shard(1) ``w``),
  * a rule that declares communication of its own (a norm over a sharded dim), unless a layout entered by name
    owns the rule,
  * a plain tensor joining DTensors (a digest all-gather checks it is equal on every rank).

The fix the message gives: redistribute the input by name before the op, or change the layout.
"""

from __future__ import annotations

import contextlib

from .dispatcher import DISPATCHER
from .placements import Placement

__all__ = ["explicit_communication", "ImplicitCommunicationError"]


class ImplicitCommunicationError(RuntimeError):
    """An op would communicate inside ``explicit_communication()`` without the user's code asking for it."""


_D = DISPATCHER


def is_on() -> bool:
    return _D.explicit_depth > 0


@contextlib.contextmanager
def explicit_communication():
    """Raise at any op that would communicate without being asked to; see the module docstring. Nests."""
    from .module_tracking import ModuleTracker

    outermost = _D.explicit_depth == 0
    tracker = ModuleTracker() if outermost else None
    if tracker is not None:
        tracker.__enter__()
        _D.explicit_tracker = tracker
    _D.explicit_depth += 1
    try:
        yield
    finally:
        _D.explicit_depth -= 1
        if tracker is not None:
            _D.explicit_tracker = None
            tracker.__exit__(None, None, None)


def current_module() -> str:
    """The innermost module running now, and whether in forward or backward (module_tracking.py)."""
    if _D.explicit_tracker is None:
        return "?"
    module, phase = _D.explicit_tracker.current()
    return f"{module} ({phase})"


def collective_for_step(mesh_dim_size: int, old: Placement, new: Placement) -> str | None:
    """The collective one redistribution step runs on its mesh dim; None when the step is local."""
    if mesh_dim_size == 1 or old == new or new.is_partial() or (old.is_replicate() and not new.is_replicate()):
        return None  # Replicate -> Shard/Partial keeps a slice or a share: no data moves
    if old.is_partial():
        return "all_reduce" if new.is_replicate() else "reduce_scatter"
    return "all_gather" if new.is_replicate() else "all_to_all"


def check_input_moves(func, specs, targets) -> None:
    """Raise if the dispatcher would move any input of ``func`` (specs -> targets) in explicit mode."""
    moves = []
    for index, (spec, target) in enumerate(zip(specs, targets)):
        if target is None:
            continue
        names = spec.mesh.mesh_dim_names or tuple(f"mesh dim {k}" for k in range(spec.mesh.ndim))
        collectives = [f"{c} on {names[k]}" for k, (a, b) in enumerate(zip(spec.placements, target))
                       if (c := collective_for_step(spec.mesh.size(k), a, b))]
        if collectives:
            moves.append(f"input {index} {tuple(spec.shape)} {_placements(spec.placements)} -> "
                         f"{_placements(target)} ({', '.join(collectives)})")
    if moves:
        raise ImplicitCommunicationError(
            f"{func} in {current_module()} would communicate implicitly: " + "; ".join(moves)
            + ". Inside explicit_communication() only named communication runs: redistribute the input to the "
            "placements shown before the op (x.redistribute(mesh, placements)), or change the layout"
        )


def check_declared(func, specs, comm) -> None:
    """Raise if the rule of ``func`` declared communication (``comm``, a declared.Communicator, or None) that the
    user did not ask for: only the rules of a layout entered by name (``override_rule(..., asked_for=True)``:
    loss_parallel, context_parallel) have theirs asked for."""
    if comm is None or comm.asked_for:
        return
    raise ImplicitCommunicationError(
        f"{func} in {current_module()} would run {', '.join(comm.describe())} inside its rule (inputs "
        f"{', '.join(_placements(s.placements) for s in specs)}). Inside explicit_communication() only named "
        "communication runs: gather the sharded input by name first (full_tensor() or redistribute), or enter the "
        "layout that owns this collective (loss_parallel(), context_parallel())"
    )


def check_collective(collective: str, mesh_dim_name: str) -> None:
    """Called by every collective: in explicit mode, raise if it checks a plain tensor joining DTensors. (An op's
    own collectives are all declared, and ``check_declared`` judged them before the op ran.)"""
    if _D.explicit_depth and _D.explicit_op == "plain":
        raise ImplicitCommunicationError(
            f"a plain tensor joins DTensors in {current_module()}: checking it is equal on every rank would run a "
            f"{collective} on {mesh_dim_name!r}. Make it a DTensor by name (distribute_tensor(t, mesh, "
            "[Replicate()], src_data_rank=None)) or build it inside `with implicit_replication():`"
        )


@contextlib.contextmanager
def checking_plain():
    """The scope of the check that a plain tensor may join DTensors (its digest all-gather)."""
    saved = _D.explicit_op
    _D.explicit_op = "plain"
    try:
        yield
    finally:
        _D.explicit_op = saved


def _placements(placements) -> str:
    return "[" + ", ".join(map(repr, placements)) + "]"
