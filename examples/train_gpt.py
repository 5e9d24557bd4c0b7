"""Train the GPT of examples/gpt.py on a (dp, tp) mesh, with any ZeRO stage, and check it against one process.

    torchrun --standalone --nproc-per-node 4 examples/train_gpt.py --dp 2 --tp 2 --sp --zero 3 --config debug --steps 20
    torchrun --standalone --nproc-per-node 4 examples/train_gpt.py --cp 2 --tp 2          # context parallel (ring)
    torchrun --standalone --nproc-per-node 4 examples/train_gpt.py --auto                 # the planner picks

The text is one every machine has without a download: the bytes of the Python standard library's own source
files (``sysconfig.get_paths()["stdlib"]``, read at run time; byte-level vocabulary of 256). Batches are random
windows drawn from a seeded generator, so every rank (and the single-process run) sees the same batches.

Each rank trains the model twice from the same initial weights and seed: once laid out on the mesh
(``place_model``: tensor parallel by ``tp_plan`` on mesh["tp"], then data parallel on mesh["dp"] as plain
``replicate`` or a ZeRO stage; dropout drawn as one device would under ``manual_seed(seed, strict=True)``),
once as one process. Rank 0 prints a progress line per step, then a table of both loss curves and the largest
parameter difference, and saves a PNG of the curves when matplotlib is importable.

The pieces are functions so tests can run a layout without torchrun (tests/examples/test_train_gpt_layouts.py)::

    layout = Layout(dp=2, tp=2, sp=True, zero=3)
    result = compare_with_single(PRESETS["debug"].replace(dropout=0.1), layout, batch_list, lr=1e-3, seed=0)
    result.mesh_losses, result.single_losses, result.max_param_diff
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import signal
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dtensor_plus as dtp  # noqa: E402
from dtensor_plus import DTensor, checkpoint  # noqa: E402
from dtensor_plus.layouts import loss_parallel  # noqa: E402
from dtensor_plus.layouts.pipeline import SCHEDULES  # noqa: E402
from auto_layout import AUTO_FLAGS, auto_flags  # noqa: E402
from gpt import GPT, PRESETS, GPTConfig  # noqa: E402
from gpt_layouts import CP_BALANCES, CP_MESH_DIMS, Layout, cp_scope, make_mesh, make_optimizer, place_batch, place_model  # noqa: E402,F401,E501
from moe_balancing import MODES as BALANCE_MODES, MoEBalancing, experts_in_id_order, skew_router  # noqa: E402

MAX_TEXT_BYTES = 4 << 20  # enough text for a small model; reading all of the stdlib (~30 MB) takes seconds


@dataclass
class Result:
    """Both loss curves, the largest final parameter difference, and where the mesh run kept things: for each
    parameter, the placement type of its weight and of its AdamW ``exp_avg`` per mesh dim (e.g. ("Shard",
    "Replicate") on a (dp, tp) mesh), plain strings so a Result pickles anywhere."""

    mesh_losses: list[float]
    single_losses: list[float]
    max_param_diff: float
    param_placements: dict[str, tuple[str, ...]] = field(default_factory=dict)
    state_placements: dict[str, tuple[str, ...]] = field(default_factory=dict)
    routing_flips: tuple[int, int] | None = None  # MoE: (decisions the runs disagree on, decisions), else None
    imbalance: list[float] = field(default_factory=list)  # MoE: per step, max/mean tokens per ep rank (worst layer)


class _Parser(argparse.ArgumentParser):
    """Under torchrun every rank parses the flags: a mistake is said once (by rank 0), in one line, not as a
    usage block per rank."""

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp", type=int, default=None, help="data-parallel size (default: the ranks the other "
                        "sizes leave)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--sp", action="store_true", help="sequence parallelism on the tp mesh dim")
    parser.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3), help="ZeRO stage on the dp mesh dim")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel size (sequence sharded through attention)")
    parser.add_argument("--cp-kind", default="ring", choices=tuple(CP_MESH_DIMS))
    parser.add_argument("--cp-balance", nargs="?", const="zigzag", default="none", choices=CP_BALANCES)  # of the ring
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages on a pp mesh dim (outermost)")
    parser.add_argument("--schedule", default="1f1b", choices=[*SCHEDULES, "seq1f1b", "terapipe"], help="pp schedule")
    parser.add_argument("--seq-chunks", type=int, default=1, help="seq1f1b/terapipe: sequence chunks")
    parser.add_argument("--balanced", action="store_true", help="--pp: stages cut by partition_layers, not evenly")
    parser.add_argument("--microbatches", type=int, default=4,
                        help="pipeline microbatches; must divide batch-size / dp (interleaved_1f1b: a multiple of pp)")
    parser.add_argument("--moe", type=int, default=0, metavar="E",
                        help="mixture of experts: E experts in every --moe-every-th block's MLP, sharded over dp (ep = dp)")
    parser.add_argument("--moe-top-k", type=int, default=2, help="experts per token")
    parser.add_argument("--moe-every", type=int, default=2, help="every n-th block is MoE (2: every other block)")
    parser.add_argument("--moe-capacity", type=float, default=None, help="capacity factor (default: dropless)")
    parser.add_argument("--moe-balance", default="none", choices=BALANCE_MODES,
                        help="balance the experts' load while training: re-place hot experts across ep ranks, the "
                             "DeepSeek-V3 routing bias, or both (examples/moe_balancing.py)")
    parser.add_argument("--moe-balance-every", type=int, default=2, help="steps between expert re-placements")
    parser.add_argument("--moe-balance-rate", type=float, default=0.01, help="routing-bias step per training step")
    parser.add_argument("--moe-skew", type=float, default=0.0,
                        help="(demo) a logit bonus for experts 0 and 1, both on ep rank 0: a skewed router to balance")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                        help="parameters and activations (float64: MoE routing no longer flips on rounding)")
    parser.add_argument("--auto", action="store_true",
                        help="let the planner (python -m dtensor_plus.plan, cluster 'cpu') pick --dp/--tp/--sp/--zero/"
                             "--cp/--pp/--schedule/--microbatches for the ranks given; prints its table and why")
    parser.add_argument("--config", default="debug", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (divisible by --dp)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the config's block_size")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-bytes", type=int, default=MAX_TEXT_BYTES, help="how much stdlib source to read")
    parser.add_argument("--plot", default=str(Path("runs") / "train_gpt_loss.png"),
                        help="where to save the loss curves and their difference (default: runs/, git-ignored)")
    parser.add_argument("--checkpoint", default=None, help="directory: resume from its latest save, save there")
    parser.add_argument("--save-every", type=int, default=0, help="steps between saves (0: never)")
    parser.add_argument("--fail-at-step", type=int, default=None, help="(tests) SIGKILL rank 1 after this step, "
                        "first torchrun attempt only")
    args = parser.parse_args(argv)
    # torchrun sets WORLD_SIZE; a process group started otherwise (e.g. run_on_ranks in tests) knows its own.
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if args.auto:
        argv = list(sys.argv[1:] if argv is None else argv)
        given = [flag for flag in AUTO_FLAGS if any(a == flag or a.startswith(flag + "=") for a in argv)]
        if given:
            parser.error(f"--auto picks {', '.join(given)} itself: leave them out (or leave out --auto)")
        if args.moe or args.checkpoint or args.dtype != "float32":
            parser.error("--auto plans dense float32 runs without --checkpoint (the planner's train_gpt space)")
        return parse_args([a for a in argv if a != "--auto"] + auto_flags(args, world))
    if args.dp is None:  # a mesh dim left unsaid takes the ranks that are left: --zero 1 alone on 4 ranks is dp=4
        others = args.pp * args.tp * args.cp
        if world % others:
            parser.error(f"pp({args.pp}) * tp({args.tp}) * cp({args.cp}) = {others} does not divide the world size "
                         f"({world}); launch with a multiple of {others} ranks")
        args.dp = world // others
    if args.pp * args.dp * args.tp * args.cp != world:
        parser.error(f"pp({args.pp}) * dp({args.dp}) * tp({args.tp}) * cp({args.cp}) != world size({world}); "
                     f"launch with --nproc-per-node {args.pp * args.dp * args.tp * args.cp}")
    if args.pp > 1 and (args.cp > 1 or args.moe or args.checkpoint or args.dtype != "float32"):
        parser.error("--pp composes with --dp, --zero, --tp and --sp; not yet with --cp, --moe, --checkpoint or --dtype")
    if args.balanced and args.pp == 1:
        parser.error("--balanced cuts pipeline stages (examples/balanced_pipeline_gpt.py): use it with --pp > 1")
    if args.pp > 1 and (args.batch_size // args.dp) % args.microbatches:
        parser.error(f"--microbatches({args.microbatches}) must divide the per-dp-rank batch "
                     f"(--batch-size({args.batch_size}) / --dp({args.dp}))")
    if args.moe and args.zero in (1, 2):
        parser.error("--moe shards the experts over dp (ep = dp); ZeroRedundancyOptimizer needs Replicate parameters "
                     "on dp: use --zero 0 or --zero 3 (fully_shard leaves the experts' dp sharding as it is)")
    if args.moe and args.moe % args.dp:
        parser.error(f"--moe({args.moe}) experts must divide over --dp({args.dp}) ranks (ep = dp)")
    if (args.moe_balance != "none" or args.moe_skew) and not args.moe:
        parser.error("--moe-balance and --moe-skew act on the experts: give --moe E as well")
    if args.moe_balance in ("place", "both") and (args.zero or args.checkpoint):
        parser.error("--moe-balance place moves experts with their AdamW state along the dp (= ep) ranks: use it "
                     "with --zero 0 and without --checkpoint (the rebalancer's load window is not saved)")
    try:
        args.moe_balancing = MoEBalancing(args.moe_balance, args.moe_balance_every, args.moe_balance_rate,
                                          args.moe_skew)
    except ValueError as err:
        parser.error(str(err))
    if args.batch_size % args.dp:
        parser.error(f"--batch-size({args.batch_size}) must divide by --dp({args.dp})")
    try:
        args.layout = Layout(args.dp, args.tp, args.sp, args.zero, args.cp, args.cp_kind, args.cp_balance)
    except ValueError as err:
        parser.error(str(err))
    return args


# -- data ------------------------------------------------------------------------------------------------


def stdlib_bytes(limit: int = MAX_TEXT_BYTES) -> torch.Tensor:
    """The standard library's .py sources, in sorted path order, as one int64 tensor of byte values."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        chunks.append(path.read_bytes())
        total += len(chunks[-1])
        if total >= limit:
            break
    data = b"".join(chunks)[:limit]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def batches(data: torch.Tensor, steps: int, batch_size: int, seq_len: int, seed: int):
    """``steps`` (tokens, targets) pairs of shape (B, T): random windows, targets shifted by one byte."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=g)
        window = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


# -- training --------------------------------------------------------------------------------------------


def train(model, opt, data_batches, place=lambda t: t, log=None, scope=contextlib.nullcontext,
          checkpoints=None, after_step=None) -> list[float]:
    """One optimizer step per batch; forward and backward inside ``scope()`` (e.g. context_parallel) and
    ``loss_parallel`` (a no-op for plain tensors, vocab-sharded logits otherwise), then ``after_step()`` if
    given (e.g. MoE balancing, moe_balancing.BalanceSteps). Returns the losses.
    With ``checkpoints`` (a ``Checkpoints``), resumes from its latest save and saves as it goes."""
    losses = checkpoints.resume() if checkpoints is not None else []
    for step, (tokens, targets) in enumerate(data_batches):
        if step < len(losses):  # done before the checkpoint we resumed from
            continue
        start = time.perf_counter()
        with scope(), loss_parallel():
            loss = model.loss(place(tokens), place(targets))
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        # NOTE: .item() syncs (and, for a DTensor, all-reduces the loss): fine for a progress line.
        losses.append(loss.full_tensor().item() if isinstance(loss, DTensor) else loss.item())
        if log is not None:
            load = f"  {model.moe_load_line()}" if getattr(model, "moe_layers", list)() else ""  # tokens per expert
            log(f"step {step:4d}  loss {losses[-1]:.4f}  {tokens.numel() / (time.perf_counter() - start):9.0f} tokens/s{load}")
        if after_step is not None:  # after the progress line: it shows the placement the step ran with
            after_step()
        if checkpoints is not None:
            checkpoints.after_step(losses)
    return losses


class Checkpoints:
    """Resume from ``directory``/latest and save there every ``every`` steps (and after the last): model and
    optimizer state, the losses so far and the RNG state, so a resumed run goes on exactly as an uninterrupted
    one, on any layout. ``fail_at_step`` (for the fault-tolerance test) SIGKILLs rank 1 (rank 0 on one
    process) after that step, on the first attempt under torchrun only."""

    def __init__(self, directory: str, every: int, model, opt, fail_at_step: int | None = None, log=None):
        self.path = os.path.join(directory, "latest")
        self.every, self.fail_at_step, self.log = every, fail_at_step, log or (lambda message: None)
        self.model, self.opt = model, opt

    def _state(self, losses: list[float]) -> dict:
        # Built when needed, not up front: on a fresh optimizer get_state_dict creates the state tensors (a
        # step with lr 0), which only a load may follow, since it overwrites them (step counts included).
        state = checkpoint.get_state_dict(self.model, self.opt)
        return dict(state, losses=list(losses), rng=dtp.random.get_rng_state())

    def resume(self) -> list[float]:
        if not os.path.isfile(os.path.join(self.path, "index.json")):
            return []
        state = self._state([])
        checkpoint.load(state, self.path)
        checkpoint.set_state_dict(self.model, self.opt, state)
        dtp.random.set_rng_state(state["rng"])
        self.log(f"resumed from {self.path} after step {len(state['losses']) - 1}")
        return list(state["losses"])

    def after_step(self, losses: list[float]) -> None:
        if self.every and len(losses) % self.every == 0:
            checkpoint.save(self._state(losses), self.path)
        rank = torch.distributed.get_rank()
        victim = 1 if torch.distributed.get_world_size() > 1 else 0
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
        if len(losses) - 1 == self.fail_at_step and rank == victim and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash mid-training: no cleanup, no goodbye to the peers


def max_param_diff(model, reference) -> float:
    ref = dict(reference.named_parameters())
    return max((experts_in_id_order(model, n, p.full_tensor()) - ref[n]).abs().max().item()
               for n, p in model.named_parameters())


def compare_with_single(config: GPTConfig, layout: Layout, batch_list, lr: float = 1e-3, seed: int = 0,
                        mesh=None, log=None, checkpoint: str | None = None, save_every: int = 0,
                        fail_at_step: int | None = None, dtype: torch.dtype = torch.float32,
                        balancing: MoEBalancing | None = None) -> Result:
    """Train ``config`` laid out as ``layout`` and as one process, from the same weights and dropout seed.

    Call on every rank of a ``layout.world``-rank group (torchrun or ``run_on_ranks``); ``batch_list`` is the
    same list of whole (tokens, targets) batches on every rank. With ``checkpoint`` (a directory) the mesh run
    resumes from the checkpoint there, whatever layout saved it, and saves every ``save_every`` steps.
    ``balancing`` balances an MoE model's expert load as it trains (both runs; re-placement on the mesh only).
    """
    if layout.cp > 1 and config.attention != "sdpa":
        raise ValueError("context parallelism shards attention's sequence: use GPTConfig(attention='sdpa')")
    balancing = balancing or MoEBalancing()
    if balancing != MoEBalancing() and not config.moe_experts:
        raise ValueError("MoE balancing needs an MoE model: GPTConfig(moe_experts=E)")
    mesh = mesh if mesh is not None else make_mesh(layout)
    config = balancing.config(config) if config.moe_experts else config
    torch.manual_seed(seed)
    model = GPT(config).to(dtype)
    if balancing.skew:
        skew_router(model, balancing.skew)
    reference = copy.deepcopy(model)
    mesh_routing, single_routing = _record_routing(model), _record_routing(reference)

    place_model(model, mesh, layout)
    opt = make_optimizer(model, mesh, layout, lr)
    dtp.manual_seed(seed + 1, strict=True)  # dropout drawn as one device would
    scope = cp_scope(layout)  # context_parallel on the layout's context mesh dims, or nothing
    place = functools.partial(place_batch, mesh=mesh, balance=layout.cp_balance)
    checkpoints = Checkpoints(checkpoint, save_every, model, opt, fail_at_step, log) if checkpoint else None
    balance_steps = balancing.stepper(model, opt) if config.moe_experts else None
    mesh_losses = train(model, opt, batch_list, place=place, log=log, scope=scope, checkpoints=checkpoints,
                        after_step=balance_steps)

    torch.manual_seed(seed + 1)
    single_opt = make_optimizer(reference, None, Layout(), lr)
    single_steps = balancing.stepper(reference, single_opt, placement=False) if config.moe_experts else None
    single_losses = train(reference, single_opt, batch_list, after_step=single_steps)
    return Result(mesh_losses, single_losses, max_param_diff(model, reference),
                  {n: _placement_names(p) for n, p in model.named_parameters()},
                  _state_placements(model, opt), _count_flips(mesh_routing, single_routing, config),
                  balance_steps.imbalance if balance_steps else [])


def _record_routing(model) -> list[torch.Tensor]:
    """A list that fills with each MoE layer's routing decisions (the global batch's top-k experts) per forward."""
    decisions = []
    for moe in model.moe_layers():
        moe.register_forward_hook(lambda layer, args, out: decisions.append(layer.routing.whole_expert_idx()))
    return decisions


def _count_flips(mesh_routing, single_routing, config: GPTConfig) -> tuple[int, int] | None:
    """(tokens routed differently, tokens routed) over every MoE layer and step. A resumed mesh run routed only
    the steps after its checkpoint: the single run's last ones."""
    if not config.moe_experts:
        return None
    single_routing = single_routing[len(single_routing) - len(mesh_routing):]
    flips = sum(int((a != b).any(-1).sum()) for a, b in zip(mesh_routing, single_routing))
    return flips, sum(len(a) for a in mesh_routing)


