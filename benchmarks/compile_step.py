"""torch.compile over one GPT training step, dtensor_plus beside PyTorch's stack (issue 18 item 5).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compile_step.py --worlds 2,4 --report /tmp/results_compile.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compile_step.py --worlds 2,4 --backend inductor --report ...

The default backend is aot_eager (AOTAutograd's forward and backward graphs run op by op: what compiling
removes is Python and dispatch overhead, nothing is fused); it runs 2 and 4 ranks in about 10 minutes on the
2-core CPU machine. Inductor builds C++ kernels with the machine's compiler: 30-80 s a side and layout there.

Both sides place the same GPT on the same mesh as benchmarks/train_step.py does (benchmarks/layout_setups.py:
ours, and torch's parallelize_module / fully_shard / DDP / ZeroRedundancyOptimizer), then run the step of
train_step.py (forward, loss, backward, optimizer step) with the model eager and with ``torch.compile(model)``.
The layouts only we have (benchmarks/layout_setups_nd.py: 2-D tensor parallelism, striped and USP context
parallelism, HSDP, ring cp with keep_attention recomputation) run our side alone ("-" on torch's)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compile_step.py --worlds 4 \
        --layouts "2d,cp striped,cp usp,hsdp,cp keep_attention" --report /tmp/results_compile_nd.md
The loss and the optimizer step stay outside the compiled region on both sides (what ``torch.compile(model)``
covers). For each layout, world size and side it reports:

  * eager and compiled step time: median of the timed steps after the warm-up, on the slowest rank;
  * compile time: what the warm-up steps of the compiled run took beyond as many warm steps (the first call
    traces and compiles forward and backward; a recompilation in a later warm-up step is counted too);
  * Dynamo graphs (``counters["stats"]["unique_graphs"]``), graphs handed to AOTAutograd (DDP's optimizer
    splits a DDP module's graph at its buckets: more AOT graphs than Dynamo graphs there), graph breaks with
    their reasons (``counters["graph_break"]``) and recompilations with their guard failures (the
    "recompiles" log);
  * the largest |compiled loss - eager loss| of the same side over every step (same seed, same batches).

A layout/side that raises reports "fails: <reason>"; the driver runs each (world, layout) in its own torchrun
with a time limit, so a hang costs that layout only. Ranks share one fresh Inductor cache directory per driver
run (as the ranks of one job do): a kernel one rank or an earlier layout built is reused, so compile times
after the first layout are partly warm.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402,F401  (also puts examples/ on sys.path)
from gpt import GPT, PRESETS  # noqa: E402
from layout_setups import LAYOUTS, mesh_shape, place_ours, place_torch  # noqa: E402
from layout_setups_nd import ND_LAYOUTS, config_for, nd_mesh_shape, place_ours_nd  # noqa: E402

SIDES = ("torch", "ours")
PLACERS = {"torch": place_torch, "ours": place_ours}
NO_TORCH = "no torch equivalent"  # the torch side of a layout only we have (layout_setups_nd.py)


def _placer(side: str, layout: str):
    return place_ours_nd if layout in ND_LAYOUTS else PLACERS[side]


# -- worker: one (world, layout) under torchrun ------------------------------------------------------------------


class _DynamoLog(logging.Handler):
    """Keeps Dynamo's "Recompiling function ..." messages (each with its guard failures) and where each graph
    break happened ("Graph break ... in user code at <file>:<line>", the first line of its log message)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.break_sites: list[str] = []

    def clear(self):
        self.messages.clear()
        self.break_sites.clear()

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Recompiling"):
            self.messages.append(message)
        elif message.startswith("Graph break") and " at " in message.split("\n", 1)[0]:
            site = message.split("\n", 1)[0].rsplit(" at ", 1)[1].replace(str(Path(__file__).resolve().parents[1]) + "/", "")
            if site not in self.break_sites:
                self.break_sites.append(site)


def _scalar(loss) -> float:
    loss = loss.detach()
    if hasattr(loss, "full_tensor"):  # both DTensor classes (loss_parallel leaves the loss a DTensor)
        loss = loss.full_tensor()
    return float(loss)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}"


