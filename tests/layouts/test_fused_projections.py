"""Fused projections (layouts/tensor.py ``ColwiseParallel(packed=...)``, ops/packed_parts.py): a fused [q|k|v]
or [gate|up] linear layer placed so each rank holds its rows of every part. An unmodified attention block
(``split``, ``chunk`` or ``view + unbind`` of the fused output) and a gated MLP equal one device in outputs,
input gradients and parameter gradients, and communicate no more than the same model with separate
projections: where the head boundaries meet the blocks, nothing but the Megatron all-reduce of the output
projection, forward and backward; the fused output is never gathered.

Legend: B batch, T sequence, D model width, H heads, K head width, F MLP width.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Replicate
from dtensor_plus.layouts import ColwiseParallel, RowwiseParallel, fully_shard, parallelize_module
from dtensor_plus.layouts.data import replicate, shard_batch
from dtensor_plus.placements import StridedShard
from dtensor_plus.testing import run_on_ranks

B, T = 2, 3


class Conv1D(nn.Module):
    """A linear layer storing its weight (in, out), as transformers' GPT-2 c_attn does."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(d_in, d_out)), nn.Parameter(torch.randn(d_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.flatten(0, -2), self.weight).unflatten(0, x.shape[:-1])


def _linear(d_in: int, d_out: int, conv1d: bool) -> nn.Module:
    return Conv1D(d_in, d_out) if conv1d else nn.Linear(d_in, d_out)


