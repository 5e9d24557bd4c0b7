"""Activation memory per transformer layer, with and without recomputation, beside Korthikanti et al. 2022.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/activation_memory.py [--out /tmp/activation_memory.md]

examples/gpt.py's GPT (dropout 0.1, matmul attention) on tp 1, 2, 4, with and without sequence parallelism,
policies none / selective (``checkpoint_modules(model, "blocks.*.attn", "selective")``) / full
(``checkpoint_modules(model, "blocks.*", "full")``). A layer's bytes on one rank = the activations alive at the
end of forward with L + 1 layers minus those with L layers (embeddings, head and loss cancel).

What "alive" counts: every storage an op produced during forward (``LiveActivations``: a dispatch mode, local
blocks of DTensors) that is still referenced when forward ends -- saved by autograd, kept by a checkpoint (its
inputs, the selective cache), or held by the program -- each storage once. A ``saved_tensors_hooks`` tracker
(dtensor_plus/simulate/memory.py) cannot see inside a checkpointed region: torch's checkpoint installs its own
hooks there, innermost, and keeps what it keeps outside autograd's saved tensors.

The paper's formula counts 16-bit activations (2 bytes an element) and 1-byte dropout masks. On CPU in fp32 every
activation element is 4 bytes and torch's CPU dropout keeps its mask as a float tensor of the input's dtype (4
bytes, ``at::_dropout``: ``input * noise``), so the paper's figure is converted term by term: per layer it has
16 s·b·h activation elements and 2 s·b·h mask elements outside the attention core, and 2 a·s²·b activation
plus a·s²·b mask elements inside it; tp divides the terms it shards. The "formula (fp32)" column is that count
at 4 bytes an element, plus the LayerNorms' statistics (mean and 1/std, 2 s·b elements per norm, which the paper
leaves out). "+ explained" is what dtensor_plus keeps beyond it, named in ``explained_bytes``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import dtensor_plus as dtp  # noqa: E402
from dtensor_plus.layouts import loss_parallel  # noqa: E402
from dtensor_plus.layouts.recompute import checkpoint_modules  # noqa: E402
from dtensor_plus.testing import run_on_ranks  # noqa: E402

POLICY_PATTERNS = {"none": None, "selective": "blocks.*.attn", "full": "blocks.*"}


class LiveActivations(TorchDispatchMode):
    """Storages produced by ops while active (a DTensor's local block), each once; ``live_bytes()`` sums those
    still alive. Storages that existed before (parameters, buffers, inputs) are not produced, so not counted."""

    def __init__(self):
        super().__init__()
        self.seen: dict[int, tuple[int, int]] = {}  # storage address -> (weak reference, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        existing = {_storage(t)._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = _storage(t)
                key = storage._cdata
                if key in existing:
                    continue  # a view, or an in-place op's output
                if key in self.seen and not torch.UntypedStorage._expired(self.seen[key][0]):
                    continue
                self.seen[key] = (storage._weak_ref(), storage.nbytes())
        return out

    def live_bytes(self) -> int:
        return sum(n for ref, n in self.seen.values() if not torch.UntypedStorage._expired(ref))

    def release(self) -> None:
        for ref, _ in self.seen.values():
            torch.UntypedStorage._free_weak_ref(ref)
        self.seen.clear()


def _storage(t: torch.Tensor):
    return getattr(t, "_local_tensor", t).untyped_storage()


def formula_bytes(s: int, b: int, h: int, a: int, t: int, sp: bool, policy: str, act: int = 4, mask: int = 4,
                  norm_stats: bool = True) -> float:
    """Korthikanti et al.'s activation bytes per layer per rank, with ``act`` bytes an activation element and
    ``mask`` bytes a dropout-mask element (the paper: 2 and 1, giving 34 + 5as/h), plus (``norm_stats``) the
    LayerNorms' mean and 1/std in ``act`` bytes. Full recomputation keeps the layer's input only."""
    sbh, as2b = s * b * h, a * s * s * b
    if policy == "full":
        return act * sbh / t if sp else act * sbh
    replicated = 4 * act + 2 * mask  # the two norms' inputs, the attention and MLP inputs, two dropout masks
    sharded = 12 * act  # Q, K, V, the projection's input, the MLP's 4h input and output of GeLU
    core = (2 * act + mask) * as2b / t  # softmax output, its dropout mask and output
    stats = 2 * 2 * s * b * act if norm_stats else 0
    if sp:
        out = (replicated + sharded) * sbh / t + stats / t
    else:
        out = replicated * sbh + sharded * sbh / t + stats
    return out + (0 if policy == "selective" else core)


def explained_bytes(s: int, b: int, h: int, t: int, sp: bool, policy: str, act: int = 4) -> float:
    """What dtensor_plus keeps beyond the paper's count, term by term (fp32):

    * sp (none, selective): the all-gathered inputs of the q/k/v and fc layers are what those linear layers
      save, whole, where Megatron saves the shard and gathers again in backward: 2 (1 - 1/t) s·b·h more.
    * selective with tp > 1: the cache keeps the row-parallel projection's partial sum (whole, s·b·h: a
      collective reads it) and the collective's output (s·b·h/t under sp, s·b·h otherwise: the residual
      dropout's input), while the paper's projection input (s·b·h/t) is recomputed here from the core.
    """
    sbh = s * b * h * act
    extra = 0.0
    if sp and policy != "full":
        extra += 2 * (1 - 1 / t) * sbh
    if policy == "selective" and t > 1:
        extra += sbh + (sbh / t if sp else sbh) - sbh / t
    return extra


def measure(config, tp: int, sp: bool, policy: str, batch: int, strict: bool) -> int:
    """Rank function: bytes alive at the end of forward on this rank for ``config`` on tp ranks."""
    from gpt import GPT
    from gpt_layouts import Layout, make_mesh, place_batch, place_model

    layout = Layout(tp=tp, sp=sp) if tp > 1 else Layout()
    mesh = make_mesh(layout)
    torch.manual_seed(0)
    model = GPT(config)
    place_model(model, mesh, layout)
    if POLICY_PATTERNS[policy]:
        checkpoint_modules(model, POLICY_PATTERNS[policy], policy)
    dtp.manual_seed(1, strict=strict)
    tokens = torch.randint(0, config.vocab_size, (batch, config.block_size), generator=torch.Generator().manual_seed(2))
    tracker = LiveActivations()
    with loss_parallel():
        with tracker:
            loss = model.loss(place_batch(tokens, mesh), place_batch(tokens, mesh))
        live = tracker.live_bytes()
        loss.backward()
    tracker.release()
    return live


def per_layer(config, tp: int, sp: bool, policy: str, batch: int, strict: bool = False) -> int:
    """A layer's bytes on rank 0: (L + 1 layers) - (L layers)."""
    runs = [run_on_ranks(tp, measure, config.replace(num_layers=n), tp, sp, policy, batch, strict,
                         timeout=300.0)[0] for n in (config.num_layers, config.num_layers + 1)]
    return runs[1] - runs[0]


