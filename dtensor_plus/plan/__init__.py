"""The parallel planner: which layout for this model on this cluster, predicted without the cluster.

    from dtensor_plus.plan import search, gpt_workload, CLUSTERS
    result = search(gpt_workload("gpt3-175b"), 1024, CLUSTERS["a100"], global_batch=1536)
    print(result.table())

or ``python -m dtensor_plus.plan --model gpt3-175b --gpus 1024 --cluster a100 --global-batch 1536``.

layout.py: ``ParallelLayout``, one candidate (sizes of dp, tp, pp, cp, ep, mesh order, ZeRO stage, microbatches,
schedule, recomputation, offload). workload.py: ``Workload`` (the user's model), ``gpt_workload``. hardware.py:
``Cluster``, ``CLUSTERS``. profile.py: one stage's costs from simulated runs. cost.py: ``estimate`` ->
``Estimate``. search.py: ``search`` -> ``SearchResult`` (space.py: the space and the memory bound; families.py:
why each family lost; table.py: the text). report.py: the picture.
"""

from .cost import Estimate, estimate
from .hardware import CLUSTERS, Cluster, Link
from .layout import RECOMPUTE, SCHEDULES, ParallelLayout
from .report import write_report
from .search import SearchResult, SearchSpace, search
from .workload import GPT_PRESETS, Workload, gpt_workload

__all__ = ["search", "SearchResult", "SearchSpace", "ParallelLayout", "estimate", "Estimate", "Workload",
           "gpt_workload", "GPT_PRESETS", "CLUSTERS", "Cluster", "Link", "write_report", "SCHEDULES", "RECOMPUTE"]