def _state_placements(model, opt) -> dict[str, tuple[str, ...]]:
    # param_groups keep the order the parameters were given in (ZeroRedundancyOptimizer's: its master shards).
    stepped = opt.param_groups[0]["params"]
    return {name: _placement_names(opt.state[p]["exp_avg"]) for (name, _), p in zip(model.named_parameters(), stepped)}


def _placement_names(t) -> tuple[str, ...]:
    return tuple(type(p).__name__ for p in t.placements)


# -- report ----------------------------------------------------------------------------------------------


def print_table(result: Result) -> None:
    print(f"\n{'step':>4}  {'loss (mesh)':>11}  {'loss (single)':>13}  {'|diff|':>8}")
    for step, (a, b) in enumerate(zip(result.mesh_losses, result.single_losses)):
        print(f"{step:4d}  {a:11.6f}  {b:13.6f}  {abs(a - b):8.1e}")
    print(f"max |param diff| after {len(result.mesh_losses)} steps: {result.max_param_diff:.2e}")


def moe_note(result: Result, dtype: str) -> str:
    """Why an MoE run may leave one device by more than rounding: top-k routing is discontinuous, so a token
    whose two best experts' probabilities differ by less than the layouts' rounding difference can go to
    another expert, and from then on the runs train differently (not a defect: in float64 no decision flips)."""
    flips, total = result.routing_flips
    if flips == 0:
        return f"MoE: all {total} routing decisions (tokens x MoE layers x steps) equal the single process's ({dtype})"
    return (f"MoE: routing is discontinuous; {flips} of {total} routing decisions flipped on last-bit differences "
            f"({dtype}), and the runs train apart from there; run with --dtype float64 to see it exact")


