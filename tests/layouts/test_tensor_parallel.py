"""Tensor parallelism as layouts (layouts/tensor.py, layouts/plan.py): an MLP and a transformer block written
as ordinary nn.Modules, parallelized by a plan, equal one device in loss and every parameter gradient on tp = 2
and 4 and on a (dp, tp) = (2, 2) mesh, with and without sequence parallelism, with the Megatron collective
counts and no fallback.

Legend: B batch, T sequence, D model width, H heads, K head width, F MLP width, V vocabulary.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Partial, Replicate, Shard
from dtensor_plus.layouts.plan import parallelize_module
from dtensor_plus.layouts.tensor import (
    ColwiseParallel, PrepareModuleInput, PrepareModuleOutput, RowwiseParallel, SequenceParallel,
)
from dtensor_plus.testing import run_on_ranks

B, T, D, H, F_, V = 4, 8, 8, 4, 16, 12
K = D // H


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, F_), nn.Linear(F_, D)

    def forward(self, x_BTD):
        return self.fc2(F.gelu(self.fc1(x_BTD)))


class Attention(nn.Module):
    """Separate q/k/v projections. On DTensors the shapes are global: a Shard(-1) q viewed as (B, T, H, K) keeps
    its shard on H, so every rank computes its own heads with no communication.

    NOTE: heads go first, (H, B, T, K), not (B, H, T, K): a 4-D matmul flattens its two batch dims, and a
    flatten keeps a shard only on the outer dim; with (B, H) the views rule must gather (3 all-gathers per
    block, measured), with (H, B) the heads stay sharded."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x_BTD):
        b, t, _ = x_BTD.shape
        q_HBTK, k_HBTK, v_HBTK = (m(x_BTD).view(b, t, H, K).permute(2, 0, 1, 3) for m in (self.q, self.k, self.v))
        scores_HBTT = q_HBTK @ k_HBTK.transpose(-2, -1) * K**-0.5
        y_HBTK = scores_HBTT.softmax(-1) @ v_HBTK
        return self.proj(y_HBTK.permute(1, 2, 0, 3).reshape(b, t, D))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = nn.LayerNorm(D), Attention(), nn.LayerNorm(D), MLP()

    def forward(self, x_BTD):
        x_BTD = x_BTD + self.attn(self.ln1(x_BTD))
        return x_BTD + self.mlp(self.ln2(x_BTD))


class Stack(nn.Module):
    def __init__(self, num_blocks=2):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(num_blocks))

    def forward(self, x_BTD):
        for block in self.blocks:
            x_BTD = block(x_BTD)
        return x_BTD


