"""Sharding rules, one file per op family; importing this package registers them all."""

from . import pointwise  # noqa: F401
