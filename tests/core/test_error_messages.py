"""Errors that name the problem and give a fix that works; PyTorch's placements accepted as ours (code moves by
an import change), PyTorch's mesh refused with the exact import to change."""

import pytest
import torch
import torch.distributed.tensor as torch_dtensor
from torch.distributed.device_mesh import init_device_mesh as torch_init_device_mesh

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.layouts import ColwiseParallel, parallelize_module
from dtensor_plus.testing import run_on_ranks


def _two_meshes():
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    a_whole, b_whole = torch.randn(5, 3), torch.randn(5, 3)
    x = dtp.distribute_tensor(a_whole, mesh, [Shard(0), Replicate()])
    y = dtp.distribute_tensor(b_whole, mesh["tp"], [Shard(0)])
    messages = []
    for attempt in (lambda: x + y, lambda: y.redistribute(mesh, [Replicate(), Replicate()])):
        try:
            attempt()
        except ValueError as error:
            messages.append(str(error))
    # The advice, followed as written:
    y = dtp.distribute_tensor(y.full_tensor(), x.device_mesh, [Shard(0), Replicate()], src_data_rank=None)
    return messages, torch.equal((x + y).full_tensor(), a_whole + b_whole)


def test_op_on_two_meshes_gives_advice_that_works():
    for messages, advice_works in run_on_ranks(4, _two_meshes):
        assert len(messages) == 2, messages
        assert all("distribute_tensor(" in m and ".full_tensor()" in m for m in messages), messages
        assert advice_works


def _torch_placements():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    whole = torch.arange(10.0).reshape(5, 2)
    ours = dtp.distribute_tensor(whole, mesh, [Shard(0)])
    theirs = dtp.distribute_tensor(whole, mesh, [torch_dtensor.Shard(0)])
    partial = dtp.DTensor.from_local(torch.ones(2), mesh, [torch_dtensor.Partial()])
    moved = ours.redistribute(mesh, [torch_dtensor.Replicate()])
    style = ColwiseParallel(input_layouts=torch_dtensor.Replicate(), output_layouts=torch_dtensor.Shard(-1))
    model = parallelize_module(torch.nn.Linear(2, 3), mesh, style)
    return (theirs.placements == ours.placements and torch.equal(theirs.to_local(), ours.to_local()),
            partial.placements == (Partial(),) and torch.equal(partial.full_tensor(), torch.full((2,), 2.0)),
            moved.placements == (Replicate(),), tuple(model(torch.ones(4, 2)).shape))


def test_torch_placements_are_converted_everywhere_placements_enter():
    for rank, (same, partial, moved, out_shape) in enumerate(run_on_ranks(2, _torch_placements)):
        assert same and partial and moved
        assert out_shape == (4, 2 - rank)  # the style's Shard(-1) output: 3 features as torch.chunk cuts them


def _torch_mesh():
    mesh = torch_init_device_mesh("cpu", (2,))
    try:
        dtp.distribute_tensor(torch.ones(4), mesh, [Shard(0)])
    except TypeError as error:
        return str(error)


def test_torch_mesh_is_refused_naming_the_import_to_change():
    for message in run_on_ranks(2, _torch_mesh):
        assert "from dtensor_plus import init_device_mesh" in message, message