def save_plot(path: str, mesh_losses, single_losses, title: str) -> None:
    """Both loss curves, and below them their difference on a log scale (where rounding-level agreement shows)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("matplotlib is not installed: skipping the loss plot")
        return
    steps = range(len(mesh_losses))
    diffs = [max(abs(a - b), 1e-16) for a, b in zip(mesh_losses, single_losses)]  # a log axis cannot show 0
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    top.plot(steps, mesh_losses, label="mesh")
    top.plot(steps, single_losses, "--", label="single process")
    top.set(ylabel="loss", title=title)
    top.legend()
    bottom.semilogy(steps, diffs, "o-", markersize=3, color="tab:red")
    bottom.set(xlabel="step", ylabel="|loss difference|\n(1e-16: equal)")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"saved {path}")


def layout_title(args) -> str:
    """Every layout flag of the run, for the plot's title."""
    parts = [f"{name}={getattr(args, name)}" for name in ("pp", "dp", "tp", "cp") if getattr(args, name) > 1]
    parts += ["sp"] * args.sp + [f"zero-{args.zero}"] * bool(args.zero)
    if args.cp > 1:
        parts.append(f"cp-kind={args.cp_kind}" + (f" {args.cp_balance} balance" if args.cp_balance != "none" else ""))
    if args.pp > 1:
        parts.append(f"{args.schedule} x {args.microbatches} microbatches")
    if args.moe:
        capacity = f"capacity {args.moe_capacity:g}" if args.moe_capacity else "dropless"
        parts.append(f"MoE {args.moe} experts top-{args.moe_top_k} every {args.moe_every}, {capacity}"
                     + (f", balance {args.moe_balance}" if args.moe_balance != "none" else ""))
    return f"GPT {args.config}, {args.dtype}: " + (", ".join(parts) or "one rank")


