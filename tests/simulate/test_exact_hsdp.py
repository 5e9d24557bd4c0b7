"""A simulated rank does what the real rank does under HSDP / MiCS (``fully_shard(..., mesh_dim=("replicate",
"shard"))``, layouts/zero_hybrid.py) on a 2 x 2 mesh: the same collectives in order (the gathers and the
reduce-scatter on "shard", the all-reduce of the shards on "replicate", bytes, ops, phases), the same memory and
the same FLOPs, on the first and the last rank, as tests/simulate/test_exact.py checks the other layouts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import dtensor_plus as dtp
from dtensor_plus import Shard
from dtensor_plus.layouts import fully_shard
from dtensor_plus.simulate import measure_step, simulate_step, simulated_world
from dtensor_plus.testing import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from gpt import GPT, PRESETS  # noqa: E402
from test_exact import _check_equal  # noqa: E402

HSDP = ("replicate", "shard")


def _build():
    config = PRESETS["debug"]
    torch.manual_seed(0)
    model = GPT(config)
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=HSDP)
    dtp.distribute_module(model, mesh)
    for block in model.blocks:
        fully_shard(block, mesh, mesh_dim=HSDP)
    fully_shard(model, mesh, mesh_dim=HSDP)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, config.vocab_size, (4, config.block_size), generator=torch.Generator().manual_seed(0))
    place = lambda t: dtp.distribute_tensor(t, mesh, [Shard(0), Shard(0)], src_data_rank=None)  # noqa: E731

    def one_step():
        model.loss(place(tokens), place(torch.roll(tokens, -1, 1))).backward()
        opt.step()

    return one_step, model, opt


def _measured():
    from dtensor_plus.dispatch import clear_cache

    clear_cache()
    one_step, model, opt = _build()
    return measure_step(one_step, models=[model], optimizers=[opt])


@pytest.mark.slow  # four ranks, as test_exact.py's 2 x 2 cases
def test_simulated_hsdp_rank_equals_real_rank():
    assert not dist.is_initialized(), "the simulation runs in this process: it must not be a rank already"
    real = run_on_ranks(4, _measured, timeout=120)
    for rank in (0, 3):
        with simulated_world(4, rank) as world:
            one_step, model, opt = _build()
            simulated = simulate_step(world, one_step, models=[model], optimizers=[opt])
        _check_equal("hsdp 2x2", rank, simulated, real[rank])
        assert simulated.bytes("all_reduce", "replicate") > 0 and simulated.bytes("reduce_scatter", "shard") > 0
        assert simulated.count("all_gather", "replicate") == simulated.count("reduce_scatter", "replicate") == 0
