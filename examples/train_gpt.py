"""Train the GPT of examples/gpt.py on a (dp, tp) mesh, with any ZeRO stage, and check it against one process.

    torchrun --standalone --nproc-per-node 4 examples/train_gpt.py --dp 2 --tp 2 --sp --zero 3 --config debug --steps 20
    torchrun --standalone --nproc-per-node 4 examples/train_gpt.py --cp 2 --tp 2          # context parallel (ring)

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
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dtensor_plus as dtp  # noqa: E402
from dtensor_plus import DTensor, Replicate, Shard  # noqa: E402
from dtensor_plus.placements import StridedShard  # noqa: E402
from dtensor_plus.layouts import (ZeroRedundancyOptimizer, context_parallel, fully_shard, loss_parallel,  # noqa: E402
                                  parallelize_module)
from dtensor_plus.layouts.data import replicate  # noqa: E402
from gpt import GPT, PRESETS, GPTConfig, tp_plan  # noqa: E402

MAX_TEXT_BYTES = 4 << 20  # enough text for a small model; reading all of the stdlib (~30 MB) takes seconds
WEIGHT_DECAY = 0.1


@dataclass(frozen=True)
class Layout:
    """How the model is laid out: dp x tp ranks, Megatron sequence parallelism on tp, ZeRO stage on dp.

    zero: 0 plain data parallelism (``replicate``: one all-reduce per gradient), 1 optimizer state sharded,
    2 plus gradients reduce-scattered (both ``ZeroRedundancyOptimizer``), 3 plus parameters sharded
    (``fully_shard`` per block, then the root).
    """

    dp: int = 1
    tp: int = 1
    sp: bool = False
    zero: int = 0
    cp: int = 1
    cp_kind: str = "ring"
    cp_balance: bool = False  # zigzag the sequence over cp: every rank does equal causal-attention work

    def __post_init__(self):
        for name in ("dp", "tp", "cp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Layout.{name} must be a positive int, got {value!r}")
        if self.sp and self.tp == 1:
            raise ValueError("sp=True needs tp > 1: sequence parallelism shards the sequence on the tp mesh dim")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"zero must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.zero and self.dp == 1:
            raise ValueError(f"zero={self.zero} shards on the dp mesh dim and needs dp > 1; set dp or zero=0")
        if self.sp and self.cp > 1:
            raise ValueError("sp and cp both shard the sequence; context parallelism (cp) already covers the norms")
        if self.cp_kind not in ("ring", "ulysses"):
            raise ValueError(f"cp_kind must be 'ring' or 'ulysses', got {self.cp_kind!r}")
        if self.cp_balance and (self.cp == 1 or self.cp_kind != "ring"):
            raise ValueError("cp_balance zigzags the sequence for ring attention: it needs cp > 1 and cp_kind='ring'")

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.cp

    def __str__(self) -> str:
        cp = f" cp={self.cp} ({self.cp_kind}{', balanced' if self.cp_balance else ''})" if self.cp > 1 else ""
        return f"dp={self.dp} tp={self.tp} sp={self.sp} zero={self.zero}{cp}"


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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--sp", action="store_true", help="sequence parallelism on the tp mesh dim")
    parser.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3), help="ZeRO stage on the dp mesh dim")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel size (sequence sharded through attention)")
    parser.add_argument("--cp-kind", default="ring", choices=("ring", "ulysses"))
    parser.add_argument("--cp-balance", action="store_true", help="zigzag the sequence over cp (causal load balance)")
    parser.add_argument("--config", default="debug", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (divisible by --dp)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the config's block_size")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-bytes", type=int, default=MAX_TEXT_BYTES, help="how much stdlib source to read")
    parser.add_argument("--plot", default="train_gpt_loss.png", help="where to save the loss curves")
    args = parser.parse_args(argv)
    # torchrun sets WORLD_SIZE; a process group started otherwise (e.g. run_on_ranks in tests) knows its own.
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if args.dp * args.tp * args.cp != world:
        parser.error(f"dp({args.dp}) * tp({args.tp}) * cp({args.cp}) != world size({world}); "
                     f"launch with --nproc-per-node {args.dp * args.tp * args.cp}")
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


# -- layout ----------------------------------------------------------------------------------------------


def make_mesh(layout: Layout):
    """A mesh with a named dim per parallelism of size > 1, in the order ("dp", "tp", "cp") (cp innermost:
    Ulysses splits tp's blocks of heads further)."""
    sizes = (("dp", layout.dp), ("tp", layout.tp), ("cp", layout.cp))
    names, shape = zip(*[(n, s) for n, s in sizes if s > 1] or [("dp", 1)])
    return dtp.init_device_mesh("cpu", shape, mesh_dim_names=names)


def place_batch(batch: torch.Tensor, mesh, balance: bool = False) -> DTensor:
    """Whole (B, T) tokens as a DTensor: batch Shard(0) on dp, sequence Shard(1) on cp (``balance``: zigzag,
    rank r holding pieces r and 2cp-1-r of 2cp), Replicate elsewhere."""
    by_name = {"dp": Shard(0), "cp": StridedShard(1, 1, zigzag=True) if balance else Shard(1)}
    placements = [by_name.get(name, Replicate()) for name in mesh.mesh_dim_names]
    return dtp.distribute_tensor(batch, mesh, placements, src_data_rank=None)


def place_model(model: GPT, mesh, layout: Layout) -> GPT:
    """Lay ``model`` out on ``mesh`` (in place): tp first on mesh["tp"], then the dp dim.

    Every parameter and buffer must end on the whole mesh before ZeRO sees it: ``fully_shard`` and
    ``ZeroRedundancyOptimizer`` take DTensors on the mesh they are given (Replicate on dp), not tp-placed ones
    on the mesh["tp"] sub-mesh, and the causal-mask buffer must be a DTensor too. ``replicate`` lifts them all
    (no data moves); with ZeRO its gradient hooks stay off, because ZeRO reduce-scatters the gradients itself
    (an all-reduce first would double the traffic).
    """
    if layout.tp > 1:
        parallelize_module(model, mesh["tp"], tp_plan(model.config, sequence_parallel=layout.sp))
    if layout.dp == 1 and layout.cp == 1:
        dtp.distribute_module(model, mesh)  # replicate what tp_plan leaves plain (position embedding, norms)
        return model
    # Under cp each rank's gradients cover its part of the sequence: reduced over cp (and dp) like dp's.
    replicate(model, mesh, dp_dim="dp" if layout.dp > 1 else "cp", reduce_in_backward=layout.zero == 0)
    if layout.zero == 3:
        # FSDP2 order: the blocks first, then the root, which owns the rest (embeddings, final norm, head).
        for block in model.blocks:
            fully_shard(block, mesh, mesh_dim="dp")
        fully_shard(model, mesh, mesh_dim="dp")
    return model


def make_optimizer(model: GPT, mesh, layout: Layout, lr: float):
    """AdamW; for ZeRO 1/2 wrapped in ``ZeroRedundancyOptimizer`` (sharded state), otherwise plain (for ZeRO 3
    its state is sharded because the parameters are)."""
    kwargs = dict(lr=lr, weight_decay=WEIGHT_DECAY, foreach=False)
    if layout.zero in (1, 2):
        return ZeroRedundancyOptimizer(
            model.parameters(), mesh, torch.optim.AdamW, stage=layout.zero, mesh_dim="dp", **kwargs
        )
    return torch.optim.AdamW(model.parameters(), **kwargs)


# -- training --------------------------------------------------------------------------------------------


def train(model, opt, data_batches, place=lambda t: t, log=None, scope=contextlib.nullcontext) -> list[float]:
    """One optimizer step per batch; forward and backward inside ``scope()`` (e.g. context_parallel) and
    ``loss_parallel`` (a no-op for plain tensors, vocab-sharded logits otherwise). Returns the losses."""
    losses = []
    for step, (tokens, targets) in enumerate(data_batches):
        start = time.perf_counter()
        with scope(), loss_parallel():
            loss = model.loss(place(tokens), place(targets))
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        # NOTE: .item() syncs (and, for a DTensor, all-reduces the loss): fine for a progress line.
        losses.append(loss.full_tensor().item() if isinstance(loss, DTensor) else loss.item())
        if log is not None:
            log(f"step {step:4d}  loss {losses[-1]:.4f}  {tokens.numel() / (time.perf_counter() - start):9.0f} tokens/s")
    return losses


def max_param_diff(model, reference) -> float:
    ref = dict(reference.named_parameters())
    return max((p.full_tensor() - ref[n]).abs().max().item() for n, p in model.named_parameters())


def compare_with_single(config: GPTConfig, layout: Layout, batch_list, lr: float = 1e-3, seed: int = 0,
                        mesh=None, log=None) -> Result:
    """Train ``config`` laid out as ``layout`` and as one process, from the same weights and dropout seed.

    Call on every rank of a ``layout.world``-rank group (torchrun or ``run_on_ranks``); ``batch_list`` is the
    same list of whole (tokens, targets) batches on every rank.
    """
    if layout.cp > 1 and config.attention != "sdpa":
        raise ValueError("context parallelism shards attention's sequence: use GPTConfig(attention='sdpa')")
    mesh = mesh if mesh is not None else make_mesh(layout)
    torch.manual_seed(seed)
    model = GPT(config)
    reference = copy.deepcopy(model)

    place_model(model, mesh, layout)
    opt = make_optimizer(model, mesh, layout, lr)
    dtp.manual_seed(seed + 1, strict=True)  # dropout drawn as one device would
    scope = functools.partial(context_parallel, "cp", layout.cp_kind) if layout.cp > 1 else contextlib.nullcontext
    place = functools.partial(place_batch, mesh=mesh, balance=layout.cp_balance)
    mesh_losses = train(model, opt, batch_list, place=place, log=log, scope=scope)

    torch.manual_seed(seed + 1)
    single_losses = train(reference, make_optimizer(reference, None, Layout(), lr), batch_list)
    return Result(mesh_losses, single_losses, max_param_diff(model, reference),
                  {n: _placement_names(p) for n, p in model.named_parameters()},
                  _state_placements(model, opt))


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


def save_plot(path: str, mesh_losses, single_losses, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the loss plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(mesh_losses, label="mesh")
    ax.plot(single_losses, "--", label="single process")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"saved {path}")


def main(argv=None) -> Result:
    args = parse_args(argv)
    layout = args.layout
    mesh = make_mesh(layout)
    rank0 = mesh.get_rank() == 0
    config = PRESETS[args.config].replace(dropout=args.dropout)
    if layout.cp > 1:
        config = config.replace(attention="sdpa")  # what context parallelism shards along the sequence
    seq_len = args.seq_len or config.block_size
    data = stdlib_bytes(args.text_bytes)
    if rank0:
        print(f"{len(data):,} bytes of stdlib source; {layout}; {config}")
    batch_list = list(batches(data, args.steps, args.batch_size, seq_len, args.seed))
    log = print if rank0 else None
    result = compare_with_single(config, layout, batch_list, args.lr, args.seed, mesh=mesh, log=log)
    if rank0:
        print_table(result)
        save_plot(args.plot, result.mesh_losses, result.single_losses, f"GPT {args.config}: {layout}")
    return result


if __name__ == "__main__":
    main()
    torch.distributed.destroy_process_group()
