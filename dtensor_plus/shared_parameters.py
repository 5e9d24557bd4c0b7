"""One Parameter shared by several modules stays one Parameter under every layout.

Tied weights are one Parameter object held by several *slots* (a slot: a module and a key of its
``_parameters``): GPT-2, Gemma and nanoGPT set ``lm_head.weight = transformer.wte.weight``. A layout that
converted slot by slot would make two Parameters of it, each with half the gradient, and training would
silently drift from one device. Every layout converts through this file instead:

    for param, slots in parameter_slots(module):      # each Parameter once, with every slot that holds it
        assign(slots, nn.Parameter(convert(param)))    # one Parameter: one gradient, one hook, one optimizer state

Where the decision is made module by module by code the layout does not own (a parallel style, a
``distribute_module`` partition_fn), ``SharedParameters`` watches it: ``decided(owner, by)`` after each module's
decision. A shared Parameter's first decision converts it; every later one (made on what the slot held, so the
code decides as it would for an untied model) must lay it out the same way, or a ValueError names both slots
and the fix; ``finish()`` then puts the one converted Parameter in every slot. A slot whose code made no
decision is no vote: the shared Parameter takes the layout the other slot decided.

Across layout calls: the Parameter a slot held records the one it was converted into (``_LAID_OUT_AS``), so a
slot that a call did not reach (outside the module it was given) still resolves to the newest Parameter
(``latest``), and the next call puts that one there.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import torch
from torch import nn

from .dtensor import DTensor

__all__ = ["Slot", "parameter_slots", "assign", "latest", "first_conversion", "SharedParameters"]

_LAID_OUT_AS = "_dtp_laid_out_as"  # on a replaced Parameter: the one a layout converted it into


class Slot(NamedTuple):
    """Where a module holds a parameter: ``owner._parameters[key]``, named ``name`` from the layout's root."""

    name: str
    owner: nn.Module
    key: str

    def get(self) -> torch.Tensor:
        return self.owner._parameters[self.key]

    def set(self, param: torch.Tensor) -> None:
        self.owner._parameters[self.key] = param


def latest(param: torch.Tensor) -> torch.Tensor:
    """``param``, or the Parameter layouts have since converted it into (following every conversion)."""
    while (newer := param.__dict__.get(_LAID_OUT_AS)) is not None:
        param = newer
    return param


def first_conversion(param: torch.Tensor) -> torch.Tensor | None:
    """The Parameter a layout converted ``param`` into (one step, not the newest), or None."""
    return param.__dict__.get(_LAID_OUT_AS)


def _named_owners(module: nn.Module, prefix: str, prune) -> Iterator[tuple[str, nn.Module]]:
    yield prefix, module
    for name, child in module.named_children():
        if prune is None or not prune(child):
            yield from _named_owners(child, f"{prefix}.{name}" if prefix else name, prune)


def parameter_slots(
    module: nn.Module, prune: Callable[[nn.Module], bool] | None = None
) -> list[tuple[torch.Tensor, list[Slot]]]:
    """Every Parameter under ``module`` once, as (its newest version, every slot holding it), in module order.

    ``prune(child)``: leave that child's subtree out (fully_shard: subtrees an inner call owns). A slot
    holding a Parameter that a layout already converted is grouped with the slots holding the new one."""
    groups: dict[int, tuple[torch.Tensor, list[Slot]]] = {}
    seen_modules = set()
    for prefix, owner in _named_owners(module, "", prune):
        if id(owner) in seen_modules:  # one module reachable twice holds its slots once
            continue
        seen_modules.add(id(owner))
        for key, param in owner._parameters.items():
            if param is not None:
                newest = latest(param)
                name = f"{prefix}.{key}" if prefix else key
                groups.setdefault(id(newest), (newest, []))[1].append(Slot(name, owner, key))
    return list(groups.values())


def assign(slots: list[Slot], param: torch.Tensor) -> None:
    """Put ``param`` in every slot; each Parameter replaced records it (unless it already records its own
    conversion), so slots elsewhere still holding one resolve to ``param``."""
    for slot in slots:
        old = slot.get()
        if old is not param:
            old.__dict__.setdefault(_LAID_OUT_AS, param)
        slot.set(param)


def _layout(t: torch.Tensor) -> tuple:
    """What two decisions must agree on to be one Parameter: mesh, placements, shape and dtype."""
    if isinstance(t, DTensor):
        return t.device_mesh, tuple(t.placements), tuple(t.shape), t.dtype
    return None, None, tuple(t.shape), t.dtype


def _describe(t: torch.Tensor) -> str:
    where = f"{list(t.placements)} on {t.device_mesh}" if isinstance(t, DTensor) else "a plain tensor"
    return f"{where} (shape {tuple(t.shape)}, {t.dtype})"


class SharedParameters:
    """Keeps one Parameter per group of slots while other code decides layouts module by module.

    Args:
        module: the layout's root; every Parameter held by two or more slots under it is watched.
        layout: the layout's name, for errors (e.g. "parallelize_module").
        fix: what to do when two decisions disagree, for errors.

    Example::

        shared = SharedParameters(model, "parallelize_module", fix="...")
        for name, owner in model.named_modules():
            style.apply(owner, mesh)
            shared.decided(owner, f"{style!r} on {name!r}")
        shared.finish()
    """

    def __init__(self, module: nn.Module, layout: str, fix: str):
        self.layout, self.fix = layout, fix
        self.groups = [(param, slots) for param, slots in parameter_slots(module) if len(slots) > 1]
        # What each watched slot held when the layout began: the Parameter its decision starts from.
        self.held = {(id(s.owner), s.key): (s, s.get()) for _, slots in self.groups for s in slots}
        self.decided_by: dict[int, tuple[str, str]] = {}  # id(held Parameter) -> (first slot, what decided it)

    def decided(self, owner: nn.Module, by: str) -> None:
        """Check the decisions just made for ``owner``'s watched slots against earlier ones (see the module doc)."""
        for key in list(owner._parameters):
            entry = self.held.get((id(owner), key))
            if entry is None:
                continue
            slot, held = entry
            now = slot.get()
            if now is held:
                continue  # no decision here
            first = first_conversion(held)
            if first is None:  # the first decision: it converts the shared Parameter
                held.__dict__[_LAID_OUT_AS] = now
                self.decided_by[id(held)] = (slot.name, by)
                continue
            if _layout(first) != _layout(now):
                first_slot, first_by = self.decided_by.get(id(held), ("another slot", "an earlier layout call"))
                raise ValueError(
                    f"{first_slot} and {slot.name} are one shared Parameter (tied weights), but {self.layout} lays it "
                    f"out as {_describe(first)} for {first_slot} ({first_by}) and as {_describe(now)} for {slot.name} "
                    f"({by}); one Parameter has one layout: {self.fix}"
                )
            slot.set(latest(first))  # the same layout: keep the one Parameter

    def finish(self) -> None:
        """Put each watched group's one (newest) Parameter in every slot of it."""
        for param, slots in self.groups:
            assign(slots, latest(param))
