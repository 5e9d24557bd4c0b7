"""A stand-in cost model for the search tests: analytic, transparent, fast (no simulation).

The search is tested on what it does with any cost model (enumerate, prune, rank, explain), so its tests use
this one, whose answers are obvious by construction: the real ``dtensor_plus.plan.cost.estimate`` (helper A's,
simulated profiles) is tested in tests/plan/test_cost.py and used by the CLI test. It builds the package's own
Estimate, Cluster and Workload.

Model: fp32 state of 16 bytes a parameter (4 weights, 4 gradients, 8 Adam), sharded by tp and pp, and by dp as
ZeRO says; activations 34 x tokens x hidden x 4 bytes a layer / tp, times the microbatches in flight (pp for
1F1B, all of them for GPipe), /17 under full recomputation, /1.5 under selective; compute 6 x parameters x
tokens at peak x efficiency (x 4/3 full recomputation); tp 4 all-reduces a layer a microbatch; dp one
all-reduce of the gradients (x 1.5 for ZeRO-3); pp sends each microbatch's activations and gets their
gradients back (x virtual stages); nothing overlapped; bubble from the published formulas.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import MappingProxyType

import torch

from dtensor_plus.layouts.pipeline.simulate import bubble_formula
from dtensor_plus.plan import Cluster, Estimate, Link, Workload

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from gpt import GPT, PRESETS  # noqa: E402


def _not_simulated(*args, **kwargs):
    raise AssertionError("the stand-in prices layouts analytically: nothing is placed or stepped")


def gpt(preset: str, **changes) -> Workload:
    config = PRESETS[preset].replace(**changes)
    return Workload(preset, config.num_layers, config.block_size, config.dim, config.num_heads, config.vocab_size,
                    lambda n: GPT(config.replace(num_layers=n)), place=_not_simulated, step=_not_simulated)


def cluster(memory_bytes: int, inter_node_bandwidth: float = 25e9, gpus_per_node: int = 8) -> Cluster:
    return Cluster("standin", gpus_per_node, 1e12, memory_bytes, Link(300e9, 1e-6),
                   Link(inter_node_bandwidth, 5e-6), compute_efficiency=0.5)


def _params(w: Workload) -> float:
    h = w.hidden
    return w.num_layers * (12 * h * h + 13 * h) + w.vocab_size * h + w.seq_len * h + 2 * h


def _all_reduce(n_bytes: float, ranks: int, link: Link) -> float:
    return 0.0 if ranks == 1 else 2 * (ranks - 1) * link.latency + 2 * (ranks - 1) / ranks * n_bytes / link.bandwidth


def estimate(workload, layout, cluster, global_batch, memory_per_device=None) -> Estimate:
    p = _params(workload)
    m = layout.microbatches(global_batch)
    tokens_per_mb = layout.micro_batch_size * workload.seq_len
    intra = layout.intra_node(cluster.gpus_per_node)
    link = {d: cluster.intra_node if intra[d] else cluster.inter_node for d in intra}
    shard = layout.tp * layout.pp
    z = layout.zero
    memory = {"parameters": 4 * p / shard / (layout.dp if z >= 3 else 1),
              "gradients": 4 * p / shard / (layout.dp if z >= 2 else 1),
              "optimizer": 0.0 if layout.offload else 8 * p / shard / (layout.dp if z >= 1 else 1)}
    per_layer_act = 34 * tokens_per_mb / layout.cp * workload.hidden * 4 / layout.tp
    per_layer_act /= {"none": 1, "selective": 1.5, "full": 17}[layout.recompute]
    in_flight = m if layout.schedule == "gpipe" else min(m, layout.pp)
    memory["activations"] = per_layer_act * workload.num_layers / layout.pp * in_flight
    flops = 6 * p * global_batch * workload.seq_len
    compute = flops / layout.world / (cluster.peak_flops * cluster.compute_efficiency)
    compute *= {"none": 1, "selective": 1.03, "full": 4 / 3}[layout.recompute]
    comm = {}
    if layout.tp > 1:
        act_bytes = tokens_per_mb / layout.cp * workload.hidden * 4
        comm["tp"] = 4 * workload.num_layers / layout.pp * m * _all_reduce(act_bytes, layout.tp, link["tp"])
    if layout.dp > 1:
        comm["dp"] = _all_reduce(4 * p / shard, layout.dp, link["dp"]) * (1.5 if z == 3 else 1)
    if layout.cp > 1:
        comm["cp"] = 2 * workload.num_layers / layout.pp * m * _all_reduce(2 * tokens_per_mb * workload.hidden * 4 / layout.cp, layout.cp, link["cp"])
    if layout.pp > 1:  # activations forward and their gradients back, each microbatch, over one stage boundary
        p2p = tokens_per_mb / layout.cp * workload.hidden * 4
        comm["pp"] = 2 * m * layout.virtual_stages * (link["pp"].latency + p2p / link["pp"].bandwidth)
    if layout.offload:
        comm["host"] = 16 * p / shard / 25e9
    fraction = bubble_formula(layout.schedule, layout.pp, m, layout.virtual_stages) if layout.pp > 1 else 0.0
    bubble = compute * fraction / (1 - fraction)
    step = compute + sum(comm.values()) + bubble
    capacity = memory_per_device if memory_per_device is not None else cluster.memory_bytes
    memory = {k: int(v) for k, v in memory.items()}
    return Estimate(layout, step, global_batch * workload.seq_len / step, flops / (layout.world * cluster.peak_flops * step),
                    compute, MappingProxyType(dict(comm)), MappingProxyType(dict(comm)), bubble,
                    MappingProxyType(memory), sum(memory.values()) <= capacity)


def params_of(workload) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in workload.build(workload.num_layers).parameters())
