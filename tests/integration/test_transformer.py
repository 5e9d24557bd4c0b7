"""A small GPT block, forward and backward, on (dp, tp) meshes: Megatron tensor parallelism written as
placements only, equal to one device in loss and every gradient, with no op falling back.

Legend: B batch, T sequence, D model width, H heads, K head width, F MLP width, V vocabulary.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import dtensor_plus as dtp
from dtensor_plus import Replicate, Shard
from dtensor_plus.testing import run_on_ranks

B, T, D, H, F_, V = 3, 5, 8, 2, 16, 11
K = D // H


def _parameters(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    return {
        "embed": randn(V, D, scale=0.5),
        "ln1_w": 1 + randn(D, scale=0.1), "ln1_b": randn(D, scale=0.1),
        "qkv_w": randn(3 * D, D, scale=D**-0.5), "qkv_b": randn(3 * D, scale=0.1),
        "proj_w": randn(D, D, scale=D**-0.5), "proj_b": randn(D, scale=0.1),
        "ln2_w": 1 + randn(D, scale=0.1), "ln2_b": randn(D, scale=0.1),
        "fc_w": randn(F_, D, scale=D**-0.5), "fc_b": randn(F_, scale=0.1),
        "out_w": randn(D, F_, scale=F_**-0.5), "out_b": randn(D, scale=0.1),
        "head_w": randn(V, D, scale=D**-0.5),
    }


def _attention(x_BTD, p):
    qkv_BT3D = F.linear(x_BTD, p["qkv_w"], p["qkv_b"])
    q_BTD, k_BTD, v_BTD = (qkv_BT3D[..., i * D : (i + 1) * D] for i in range(3))
    q_BHTK, k_BHTK, v_BHTK = (t.view(B, T, H, K).transpose(1, 2) for t in (q_BTD, k_BTD, v_BTD))
    scores_BHTT = q_BHTK @ k_BHTK.transpose(-2, -1) / math.sqrt(K)
    causal_TT = torch.ones(T, T, dtype=torch.bool).triu(1)
    scores_BHTT = scores_BHTT.masked_fill(_like(causal_TT, scores_BHTT), float("-inf"))
    y_BHTK = scores_BHTT.softmax(-1) @ v_BHTK
    y_BTD = y_BHTK.transpose(1, 2).reshape(B, T, D)
    return F.linear(y_BTD, p["proj_w"], p["proj_b"])


def _like(mask, reference):
    """A replicated constant next to a DTensor (plain tensors other than 0-d ones must be placed)."""
    if isinstance(reference, dtp.DTensor):
        return dtp.distribute_tensor(mask, reference.device_mesh, [Replicate()] * reference.device_mesh.ndim, src_data_rank=None)
    return mask


def gpt_block_loss(tokens_BT, targets_BT, p):
    x_BTD = F.embedding(tokens_BT, p["embed"])
    x_BTD = x_BTD + _attention(F.layer_norm(x_BTD, (D,), p["ln1_w"], p["ln1_b"]), p)
    h_BTF = F.gelu(F.linear(F.layer_norm(x_BTD, (D,), p["ln2_w"], p["ln2_b"]), p["fc_w"], p["fc_b"]))
    x_BTD = x_BTD + F.linear(h_BTF, p["out_w"], p["out_b"])
    logits_BTV = F.linear(x_BTD, p["head_w"])
    return F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())


# Megatron: qkv and fc column-wise, proj and out row-wise on tp; everything else replicated. The fused qkv
# weight is sharded on its rows, so each rank holds a slice of the concatenated q|k|v columns.
TP_PLAN = {"qkv_w": Shard(0), "qkv_b": Shard(0), "fc_w": Shard(0), "fc_b": Shard(0), "proj_w": Shard(1), "out_w": Shard(1), "embed": Shard(0)}


def _run_block(mesh_shape, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "tp"))
    whole = _parameters(seed)
    g = torch.Generator().manual_seed(seed + 1)
    tokens, targets = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)

    params = {
        name: dtp.distribute_tensor(t.requires_grad_(), mesh, [Replicate(), TP_PLAN.get(name, Replicate())])
        for name, t in whole.items()
    }
    batch = [Shard(0), Replicate()]
    with dtp.comm_mode() as comm:
        loss = gpt_block_loss(dtp.distribute_tensor(tokens, mesh, batch), dtp.distribute_tensor(targets, mesh, batch), params)
        loss.backward()
    reference = gpt_block_loss(tokens, targets, whole)
    reference.backward()

    torch.testing.assert_close(loss.full_tensor(), reference)
    for name, t in whole.items():
        torch.testing.assert_close(params[name].grad.full_tensor(), t.grad, msg=lambda m: f"grad of {name}: {m}")
    return dict(comm.fallbacks)


@pytest.mark.parametrize("mesh_shape", [(1, 2), (2, 2), (1, 3), (3, 1), (2, 1)])
def test_gpt_block_matches_one_device_with_no_fallback(mesh_shape):
    world = mesh_shape[0] * mesh_shape[1]
    for fallbacks in run_on_ranks(world, _run_block, mesh_shape, 0):
        assert not fallbacks, fallbacks
