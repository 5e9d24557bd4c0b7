"""Price a layout on a cluster: step time, tokens/s, MFU and memory per device, from the stage profiles.

Compute: a stage's FLOPs (``profile``) at ``cluster.peak_flops * cluster.compute_efficiency``.

Communication, alpha-beta: a collective's time is the bytes this rank sends (what the simulator records, already
the per-collective figure: ring all-reduce 2(n-1)/n B, all-gather and reduce-scatter (n-1)/n B, all-to-all
(n-1)/n of the local block) over its link's bandwidth, plus its link's latency times the ring steps (all-reduce
2(n-1), all-gather / reduce-scatter / all-to-all n-1, a ring shift or p2p message 1). A mesh dim's link is NVLink
when its groups stay inside a node (``layout.intra_node``), InfiniBand otherwise.

Overlap, stated:
- tp / sp collectives and ep's all-to-alls sit between dependent matmuls: exposed, added to the microbatch's F/B.
- cp's ring shifts overlap the attention kernels they feed: exposed only beyond the phase's attention compute
  time (``StageProfile.*_attention_flops``); cp's other collectives are exposed.
- ZeRO-3's all-gathers are prefetched (one layer ahead) and its reduce-scatters run behind the next layer's
  backward: exposed are the first layer's gather per phase (1/(layers+1) of the phase's traffic) and whatever
  exceeds the phase's compute.
- dp's gradient sync (per step) runs in buckets (one per layer) behind the last microbatch's backward: exposed is
  the last bucket plus whatever exceeds that backward; ZeRO-1/2's parameter all-gather after the step is exposed.
- pipeline p2p: sends are non-blocking; each message's time (bytes / bandwidth + latency) delays its receiver in
  the schedule simulation (``layouts.pipeline.simulate``), which also gives the bubble.
- offload: gradients to the host and parameters back over PCIe (``PCIE_BANDWIDTH``) after the backward, exposed;
  the host's Adam is not timed. The on-device optimizer step is not timed either (memory-bound, ~1% of a step).

Memory per device, worst stage: parameters, gradients, optimizer state (after ZeRO / offload) and the activations
of the microbatches in flight (the schedule's peak: under 1F1B the first stage holds p, which with its embeddings
usually makes it the worst) plus what is held once (full recomputation's layer being recomputed). Every schedule
of ``layouts.pipeline.registry`` is priced by its own simulated order: V schedules hold half-stage chunks (V-Half
and V-Min counted until W, their paper's accounting); a Chimera rank keeps the states of two stages (r and
pp-1-r) and all-reduces each stage's gradients with its replica after the pipeline, exposed.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .hardware import Cluster, Link
from .layout import LOOPED, SPLIT_BACKWARD, ParallelLayout
from .profile import StageProfile, profile
from .workload import Workload

__all__ = ["Estimate", "estimate", "collective_time", "pipeline_time", "PCIE_BANDWIDTH"]

PCIE_BANDWIDTH = 25e9  # bytes/s host <-> GPU, PCIe 4 x16 as reached (offload)


@dataclass(frozen=True)
class Estimate:
    """One layout priced on one cluster (times in seconds, per optimizer step; memory in bytes per device)."""

    layout: ParallelLayout
    step_time: float
    tokens_per_s: float
    mfu: float
    compute_s: float
    communication_s: Mapping[str, float]
    exposed_communication_s: Mapping[str, float]
    bubble_s: float
    memory: Mapping[str, int]
    fits: bool

    @property
    def memory_total(self) -> int:
        return sum(self.memory.values())

    def tflops_per_gpu(self, flops_per_step: float) -> float:
        """Achieved TFLOP/s per GPU for a step of ``flops_per_step`` FLOPs over all GPUs."""
        return flops_per_step / (self.layout.world * self.step_time) / 1e12


_STEPS = MappingProxyType({"all_reduce": lambda n: 2 * (n - 1), "all_gather": lambda n: n - 1,
                           "reduce_scatter": lambda n: n - 1, "all_to_all": lambda n: n - 1})


def collective_time(collective: str, group: int, sent_bytes: float, calls: int, link: Link) -> float:
    """Alpha-beta: ``sent_bytes`` (this rank's, over ``calls`` calls in a group of ``group`` ranks) over the link's
    bandwidth plus latency per ring step."""
    if sent_bytes <= 0 and calls <= 0:
        return 0.0
    steps = _STEPS.get(collective, lambda n: 1)(group)
    return sent_bytes / link.bandwidth + calls * steps * link.latency


def estimate(workload: Workload, layout: ParallelLayout, cluster: Cluster, global_batch: int,
             memory_per_device: int | None = None) -> Estimate:
    """Price ``layout`` for ``workload`` on ``cluster`` at ``global_batch`` sequences per step (see the module
    docstring for the model). Only ``profile`` simulates (cached), so this is cheap after the first call for a
    given (tp, sp, cp, micro_batch_size)."""
    m = layout.microbatches(global_batch)
    intra = layout.intra_node(cluster.gpus_per_node)
    flops_rate = cluster.peak_flops * cluster.compute_efficiency
    stages = _stage_profiles(workload, layout.replace(schedule="1f1b", virtual_stages=1))
    priced = [_price_stage(p, layout, intra, cluster, flops_rate) for p in stages]

    p2p_link = cluster.link(intra["pp"])
    p2p = (stages[0].p2p_bytes / p2p_link.bandwidth + p2p_link.latency) if layout.pp > 1 else 0.0
    pipe = pipeline_time(layout.schedule, layout.pp, m, layout.virtual_stages,
                         tuple(s["F"] for s in priced), tuple(s["B"] for s in priced), tuple(s["W"] for s in priced),
                         p2p)
    # per step, after the pipeline: gradient sync (exposed part), ZeRO-1/2 parameter gather, offload transfers;
    # the step ends when the stage with the most of it is done
    if layout.schedule == "chimera" and layout.pp > 1:  # each stage's two replicas sum their gradients, exposed
        for rank, p in enumerate(stages):
            t = collective_time("all_reduce", 2, p.gradient_bytes, 1, p2p_link)
            for key in ("comm_per_step", "exposed_per_step"):
                priced[rank][key]["pp"] += t
            priced[rank]["after_step"] += t
    syncing = max(range(layout.pp), key=lambda s: priced[s]["after_step"])
    step_time = pipe["step_time"] + priced[syncing]["after_step"]

    communication, exposed = Counter(), Counter()
    worst = max(range(layout.pp), key=lambda s: priced[s]["F"] + priced[s]["B"] + priced[s]["W"])
    for dim, t in priced[worst]["comm_per_microbatch"].items():
        communication[dim] += m * t
    for dim, t in priced[worst]["exposed_per_microbatch"].items():
        exposed[dim] += m * t
    for dim, t in priced[syncing]["comm_per_step"].items():
        communication[dim] += t
    for dim, t in priced[syncing]["exposed_per_step"].items():
        exposed[dim] += t
    if layout.pp > 1:
        communication["pp"] += 2 * m * p2p
        exposed["pp"] += pipe["p2p_exposed"]
    compute = m * priced[worst]["compute"]
    bubble = max(0.0, pipe["step_time"] - pipe["busy_max"] - pipe["p2p_exposed"])

    memory = _worst_memory(stages, pipe["in_flight"], layout)
    budget = cluster.memory_bytes if memory_per_device is None else memory_per_device
    tokens = global_batch * workload.seq_len
    return Estimate(
        layout=layout, step_time=step_time, tokens_per_s=tokens / step_time,
        mfu=workload.model_flops(tokens) / (layout.world * cluster.peak_flops * step_time),
        compute_s=compute,
        communication_s=MappingProxyType({k: v for k, v in communication.items() if v > 0}),
        exposed_communication_s=MappingProxyType({k: v for k, v in exposed.items() if v > 0}),
        bubble_s=bubble, memory=MappingProxyType(memory), fits=sum(memory.values()) <= budget,
    )


@functools.lru_cache(maxsize=1024)
def _stage_profiles(workload: Workload, layout: ParallelLayout) -> tuple[StageProfile, ...]:
    """Every pp rank's profile. The schedule is not part of a profile (one microbatch through one rank's layers),
    so the caller passes the layout with its schedule reset: the search's schedule moves reuse the profiles."""
    return tuple(profile(workload, layout, s) for s in range(layout.pp))


