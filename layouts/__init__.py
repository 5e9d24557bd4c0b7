"""Parallelism as layouts: placements for parameters and activations, applied to ordinary modules.

    from dtensor_plus.layouts import ColwiseParallel, RowwiseParallel, parallelize_module, loss_parallel
    parallelize_module(model, mesh["tp"], {"blocks.*.mlp.fc1": ColwiseParallel(), "blocks.*.mlp.fc2": RowwiseParallel()})
"""

from .annotation import format_layout, layout_of, parse_layout
from .loss import loss_parallel
from .plan import parallelize_module
from .zero import ZeroRedundancyOptimizer, fully_shard
from .tensor import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
)

__all__ = [
    "ParallelStyle", "ColwiseParallel", "RowwiseParallel", "SequenceParallel", "PrepareModuleInput",
    "PrepareModuleOutput", "parallelize_module", "loss_parallel", "parse_layout", "format_layout", "layout_of",
    "fully_shard", "ZeroRedundancyOptimizer",
]
