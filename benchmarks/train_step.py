"""One GPT training step under every layout: communication bytes, state memory and step time, dtensor_plus
beside PyTorch's own stack (torch.distributed.tensor.parallel + fsdp.fully_shard + DDP), same model and mesh.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 4 benchmarks/train_step.py --config debug
    torchrun --standalone --nproc-per-node $(nvidia-smi -L | wc -l) benchmarks/train_step.py --device cuda --config small

For each layout (benchmarks/layout_setups.py) it prints, on rank 0:
  * bytes this rank sends per training step, by collective and mesh dim (dtensor_plus.comm_mode), beside the
    analytic minimum (DESIGN.md reference figures, derived per layout in ``analytic_bytes``) and their ratio;
  * parameters + gradients + optimizer state per rank (sum of local numel x itemsize, each storage once),
    beside the fp32 analytic figure (``analytic_state``), for ours and torch's;
  * median step time after warm-up, ours and torch's.
Every figure is fp32 (4 bytes a parameter): Ψ below is the parameter count, P = 4Ψ bytes.

``--device cuda`` runs each rank on GPU LOCAL_RANK over NCCL; the step clock is read after
``torch.cuda.synchronize()`` (else it would time kernel launches, not kernels), and each layout adds its peak
CUDA memory per rank (activations included). A layout whose mesh the world size cannot make is skipped with
the reason (benchmarks/layout_setups.py ``unfit_reason``).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import dtensor_plus as dtp  # noqa: E402
from gpt import GPT, PRESETS  # noqa: E402
from layout_setups import LAYOUTS, mesh_shape, place_ours, place_torch, unfit_reason  # noqa: E402

F32 = 4


# -- one step --------------------------------------------------------------------------------------------------


def step(placed, tokens, targets):
    """One training step; returns the loss (benchmarks/compile_step.py compares compiled with eager)."""
    x, y = placed.inputs(tokens, targets)
    with placed.loss_ctx():
        loss = F.cross_entropy(placed.model(x).flatten(0, 1), y.flatten(0, 1))
        loss.backward()
    placed.after_backward()
    placed.opt.step()
    return loss


def _local(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "_local_tensor"):  # both DTensor classes keep the local block here
        return t._local_tensor
    return t


def state_bytes(placed) -> dict:
    """Bytes of parameters, gradients, optimizer state held by this rank (each storage counted once)."""
    seen, out = set(), {}

    def add(kind, t):
        if not isinstance(t, torch.Tensor):
            return
        t = _local(t)
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if t.numel() and key not in seen:
            seen.add(key)
            out[kind] = out.get(kind, 0) + t.numel() * t.element_size()

    params = list(placed.model.parameters())
    for p in params:
        add("param", p)
    for p in params:
        add("grad", p.grad)
    opt = placed.opt
    inner = getattr(opt, "optimizer", None) or opt  # ours: masters + wrapped AdamW; torch's Zero: .optim
    inner = getattr(opt, "optim", inner)
    for group in inner.param_groups:
        for p in group["params"]:
            add("master", p)  # ours zero-1/2: dp-sharded fp32 masters (a param seen above is skipped)
            add("grad", p.grad)
    for st in inner.state.values():
        for name, t in st.items():
            add("step" if name == "step" else "adam", t)
    # Ours ZeRO-1/2 with flat masters: the masters' gradients live in one flat buffer per dtype, which no master's
    # .grad views after a stage-1 step (stage 2's masters hold views of it, counted above).
    flat = getattr(opt, "_flat", None)
    if not any(p.grad is not None for group in inner.param_groups for p in group["params"]):
        for t in getattr(flat, "grads", {}).values():
            add("grad", t)
    return out


def start_distributed(device: str) -> torch.device:
    """gloo on CPU; on CUDA, NCCL with this rank on GPU LOCAL_RANK. A machine without the GPUs asked for
    stops here with the reason, before any process group exists."""
    if device == "cpu":
        dist.init_process_group("gloo")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        sys.exit(f"CUDA is not available: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no GPU; "
                 "run with --device cpu, or on a machine with a GPU and a CUDA build of torch")
    local_rank, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if local_rank >= gpus:
        sys.exit(f"LOCAL_RANK {local_rank} needs GPU {local_rank} but this machine has {gpus}: "
                 f"launch at most --nproc-per-node {gpus}")
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    return torch.device("cuda", local_rank)


def run_layout(placer, layout, config, batches, warmup, timed, device=torch.device("cpu")):
    """(comm counter, state bytes, step seconds on the slowest rank, peak CUDA bytes or None on CPU)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    if cuda:  # the previous layout's model and optimizer go first: the peak is this layout's alone
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    placed = placer(layout, GPT(config), dist.get_world_size(), device=device.type)
    counter = None
    for i, (tokens, targets) in enumerate(batches[:warmup]):
        if i == warmup - 1 and placer is not place_torch:
            with dtp.comm_mode() as counter:
                step(placed, tokens, targets)
        else:
            step(placed, tokens, targets)
        if i < warmup - 1:
            placed.opt.zero_grad(set_to_none=True)
    memory = state_bytes(placed)  # after step(), before zero_grad: gradients and state all alive
    placed.opt.zero_grad(set_to_none=True)
    times = []
    for tokens, targets in batches[warmup : warmup + timed]:
        sync()
        dist.barrier()
        start = time.perf_counter()
        step(placed, tokens, targets)
        placed.opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
    t = torch.tensor([statistics.median(times)], device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the step time
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    return counter, memory, t.item(), peak


# -- analytic figures ------------------------------------------------------------------------------------------


def param_counts(config, shape) -> dict:
    """Ψ (all parameters), and the parts the derivations need."""
    model = GPT(config)
    total = sum(p.numel() for p in model.parameters())
    ln = sum(p.numel() for n, p in model.named_parameters() if ".ln" in n or n.startswith("ln_f"))
    return {"total": total, "ln": ln, "pos": model.pos_emb.numel()}


def analytic_bytes(layout, config, counts, shape, batch, seq) -> dict:
    """Minimum bytes this rank sends per step, by (collective, mesh dim). Ring figures: all-reduce 2(n-1)/n·B,
    all-gather / reduce-scatter (n-1)/n·B of the full tensor B."""
    P, L, D = F32 * counts["total"], config.num_layers, config.dim
    dp, tp = shape.get("dp", 1), shape.get("tp", 1)
    out = {}
    if tp > 1:
        act = F32 * (batch // dp) * seq * D  # b·s·h of this dp group's batch
        ar = lambda b: 2 * (tp - 1) * b / tp
        # Megatron: 2 all-reduces forward + 2 backward per layer; plus the embedding's row-wise output
        # (forward) and the head's replicated input (backward): 4L + 2 activations of b·s·h.
        n_act = 4 * L + 2
        rows = (batch // dp) * seq
        if "sp" in layout:
            # each all-reduce becomes all-gather + reduce-scatter of the same b·s·h: same bytes.
            out["all_gather", "tp"] = n_act * (tp - 1) * act / tp
            out["reduce_scatter", "tp"] = n_act * (tp - 1) * act / tp
            # norm weights see sequence shards: their gradients are Partial, one all-reduce each; the
            # position embedding's gradient comes out sequence-sharded: one all-gather of its T rows.
            out["all_reduce", "tp"] = ar(F32 * counts["ln"])
            out["all_gather", "tp"] += (tp - 1) * F32 * seq * D / tp
        else:
            out["all_reduce", "tp"] = n_act * ar(act)
        # loss_parallel: all-reduce max and sum-exp of (N, 1) forward, sum of (N, 1) backward.
        out["all_reduce", "tp"] = out.get(("all_reduce", "tp"), 0) + 3 * ar(F32 * rows)
    local_P = P if tp == 1 else None
    if layout in ("dp", "dp x tp+sp"):
        local_P = local_P or F32 * counts["local"]
        out["all_reduce", "dp"] = 2 * (dp - 1) * local_P / dp
    elif layout in ("zero-1", "zero-2"):
        out["reduce_scatter", "dp"] = (dp - 1) * P / dp
        out["all_gather", "dp"] = (dp - 1) * P / dp
    elif layout == "zero-3":
        out["all_gather", "dp"] = 2 * (dp - 1) * P / dp
        out["reduce_scatter", "dp"] = (dp - 1) * P / dp
    return out


def analytic_state(layout, counts, shape) -> tuple[float, str]:
    """fp32 AdamW, bytes per rank: parameters 4 + gradients 4 + exp_avg 4 + exp_avg_sq 4 per parameter."""
    P, n = F32 * counts["total"], shape.get("dp", 1)
    if layout in ("tp", "tp+sp", "dp x tp+sp", "dp"):
        return 4 * F32 * counts["local"], "16Ψ_local"
    if layout in ("zero-1", "zero-2"):
        # whole param; reduced grad, master, m, v sharded. Measured after step(): zero-1 frees its whole
        # gradients there (they live from backward to step, +4Ψ at the peak), zero-2 never holds them.
        return P + 4 * P / n, "4Ψ+16Ψ/n"
    return 4 * P / n, "16Ψ/n"


# -- tables ----------------------------------------------------------------------------------------------------


def fmt_bytes(b: float) -> str:
    return f"{b / 1024:,.1f} KiB" if b < 1 << 20 else f"{b / (1 << 20):,.2f} MiB"


def local_param_count(config, shape) -> int:
    """Ψ_local: parameters one rank holds under the tp plan (sharded ones divided by tp)."""
    torch.manual_seed(0)
    model = GPT(config)
    tp = shape.get("tp", 1)
    total = 0
    sharded = ("tok_emb", "attn.q", "attn.k", "attn.v", "mlp.fc", "head")
    for name, p in model.named_parameters():
        split = any(s in name for s in sharded) or name.endswith(("proj.weight", "out.weight"))
        total += p.numel() // tp if split else p.numel()
    return total


def report(config_name, config, layout, shape, ours, theirs, counts, batch, seq, lines):
    counter, mem_ours, t_ours, peak_ours = ours
    mem_theirs, t_theirs, peak_theirs = theirs
    counts = dict(counts, local=local_param_count(config, shape))
    want = analytic_bytes(layout, config, counts, shape, batch, seq)
    mesh = " x ".join(f"{k}={v}" for k, v in shape.items())
    lines.append(f"\n### {config_name}: {layout}  (mesh {mesh})")
    keys = sorted(set(counter.sent_bytes) | set(want))
    lines.append(f"{'collective[mesh dim]':<24}{'calls':>6}{'measured':>14}{'analytic':>14}{'ratio':>7}")
    for key in keys:
        got, ref = counter.sent_bytes.get(key, 0), want.get(key, 0)
        ratio = f"{got / ref:7.2f}" if ref else "    inf" if got else "      -"
        lines.append(f"{key[0] + '[' + key[1] + ']':<24}{counter.counts.get(key, 0):>6}{fmt_bytes(got):>14}{fmt_bytes(ref):>14}{ratio}")
    got, ref = sum(counter.sent_bytes.values()), sum(want.values())
    lines.append(f"{'total':<24}{sum(counter.counts.values()):>6}{fmt_bytes(got):>14}{fmt_bytes(ref):>14}{got / ref if ref else 0:7.2f}")
    if counter.fallbacks:
        lines.append(f"fallbacks: {dict(counter.fallbacks)}")
    ref_mem, formula = analytic_state(layout, counts, shape)
    parts = lambda m: " ".join(f"{k}={fmt_bytes(v)}" for k, v in sorted(m.items()))
    lines.append(f"state/rank ours {fmt_bytes(sum(mem_ours.values()))} ({parts(mem_ours)}); "
                 f"analytic {formula} = {fmt_bytes(ref_mem)}; ratio {sum(mem_ours.values()) / ref_mem:.2f}")
    if mem_theirs is not None:
        lines.append(f"state/rank torch {fmt_bytes(sum(mem_theirs.values()))} ({parts(mem_theirs)})")
    tt = f"{t_theirs * 1e3:.1f} ms" if t_theirs else "n/a"
    ratio = f"{t_ours / t_theirs:.2f}" if t_theirs else "-"
    lines.append(f"step time (median, slowest rank): ours {t_ours * 1e3:.1f} ms, torch {tt}, ours/torch {ratio}")
    if peak_ours is not None:
        pt = fmt_bytes(peak_theirs) if peak_theirs else "n/a"
        ratio = f"{peak_ours / peak_theirs:.2f}" if peak_theirs else "-"
        lines.append(f"peak CUDA memory/rank (this rank, above what was allocated before placing): "
                     f"ours {fmt_bytes(peak_ours)}, torch {pt}, ours/torch {ratio}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="debug", choices=sorted(PRESETS))
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset of " + ", ".join(LAYOUTS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--no-sync", action="store_true", help="tp layouts: leave Partial gradients to the optimizer")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch's stack")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: NCCL, one GPU per rank (LOCAL_RANK), synchronised step clock, peak CUDA memory")
    args = parser.parse_args(argv)
    layouts = args.layouts.split(",")
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layout(s) {unknown}: pick from {', '.join(LAYOUTS)}")
    device = start_distributed(args.device)
    world, rank0 = dist.get_world_size(), dist.get_rank() == 0
    config = PRESETS[args.config]
    seq = config.block_size
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, config.vocab_size, (args.batch_size, seq), generator=g),) * 1 for _ in range(args.warmup + args.steps)]
    batches = [(x[0].to(device), torch.roll(x[0], -1, 1).to(device)) for x in batches]
    counts = param_counts(config, {})
    backend = "gloo, CPU" if device.type == "cpu" else f"nccl, {torch.cuda.get_device_name(device)}"
    lines = [f"GPT {args.config}: {counts['total']:,} parameters, batch {args.batch_size} x seq {seq}, "
             f"{world} ranks ({backend}), AdamW fp32; bytes = sent by one rank per step"]
    out = os.environ.get("TRAIN_STEP_OUT") if rank0 else None
    for layout in layouts:
        shape, start = mesh_shape(layout, world), len(lines)
        reason = unfit_reason(layout, world)
        if reason:
            lines.append(f"\n### {args.config}: {layout}  skipped on {world} ranks: {reason}")
        else:
            ours = run_layout(functools.partial(place_ours, sync=not args.no_sync), layout, config, batches,
                              args.warmup, args.steps, device)
            theirs = (None, None, None)
            if not args.no_torch:
                try:
                    _, mem, t, peak = run_layout(place_torch, layout, config, batches, args.warmup, args.steps, device)
                    theirs = (mem, t, peak)
                except Exception:  # noqa: BLE001 - report torch's failure in the table, keep going
                    if rank0:
                        traceback.print_exc(limit=3)
                    lines.append(f"(torch's stack failed on {layout}: see stderr)")
            if rank0:
                report(args.config, config, layout, shape, ours, theirs, counts, args.batch_size, seq, lines)
        if rank0:
            print("\n".join(lines[start:]), flush=True)
        if out:  # after every layout: a run cut at a time limit (benchmarks/gpu/run.sh) keeps what it finished
            Path(out).write_text("\n".join(lines) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
