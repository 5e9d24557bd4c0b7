"""Published large-scale training runs, as data, and the cost model's prediction for each.

Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", SC'21,
arXiv 2104.04473), Table 1: weak scaling of GPT models on Selene (A100-80GB, 8 a node, 8 x 200 Gb/s HDR IB),
sequence 2048, vocabulary 51200, mixed precision, full activation recomputation, tensor parallelism t inside a
node and pipeline parallelism p across (data parallelism fills the rest), TFLOP/s per GPU counted with the
paper's formula 96 B s l h^2 (1 + s/(6h) + V/(16 l h)) (recomputation included).

Smith et al. 2022 ("Using DeepSpeed and Megatron to Train Megatron-Turing NLG 530B", arXiv 2201.11990), section
2.4: 105 layers, 20480 wide, 128 heads, sequence 2048, tensor 8 x pipeline 35, global batch 1920 on 280 / 350 /
420 DGX A100 nodes: 60.1 / 50.2 / 44.4 s per iteration, 126 / 121 / 113 TFLOP/s per GPU (the same formula).

What the papers do not give, assumed here (the same for every row): micro-batch size 1, the 1F1B schedule (the
paper's interleaved schedule is not credited), no sequence parallelism (it came in 2022), full recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass

from .cost import estimate
from .hardware import CLUSTERS, Cluster
from .layout import ParallelLayout
from .workload import gpt_workload

__all__ = ["PublishedRun", "PUBLISHED", "Comparison", "compare", "comparison_table"]


@dataclass(frozen=True)
class PublishedRun:
    """One published run: the model (a ``GPT_PRESETS`` name), its layout and batch, the GPUs and the achieved
    TFLOP/s per GPU the paper reports."""

    source: str
    model: str
    params_billion: float
    gpus: int
    tp: int
    pp: int
    global_batch: int
    tflops_per_gpu: float

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(dp=self.gpus // (self.tp * self.pp), tp=self.tp, pp=self.pp, micro_batch_size=1,
                              schedule="1f1b", recompute="full")


_T1 = "Narayanan et al. 2021, Table 1"
_MTNLG = "Smith et al. 2022, section 2.4"
PUBLISHED: tuple[PublishedRun, ...] = (
    PublishedRun(_T1, "megatron-1.7b", 1.7, 32, 1, 1, 512, 137),
    PublishedRun(_T1, "megatron-3.6b", 3.6, 64, 2, 1, 512, 138),
    PublishedRun(_T1, "megatron-7.5b", 7.5, 128, 4, 1, 512, 142),
    PublishedRun(_T1, "megatron-18b", 18.4, 256, 8, 1, 1024, 135),
    PublishedRun(_T1, "megatron-39b", 39.1, 512, 8, 2, 1536, 138),
    PublishedRun(_T1, "megatron-76b", 76.1, 1024, 8, 4, 1792, 140),
    PublishedRun(_T1, "megatron-145b", 145.6, 1536, 8, 8, 2304, 148),
    PublishedRun(_T1, "megatron-310b", 310.1, 1920, 8, 16, 2160, 155),
    PublishedRun(_T1, "megatron-530b", 529.6, 2520, 8, 35, 2520, 163),
    PublishedRun(_T1, "megatron-1t", 1008.0, 3072, 8, 64, 3072, 163),
    PublishedRun(_MTNLG, "mt-nlg-530b", 530.0, 2240, 8, 35, 1920, 126),
    PublishedRun(_MTNLG, "mt-nlg-530b", 530.0, 2800, 8, 35, 1920, 121),
    PublishedRun(_MTNLG, "mt-nlg-530b", 530.0, 3360, 8, 35, 1920, 113),
)


@dataclass(frozen=True)
class Comparison:
    run: PublishedRun
    predicted_tflops_per_gpu: float
    step_time: float
    fits: bool

    @property
    def ratio(self) -> float:
        return self.predicted_tflops_per_gpu / self.run.tflops_per_gpu


def compare(cluster: Cluster | None = None, runs=PUBLISHED) -> list[Comparison]:
    """Predict every published run with ``estimate`` on ``cluster`` (default ``CLUSTERS["a100"]``) and count its
    TFLOP/s per GPU with the paper's own formula."""
    cluster = cluster or CLUSTERS["a100"]
    out = []
    for run in runs:
        workload = gpt_workload(run.model)
        est = estimate(workload, run.layout, cluster, run.global_batch)
        flops = workload.published_flops(run.global_batch * workload.seq_len)
        out.append(Comparison(run, est.tflops_per_gpu(flops), est.step_time, est.fits))
    return out


def comparison_table(comparisons) -> str:
    """A markdown table: model, GPUs, published layout, published and predicted TFLOP/s per GPU, their ratio."""
    rows = ["| source | model | GPUs | layout (published) | batch | published TFLOP/s/GPU | predicted | ratio | fits |",
            "|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        r = c.run
        rows.append(f"| {r.source} | {r.model} ({r.params_billion:g}B) | {r.gpus} | tp{r.tp} pp{r.pp} "
                    f"dp{r.gpus // (r.tp * r.pp)} | {r.global_batch} | {r.tflops_per_gpu:g} | "
                    f"{c.predicted_tflops_per_gpu:.0f} | {c.ratio:.2f} | {'yes' if c.fits else 'no'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import time

    start = time.perf_counter()
    table = comparison_table(compare())
    print(table)
    print(f"\n{time.perf_counter() - start:.1f} s")
