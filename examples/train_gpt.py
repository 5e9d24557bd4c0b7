"""Train the GPT of examples/gpt.py on a (dp, tp) mesh and check it against one process, step by step.

    torchrun --standalone --nproc-per-node 4 examples/train_gpt.py --dp 2 --tp 2 --sp --config debug --steps 20

The text is one every machine has without a download: the bytes of the Python standard library's own source
files (``sysconfig.get_paths()["stdlib"]``, read at run time; byte-level vocabulary of 256). Batches are random
windows drawn from a seeded generator, so every rank (and the single-process run) sees the same batches.

Each rank trains the model twice from the same initial weights and seed: once placed on the mesh (tensor
parallel by ``tp_plan``, data parallel by ``replicate``, dropout drawn as one device would under
``manual_seed(seed, strict=True)``), once as one process. Rank 0 prints a progress line per step, then a table
of both loss curves and the largest parameter difference, and saves a PNG of the curves when matplotlib is
importable.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dtensor_plus as dtp  # noqa: E402
from dtensor_plus import DTensor  # noqa: E402
from dtensor_plus.layouts import loss_parallel, parallelize_module  # noqa: E402
from dtensor_plus.layouts.data import replicate, shard_batch  # noqa: E402
from gpt import GPT, PRESETS, tp_plan  # noqa: E402

MAX_TEXT_BYTES = 4 << 20  # enough text for a small model; reading all of the stdlib (~30 MB) takes seconds


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--sp", action="store_true", help="sequence parallelism on the tp mesh dim")
    parser.add_argument("--config", default="debug", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (divisible by --dp)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the config's block_size")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="train_gpt_loss.png", help="where to save the loss curves")
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.dp * args.tp != world:
        parser.error(f"dp({args.dp}) * tp({args.tp}) != world size({world}); launch with --nproc-per-node {args.dp * args.tp}")
    if args.batch_size % args.dp:
        parser.error(f"--batch-size({args.batch_size}) must divide by --dp({args.dp})")
    if args.sp and args.tp == 1:
        parser.error("--sp needs --tp > 1")
    return args


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


def train(model, data_batches, lr: float, place=lambda t: t, log=None) -> list[float]:
    """AdamW steps; the loss inside ``loss_parallel`` (a no-op for plain tensors, vocab-sharded logits otherwise)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, foreach=False)
    losses = []
    for step, (tokens, targets) in enumerate(data_batches):
        start = time.perf_counter()
        with loss_parallel():
            loss = model.loss(place(tokens), place(targets))
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        # NOTE: .item() syncs (and, for a DTensor, all-reduces the loss): fine for a progress line.
        losses.append(loss.full_tensor().item() if isinstance(loss, DTensor) else loss.item())
        if log is not None:
            log(f"step {step:4d}  loss {losses[-1]:.4f}  {tokens.numel() / (time.perf_counter() - start):9.0f} tokens/s")
    return losses


def place_model(model: GPT, mesh, args) -> GPT:
    if args.tp > 1:
        parallelize_module(model, mesh["tp"], tp_plan(model.config, sequence_parallel=args.sp))
    if args.dp > 1:
        replicate(model, mesh)
    else:
        dtp.distribute_module(model, mesh)  # replicate what tp_plan leaves plain (position embedding, norms)
    return model


def max_param_diff(model, reference) -> float:
    ref = dict(reference.named_parameters())
    return max((p.full_tensor() - ref[n]).abs().max().item() for n, p in model.named_parameters())


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


def main(argv=None) -> float:
    args = parse_args(argv)
    names, shape = zip(*[(n, s) for n, s in (("dp", args.dp), ("tp", args.tp)) if s > 1] or [("dp", 1)])
    mesh = dtp.init_device_mesh("cpu", shape, mesh_dim_names=names)
    rank0 = mesh.get_rank() == 0
    log = print if rank0 else None
    config = PRESETS[args.config].replace(dropout=args.dropout)
    seq_len = args.seq_len or config.block_size
    data = stdlib_bytes()
    if rank0:
        print(f"{len(data):,} bytes of stdlib source; mesh {dict(zip(names, shape))} sp={args.sp}; {config}")

    torch.manual_seed(args.seed)
    model = GPT(config)
    reference = copy.deepcopy(model)
    place_model(model, mesh, args)

    dtp.manual_seed(args.seed + 1, strict=True)  # dropout drawn as one device would
    mesh_losses = train(model, batches(data, args.steps, args.batch_size, seq_len, args.seed), args.lr,
                        place=lambda t: shard_batch(t, mesh), log=log)
    torch.manual_seed(args.seed + 1)
    single_losses = train(reference, batches(data, args.steps, args.batch_size, seq_len, args.seed), args.lr)
    diff = max_param_diff(model, reference)

    if rank0:
        print(f"\n{'step':>4}  {'loss (mesh)':>11}  {'loss (single)':>13}  {'|diff|':>8}")
        for step, (a, b) in enumerate(zip(mesh_losses, single_losses)):
            print(f"{step:4d}  {a:11.6f}  {b:13.6f}  {abs(a - b):8.1e}")
        print(f"max |param diff| after {args.steps} steps: {diff:.2e}")
        save_plot(args.plot, mesh_losses, single_losses, f"GPT {args.config}: dp={args.dp} tp={args.tp} sp={args.sp}")
    return diff


if __name__ == "__main__":
    main()
    torch.distributed.destroy_process_group()