def run_phase(side, layout, config, batches, warmup, backend, dynamo_log) -> dict:
    """Places a fresh GPT (seed 0) on ``side``'s stack, compiles the model when ``backend`` is given, runs every
    batch; returns this rank's times, losses and compile counters."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    placed = _placer(side, layout)(layout, GPT(config_for(layout, config)), dist.get_world_size())
    if backend:
        torch._dynamo.reset()
        counters.clear()
        dynamo_log.clear()
        placed.model = torch.compile(placed.model, backend=backend)
    times, losses, out = [], [], {}
    try:
        for tokens, targets in batches:
            dist.barrier()
            start = time.perf_counter()
            loss = train_step.step(placed, tokens, targets)
            placed.opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
            losses.append(_scalar(loss))
    except Exception as exc:  # noqa: BLE001 - a failing layout/side is a row of the table, not a crash
        traceback.print_exc(limit=6)
        out["fails"] = _reason(exc)
    out.update(times=times, losses=losses)
    if backend:  # kept on failure too: the graph breaks before it say where tracing went wrong
        out.update(graphs=counters["stats"]["unique_graphs"], aot_graphs=counters["aot_autograd"]["total"],
                   breaks=dict(counters["graph_break"]), recompiles=list(dynamo_log.messages),
                   break_sites=list(dynamo_log.break_sites))
    return out


def _merge(per_rank: list[dict], warmup: int, eager: dict | None) -> dict:
    """One row from every rank's phase: the slowest rank's times, the largest loss difference, counters of
    rank 0 (with the range over ranks where they differ)."""
    failed = [r["fails"] for r in per_rank if "fails" in r]
    if failed:
        row = {"fails": failed[0] + (f" ({len(failed)}/{len(per_rank)} ranks)" if len(failed) < len(per_rank) else "")}
        row["breaks"] = {reason: n for r in per_rank for reason, n in r.get("breaks", {}).items()}
        row["break_sites"] = sorted({s for r in per_rank for s in r.get("break_sites", [])})
        return row
    warm = max(statistics.median(r["times"][warmup:]) for r in per_rank)
    row = {"step_ms": 1e3 * warm,
           "compile_s": max(sum(t - warm for t in r["times"][:warmup]) for r in per_rank),
           "first_call_s": max(r["times"][0] for r in per_rank),
           "losses": per_rank[0]["losses"]}
    if eager is not None and "per_rank_losses" in eager:
        row["max_loss_diff"] = max(abs(a - b) for r, e in zip(per_rank, eager["per_rank_losses"])
                                   for a, b in zip(r["losses"], e))
    row["per_rank_losses"] = [r["losses"] for r in per_rank]
    if "graphs" in per_rank[0]:
        for key in ("graphs", "aot_graphs"):
            values = sorted({r[key] for r in per_rank})
            row[key] = values[0] if len(values) == 1 else f"{values[0]}-{values[-1]}"
        breaks: dict = {}
        for r in per_rank:
            for reason, count in r["breaks"].items():
                breaks[reason] = max(breaks.get(reason, 0), count)
        row["breaks"] = breaks
        row["recompiles"] = max(len(r["recompiles"]) for r in per_rank)
        row["recompile_reasons"] = sorted({m for r in per_rank for m in r["recompiles"]})
        row["break_sites"] = sorted({s for r in per_rank for s in r.get("break_sites", [])})
    return row


def worker(args) -> None:
    import torch._dynamo  # noqa: F401  (imported before any phase, so eager runs the same imports on both sides)

    dynamo_log = _DynamoLog()
    torch._logging.set_logs(recompiles=True, graph_breaks=True)  # also printed in the layout's log file
    logging.getLogger("torch._dynamo").addHandler(dynamo_log)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.pg_timeout))
    rank0 = dist.get_rank() == 0
    config = PRESETS[args.config]
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, config.vocab_size, (args.batch_size, config.block_size), generator=g)
              for _ in range(args.warmup + args.steps)]
    batches = [(x, torch.roll(x, -1, 1)) for x in tokens]
    results: dict = {}
    sides = ("ours",) if args.layout in ND_LAYOUTS else SIDES
    phases = [(side, None) for side in sides] + [(side, args.backend) for side in sides]
    if args.layout in ND_LAYOUTS:
        results.update({"torch/eager": {"fails": NO_TORCH}, "torch/compiled": {"fails": NO_TORCH}})
    for side, backend in phases:
        key = f"{side}/{'compiled' if backend else 'eager'}"
        try:
            mine = run_phase(side, args.layout, config, batches, args.warmup, backend, dynamo_log)
        except Exception as exc:  # noqa: BLE001 - placing the model failed
            traceback.print_exc(limit=6)
            mine = {"fails": _reason(exc)}
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, mine)
        eager = results.get(f"{side}/eager") if backend else None
        results[key] = _merge(per_rank, args.warmup, eager)
        if rank0:
            Path(args.out).write_text(json.dumps(results, indent=1, default=str))
            print(key, {k: v for k, v in results[key].items() if "losses" not in k}, flush=True)
    dist.destroy_process_group()


# -- driver: every (world, layout) in its own torchrun, then the table ------------------------------------------


def launch(args, world: int, layout: str, logdir: Path, env: dict) -> dict:
    slug = f"{world}ranks_{layout.replace(' ', '').replace('+', 'p')}"
    out, log = logdir / f"{slug}.json", logdir / f"{slug}.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           __file__, "--worker", "--layout", layout, "--out", str(out), "--config", args.config,
           "--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--backend", args.backend, "--pg-timeout", str(args.pg_timeout)]
    start = time.perf_counter()
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=args.layout_timeout)
            missing = f"fails: torchrun exited {code} before this phase (see {log})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the torchrun this function started, and its ranks
            proc.wait()
            missing = f"fails: no result within {args.layout_timeout} s (hang or too slow; see {log})"
    results = json.loads(out.read_text()) if out.exists() else {}
    for side in SIDES:
        for mode in ("eager", "compiled"):
            results.setdefault(f"{side}/{mode}", {"fails": missing})
    results["wall_s"] = time.perf_counter() - start
    print(f"{world} ranks, {layout}: {results['wall_s']:.0f} s", flush=True)
    return results


def _mesh(layout: str, world: int) -> str:
    shape = nd_mesh_shape(layout, world) if layout in ND_LAYOUTS else mesh_shape(layout, world)
    return " x ".join(f"{name}={size}" for name, size in shape.items())


def _ms(row) -> str:
    return ("-" if row.get("fails") == NO_TORCH else "fails") if "fails" in row else f"{row['step_ms']:.1f}"


def _ratio(a, b) -> str:
    return "-" if "fails" in a or "fails" in b else f"{a['step_ms'] / b['step_ms']:.2f}"


def _counts(row) -> str:
    if "fails" in row:
        return "fails | - | - | - | - | -"
    diff = row.get("max_loss_diff")
    return (f"{row['compile_s']:.1f} | {row['graphs']} | {row['aot_graphs']} | {sum(row['breaks'].values())} | "
            f"{row['recompiles']} | {'-' if diff is None else f'{diff:.1e}'}")


def _tree() -> str:
    """The commit measured, and whether tracked files differed from it (others edit the tree meanwhile)."""
    root = Path(__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout
    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return f"commit {git('rev-parse', '--short', 'HEAD').strip()}" + (f" + uncommitted edits to {', '.join(dirty)}" if dirty else "")


def table(all_results: dict, args, command: str, tree: str) -> str:
    backend_note = {"inductor": "Inductor (C++ kernels built with the machine's g++)",
                    "aot_eager": "aot_eager: AOTAutograd's graphs run op by op, no kernel fusion; it measures only "
                                 "the removal of Python/dispatch overhead"}.get(args.backend, args.backend)
    lines = [f"## torch.compile over one GPT step, ours beside PyTorch's stack (issue 18 item 5), {time.strftime('%Y-%m-%d')}",
             "",
             f"Machine: {platform.node() or 'CPU VM'}, {os.cpu_count()} CPU cores shared with other sessions (absolute times "
             f"are noisy; ratios are taken in the same run), torch {torch.__version__}, gloo, OMP_NUM_THREADS=1. "
             f"Backend: {backend_note}. GPT \"{args.config}\", batch {args.batch_size}, {args.warmup} warm-up + "
             f"{args.steps} timed steps (median, slowest rank). Tree at the start: {tree}. Command:", "",
             f"    {command}", "",
             "Step times in ms. compiled ours/torch is the target (<= 1.00 on every layout both run); "
             "ours compiled/eager < 1.00 means compiling pays off for ours. \"torch's faster\" is the faster of "
             "torch's eager and compiled steps (compiling does not always pay off for torch either).", "",
             "| layout | mesh | torch eager | torch compiled | ours eager | ours compiled | **compiled ours/torch** "
             "| compiled ours / torch's faster | eager ours/torch | ours compiled/eager | torch compiled/eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (world, layout), res in all_results.items():
        te, tc, oe, oc = (res[k] for k in ("torch/eager", "torch/compiled", "ours/eager", "ours/compiled"))
        faster = min((r for r in (te, tc) if "fails" not in r), key=lambda r: r["step_ms"], default=te)
        lines.append(f"| {layout} | {_mesh(layout, world)} | {_ms(te)} | {_ms(tc)} | {_ms(oe)} | {_ms(oc)} | **{_ratio(oc, tc)}** "
                     f"| {_ratio(oc, faster)} | {_ratio(oe, te)} | {_ratio(oc, oe)} | {_ratio(tc, te)} |")
    lines += ["", "Compilation (compile s: warm-up steps beyond warm steps, slowest rank; graphs: Dynamo's; AOT: "
              "graphs handed to AOTAutograd; max |Δloss|: compiled vs eager loss of the same side, every step):", "",
              "| layout | mesh | side | compile s | graphs | AOT graphs | breaks | recompiles | max abs Δloss |",
              "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for (world, layout), res in all_results.items():
        for side in SIDES:
            row = res[f"{side}/compiled"]
            if row.get("fails") == NO_TORCH:
                continue
            lines.append(f"| {layout} | {_mesh(layout, world)} | {side} | {_counts(row)} |")
            for mode in ("eager", "compiled"):
                r = res[f"{side}/{mode}"]
                if "fails" in r and r["fails"] != NO_TORCH:
                    notes.append(f"- {layout}, {world} ranks, {side} {mode}: {r['fails']}")
            for reason, count in row.get("breaks", {}).items():
                notes.append(f"- {layout}, {world} ranks, {side}: graph break x{count}: {' '.join(reason.split())[:300]}")
            if row.get("break_sites"):
                notes.append(f"- {layout}, {world} ranks, {side}: graph breaks at {', '.join(row['break_sites'])}")
            for message in row.get("recompile_reasons", []):
                notes.append(f"- {layout}, {world} ranks, {side}: {' '.join(message.split())[:400]}")
    lines += ["", "Failures, graph breaks and recompilations:", ""] + (notes or ["- none"])
    return "\n".join(lines) + "\n"


def driver(args) -> None:
    logdir = Path(args.logdir or tempfile.mkdtemp(prefix="compile_step_"))
    logdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(logdir / "inductor_cache"))  # fresh per run, shared by ranks
    command = " ".join([f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}", ".venv/bin/python", "benchmarks/compile_step.py"]
                       + [a if " " not in a else repr(a) for a in sys.argv[1:]])
    print(f"logs and per-layout JSON in {logdir}", flush=True)
    all_results, tree = {}, _tree()
    for world in (int(w) for w in args.worlds.split(",")):
        for layout in args.layouts.split(","):
            all_results[world, layout] = launch(args, world, layout, logdir, env)
            text = table(all_results, args, command, tree)
            if args.report:
                Path(args.report).write_text(text)
    print(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="2,4", help="comma-separated world sizes (ranks)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help="comma-separated subset of " + ", ".join(LAYOUTS + ND_LAYOUTS) + " (the last "
                             f"{len(ND_LAYOUTS)}: ours only, layout_setups_nd.py)")
    parser.add_argument("--config", default="debug", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps; the compiled run compiles in them")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--backend", default="aot_eager",
                        help="torch.compile backend: aot_eager (default: the 2- and 4-rank run takes ~10 min here) "
                             "or inductor (C++ build: ~30-80 s a side and layout on 2 cores, ~35 min in all)")
    parser.add_argument("--layout-timeout", type=int, default=600, help="seconds for one (world, layout) run")
    parser.add_argument("--pg-timeout", type=int, default=300, help="gloo collective timeout, seconds")
    parser.add_argument("--report", help="write the Markdown table here")
    parser.add_argument("--logdir", help="per-layout logs and JSON (default: a fresh temporary directory)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for layout in args.layouts.split(","):
        if layout not in LAYOUTS + ND_LAYOUTS:
            parser.error(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS + ND_LAYOUTS)}")
    for world in args.worlds.split(","):
        if not world.isdigit() or int(world) < 2 or int(world) % 2:
            parser.error(f"--worlds takes even world sizes >= 2 (dp x tp+sp needs dp=2), got {world!r}")
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the first compiled step compiles)")
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