def _price_stage(p: StageProfile, layout: ParallelLayout, intra: Mapping[str, bool], cluster: Cluster,
                 flops_rate: float) -> dict:
    """F, B (and W for zero-bubble schedules) of one microbatch on this stage, with the exposed per-microbatch
    collectives folded in; and the per-step work after the pipeline."""
    forward_compute = p.forward_flops / flops_rate
    backward_compute = (p.backward_flops + p.recompute_flops) / flops_rate
    phase_compute = {"forward": forward_compute, "backward": backward_compute}
    attention_compute = {"forward": p.forward_attention_flops / flops_rate,
                         "backward": p.backward_attention_flops / flops_rate}
    comm, exposed = Counter(), Counter()
    exposed_by_phase = Counter()
    grouped = Counter()  # (dim, phase, hidden-kind) -> seconds
    for (collective, dim, phase), sent in p.microbatch_collectives.items():
        group = p.dp_group if dim == "dp" else layout.size(dim)
        link = _dim_link(dim, layout, intra, cluster)
        t = collective_time(collective, group, sent, p.microbatch_counts.get((collective, dim, phase), 0), link)
        comm[dim] += t
        if collective == "ring_shift" or (dim == "dp" and collective in ("all_gather", "reduce_scatter")):
            grouped[dim, phase, collective] += t
        else:
            exposed[dim] += t
            exposed_by_phase[phase] += t
    for (dim, phase, collective), t in grouped.items():
        hidden_behind = phase_compute.get(phase, 0.0)
        if collective == "ring_shift":  # k/v blocks move while the attention kernels compute on the last ones
            shown = max(0.0, t - attention_compute.get(phase, 0.0))
        else:  # ZeRO-3: the first layer's gather cannot be prefetched
            first = t / (p.layers + 1)
            shown = first + max(0.0, t - first - hidden_behind)
        exposed[dim] += shown
        exposed_by_phase[phase] += shown
    forward = forward_compute + exposed_by_phase["forward"]
    backward = backward_compute + exposed_by_phase["backward"]
    if layout.schedule in SPLIT_BACKWARD:  # backward split: B (input gradients) and W (weight gradients), half each
        b, w = backward / 2, backward / 2
    else:
        b, w = backward, 0.0
    comm_step, exposed_step = Counter(), Counter()
    after = 0.0
    for (collective, dim), sent in p.step_collectives.items():
        link = _dim_link(dim, layout, intra, cluster)
        t = collective_time(collective, p.dp_group, sent, p.step_counts.get((collective, dim), 0), link)
        comm_step[dim] += t
        if collective == "all_gather":  # ZeRO-1/2: parameters gathered after the step
            shown = t
        else:  # gradient buckets behind the last microbatch's backward; the last bucket exposed
            last_bucket = t / (p.layers + 1)
            shown = last_bucket + max(0.0, t - last_bucket - backward_compute)
        exposed_step[dim] += shown
        after += shown
    if layout.offload:  # reported as the "host" link's communication, all exposed
        host = (p.gradient_bytes + p.parameter_bytes) / PCIE_BANDWIDTH
        comm_step["host"] += host
        exposed_step["host"] += host
        after += host
    return dict(F=forward, B=b, W=w, compute=forward_compute + backward_compute, after_step=after,
                comm_per_microbatch=comm, exposed_per_microbatch=exposed, comm_per_step=comm_step,
                exposed_per_step=exposed_step)


