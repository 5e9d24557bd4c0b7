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
from . import complex_views, diagonals, padding, scatter_views, shape_ops  # noqa: F401,E402  (shape-op family)
from . import batch_norm, convolution, fft, indexing, linalg, pooling  # noqa: F401,E402  (issue 3 families)