# How far a layout may stray from one device and still be equal. float32: layouts sum in other orders (a
# sharded matmul adds partial products, an all-reduce adds ranks' values), so each op rounds differently by
# about 1e-7 relative, and AdamW steps carry it forward: about 1e-6 after 20 steps, bounded here with margin.
# float64 has the same effect at 1e-16.
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}


def verdict(result: Result, dtype: str) -> str:
    """One line: equal to one device within what tolerance and why, or by how much not."""
    loss_diff = max(abs(a - b) for a, b in zip(result.mesh_losses, result.single_losses))
    worst = max(loss_diff, result.max_param_diff)
    tolerance = TOLERANCE[dtype]
    why = "the layouts round in other orders" if dtype == "float32" else "float64 rounding"
    if worst <= tolerance:
        return (f"verdict: EQUAL to one device within {tolerance:g} (loss {loss_diff:.1e}, parameters "
                f"{result.max_param_diff:.1e}; {dtype}: {why})")
    flips = result.routing_flips
    if flips is not None and flips[0]:
        return (f"verdict: apart from one device by {worst:.1e} > {tolerance:g} after {flips[0]} MoE routing "
                f"decisions flipped on rounding (top-k is discontinuous); --dtype float64 shows it exact")
    return (f"verdict: NOT EQUAL to one device: {worst:.1e} > {tolerance:g} ({dtype}); this is a bug, please "
            f"report it with this command line")


