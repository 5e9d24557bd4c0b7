"""View and shape ops."""

from __future__ import annotations

from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten


@register_rule(aten.detach.default, aten.alias.default, aten.lift_fresh.default)
def identity_rule(op: OpSchema) -> Sharding:
    """Ops that return the same tensor (a new alias): any layout passes through untouched."""
    return Sharding(inputs=(None,), outputs=(op.specs[0].placements,))
