"""Property: random small models with shared parameters, under random layout compositions, train as one device.

A model is an embedding, a few residual blocks and a head; hypothesis draws how many blocks, which are nested a
level deeper, which share a Linear weight with an earlier block (one Parameter in two modules) or are the
earlier block's very Linear (one module in two places), and whether the head is the embedding (a tied
vocabulary). It then draws a layout: replicate (dp), parallelize_module styles (tp), tp x dp on a 2x2 mesh,
ZeroRedundancyOptimizer stage 1 or 2, or fully_shard on some blocks and the root. Every tied group gets one
style, so the layouts agree (disagreement raising is tested in test_shared_parameters.py). Checked against one
device: the input gradient of step 1, the loss of every step and every parameter after 5 AdamW steps. The
batch, the width (5) and the vocabulary (7) divide over no mesh dim, and a batch of 1 leaves a rank empty.

Legend: B batch, D model width, V vocabulary.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Replicate, Shard
from dtensor_plus.layouts import (
    ColwiseParallel, RowwiseParallel, ZeroRedundancyOptimizer, fully_shard, parallelize_module, replicate, shard_batch,
)
from dtensor_plus.testing import run_on_ranks

D, V, STEPS = 5, 7, 5
LAYOUTS = {"dp": (2, 3), "tp": (2,), "tp x dp": (4,), "zero1": (2, 3), "zero2": (2, 3), "fully_shard": (2, 3)}


class Block(nn.Module):
    def __init__(self, nested: bool):
        super().__init__()
        linear = nn.Linear(D, D)
        self.fc = nn.Sequential(linear) if nested else linear

    def linear(self) -> nn.Linear:
        return self.fc[0] if isinstance(self.fc, nn.Sequential) else self.fc

    def forward(self, h_BD):
        return h_BD + torch.tanh(self.fc(h_BD))


class Model(nn.Module):
    """``blocks``: one (nested, tie) per block; tie is None, ("weight", j) or ("module", j) for an earlier block j."""

    def __init__(self, blocks, tie_embedding: bool):
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block(nested) for nested, _ in blocks)
        for block, (_, tie) in zip(self.blocks, blocks):
            if tie is not None:
                kind, j = tie
                if kind == "weight":
                    block.linear().weight = self.blocks[j].linear().weight
                else:
                    block.fc = self.blocks[j].fc
        self.head = nn.Linear(D, V)
        if tie_embedding:
            self.head.weight = self.wte.weight

    def forward(self, x_BD, tokens_B):
        h_BD = x_BD + self.wte(tokens_B)
        for block in self.blocks:
            h_BD = block(h_BD)
        return self.head(h_BD)


def _tie_groups(blocks) -> list[int]:
    """The tied group of each block's Linear: the block whose Linear weight it shares, or its own index."""
    groups = []
    for i, (_, tie) in enumerate(blocks):
        groups.append(groups[tie[1]] if tie is not None else i)
    return groups


def _tp_plan(model, blocks, styles, vocab_parallel: bool) -> dict:
    """One style per tied group (so tied modules agree); a module reached twice is planned once, by its name."""
    style = {"col": ColwiseParallel(use_local_output=False), "row": RowwiseParallel(use_local_output=False)}
    groups = _tie_groups(blocks)
    names = {id(m): name for name, m in model.named_modules()}
    plan = {}
    for block, group in zip(model.blocks, groups):
        if styles[group] != "none":
            plan[names[id(block.linear())]] = style[styles[group]]
    if vocab_parallel:  # the tied vocabulary: both Shard(0)
        plan["wte"] = RowwiseParallel(use_local_output=False)
        plan["head"] = ColwiseParallel(output_layouts=Replicate(), use_local_output=False)
    return plan


