"""The parallel planner: which layout for this model on this cluster, predicted without the cluster.

layout.py: ``ParallelLayout``, one candidate (sizes of dp, tp, pp, cp, ep, mesh order, ZeRO stage, microbatches,
schedule, recomputation, offload).
"""

from .layout import RECOMPUTE, SCHEDULES, ParallelLayout

__all__ = ["ParallelLayout", "SCHEDULES", "RECOMPUTE"]
