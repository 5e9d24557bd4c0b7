"""Sharding rules, one file per op family; importing this package registers them all."""

from . import (  # noqa: F401
    attention,
    embedding,
    factories,
    foreach,
    losses,
    matrix,
    normalization,
    pointwise,
    random_ops,
    reductions,
    softmax,
    views,
)
