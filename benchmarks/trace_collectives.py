"""Where each collective of one training step comes from: rank 0 prints (collective, mesh dim, bytes, origin)
grouped, the origin being the innermost frames outside dtensor_plus's core (model, layout or optimizer code).

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 4 benchmarks/trace_collectives.py tp+sp debug
"""

from __future__ import annotations

import collections
import sys
import traceback

import torch.distributed as dist

import train_step  # noqa: F401  (sets sys.path for examples/ and benchmarks/)
from dtensor_plus import collectives
from gpt import GPT, PRESETS
from layout_setups import place_ours

import torch


def origin() -> str:
    frames = traceback.extract_stack()[:-3]
    keep = [f for f in frames if "/dtensor_plus/" not in f.filename and "torch/" not in f.filename][-2:]
    inner = [f for f in frames if "/dtensor_plus/" in f.filename or "/layouts/" in f.filename or "/ops/" in f.filename][-3:]
    fmt = lambda fs: " < ".join(f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in reversed(fs))
    op = next((str(fr.f_locals["func"]) for fr in _frames() if "func" in fr.f_locals and "dispatch.py" in fr.f_code.co_filename), "")
    return fmt(keep) + "  ||  " + fmt(inner) + "  op=" + op


def _frames():
    fr = sys._getframe()
    while fr is not None:
        yield fr
        fr = fr.f_back


def main(layout: str, config_name: str) -> None:
    dist.init_process_group("gloo")
    seen = collections.Counter()
    real = collectives._record

    def record(collective, mesh, mesh_dim, num_bytes):
        seen[collective, mesh.mesh_dim_name(mesh_dim), int(num_bytes), origin()] += 1
        real(collective, mesh, mesh_dim, num_bytes)

    config = PRESETS[config_name]
    torch.manual_seed(0)
    placed = place_ours(layout, GPT(config), dist.get_world_size())
    x = torch.randint(0, 256, (8, config.block_size))
    train_step.step(placed, x, x.roll(-1, 1))  # warm-up (caches)
    placed.opt.zero_grad(set_to_none=True)
    collectives._record = record
    train_step.step(placed, x, x.roll(-1, 1))
    collectives._record = real
    if dist.get_rank() == 0:
        for name, p in placed.model.named_parameters():
            g = p.grad
            if g is not None and getattr(g, "placements", None) != getattr(p, "placements", None):
                print(f"grad placement differs: {name} param {p.placements} {tuple(p._local_tensor.shape)} "
                      f"grad {g.placements} {tuple(g._local_tensor.shape)}")
    if dist.get_rank() == 0:
        for (c, m, b, where), n in sorted(seen.items(), key=lambda kv: kv[0][3]):
            print(f"{n:3d} x {c}[{m}] {b} B  {where}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "debug")