def main(argv=None):
    from gpt import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tp", default="1,2,4")
    parser.add_argument("--strict", action="store_true", help="dropout in strict RNG mode (drawn whole, sliced)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    config = PRESETS["debug"].replace(block_size=args.seq, dim=args.dim, num_heads=args.heads, num_layers=1,
                                      dropout=0.1)
    s, b, h, a = args.seq, args.batch, args.dim, args.heads
    lines = [f"s={s} b={b} h={h} a={a} (a·s/h = {a * s / h:g}), fp32, dropout 0.1, "
             f"{'strict' if args.strict else 'default'} RNG; bytes per layer on one rank",
             "", "| tp | sp | policy | measured B | formula (fp32) B | ratio | + explained B | ratio to formula + "
             "explained | paper (16-bit) B |",
             "|---:|:--:|:--|---:|---:|---:|---:|---:|---:|"]
    for tp in [int(x) for x in args.tp.split(",")]:
        for sp in ([False, True] if tp > 1 else [False]):
            for policy in POLICY_PATTERNS:
                got = per_layer(config, tp, sp, policy, b, args.strict)
                want = formula_bytes(s, b, h, a, tp, sp, policy)
                paper = formula_bytes(s, b, h, a, tp, sp, policy, act=2, mask=1, norm_stats=False)
                extra = explained_bytes(s, b, h, tp, sp, policy)
                lines.append(f"| {tp} | {'yes' if sp else 'no'} | {policy} | {got} | {want:.0f} | {got / want:.3f} "
                             f"| {extra:.0f} | {got / (want + extra):.3f} | {paper:.0f} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