def _dim_link(dim: str, layout: ParallelLayout, intra: Mapping[str, bool], cluster: Cluster) -> Link:
    if dim == "dp" and layout.cp > 1:  # the gradient sync spans dp x cp
        return cluster.link(intra["dp"] and intra["cp"])
    return cluster.link(intra.get(dim, False))


def _worst_memory(stages, in_flight, layout) -> dict[str, int]:
    """The rank with the most bytes. ``in_flight[r]``: chunks of rank r held at once (a chunk is 1/chunks_per_rank
    of its stage); a Chimera rank r keeps the states of two stages, r and pp-1-r (one of each replica pair)."""
    best = None
    for rank, (p, held) in enumerate(zip(stages, in_flight)):
        twin = stages[layout.pp - 1 - rank] if layout.schedule == "chimera" and layout.pp > 1 else None
        activations = p.activation_bytes * held // layout.chunks_per_rank + p.activation_once_bytes
        mem = {"parameters": p.parameter_bytes, "gradients": p.gradient_bytes, "optimizer": p.optimizer_bytes,
               "activations": int(activations)}
        if twin is not None:
            mem.update(parameters=p.parameter_bytes + twin.parameter_bytes,
                       gradients=p.gradient_bytes + twin.gradient_bytes,
                       optimizer=p.optimizer_bytes + twin.optimizer_bytes)
        if best is None or sum(mem.values()) > sum(best.values()):
            best = mem
    return best


# -- the pipeline ------------------------------------------------------------------------------------------------


