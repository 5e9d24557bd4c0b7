"""Bytes and memory per transformer layer under 1-D (Megatron), 2-D (Optimus), 2.5-D (Tesseract) and 3-D (Bian
et al.) tensor parallelism, measured beside each scheme's formula, on the same number of ranks.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tensor_parallel_nd.py [--out /tmp/tensor_parallel_nd.md]

One layer = examples/gpt.py's ``Block`` (ln1, causal SDPA attention, ln2, MLP of width 4D, biases) on an input
(B, T, D) laid out as each scheme's residual stream, forward and backward (the input's gradient included), on
real gloo ranks: 4 (1-D tp=4, 2-D q=2) and 8 (1-D tp=8, 2.5-D q=2 d=2, 3-D q=2). Columns, per rank:

- bytes: everything ``comm_mode`` counts in forward + backward, gradient reductions of the layer's parameters
  included, beside the formula (M = B T rows, D width, fp32; Σ|W| = 12 D², Σ|y| = 9 M D over the six linears):
    1-D   4 all-reduces of M D (two in forward after the row-parallel layers, two of the input gradients in
          backward): 8 (p-1)/p M D elements
    2-D   per linear layer SUMMA sends (q+1)(|W| + |y|/d)/q² (forward NT, backward NN and TN, ops/summa.py);
          each layer norm 3 all-reduces of per-row statistics (4 values a row) on col, 8 (q-1) M/(q² d); the
          1/q parameters' (biases, norms: 13 D) gradients all-reduced on row, 2 (q-1)/q² 13 D; 2.5-D adds every
          gradient's all-reduce on depth, 2 (d-1)/d (12 D²/q² + 13 D/q)
    3-D   per linear layer (q-1)/q³ (|x| + |W| + |y|) each way (Σ|x| = 9 M D); layer norms 8 (q-1) M/q³ each;
          the 1/q parameters' gradients all-reduced on two mesh dims, 4 (q-1)/q² 13 D
- params: the layer's parameter bytes on a rank, beside 12 D² and 13 D divided as each scheme divides them.
- activations: bytes alive at the end of forward (benchmarks/activation_memory.py's ``LiveActivations``: what
  autograd saved, and the output), beside one device's figure divided by the ranks ("ideal" = every activation
  split p ways). 1-D Megatron without sequence parallelism keeps the norms' and residuals' activations whole
  (Korthikanti et al.'s 10 s b h term), so its ratio is above 1; the block schemes split all of them.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(1, str(ROOT / "benchmarks"))

import dtensor_plus as dtp  # noqa: E402
from dtensor_plus import distribute_tensor  # noqa: E402
from dtensor_plus.collectives import comm_mode  # noqa: E402
from dtensor_plus.layouts import parallelize_module  # noqa: E402
from dtensor_plus.layouts.tensor_2d import Grid2D, tensor_parallel_2d  # noqa: E402
from dtensor_plus.layouts.tensor_3d import Cube3D, tensor_parallel_3d  # noqa: E402
from dtensor_plus.mesh import init_device_mesh  # noqa: E402
from dtensor_plus.placements import Replicate  # noqa: E402
from dtensor_plus.testing import run_on_ranks  # noqa: E402

from activation_memory import LiveActivations  # noqa: E402
from gpt import PRESETS, Block, tp_plan  # noqa: E402
from gpt_tensor_nd import plan_2d, plan_3d  # noqa: E402

B, T, D, H = 8, 16, 64, 8
CONFIG = PRESETS["debug"].replace(dim=D, num_heads=H, block_size=T, attention="sdpa", dropout=0.0)
SCHEMES = {  # name: (ranks, mesh shape, mesh dim names, q, d)
    "1-D tp=4": (4, (4,), ("tp",), 4, 1),
    "2-D q=2": (4, (2, 2), ("row", "col"), 2, 1),
    "1-D tp=8": (8, (8,), ("tp",), 8, 1),
    "2.5-D q=2 d=2": (8, (2, 2, 2), ("depth", "row", "col"), 2, 2),
    "3-D q=2": (8, (2, 2, 2), ("seq", "batch", "hidden"), 2, 1),
}


def _block_plan(plan: dict) -> dict:
    """A whole-GPT plan's entries for one block, relative to it."""
    return {key[len("blocks.*."):]: style for key, style in plan.items() if key.startswith("blocks.*.")}