def _mlp_plan(sp: bool):
    if sp:  # enter with sequence shards, all-gather; leave by reduce-scatter back to sequence shards
        return {
            "fc1": ColwiseParallel(input_layouts=Shard(1)),
            "fc2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        }
    return {"fc1": ColwiseParallel(), "fc2": RowwiseParallel(use_local_output=False)}


def _stack_plan(sp: bool):
    plan = {"blocks.*.attn.[qkv]": ColwiseParallel(use_local_output=False)}
    if sp:
        plan |= {
            "blocks.*.ln?": SequenceParallel(),
            # one all-gather for q, k and v together, not one each
            "blocks.*.attn": PrepareModuleInput(input_layouts=Shard(1), desired_input_layouts=Replicate()),
            "blocks.*.attn.proj": RowwiseParallel(output_layouts=Shard(1)),
            "blocks.*.mlp.fc1": ColwiseParallel(input_layouts=Shard(1)),
            "blocks.*.mlp.fc2": RowwiseParallel(output_layouts=Shard(1)),
        }
    else:
        plan |= {
            "blocks.*.attn.proj": RowwiseParallel(),
            "blocks.*.mlp.fc1": ColwiseParallel(),
            "blocks.*.mlp.fc2": RowwiseParallel(),
        }
    return plan


def _make(kind: str):
    torch.manual_seed(0)
    model = (MLP() if kind == "mlp" else Stack()).double()
    with torch.no_grad():  # LayerNorm starts at (1, 0); move it off so its gradients are checked honestly
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    x_BTD = torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, x_BTD


def _chunk(t: torch.Tensor, dim: int, mesh, name: str) -> torch.Tensor:
    return t.chunk(mesh.size(name), dim)[mesh.get_local_rank(name)]


def _run(kind: str, mesh_shape: tuple[int, int], sp: bool):
    """Rank function: (dp, tp) mesh, TP by plan on mesh["tp"], the batch split over dp. Checks loss and grads
    against one device; returns (forward comm counts, fallbacks)."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "tp"))
    tp_mesh = mesh["tp"]
    reference, x_BTD = _make(kind)
    model = copy.deepcopy(reference)
    parallelize_module(model, tp_mesh, _mlp_plan(sp) if kind == "mlp" else _stack_plan(sp))

    x_local = _chunk(x_BTD, 0, mesh, "dp")
    if sp:
        x_local = _chunk(x_local, 1, mesh, "tp")
    if sp and kind == "mlp":  # sequence shards with their global shape: no gather of the block sizes
        x_local = DTensor.from_local(x_local, tp_mesh, [Shard(1)], shape=(len(x_local), T, D))
    with dtp.comm_mode() as forward_comm:
        y = model(x_local)
    y = y if isinstance(y, DTensor) else DTensor.from_local(y, tp_mesh, [Shard(1) if sp else Replicate()])
    with dtp.comm_mode() as comm:
        loss = y.pow(2).mean().full_tensor()  # this dp rank's mean
        loss.backward()

    ref_loss = reference(x_BTD).pow(2).mean()
    ref_loss.backward()
    torch.testing.assert_close(_dp_mean(loss, mesh), ref_loss)
    for name, p in model.named_parameters():
        # Without SP the norms are not in the plan and stay plain (replicated by construction).
        assert isinstance(p, DTensor) or (not sp and "ln" in name), f"{name} was not distributed"
        grad = _dp_mean(p.grad.full_tensor() if isinstance(p, DTensor) else p.grad, mesh)
        torch.testing.assert_close(grad, reference.get_parameter(name).grad, msg=lambda m: f"grad of {name}: {m}")
    return forward_comm.counts, forward_comm.sent_bytes, dict(forward_comm.fallbacks) | dict(comm.fallbacks)


def _dp_mean(t: torch.Tensor, mesh) -> torch.Tensor:
    """The mean over dp ranks of this rank's (plain) value: the data-parallel gradient average."""
    return DTensor.from_local(t.detach(), mesh["dp"], [Partial("avg")]).full_tensor()


# ---------------------------------------------------------------- equivalence with one device

CASES = [(1, 2), (1, 4), (2, 2)]


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("mesh_shape", CASES, ids=lambda s: f"dp{s[0]}xtp{s[1]}")
@pytest.mark.parametrize("kind", ["mlp", "stack"])
def test_matches_one_device_with_no_fallback(kind, mesh_shape, sp):
    for counts, _, fallbacks in run_on_ranks(mesh_shape[0] * mesh_shape[1], _run, kind, mesh_shape, sp):
        assert not fallbacks, fallbacks
        # Megatron: per layer, forward, one all-reduce after attention and one after the MLP; sequence
        # parallelism replaces each by an all-gather on entry and a reduce-scatter on exit.
        n = 1 if kind == "mlp" else 2 * 2  # MLP: one region; stack: 2 blocks of 2 regions
        # The stack's residual stream is plain sequence shards: each norm learns the global sequence length
        # from one small all-gather of the block sizes (layouts/tensor.py _to_dtensor).
        size_gathers = n if sp and kind == "stack" else 0
        expected = {("all_gather", "tp"): n + size_gathers, ("reduce_scatter", "tp"): n} if sp else {("all_reduce", "tp"): n}
        assert dict(counts) == expected, counts


def test_mlp_sequence_parallel_moves_the_bytes_of_the_all_reduce():
    """Megatron-SP: all-gather + reduce-scatter send exactly what the one all-reduce sends (tp = 2)."""
    (_, plain_bytes, _), _ = run_on_ranks(2, _run, "mlp", (1, 2), False)
    (_, sp_bytes, _), _ = run_on_ranks(2, _run, "mlp", (1, 2), True)
    assert set(plain_bytes) == {("all_reduce", "tp")}
    assert sp_bytes[("all_gather", "tp")] + sp_bytes[("reduce_scatter", "tp")] == plain_bytes[("all_reduce", "tp")]
    # 2(n-1)/n of the (B, T, D) activation in float64
    assert plain_bytes[("all_reduce", "tp")] == B * T * D * 8


# ---------------------------------------------------------------- embeddings


def _embedding(style_name: str):
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    reference = nn.Embedding(V, D).double()
    model = copy.deepcopy(reference)
    style = RowwiseParallel() if style_name == "rowwise" else ColwiseParallel(output_layouts=Replicate())
    parallelize_module(model, mesh, style)
    tokens_BT = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    y_BTD = model(tokens_BT)  # plain, replicated
    weights = torch.arange(D, dtype=torch.float64)
    (y_BTD * weights).sum().backward()
    ref = reference(tokens_BT)
    (ref * weights).sum().backward()
    torch.testing.assert_close(y_BTD, ref)
    torch.testing.assert_close(model.weight.grad.full_tensor(), reference.weight.grad)
    return model.weight.placements


@pytest.mark.parametrize("style_name, placement", [("rowwise", Shard(0)), ("colwise", Shard(1))])
def test_embedding_styles(style_name, placement):
    for placements in run_on_ranks(2, _embedding, style_name):
        assert placements == (placement,)


# ---------------------------------------------------------------- preparing inputs and outputs


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = MLP()

    def forward(self, x_BTD, scale: float):
        return self.mlp(x_BTD) * scale


def _prepare():
    """Sequence shards in, whole tensor out, the MLP in between sequence parallel; a non-tensor input passes."""
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    reference, x_BTD = _make("mlp")
    model = _TwoInputs().double()
    model.mlp.load_state_dict(reference.state_dict())
    parallelize_module(model, mesh, {
        "": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Shard(1), None)),
        "mlp.fc1": ColwiseParallel(input_layouts=Shard(1)),
        "mlp.fc2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "mlp": PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate()),
    })
    with dtp.comm_mode() as comm:
        y_BTD = model(_chunk(x_BTD, 1, mesh, "tp"), 2.0)
    assert type(y_BTD) is torch.Tensor  # use_local_output: a plain whole tensor
    y_BTD.pow(2).sum().backward()
    ref = reference(x_BTD) * 2.0
    ref.pow(2).sum().backward()
    torch.testing.assert_close(y_BTD, ref)
    for name, p in model.mlp.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), reference.get_parameter(name).grad)
    # the block sizes of the plain sequence shards, all-gather in, reduce-scatter out of the MLP, all-gather
    # for the whole output
    return dict(comm.counts)