def main(argv=None, *, args=None) -> Result:
    """Run the command line ``argv`` (or the already parsed ``args``, e.g. to see what --auto chose first)."""
    args = args if args is not None else parse_args(argv)
    layout = args.layout
    if args.pp > 1:
        return _main_pipelined(args)
    mesh = make_mesh(layout)
    rank0 = mesh.get_rank() == 0
    config = PRESETS[args.config].replace(dropout=args.dropout, moe_experts=args.moe, moe_top_k=args.moe_top_k,
                                          moe_every=args.moe_every, moe_capacity_factor=args.moe_capacity)
    dtype = getattr(torch, args.dtype)
    if layout.cp > 1:
        config = config.replace(attention="sdpa")  # what context parallelism shards along the sequence
    seq_len = args.seq_len or config.block_size
    data = stdlib_bytes(args.text_bytes)
    if rank0:
        print(f"{len(data):,} bytes of stdlib source; {layout}; {config}")
    batch_list = list(batches(data, args.steps, args.batch_size, seq_len, args.seed))
    log = print if rank0 else None
    result = compare_with_single(config, layout, batch_list, args.lr, args.seed, mesh=mesh, log=log,
                                 checkpoint=args.checkpoint, save_every=args.save_every, fail_at_step=args.fail_at_step,
                                 dtype=dtype, balancing=args.moe_balancing)
    if rank0:
        print_table(result)
        if result.routing_flips is not None:
            print(moe_note(result, args.dtype))
            figure = result.imbalance
            print(f"MoE {args.moe_balance} balancing: max/mean tokens per ep rank (worst layer) {figure[0]:.2f} "
                  f"(step 0) -> {figure[-1]:.2f} (step {len(figure) - 1}), mean of the last half "
                  f"{sum(figure[len(figure) // 2:]) / len(figure[len(figure) // 2:]):.2f}")
        save_plot(args.plot, result.mesh_losses, result.single_losses, layout_title(args))
        print(verdict(result, args.dtype))
    return result