def _place(model, layout, blocks, styles, vocab_parallel, unit_mask):
    """Lay ``model`` out; returns (optimizer, a function laying out a batch tensor)."""
    world = torch.distributed.get_world_size()
    if layout in ("tp", "tp x dp"):
        shape, names = ((2, 2), ("dp", "tp")) if layout == "tp x dp" else ((2,), ("tp",))
        mesh = dtp.init_device_mesh("cpu", shape, mesh_dim_names=names)
        parallelize_module(model, mesh["tp"], _tp_plan(model, blocks, styles, vocab_parallel))
        if layout == "tp":
            dtp.distribute_module(model, mesh)  # the rest Replicate
            place = lambda t: dtp.distribute_tensor(t, mesh, [Replicate()], src_data_rank=None)  # noqa: E731
        else:
            replicate(model, mesh)
            place = lambda t: shard_batch(t, mesh)  # noqa: E731
        return torch.optim.AdamW(model.parameters(), lr=1e-2), place
    mesh = dtp.init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    if layout == "dp":
        replicate(model, mesh)
    elif layout == "fully_shard":
        groups, wrapped = _tie_groups(blocks), set()
        for i, block in enumerate(model.blocks):
            # At most one unit per tied group: the root, holding the others, takes the Parameter over from it.
            if unit_mask >> i & 1 and groups[i] not in wrapped:
                fully_shard(block, mesh)
                wrapped.add(groups[i])
        fully_shard(model, mesh)
    else:
        dtp.distribute_module(model, mesh)
        stage = int(layout[-1])
        return ZeroRedundancyOptimizer(model.parameters(), mesh, torch.optim.AdamW, stage=stage, lr=1e-2), \
            lambda t: shard_batch(t, mesh)
    return torch.optim.AdamW(model.parameters(), lr=1e-2), lambda t: shard_batch(t, mesh)


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _check(blocks, tie_embedding, layout, styles, vocab_parallel, unit_mask, batch):
    torch.manual_seed(0)
    reference = Model(blocks, tie_embedding).double()
    model = copy.deepcopy(reference)
    optimizer, place = _place(model, layout, blocks, styles, vocab_parallel and tie_embedding, unit_mask)
    # one Parameter per tied group, in every slot
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    if tie_embedding:
        assert model.head.weight is model.wte.weight
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        x_BD = torch.randn(batch, D, generator=g, dtype=torch.float64)
        y_BV = torch.randn(batch, V, generator=g, dtype=torch.float64)
        tokens_B = torch.randint(0, V, (batch,), generator=g)
        x_dist = place(x_BD).requires_grad_()
        loss = F.mse_loss(model(x_dist, place(tokens_B)), place(y_BV))
        loss.backward()
        x_ref = x_BD.clone().requires_grad_()
        ref_loss = F.mse_loss(reference(x_ref, tokens_B), y_BV)
        ref_loss.backward()
        if step == 0:
            torch.testing.assert_close(_full(x_dist.grad), x_ref.grad, msg=lambda m: f"input gradient: {m}")
        torch.testing.assert_close(_full(loss), ref_loss, msg=lambda m, step=step: f"loss of step {step}: {m}")
        for opt in (optimizer, ref_optimizer):
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(_full(p).detach(), q.detach(), msg=lambda m, name=name: f"{name}: {m}")


@st.composite
def _cases(draw):
    num_blocks = draw(st.integers(1, 3))
    blocks = []
    for i in range(num_blocks):
        tie = None
        if i:  # share the weight of an earlier block's Linear, or be that very Linear
            tie = draw(st.one_of(st.none(), st.tuples(st.sampled_from(["weight", "module"]), st.integers(0, i - 1))))
        blocks.append((draw(st.booleans()), tie))
    layout = draw(st.sampled_from(sorted(LAYOUTS)))
    return dict(
        blocks=tuple(blocks),
        tie_embedding=draw(st.booleans()),
        layout=layout,
        world_size=draw(st.sampled_from(LAYOUTS[layout])),
        styles=tuple(draw(st.sampled_from(["col", "row", "none"])) for _ in range(num_blocks)),
        vocab_parallel=draw(st.booleans()),
        unit_mask=draw(st.integers(0, 7)),
        batch=draw(st.integers(1, 3)),
    )


def _run(case):
    world_size = case.pop("world_size")
    run_on_ranks(world_size, _check, *case.values())


@settings(max_examples=5)
@given(case=_cases())
def test_shared_parameters_train_as_one_device_under_random_layouts(case):
    _run(case)


@pytest.mark.slow
@settings(max_examples=60)
@given(case=_cases())
def test_shared_parameters_train_as_one_device_under_random_layouts_wide(case):
    _run(case)