def _place(scheme: str, block, mesh):
    """(the residual stream's placements, the scope to run in) after laying ``block`` out."""
    if scheme.startswith("1-D"):
        parallelize_module(block, mesh, _block_plan(tp_plan(CONFIG, sequence_parallel=False)))
        return (Replicate(),), _Nothing
    if scheme.startswith("3-D"):
        cube = Cube3D()
        parallelize_module(block, mesh, _block_plan(plan_3d(cube)))
        return cube.residual(mesh), tensor_parallel_3d
    grid = Grid2D(depth_mesh_dim="depth" if "2.5" in scheme else None)
    parallelize_module(block, mesh, _block_plan(plan_2d(grid)))
    return grid.activation(mesh, 3), lambda: tensor_parallel_2d(grid)


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _one_device_activations() -> int:
    torch.manual_seed(0)
    block, x = Block(CONFIG), torch.randn(B, T, D, requires_grad=True)
    with LiveActivations() as live:
        y = block(x)
        alive = live.live_bytes()
    del y
    return alive


def _measure(scheme: str) -> dict:
    """Rank function: this rank's bytes sent (forward, backward), parameter bytes, activation bytes."""
    _, shape, names, _, _ = SCHEMES[scheme]
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    torch.manual_seed(0)
    block = Block(CONFIG)
    reference = copy.deepcopy(block)
    residual, scope = _place(scheme, block, mesh)
    dtp.distribute_module(block, mesh)  # the causal mask; 1-D's norms, replicated
    x_whole, grad_whole = torch.randn(B, T, D), torch.randn(B, T, D)
    x = distribute_tensor(x_whole, mesh, residual, src_data_rank=None).requires_grad_()
    with scope():
        with comm_mode() as forward, LiveActivations() as live:
            y = block(x)
            activations = live.live_bytes()
        grad = distribute_tensor(grad_whole, mesh, y.placements, src_data_rank=None)
        with comm_mode() as backward:
            y.backward(grad)
    x_ref = x_whole.clone().requires_grad_()
    reference(x_ref).backward(grad_whole)
    error = max((y.full_tensor() - reference(x_whole)).abs().max().item(),
                (x.grad.full_tensor() - x_ref.grad).abs().max().item())
    params = sum(p.to_local().numel() * p.element_size() for p in block.parameters())
    return dict(forward=forward.bytes(), backward=backward.bytes(), params=params, activations=activations,
                error=error)


def formula_bytes(scheme: str) -> float:
    """Bytes a rank sends per layer, forward + backward, by the scheme's formula (see the module docstring)."""
    _, _, _, q, d = SCHEMES[scheme]
    M, W, Y, X, small = B * T, 12 * D * D, 9 * B * T * D, 9 * B * T * D, 13 * D
    if scheme.startswith("1-D"):
        elements = 8 * (q - 1) / q * M * D
    elif scheme.startswith("3-D"):
        elements = 2 * (q - 1) / q**3 * (X + W + Y) + 2 * 8 * (q - 1) * M / q**3 + 4 * (q - 1) / q**2 * small
    else:
        elements = ((q + 1) * (W + Y / d) / q**2 + 2 * 8 * (q - 1) * M / (q * q * d) + 2 * (q - 1) / q**2 * small
                    + 2 * (d - 1) / d * (W / q**2 + small / q))
    return 4 * elements


def formula_params(scheme: str) -> float:
    _, _, _, q, _ = SCHEMES[scheme]
    if scheme.startswith("1-D"):  # q, k, v, fc (and their biases) by columns, proj and out by rows; norms whole
        return 4 * (12 * D * D / q + 7 * D / q + 2 * D + 4 * D)
    return 4 * (12 * D * D / (q**3 if scheme.startswith("3-D") else q**2) + 13 * D / q)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    one_device = _one_device_activations()
    rows = ["| scheme | ranks | bytes/rank fwd+bwd | formula | ratio | params/rank | formula | ratio | "
            "activations/rank | one device / ranks | ratio | max error |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for scheme, (world, *_) in SCHEMES.items():
        results = run_on_ranks(world, _measure, scheme, timeout=600.0)
        sent = max(r["forward"] + r["backward"] for r in results)
        params, acts = max(r["params"] for r in results), max(r["activations"] for r in results)
        error = max(r["error"] for r in results)
        fb, fp, ideal = formula_bytes(scheme), formula_params(scheme), one_device / world
        rows.append(f"| {scheme} | {world} | {sent} | {fb:.0f} | {sent / fb:.2f} | {params} | {fp:.0f} | "
                    f"{params / fp:.2f} | {acts} | {ideal:.0f} | {acts / ideal:.2f} | {error:.1e} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(f"\nB={B} T={T} D={D} heads={H}, fp32; one device's activations: {one_device} B\n\n{table}")
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
