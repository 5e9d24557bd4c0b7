"""Named hardware for the cost model: a GPU's peak FLOP/s and memory, and the two links (inside a node, across).

A ``Link`` is the alpha-beta model of one kind of connection: ``bandwidth`` bytes/s that one GPU sends (one
direction), ``latency`` seconds per message step. ``Cluster.compute_efficiency`` is the share of peak FLOP/s
that dense transformer compute reaches; it is calibrated (see the comment at each value: where it came from).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["Link", "Cluster", "CLUSTERS"]


@dataclass(frozen=True)
class Link:
    """bandwidth: bytes/s one GPU sends over this link (one direction); latency: seconds per message step."""

    bandwidth: float
    latency: float

    def __post_init__(self):
        if not self.bandwidth > 0 or not self.latency >= 0:
            raise ValueError(f"Link needs bandwidth > 0 and latency >= 0, got {self.bandwidth!r}, {self.latency!r}")


@dataclass(frozen=True)
class Cluster:
    """GPUs of one kind, ``gpus_per_node`` a node. peak_flops: dense bf16/fp16 FLOP/s per GPU; memory_bytes:
    per GPU; intra_node (NVLink) and inter_node (InfiniBand) links; compute_efficiency: achieved share of peak."""

    name: str
    gpus_per_node: int
    peak_flops: float
    memory_bytes: int
    intra_node: Link
    inter_node: Link
    compute_efficiency: float

    def __post_init__(self):
        if self.gpus_per_node < 1 or self.peak_flops <= 0 or self.memory_bytes <= 0:
            raise ValueError(f"Cluster {self.name!r}: gpus_per_node, peak_flops and memory_bytes must be positive")
        if not 0 < self.compute_efficiency <= 1:
            raise ValueError(f"Cluster {self.name!r}: compute_efficiency must be in (0, 1], got "
                             f"{self.compute_efficiency!r}")

    def link(self, intra_node: bool) -> Link:
        return self.intra_node if intra_node else self.inter_node

    def replace(self, **changes) -> Cluster:
        from dataclasses import replace

        return replace(self, **changes)


GiB = 2**30

# The cpu profile: fp32 matmul of one core on this 2-core VM, measured with torch (OMP_NUM_THREADS=1, 1024 x 1024
# matmuls: 34 GFLOP/s on 2026-12-07, noisy: shared cores); gloo between processes on one machine: about 1 GB/s
# and ~50 us per message (assumed, not measured). compute_efficiency 0.5: small ops reach half of a big matmul.
# Rough, stated: train_gpt --auto ranks layouts with it; it makes no published claim.
CPU_PEAK_FLOPS = 3.5e10

CLUSTERS: Mapping[str, Cluster] = MappingProxyType({
    # A100-80GB SXM as in NVIDIA's Selene (the Megatron-LM 2021 runs): 312 TFLOP/s dense bf16; NVLink 3 (NVSwitch)
    # 300 GB/s per GPU per direction; 8 x 200 Gb/s HDR InfiniBand per node = 25 GB/s per GPU. Bus bandwidths
    # reached by NCCL (nccl-tests) are below these: ~230 GB/s NVLink, ~23 GB/s IB (values used). Latencies: a few
    # microseconds per ring step. compute_efficiency 0.52: the one fitted constant, fitted to Narayanan et al.
    # 2021 Table 1's 18B row (tp 8, pp 1, dp 32, batch 1024: 135 TFLOP/s per GPU, which 0.525 reproduces); that
    # row has no pipeline and its dp sync is mostly hidden, so it measures compute + tp communication. Every
    # other row of that table and MT-NLG's are predictions (plan/published.py, tests/plan/test_published.py).
    "a100": Cluster("a100", 8, 312e12, 80 * GiB, Link(230e9, 5e-6), Link(23e9, 10e-6), 0.52),
    # H100-SXM: 989 TFLOP/s dense bf16; NVLink 4 450 GB/s per direction (~360 GB/s reached); 8 x 400 Gb/s NDR
    # = 50 GB/s per GPU (~45 reached). compute_efficiency 0.50: not fitted here (no published table of this
    # kind for H100); the lower share reflects that H100 runs of this size report ~40-55% MFU.
    "h100": Cluster("h100", 8, 989e12, 80 * GiB, Link(360e9, 4e-6), Link(45e9, 8e-6), 0.50),
    # This 2-core VM with gloo ranks (train_gpt --auto): one "node" of 8 processes; see CPU_PEAK_FLOPS.
    "cpu": Cluster("cpu", 8, CPU_PEAK_FLOPS, 8 * GiB, Link(1e9, 50e-6), Link(1e9, 50e-6), 0.5),
})
