"""The debug GPT (examples/gpt.py) trained a few AdamW steps with dropout on (dp, tp, sp) meshes equals the
same training on one device: every loss and every final parameter within 1e-5, and no op falls back.

Strict RNG (``dtensor_plus.manual_seed(s, strict=True)``) makes each dropout mask the single-device one.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch

import dtensor_plus as dtp
from dtensor_plus import DTensor
from dtensor_plus.layouts import loss_parallel, parallelize_module
from dtensor_plus.layouts.data import replicate, shard_batch
from dtensor_plus.testing import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from gpt import GPT, PRESETS, tp_plan  # noqa: E402

B, T, STEPS, SEED = 4, 8, 3, 0
CONFIG = PRESETS["debug"].replace(dropout=0.1)


def _batches():
    g = torch.Generator().manual_seed(SEED + 1)
    data = torch.randint(0, CONFIG.vocab_size, (STEPS, B, T + 1), generator=g)
    return [(d[:, :-1], d[:, 1:]) for d in data]


def _train(model, batches, place=lambda t: t):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    losses = []
    for tokens, targets in batches:
        with loss_parallel():
            loss = model.loss(place(tokens), place(targets))
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.full_tensor().item() if isinstance(loss, DTensor) else loss.item())
    return losses


def _run(dp: int, tp: int, sp: bool):
    names, shape = zip(*[(n, s) for n, s in (("dp", dp), ("tp", tp)) if s > 1])
    mesh = dtp.init_device_mesh("cpu", shape, mesh_dim_names=names)
    torch.manual_seed(SEED)
    model = GPT(CONFIG)
    reference = copy.deepcopy(model)

    torch.manual_seed(SEED + 2)
    ref_losses = _train(reference, _batches())

    if tp > 1:
        parallelize_module(model, mesh["tp"], tp_plan(CONFIG, sequence_parallel=sp))
    if dp > 1:
        replicate(model, mesh)
    else:
        dtp.distribute_module(model, mesh)  # the replicated rest: position embedding, norms, mask
    dtp.manual_seed(SEED + 2, strict=True)
    with dtp.comm_mode() as comm:
        losses = _train(model, _batches(), place=lambda t: shard_batch(t, mesh))

    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-5, rtol=0)
    ref_params = dict(reference.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        worst = max(worst, (p.full_tensor() - ref_params[name]).abs().max().item())
    assert worst < 1e-5, worst
    return dict(comm.fallbacks)


@pytest.mark.parametrize("dp, tp, sp", [(2, 2, True), (4, 1, False), (1, 4, True)], ids=["dp2-tp2-sp", "dp4", "tp4-sp"])
def test_gpt_training_matches_one_device(dp, tp, sp):
    for fallbacks in run_on_ranks(dp * tp, _run, dp, tp, sp):
        assert not fallbacks, fallbacks
