"""Parallelism as layouts: placements for parameters and activations, applied to ordinary modules.

    from dtensor_plus.layouts import ColwiseParallel, RowwiseParallel, parallelize_module, loss_parallel
    parallelize_module(model, mesh["tp"], {"blocks.*.mlp.fc1": ColwiseParallel(), "blocks.*.mlp.fc2": RowwiseParallel()})
"""

from .annotation import format_layout, layout_of, parse_layout
from .clip import clip_grad_norm_, get_total_norm
from .context_parallel import context_parallel, striped_placement
from .data import replicate, shard_batch, sync_gradients
from .loss import loss_parallel, parallel_cross_entropy
from .moe import MoE, expert_parallel
from .moe_placement import ExpertRebalancer, place_experts
from .plan import parallelize_module
from .precision import MixedPrecision, mixed_precision
from .prepare_io import PrepareModuleInputOutput
from .sequence_switch import SequenceSwitch, switch_sequence_dim
from .tensor import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
)
from .tensor_2d import Embedding2D, Grid2D, HiddenParameter2D, LayerNorm2D, Linear2D, tensor_parallel_2d
from .tensor_3d import Cube3D, Embedding3D, HiddenParameter3D, LayerNorm3D, Linear3D, tensor_parallel_3d
from .zero import CPUOffload, OverlappedStep, ZeroRedundancyOptimizer, fully_shard, set_requires_all_reduce

__all__ = [
    "ParallelStyle", "ColwiseParallel", "RowwiseParallel", "SequenceParallel", "PrepareModuleInput",
    "PrepareModuleOutput", "PrepareModuleInputOutput", "parallelize_module", "loss_parallel", "parse_layout", "format_layout", "layout_of",
    "replicate", "sync_gradients", "shard_batch", "fully_shard", "ZeroRedundancyOptimizer", "CPUOffload",
    "clip_grad_norm_", "get_total_norm", "MixedPrecision", "mixed_precision", "context_parallel", "MoE", "parallel_cross_entropy",
    "expert_parallel", "SequenceSwitch", "switch_sequence_dim", "striped_placement", "ExpertRebalancer", "place_experts",
    "Grid2D", "tensor_parallel_2d", "Linear2D", "LayerNorm2D", "Embedding2D", "HiddenParameter2D", "Cube3D",
    "tensor_parallel_3d", "Linear3D", "LayerNorm3D", "Embedding3D", "HiddenParameter3D", "OverlappedStep",
    "set_requires_all_reduce",
]
