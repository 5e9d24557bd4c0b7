"""The MoE variant of examples/gpt.py: configuration errors, the dense model untouched by the MoE fields, and
20 training steps with experts sharded over the data-parallel ranks (ep = dp = 2, dropout drawn as one
device would) equal to one process: loss curve and final parameters.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch

import dtensor_plus as dtp
from dtensor_plus import Replicate, Shard
from dtensor_plus.layouts.data import replicate
from dtensor_plus.layouts.moe import expert_parallel
from dtensor_plus.testing import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from gpt import GPT, PRESETS, GPTConfig  # noqa: E402

MOE = PRESETS["debug"].replace(moe_experts=4, moe_top_k=2, dropout=0.1)


@pytest.mark.parametrize("changes, match", [
    (dict(moe_experts=4, moe_top_k=5), "moe_top_k"),
    (dict(moe_experts=4, moe_every=3), "moe_every"),
    (dict(moe_experts=-1), "moe_experts"),
])
def test_moe_config_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(num_layers=2, **changes)


def test_dense_model_is_unchanged_and_moe_every_other_block():
    torch.manual_seed(0)
    dense = GPT(PRESETS["debug"])
    assert not dense.moe_layers()
    assert all("moe" not in name for name, _ in dense.named_parameters())
    model = GPT(MOE)
    assert [type(b.mlp).__name__ for b in model.blocks] == ["MLP", "MoEMLP"]
    model.loss(*_batch(0))
    assert model.moe_layers()[0].load.sum().item() == 4 * 8 * 2  # B T tokens, two experts each
    assert model.moe_load_line().startswith("load b1 [")


def _batch(step):
    g = torch.Generator().manual_seed(step)
    window = torch.randint(0, MOE.vocab_size, (4, MOE.block_size + 1), generator=g)
    return window[:, :-1], window[:, 1:]


def _train(model, steps, place=lambda t: t):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)  # train_gpt.py's lr
    losses = []
    for step in range(steps):
        loss = model.loss(*(place(t) for t in _batch(step)))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.full_tensor().item() if hasattr(loss, "full_tensor") else loss.item())
    return losses


def _check_moe_gpt(steps):
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    model = GPT(MOE)
    reference = copy.deepcopy(model)
    replicate(model, mesh, "dp")
    expert_parallel(model, mesh, ep_dim="dp")  # 2 of the 4 experts per rank
    dtp.manual_seed(1, strict=True)
    losses = _train(model, steps, lambda t: dtp.distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None))
    torch.manual_seed(1)
    want = _train(reference, steps)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want), atol=1e-5, rtol=1e-5)
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.full_tensor(), ref[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        want_placement = Shard(0) if ".moe.experts." in name else Replicate()
        assert p.placements == (want_placement,), (name, p.placements)
    return losses


def test_moe_gpt_trains_like_one_process_with_experts_on_dp():
    losses = run_on_ranks(2, _check_moe_gpt, 20)[0]
    assert losses[-1] < losses[0]