def test_prepare_module_input_and_output():
    for counts in run_on_ranks(2, _prepare):
        assert counts == {("all_gather", "tp"): 3, ("reduce_scatter", "tp"): 1}, counts


# ---------------------------------------------------------------- plan errors


def _bad_plan():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    model = Stack()
    with pytest.raises(ValueError, match=r"blocks\.\*\.mlp\.fc3.*fc1"):
        parallelize_module(model, mesh, {"blocks.*.mlp.fc3": ColwiseParallel()})
    with pytest.raises(TypeError, match="ParallelStyle"):
        parallelize_module(model, mesh, {"blocks.0.mlp.fc1": Shard(0)})
    with pytest.raises(ValueError, match="1-D mesh"):
        parallelize_module(model, dtp.init_device_mesh("cpu", (1, 2)), ColwiseParallel())


def test_plan_errors_name_the_pattern_and_the_fix():
    run_on_ranks(2, _bad_plan)


def test_prepare_module_input_keyword_layouts_must_name_the_same_inputs():
    from dtensor_plus.layouts import PrepareModuleInput

    with pytest.raises(ValueError, match="same keyword inputs"):
        PrepareModuleInput(input_kwarg_layouts={"x": Shard(1)}, desired_input_kwarg_layouts={"y": Replicate()})
    with pytest.raises(TypeError, match="must be a Placement"):
        PrepareModuleInput(input_kwarg_layouts={"x": "Shard(1)"}, desired_input_kwarg_layouts={"x": Replicate()})