def _heads(z_BTD, h: int):  # (H, B, T, K): heads first, so matmul's batch flatten keeps them sharded
    b, t, d = z_BTD.shape
    return z_BTD.view(b, t, h, d // h).permute(2, 0, 1, 3)


def _attend(q_BTD, k_BTD, v_BTD, h: int):
    q_HBTK, k_HBTK, v_HBTK = (_heads(z, h) for z in (q_BTD, k_BTD, v_BTD))
    scores_HBTT = q_HBTK @ k_HBTK.transpose(-2, -1) * q_HBTK.shape[-1] ** -0.5
    y_HBTK = scores_HBTT.softmax(-1) @ v_HBTK
    return y_HBTK.permute(1, 2, 0, 3).flatten(2)  # (B, T, D)


class FusedAttention(nn.Module):
    def __init__(self, heads: int, head_dim: int, how: str, conv1d: bool):
        super().__init__()
        self.heads, self.how, d = heads, how, heads * head_dim
        self.qkv, self.proj = _linear(d, 3 * d, conv1d), nn.Linear(d, d)

    def forward(self, x_BTD):
        b, t, d = x_BTD.shape
        qkv_BT3D = self.qkv(x_BTD)
        if self.how == "split":
            q, k, v = qkv_BT3D.split(d, dim=-1)
        elif self.how == "chunk":
            q, k, v = qkv_BT3D.chunk(3, -1)
        else:
            q, k, v = qkv_BT3D.view(b, t, 3, d).unbind(2)
        return self.proj(_attend(q, k, v, self.heads))


class SeparateAttention(nn.Module):
    """The same block with q, k and v as three layers: what the fused one must not communicate more than."""

    def __init__(self, fused: FusedAttention, conv1d: bool):
        super().__init__()
        self.heads, dim = fused.heads, 0 if not conv1d else 1
        for name, w, b in zip("qkv", fused.qkv.weight.detach().chunk(3, dim), fused.qkv.bias.detach().chunk(3)):
            layer = _linear(w.shape[1 - dim], w.shape[dim], conv1d)
            layer.weight, layer.bias = nn.Parameter(w.clone()), nn.Parameter(b.clone())
            setattr(self, name, layer)
        self.proj = copy.deepcopy(fused.proj)

    def forward(self, x_BTD):
        return self.proj(_attend(self.q(x_BTD), self.k(x_BTD), self.v(x_BTD), self.heads))


def _run(model, reference, mesh, d: int):
    """Forward and backward of ``model`` (placed) and ``reference`` (one device) on one plain input: checks the
    output, the input gradient and every parameter gradient; returns (forward, backward) comm counts."""
    x_BTD = torch.randn(B, T, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    x_local = x_BTD.detach().requires_grad_()
    weights = torch.randn(B, T, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with dtp.comm_mode() as forward:
        y = model(x_local)
    with dtp.comm_mode() as backward:
        (y * weights).sum().backward()
    y_ref = reference(x_BTD)
    (y_ref * weights).sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x_local.grad, x_BTD.grad)
    for name, p in reference.named_parameters():
        got = model.get_parameter(name).grad
        torch.testing.assert_close(got.full_tensor(), p.grad, msg=lambda m: f"grad of {name}: {m}")
    assert not forward.fallbacks and not backward.fallbacks, (forward.fallbacks, backward.fallbacks)
    return dict(forward.sent_bytes), dict(backward.sent_bytes)


def _attention(n: int, heads: int, head_dim: int, how: str, conv1d: bool):
    mesh = dtp.init_device_mesh("cpu", (n,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    reference = FusedAttention(heads, head_dim, how, conv1d).double()
    fused = parallelize_module(copy.deepcopy(reference), mesh, {
        "qkv": ColwiseParallel(packed=3, use_local_output=False, weight_output_dim=1 if conv1d else None),
        "proj": RowwiseParallel(),
    })
    assert fused.qkv.weight.placements == (StridedShard(1 if conv1d else 0, 3),)
    separate = parallelize_module(SeparateAttention(reference, conv1d), mesh, {
        "[qkv]": ColwiseParallel(use_local_output=False, weight_output_dim=1 if conv1d else None),
        "proj": RowwiseParallel(),
    })
    d = heads * head_dim
    fused_bytes = _run(fused, reference, mesh, d)
    separate_bytes = _run(separate, SeparateAttention(reference, conv1d), mesh, d)
    return fused_bytes, separate_bytes, heads % n == 0


def _no_more_than(fused, separate):
    """Bytes sent, forward and backward: packing costs nothing extra (backward it saves: one input-gradient
    reduction instead of three; where heads are cut, the planner may pick other collectives of fewer bytes)."""
    for phase, (f, s) in enumerate(zip(fused, separate)):
        assert sum(f.values()) <= sum(s.values()), (phase, fused, separate)


@settings(max_examples=8)
@given(n=st.sampled_from([2, 3]), heads=st.sampled_from([1, 2, 3, 4, 6]), head_dim=st.sampled_from([1, 2]),
       how=st.sampled_from(["split", "chunk", "unbind"]), conv1d=st.booleans())
def test_fused_qkv_attention_equals_one_device_and_separate_projections(n, heads, head_dim, how, conv1d):
    (fused, separate, aligned), *_ = run_on_ranks(n, _attention, n, heads, head_dim, how, conv1d)
    _no_more_than(fused, separate)
    if aligned:  # each rank computes its own heads: only the output projection's all-reduce, forward
        assert set(fused[0]) == {("all_reduce", "tp")} and not any(c == "all_gather" for c, _ in fused[1]), fused


@pytest.mark.parametrize("how", ["split", "chunk", "unbind"])
def test_three_heads_on_two_ranks(how):
    """3 heads on 2 ranks: the blocks (3 + 3 features of 6) cut head 1, so the head view gathers q, k and v,
    as with separate projections; the values are exact."""
    (fused, separate, _), _ = run_on_ranks(2, _attention, 2, 3, 2, how, False)
    _no_more_than(fused, separate)
    assert fused[0] == separate[0], (fused, separate)  # forward: the same three head-view gathers


# ---------------------------------------------------------------- a gated MLP: [gate | up]


class GatedMLP(nn.Module):
    def __init__(self, d: int, width: int):
        super().__init__()
        self.gate_up, self.down = nn.Linear(d, 2 * width), nn.Linear(width, d)

    def forward(self, x_BTD):
        gate, up = self.gate_up(x_BTD).chunk(2, -1)
        return self.down(F.silu(gate) * up)


def _gated(n: int, width: int):
    mesh = dtp.init_device_mesh("cpu", (n,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    reference = GatedMLP(4, width).double()
    model = parallelize_module(copy.deepcopy(reference), mesh, {
        "gate_up": ColwiseParallel(packed=2, use_local_output=False), "down": RowwiseParallel(),
    })
    return _run(model, reference, mesh, 4)


@pytest.mark.parametrize("n, width", [(3, 7), (2, 1), (2, 4)])
def test_gated_mlp_with_uneven_width(n, width):
    """7 features on 3 ranks (3, 3, 1), 1 on 2 (an empty block): one all-reduce forward, no gather anywhere."""
    for forward, backward in run_on_ranks(n, _gated, n, width):
        assert set(forward) == {("all_reduce", "tp")}, forward
        assert not any(c == "all_gather" for c, _ in backward), backward


# ---------------------------------------------------------------- (dp, tp): replicate and fully_shard


def _fused_on_dp_tp(zero3: bool):
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    reference = FusedAttention(2, 3, "split", False).double()
    model = parallelize_module(copy.deepcopy(reference), mesh["tp"], {
        "qkv": ColwiseParallel(packed=3, use_local_output=False), "proj": RowwiseParallel(use_local_output=False),
    })
    replicate(model, mesh, reduce_in_backward=not zero3)
    if zero3:
        fully_shard(model, mesh, mesh_dim="dp")
    x_BTD = torch.randn(3, T, 6, dtype=torch.float64)  # 3 rows on dp = 2
    with dtp.comm_mode() as comm:
        loss = model(shard_batch(x_BTD, mesh)).pow(2).mean()
        loss.backward()
    # ZeRO shards the packed weight on its other dim (layouts/zero_placement.py): gathering dp restores the tp
    # layout, and nothing on tp but the output projection's all-reduce
    assert set(k for k in comm.counts if k[1] == "tp") == {("all_reduce", "tp")}, comm.counts
    ref_loss = reference(x_BTD).pow(2).mean()
    ref_loss.backward()
    torch.testing.assert_close(loss.full_tensor(), ref_loss)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(model.get_parameter(name).grad.full_tensor(), p.grad, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(model.get_parameter(name).full_tensor(), p.detach())
    return True


@pytest.mark.parametrize("zero3", [False, True], ids=["replicate", "fully_shard"])
def test_packed_under_replicate_and_fully_shard(zero3):
    assert all(run_on_ranks(4, _fused_on_dp_tp, zero3))


# ---------------------------------------------------------------- the split and cat rules themselves


def _split_and_join(n: int, groups: int, inner: int, parts: list, zigzag: bool, dp: int):
    """A dim of ``groups`` x ``inner`` rows, StridedShard on tp (zigzag or not; beside a batch Shard on dp when
    dp > 1), split into parts of whole groups (backward: their cat) and joined back by cat: no collective,
    values and gradients exact."""
    mesh = dtp.init_device_mesh("cpu", (dp, n), mesh_dim_names=("dp", "tp"))
    batch = dtp.Shard(0) if dp > 1 else Replicate()
    x = torch.randn(3, groups * inner, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_dist = dtp.distribute_tensor(x, mesh, [batch, StridedShard(1, groups, zigzag)]).requires_grad_()
    sizes = [k * inner for k in parts]
    expected = [StridedShard(1, k, zigzag) if k > 1 or zigzag else dtp.Shard(1) for k in parts]
    weights = [torch.randn(3, size, dtype=torch.float64) for size in sizes]
    weights_dist = [dtp.distribute_tensor(w, mesh, [batch, p]) for w, p in zip(weights, expected)]
    with dtp.comm_mode() as comm:
        pieces = x_dist.split(sizes, dim=1)
        loss = (pieces[0] * weights_dist[0]).sum()
        for piece, w in zip(pieces[1:], weights_dist[1:]):
            loss = loss + (piece * w).sum()
        loss.backward()  # split's backward: a cat of the parts' gradients
        joined = torch.cat([piece.detach() for piece in pieces], dim=1)
    assert not comm.counts, comm.counts
    assert [piece.placements[1] for piece in pieces] == expected
    for piece, whole in zip(pieces, x.split(sizes, dim=1)):
        torch.testing.assert_close(piece.full_tensor(), whole)
    torch.testing.assert_close(x_dist.grad.full_tensor(), torch.cat(weights, dim=1))
    torch.testing.assert_close(joined.full_tensor(), x)
    return joined.placements[1], x_dist.grad.placements[1]


@settings(max_examples=6)
@given(n=st.sampled_from([2, 3]), inner=st.sampled_from([1, 2, 5]), parts=st.sampled_from([[1, 1, 1], [2, 1], [1, 2, 1]]),
       zigzag=st.booleans(), dp=st.sampled_from([1, 2]))
def test_split_and_cat_keep_packed_parts_sharded(n, inner, parts, zigzag, dp):
    if n * dp > 4:
        n = 2
    for placements in run_on_ranks(n * dp, _split_and_join, n, sum(parts), inner, parts, zigzag, dp):
        assert placements == (StridedShard(1, sum(parts), zigzag),) * 2


# ---------------------------------------------------------------- errors


def test_packed_errors_name_the_values():
    with pytest.raises(ValueError, match="packed must be an int >= 1.*got 0"):
        ColwiseParallel(packed=0)
    with pytest.raises(ValueError, match="packed must be an int >= 1.*got True"):
        ColwiseParallel(packed=True)
    assert "packed=3" in repr(ColwiseParallel(packed=3))


def _bad_packed():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    messages = []
    for module in (nn.Linear(4, 10), nn.Embedding(5, 6)):
        try:
            parallelize_module(module, mesh, ColwiseParallel(packed=3))
        except ValueError as error:
            messages.append(str(error))
    return messages


def test_packed_that_does_not_fit_raises():
    for messages in run_on_ranks(2, _bad_packed):
        assert len(messages) == 2, messages
        assert "Linear.weight has 10 output features, not 3 equal parts" in messages[0], messages
        assert "not nn.Embedding" in messages[1], messages
