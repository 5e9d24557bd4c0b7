"""Sharding rules, one file per op family; importing this package registers them all."""

from . import pointwise  # noqa: F401
from . import views  # noqa: F401