def _main_pipelined(args) -> Result:
    """--pp > 1: the model split into stages on a pp mesh dim (examples/pipeline_gpt.py), each stage laid out by
    the other flags, trained by ``--schedule``. Dropout is off: the pipelined run draws per microbatch, which
    cannot equal one device's draw over the whole batch."""
    from pipeline_gpt import compare_pipeline_with_single

    rank0 = dtp.init_device_mesh("cpu", (args.pp * args.layout.world,)).get_rank() == 0
    config = PRESETS[args.config].replace(dropout=0.0)
    data = stdlib_bytes(args.text_bytes)
    batch_list = list(batches(data, args.steps, args.batch_size, args.seq_len or config.block_size, args.seed))
    if rank0:
        print(f"{len(data):,} bytes of stdlib source; pp={args.pp} ({args.schedule}, {args.microbatches} microbatches) "
              f"x {args.layout}; {config}")
    losses, single, diff = compare_pipeline_with_single(config, args.layout,
        pp=args.pp, schedule=args.schedule, n_microbatches=args.microbatches, sequence_chunks=args.seq_chunks,
        batch_list=batch_list, lr=args.lr, seed=args.seed, log=print if rank0 else None, balanced=args.balanced)
    result = Result(losses, single, diff)
    if rank0:
        print_table(result)
        save_plot(args.plot, losses, single, layout_title(args))
        print(verdict(result, args.dtype))
    return result


if __name__ == "__main__":
    main()
    torch.distributed.destroy_process_group()
