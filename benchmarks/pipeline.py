"""Pipeline schedules on CPU ranks: measured bubble against the simulator and the formula, peak activation memory
per rank, and step time beside ``torch.distributed.pipelining`` with the same schedule, model and microbatches.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 benchmarks/pipeline.py --microbatches 8

The model is examples/gpt.py's GPT split by examples/pipeline_gpt.py (embedding on the first stage, ln_f + head on
the last), ``--layers`` blocks so that every stage of the V and interleaved placements (2 per rank) holds one. Each
schedule runs ``--steps`` forward+backward steps after a warm-up (no optimizer: the same for both). Every pipeline
(ours and torch's, each schedule) is built first, then the steps go round-robin over all of them (step i of each
before step i+1 of any), so a change in the machine's load falls on all of them alike: the ratios compare runs
interleaved in time, not one schedule's minute with another's.
On rank 0 it prints, per schedule:
  * ours ms / torch ms: median step time (slowest rank), and their ratio;
  * bubble measured: 1 - (sum of compute time of all ranks) / (ranks x step time), from our executor's timeline;
  * sim: ``simulate`` of the same schedule with F, B, W, BW costed at their measured medians per kind;
    sim/st: the same with medians per kind and stage (the first and last stages cost more: embedding, head,
    loss), the bubble the schedule itself leaves with these stages, which the measured one is held against;
    +msg: sim/st with each send also costing its sender the measured mean time to post one message (gloo writes
    a message from the sending thread, ~0.1-0.5 ms on CPU: interleaved posts 3 a microbatch), messages not free;
  * bubble formula: ``bubble_formula`` (equal stages, T_F = T_B = T_W);
  * act KiB: peak bytes autograd keeps saved for backward on each rank (distinct storages, parameters excluded,
    through saved_tensors_hooks), ours then torch's;
  * compute on a core: the thread CPU time of our compute actions over their wall time (below 100%: the OS
    ran something else in the middle of them, e.g. more ranks than cores).
  * ours per rank ms: where each rank's step went: compute, waiting on receives, posting sends, the rest (the
    executor's Python between actions, the receives posted at the step's start); the same for ``--before``,
    with its measured bubble against its own simulation;
  * step simulated from thread CPU times: the schedule simulated with each compute action costing its thread
    CPU time (median per kind and stage), messages free: the step a quiet machine would show, robust to load.
Then, when both ran, ZB-H1's step time over 1F1B's (ours, same run; and from thread CPU times). ``--split-cost``
(one process, no torchrun) instead times, on the last of two GPT stages, one fused backward against our B + W and
torch's (``torch.distributed.pipelining._backward``), in thread CPU time (robust to a loaded machine), alternating.
``--before COMMIT`` adds our executor as it was at that commit (its layouts/pipeline loaded as a package of its own)
to the round-robin: "before ms".
The sequence schedules (``--schedules seq1f1b terapipe``, each sample in ``--seq-chunks`` chunks along the sequence;
torch has none) print their peak activations against 1F1B's (when both ran) beside Seq1F1B's claim, p + k - 1
chunks against 1F1B's p microbatches (p k chunks) on rank 0, and their bubble against 1F1B's:

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 benchmarks/pipeline.py \
        --schedules 1f1b gpipe seq1f1b terapipe --microbatches 4 --seq-chunks 4
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import dtensor_plus as dtp  # noqa: E402
from dtensor_plus.layouts.pipeline import (Action, Event, Kind, PipelineSchedule, PipelineStage,  # noqa: E402
                                          build_schedule)
from dtensor_plus.layouts.pipeline.simulate import (bubble_formula, costs_from_events, simulate,  # noqa: E402
                                                    stage_costs_from_events)
from gpt import GPT, PRESETS  # noqa: E402
from pipeline_gpt import gpt_loss, split_gpt  # noqa: E402

SEQUENCE = ("seq1f1b", "terapipe")  # schedules whose microbatches are sequence chunks (--seq-chunks)

TORCH_SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B",
                   "zb_v": "ScheduleZBVZeroBubble", "dualpipe_v": "ScheduleDualPipeV",
                   "breadth_first": "ScheduleLoopedBFS"}  # torch has no single-stage ZB-H1, V-Half/Min, Chimera


class ActivationMeter:
    """Peak bytes of tensors saved for backward and still alive (each storage once; parameters left out)."""

    def __init__(self, params):
        self.param_storages = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[int, list[int]] = {}  # storage ptr -> [holders, bytes]
        self.current = self.peak = 0

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor)

    def _pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key in self.param_storages or t.device.type == "meta":
            return _Held(t, None, key)
        if key not in self.live:
            self.live[key] = [0, t.untyped_storage().nbytes()]
            self.current += self.live[key][1]
            self.peak = max(self.peak, self.current)
        self.live[key][0] += 1
        return _Held(t, self, key)

    def drop(self, key):
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]


class _Held:
    """What a saved-tensor pack hook returns: freed with the graph node, which tells the meter. It keeps the
    tensor detached: a saved output holds its own grad_fn, and node -> _Held -> tensor -> node would be a cycle
    through C++ that is never freed."""

    def __init__(self, tensor, meter, key):
        self.tensor, self.meter, self.key = tensor.detach(), meter, key

    def __del__(self):
        if self.meter is not None:
            self.meter.drop(self.key)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zb_v"])
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--seq-chunks", type=int, default=4, help="k of the sequence schedules (seq1f1b, terapipe)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--plot-dir", default=None, help="save each schedule's recorded-vs-simulated timeline here")
    parser.add_argument("--split-cost", action="store_true", help="time the B/W split against the fused backward")
    parser.add_argument("--papers", nargs=2, type=int, metavar=("P", "M"), default=None,
                        help="one process: the papers' schedules simulated on P ranks, M microbatches, beside the "
                             "papers' bubble and memory figures")
    parser.add_argument("--before", default=None, metavar="COMMIT",
                        help="also run layouts/pipeline as it was at this git commit, in the same round-robin")
    return parser.parse_args()


def _model(args):
    config = PRESETS["small"].replace(num_layers=args.layers, dim=args.dim, block_size=args.seq_len, dropout=0.0)
    torch.manual_seed(0)
    return GPT(config)


def _batch(args):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (args.batch_size, args.seq_len + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


class Runner:
    """One pipeline of the benchmark: ``step()`` runs and times one step (slowest rank); ``times`` keeps them."""

    def __init__(self, step, meter, timeline=None):
        self.step_fn, self.meter, self.timeline_fn = step, meter, timeline
        self.times, self.timelines = [], []

    def step(self):
        dist.barrier()
        start = time.perf_counter()
        with self.meter.hooks():
            self.step_fn()
        self.times.append(_slowest(time.perf_counter() - start))
        if self.timeline_fn is not None:
            self.timelines.append(self.timeline_fn())


def load_pipeline_at(commit: str):
    """layouts/pipeline as it was at ``commit``, imported as a package of its own (``pipeline_at_<commit>``)."""
    import importlib.util
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    names = subprocess.run(git + ["ls-tree", "--name-only", commit, "layouts/pipeline/"], check=True,
                           capture_output=True, text=True).stdout.split()
    where = Path(tempfile.mkdtemp(prefix="pipeline_before_"))
    for path in names:
        if path.endswith(".py"):
            text = subprocess.run(git + ["show", f"{commit}:{path}"], check=True, capture_output=True).stdout
            (where / Path(path).name).write_bytes(text)
    name = f"pipeline_at_{commit}"
    spec = importlib.util.spec_from_file_location(name, where / "__init__.py", submodule_search_locations=[str(where)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_ours(name, args, mesh, lib=None):
    """Our pipeline of schedule ``name``; ``lib``: another copy of the pipeline package (``--before``)."""
    stage_cls, schedule_cls, make_schedule = ((PipelineStage, PipelineSchedule, build_schedule) if lib is None else
                                              (lib.PipelineStage, lib.PipelineSchedule, lib.build_schedule))
    p, rank = dist.get_world_size(), dist.get_rank()
    chunks = dict(sequence_chunks=args.seq_chunks) if name in SEQUENCE else {}
    schedule = make_schedule(name, p, args.microbatches, stages_per_rank=2, **chunks)
    per_pipeline = getattr(schedule, "num_pipelines", 1)  # Chimera: one model piece per stage of each pipeline
    per_pipeline = schedule.num_stages // per_pipeline
    pieces = split_gpt(_model(args), per_pipeline)
    stages = []
    for s in schedule.stages_of(rank):
        piece = pieces[s % per_pipeline]
        extra = {} if per_pipeline == schedule.num_stages else dict(  # the replicas' gradients summed
            num_pipelines=schedule.num_pipelines,
            shared_parameters={n: f"piece{s % per_pipeline}.{n}" for n, _ in piece.named_parameters()})
        stages.append(stage_cls(piece, s, schedule.num_stages, mesh, **extra))
    mine = list({id(st.submodule): st.submodule for st in stages}.values())
    pipe = schedule_cls(stages, schedule, loss_fn=gpt_loss)
    x, y = _batch(args)

    def step():
        pipe.step(x, target=y)
        for piece in mine:
            piece.zero_grad(set_to_none=True)

    meter = ActivationMeter([q for piece in mine for q in piece.parameters()])
    return schedule, Runner(step, meter, lambda: pipe.timeline)


def build_torch(name, args):
    from torch.distributed import pipelining

    if name not in TORCH_SCHEDULES:
        return None
    p, rank = dist.get_world_size(), dist.get_rank()
    schedule = build_schedule(name, p, args.microbatches, stages_per_rank=2)  # the same placement as ours
    pieces = split_gpt(_model(args), schedule.num_stages)
    indices = schedule.stages_of(rank)
    stages = [pipelining.PipelineStage(pieces[s], s, schedule.num_stages, torch.device("cpu")) for s in indices]
    cls = getattr(pipelining, TORCH_SCHEDULES[name])
    multi = len(indices) > 1
    pipe = cls(stages if multi else stages[0], n_microbatches=args.microbatches, loss_fn=gpt_loss)
    x, y = _batch(args)
    first, last = 0 in indices, schedule.num_stages - 1 in indices

    def step():
        pipe.step(*((x,) if first else ()), **({"target": y} if last else {}))
        for s in indices:
            pieces[s].zero_grad(set_to_none=True)

    return Runner(step, ActivationMeter([q for s in indices for q in pieces[s].parameters()]))


def median_timelines(runner, args):
    """Every rank's timeline of the step with the median time: it stands for the schedule."""
    measured = list(range(args.warmup, args.warmup + args.steps))
    median_step = sorted(measured, key=lambda i: runner.times[i])[len(measured) // 2]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, runner.timelines[median_step])
    return gathered


def bubbles(schedule, timelines):
    """Measured bubble over all ranks, the simulator's with the measured median cost per kind and per (kind,
    stage), the same with each send costing the measured mean time to post one (``message_cost``), the per-kind
    costs, and the share of the compute actions' wall time their thread was on a core (well below 1: the ranks'
    compute was descheduled, more busy processes than cores)."""
    compute = [e for tl in timelines for e in tl if e.action.kind.is_compute]
    span = max(e.end for tl in timelines for e in tl) - min(e.start for tl in timelines for e in tl)
    busy = sum(e.end - e.start for e in compute)
    measured = 1 - busy / (len(timelines) * span)
    events = [e for tl in timelines for e in tl]
    costs = costs_from_events(events)
    timed = [e for e in compute if e.cpu is not None]
    cpu_share = sum(e.cpu for e in timed) / sum(e.end - e.start for e in timed) if timed else float("nan")
    per_stage = stage_costs_from_events(events)
    send = message_cost(timelines)
    with_messages = simulate(schedule, {**per_stage, Kind.SEND_F: send, Kind.SEND_B: send}).bubble
    return (measured, simulate(schedule, costs).bubble, simulate(schedule, per_stage).bubble, with_messages, costs,
            cpu_share)


def message_cost(timelines) -> float:
    """Mean seconds a rank's thread spends posting one send: its runs of communication that hold no receive (an
    executor records a run's actions as one interval), summed over all ranks, over the sends they hold. The
    mean, not the median: a send that waits on gloo's transport for a millisecond costs the step that much."""
    spent, count = 0.0, 0
    for tl in timelines:
        runs = {}  # start -> (end, kinds, sends)
        for e in tl:
            kind = e.action.kind.value
            if not (e.action.kind.is_compute or kind == "STEP"):
                end, kinds, sends = runs.get(e.start, (e.end, set(), 0))
                runs[e.start] = (max(end, e.end), kinds | {kind[:4]}, sends + kind.startswith("SEND"))
        for start, (end, kinds, sends) in runs.items():
            if "RECV" not in kinds:
                spent, count = spent + end - start, count + sends
    return spent / count if count else 0.0


def cpu_step(schedule, timelines) -> float:
    """The step the schedule would take with each compute action costing its thread CPU time (median per kind and
    stage), messages free: what a quiet machine would show, robust to load (seconds)."""
    events = [dataclasses.replace(e, end=e.start + e.cpu) for tl in timelines for e in tl if e.cpu is not None]
    return simulate(schedule, stage_costs_from_events(events)).step_time


def breakdown(timelines) -> str:
    """Where each rank's step went (ms, the median step's timeline): compute, waiting on receives, posting sends, and
    the rest (between actions: the executor's own Python, receives posted at the step's start). An executor that
    records a whole run of messages as one interval (each action of it spanning the run) counts the run once: as
    a receive wait when it holds a receive, else as sends."""
    parts = []
    for tl in timelines:
        span = max(e.end for e in tl) - min(0.0, min(e.start for e in tl))
        compute = sum(e.end - e.start for e in tl if e.action.kind.is_compute or e.action.kind.value == "STEP")
        runs = {}  # start -> (end, kinds)
        for e in tl:
            if not (e.action.kind.is_compute or e.action.kind.value == "STEP"):
                end, kinds = runs.get(e.start, (e.end, set()))
                runs[e.start] = (max(end, e.end), kinds | {e.action.kind.value[:4]})
        recv = sum(end - start for start, (end, kinds) in runs.items() if "RECV" in kinds)
        send = sum(end - start for start, (end, kinds) in runs.items() if "RECV" not in kinds)
        sends = sum(1 for e in tl if e.action.kind.value.startswith("SEND"))
        parts.append(f"r{tl[0].rank}: compute {compute * 1e3:.1f}, recv wait {recv * 1e3:.1f}, {sends} sends "
                     f"{send * 1e3:.1f}, rest {(span - compute - recv - send) * 1e3:.1f}")
    return "; ".join(parts)


def split_cost(args):
    """Fused backward, our B + W and torch's B + W of the last of two GPT stages on one microbatch, in thread CPU
    time, alternating; medians over ``--steps`` rounds."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    from dtensor_plus.layouts.pipeline.backward import backward_input, backward_weight

    torch.set_num_threads(1)
    stage = split_gpt(_model(args), 2)[1]
    params = list(stage.parameters())
    x, y = _batch(args)
    rows = args.batch_size // args.microbatches
    hidden, target = torch.randn(rows, args.seq_len, args.dim), y[:rows]

    def forward():
        leaf = hidden.clone().requires_grad_(True)
        return leaf, gpt_loss(stage(leaf), target) / args.microbatches

    plans = {}  # as a PipelineStage keeps it: the input path's walk recorded on the first microbatch
    splits = {"ours": (lambda root, grad, leaf, ps: backward_input(root, grad, leaf, ps, plans), backward_weight)}
    if args.before:
        old = sys.modules[f"{load_pipeline_at(args.before).__name__}.backward"]
        old_plans = {}  # its recorded walk too, where that version records one
        records = "plans" in inspect.signature(old.backward_input).parameters
        splits["before"] = (lambda root, grad, leaf, ps: old.backward_input(root, grad, leaf, ps, old_plans) if records
                            else old.backward_input(root, grad, leaf, ps), old.backward_weight)
    times = {"fused": []}
    for _ in range(args.steps):
        leaf, loss = forward()
        start = time.thread_time()
        loss.backward()
        times["fused"].append(time.thread_time() - start)
        for who in [*splits, "torch"]:
            leaf, loss = forward()
            start = time.thread_time()
            if who in splits:
                _, state = splits[who][0](loss, None, leaf, params)
            else:
                _, groups = stage_backward_input([loss], None, [leaf], iter(params))
            middle = time.thread_time()
            splits[who][1](state) if who in splits else stage_backward_weight(iter(params), groups)
            times.setdefault(f"{who} B", []).append(middle - start)
            times.setdefault(f"{who} W", []).append(time.thread_time() - middle)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"last of 2 GPT stages ({args.layers // 2} blocks, ln_f, head, loss), dim {args.dim}, microbatch {rows} x "
          f"{args.seq_len}; thread CPU ms, median of {args.steps}")
    for who in [*splits, "torch"]:
        total = ms[f"{who} B"] + ms[f"{who} W"]
        b, w = ms[f"{who} B"], ms[f"{who} W"]
        print(f"  {who:6}: B {b:.2f} + W {w:.2f} = {total:.2f} ms, {total / ms['fused']:.2f}x "
              f"the fused backward ({ms['fused']:.2f} ms)")


def sequence_memory(args, p, built, ours_ms) -> None:
    """The sequence schedules beside 1F1B (same run): rank 0's peak activations and the step time, as ratios, and
    Seq1F1B's claim for the activations: p + k - 1 chunks against 1F1B's p microbatches of k chunks."""
    if "1f1b" not in built:
        return
    k, base = args.seq_chunks, built["1f1b"][1].meter.peak
    for name in SEQUENCE:
        if name in built:
            held = {"seq1f1b": p + k - 1, "terapipe": args.microbatches * k}[name]
            claim = min(held, args.microbatches * k) / (min(p, args.microbatches) * k)
            print(f"{name} / 1f1b (k = {k}): rank 0 peak activations {built[name][1].meter.peak / base:.2f} "
                  f"(chunks held: {claim:.2f}); step time {ours_ms[name] / ours_ms['1f1b']:.2f}")


def main():
    args = parse_args()
    if args.split_cost:
        return split_cost(args)
    if args.papers:
        from pipeline_papers import papers_table

        return papers_table(*args.papers)
    dist.init_process_group("gloo")
    mesh = dtp.init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("pp",))
    p, rank = dist.get_world_size(), dist.get_rank()
    before_lib = load_pipeline_at(args.before) if args.before else None
    built, before = {}, {}
    for name in args.schedules:
        schedule, ours = build_ours(name, args, mesh)
        built[name] = (schedule, ours, build_torch(name, args))
        if before_lib is not None:
            before[name] = build_ours(name, args, mesh, before_lib)[1]
    runners = [r for name, (_, ours, theirs) in built.items() for r in (ours, before.get(name), theirs)
               if r is not None]
    for _ in range(args.warmup + args.steps):  # round-robin: step i of every pipeline before step i+1 of any
        for runner in runners:
            runner.step()
    if rank == 0:
        print(f"GPT {args.layers} layers, dim {args.dim}, batch {args.batch_size} x {args.seq_len}, "
              f"{args.microbatches} microbatches, pp = {p} (gloo, CPU); median of {args.steps} steps, round-robin")
        if before:
            print(f"before: layouts/pipeline at {args.before}")
        print(f"{'schedule':18} {'ours ms':>8} {'torch ms':>9} {'ratio':>6} {'bubble':>7} {'sim':>6} {'sim/st':>6} "
              f"{'+msg':>6} {'formula':>7}  {'act KiB per rank (ours | torch)'}"
              + ("  before ms (ratio to torch)" if before else ""))
    ours_ms, cpu_ms = {}, {}
    for name, (schedule, ours, theirs) in built.items():
        timelines = median_timelines(ours, args)
        ours_s = statistics.median(ours.times[args.warmup:])
        torch_s = statistics.median(theirs.times[args.warmup:]) if theirs else 0.0
        ours_ms[name] = ours_s * 1e3
        measured, simulated, per_stage, with_messages, costs, cpu_share = bubbles(schedule, timelines)
        before_timelines = None
        if name in before:  # its Events are the other package's types: rebuilt as ours for the simulator
            before_timelines = [[Event(e.rank, Action(Kind(e.action.kind.value), e.action.stage, e.action.microbatch),
                                       e.start, e.end, e.cpu) for e in tl] for tl in median_timelines(before[name], args)]
        peaks = [None] * p
        dist.all_gather_object(peaks, (ours.meter.peak, theirs.meter.peak if theirs else 0))
        if rank == 0:
            v = schedule.num_stages // p
            k = args.seq_chunks if name in SEQUENCE else 1
            formula = (bubble_formula(name, p, args.microbatches, v, k=k) if name not in ("v_half", "v_min")
                       else float("nan"))
            torch_ms = f"{torch_s * 1e3:9.1f}" if torch_s else f"{'n/a':>9}"
            ratio = f"{ours_s / torch_s:6.2f}" if torch_s else f"{'':>6}"
            act = " ".join(f"{a // 1024}" for a, _ in peaks) + " | " + " ".join(f"{b // 1024}" for _, b in peaks)
            then = ""
            if name in before:
                before_s = statistics.median(before[name].times[args.warmup:])
                then = f"  {before_s * 1e3:.1f}" + (f" ({before_s / torch_s:.2f})" if torch_s else "")
            print(f"{name:18} {ours_s * 1e3:8.1f} {torch_ms} {ratio} {measured:7.3f} {simulated:6.3f} {per_stage:6.3f} "
                  f"{with_messages:6.3f} {formula:7.3f}  {act}{then}")
            print(f"{'':18} median ms: " + ", ".join(f"{k.value} {c * 1e3:.1f}" for k, c in costs.items())
                  + f", one send posted {message_cost(timelines) * 1e3:.2f} (mean); compute on a core {cpu_share:.0%} "
                  f"of its wall time; bubble / sim/st {measured / per_stage:.2f}, / +msg {measured / with_messages:.2f}")
            print(f"{'':18} ours per rank ms: {breakdown(timelines)}")
            cpu_ms[name] = cpu_step(schedule, timelines) * 1e3
            print(f"{'':18} step simulated from thread CPU times: ours {cpu_ms[name]:.1f} ms"
                  + (f", before {cpu_step(schedule, before_timelines) * 1e3:.1f} ms" if before_timelines else ""))
            if before_timelines is not None:
                b_measured, _, b_per_stage, _, _, _ = bubbles(schedule, before_timelines)
                print(f"{'':18} before: bubble {b_measured:.3f}, sim/st {b_per_stage:.3f} "
                      f"({b_measured / b_per_stage:.2f}x; ours {measured / per_stage:.2f}x); per rank ms: "
                      f"{breakdown(before_timelines)}")
            if args.plot_dir:
                from dtensor_plus.layouts.pipeline.timeline import plot_recorded_vs_simulated

                Path(args.plot_dir).mkdir(parents=True, exist_ok=True)
                plot_recorded_vs_simulated(schedule, [e for tl in timelines for e in tl],
                                           Path(args.plot_dir) / f"pipeline_{name}.png", per_stage=True)
    if rank == 0:
        sequence_memory(args, p, built, ours_ms)
    if rank == 0 and "zb_h1" in ours_ms and "1f1b" in ours_ms:
        print(f"zb_h1 / 1f1b step time (ours, same run): {ours_ms['zb_h1'] / ours_ms['1f1b']:.3f}; simulated from "
              f"thread CPU times: {cpu_ms['zb_h1'] / cpu_ms['1f1b']:.3f}")
        if before:
            then = {n: statistics.median(before[n].times[args.warmup:]) for n in ("zb_h1", "1f1b")}
            print(f"zb_h1 / 1f1b step time (before): {then['zb_h1'] / then['1f1b']:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