def pipeline_time(schedule: str, pp: int, m: int, v: int, forward: tuple, backward: tuple, weight: tuple,
                  p2p: float) -> dict:
    """One step of ``m`` microbatches through ``pp`` ranks under ``schedule``, timed by ``layouts.pipeline``'s
    simulator with per-rank F / B (/ W) costs (chunks of an interleaved rank: its costs / v) and each p2p message
    taking ``p2p`` seconds. {"step_time", "busy_max", "p2p_exposed", "in_flight" (per rank)}.

    Large m: the schedule is simulated for pp and pp + 1 microbatches (pp and 2 pp for the interleaved schedule,
    which needs m divisible by pp) and extended linearly: past the warm-up, each further microbatch adds the same
    steady-state time (the simulated slope), so a thousand-microbatch step costs two small simulations. The busy
    time of the slowest rank is exact; the simulation gives the idle time on top of it, from costs relative to
    the slowest rank, ranks priced as three kinds (first, middle, last), quantized to 1/20 of the slowest rank's
    microbatch (p2p to 1/200), so layouts that differ only in dp (which changes m) or slightly in costs share one
    cached simulation. ``p2p_exposed``: the messages on the warm-up and cool-down chain, 2 (pp - 1) of them;
    the other transfers overlap compute."""
    busy = m * max(f + b + w for f, b, w in zip(forward, backward, weight))
    if pp == 1:
        return dict(step_time=busy, busy_max=busy, p2p_exposed=0.0, in_flight=(1,))
    unit = max(f + b + w for f, b, w in zip(forward, backward, weight)) or 1.0

    def kinds(costs):  # first, middle (the slowest of them: they differ by one layer when pp does not divide), last
        middle = max(costs[1:-1]) if pp > 2 else costs[0]
        return tuple(round(20 * x / unit) / 20 for x in (costs[0], middle, costs[-1]))

    rel = tuple(kinds(costs) for costs in (forward, backward, weight))
    idle, in_flight = _pipeline_idle(schedule, pp, m, v, rel, round(200 * p2p / unit) / 200)
    return dict(step_time=busy + idle * unit, busy_max=busy, p2p_exposed=2 * (pp - 1) * p2p, in_flight=in_flight)


@functools.lru_cache(maxsize=4096)
def _pipeline_idle(schedule: str, pp: int, m: int, v: int, rel: tuple, p2p: float) -> tuple[float, tuple]:
    """(idle time of the slowest rank over the step, in units of its microbatch; peak in-flight per rank)."""
    slowest = max(f + b + w for f, b, w in zip(*rel))
    # two sizes in the steady state: pp and one more for the classic schedules (pp more for interleaved, which
    # needs multiples of pp); 2 pp and 3 pp for the papers' schedules, whose orders (list-scheduled, V blocks,
    # DualPipeV's phases) settle later when F, B and W differ (tests/plan/test_schedule_choice.py checks the line)
    classic = schedule in ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1")
    base = pp if classic else 2 * pp
    extra = pp if schedule == "interleaved_1f1b" or not classic else 1
    if m <= base + extra:
        step, in_flight = _simulate_pipeline(schedule, pp, m, v, rel, p2p)
    else:
        t1, _ = _simulate_pipeline(schedule, pp, base, v, rel, p2p)
        t2, in_flight = _simulate_pipeline(schedule, pp, base + extra, v, rel, p2p)
        step = t2 + (t2 - t1) * (m - base - extra) / extra
        if schedule in ("gpipe", "breadth_first"):  # they hold every microbatch (breadth-first: of each chunk)
            in_flight = tuple(m * v for _ in in_flight)
    return max(0.0, step - m * slowest), in_flight


@functools.lru_cache(maxsize=256)
def _schedule(schedule: str, pp: int, m: int, v: int):
    """The generated schedule. Not validated here: the library's generators are (tests/layouts/pipeline), and
    ``validate`` costs seconds on a 64-rank schedule, which ``simulate`` would pay again on every call, so
    ``_simulate_pipeline`` passes it ``validated=True``."""
    from dtensor_plus.layouts.pipeline import SCHEDULES

    return SCHEDULES[schedule](pp, m, v) if schedule in LOOPED else SCHEDULES[schedule](pp, m)


@functools.lru_cache(maxsize=4096)
def _simulate_pipeline(schedule: str, pp: int, m: int, v: int, rel: tuple, p2p: float) -> tuple[float, tuple]:
    from dtensor_plus.layouts.pipeline import Kind, simulate
    from dtensor_plus.layouts.pipeline.simulate import peak_until_w

    plan = _schedule(schedule, pp, m, v)

    def of_rank(kind_costs, rank):
        first, middle, last = kind_costs
        return first if rank == 0 else last if rank == pp - 1 else middle

    forward, backward, weight = rel
    costs = {}
    for stage, rank in enumerate(plan.stage_to_rank):
        # a rank's chunks share its stage's costs; Chimera's stage s is model stage s % pp whole (one replica)
        piece, chunks = (stage % pp, 1) if schedule == "chimera" else (rank, plan.stage_to_rank.count(rank))
        f, b, w = (of_rank(kind, piece) / chunks for kind in (forward, backward, weight))
        costs.update({(Kind.F, stage): f, (Kind.B, stage): b, (Kind.W, stage): w, (Kind.BW, stage): b + w})
    result = simulate(plan, costs, latency=p2p, validated=True)  # a generator's own output: see _schedule
    # V-Half and V-Min: held until W, the controllable-memory paper's accounting (their order keeps that bounded);
    # the others until their B or BW as before (the B frees most of a layer's activations): V-Min is not favoured
    held = peak_until_w(plan) if schedule in ("v_half", "v_min") else result.peak_in_flight
    return result.step_time, held
