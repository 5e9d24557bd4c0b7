"""A DTensor's metadata tells the truth about its blocks: dtype after ``module.to``, placements after
``empty_like``/``to_empty``, stride after ``from_local`` of a strided block, and nothing but an empty placeholder
on a rank outside the mesh. Sizes the mesh does not divide: 5 rows on 2 ranks, 7 on 3, 1 on 2 (an empty shard).
"""

import copy

import torch
import torch.distributed as dist
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DeviceMesh, DTensor, Partial, Replicate, Shard
from dtensor_plus.placements import chunk_bounds
from dtensor_plus.testing import run_on_ranks

SIZES = [(2, 5), (3, 7), (2, 1)]


def _mesh():
    return dtp.init_device_mesh("cpu", (dist.get_world_size(),))


def _distributed_linear(num_rows, mesh):
    torch.manual_seed(0)
    reference = nn.Linear(4, num_rows)
    model = copy.deepcopy(reference)
    model.weight = nn.Parameter(dtp.distribute_tensor(model.weight.detach(), mesh, [Shard(0)]))
    model.bias = nn.Parameter(dtp.distribute_tensor(model.bias.detach(), mesh, [Shard(0)]))
    return model, reference


def _module_to(num_rows):
    """module.to(bfloat16) and .double() convert the blocks with the metadata; outputs, gradients and a step
    equal one device's."""
    mesh = _mesh()
    model, reference = _distributed_linear(num_rows, mesh)
    model.to(torch.bfloat16)
    reference.to(torch.bfloat16)
    for p, ref in zip(model.parameters(), reference.parameters()):
        assert p.dtype == p.to_local().dtype == torch.bfloat16, (p.dtype, p.to_local().dtype)
        assert p.placements == (Shard(0),) and isinstance(p, nn.Parameter)
        torch.testing.assert_close(p.full_tensor(), ref.detach())
    model.double()
    reference.double()
    x = torch.randn(3, 4, dtype=torch.float64)
    out = model(dtp.distribute_tensor(x, mesh, [Replicate()]))
    ref_out = reference(x)
    torch.testing.assert_close(out.full_tensor(), ref_out)
    out.sum().backward()
    ref_out.sum().backward()
    for p, ref in zip(model.parameters(), reference.parameters()):
        assert p.grad.dtype == p.grad.to_local().dtype == torch.float64
        torch.testing.assert_close(p.grad.full_tensor(), ref.grad)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for p, ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.full_tensor(), ref.detach())
    return True


def test_module_to_converts_the_blocks():
    for world_size, num_rows in SIZES:
        assert all(run_on_ranks(world_size, _module_to, num_rows))


def _empty_like_keeps_the_layout(num_rows):
    mesh, rank = _mesh(), dist.get_rank()
    partial = DTensor.from_local(torch.full((num_rows, 2), float(rank)), mesh, [Partial()])
    empty = torch.empty_like(partial)
    assert empty.placements == (Partial(),) and empty.shape == partial.shape
    assert torch.equal(empty.zero_().full_tensor(), torch.zeros(num_rows, 2))
    seven = torch.empty_like(partial).copy_(torch.tensor(7.0))  # a replicated scalar partitioned into the pieces
    assert seven.placements == (Partial(),) and torch.equal(seven.full_tensor(), torch.full((num_rows, 2), 7.0))
    module = nn.Module()
    module.partial = nn.Parameter(partial)
    module.sharded = nn.Parameter(dtp.distribute_tensor(torch.randn(num_rows, 3), mesh, [Shard(0)]))
    module.to_empty(device="cpu")
    assert module.partial.placements == (Partial(),) and module.sharded.placements == (Shard(0),)
    assert module.sharded.to_local().shape == (chunk_bounds(num_rows, mesh.size(0), rank)[1], 3)
    nn.init.ones_(module.sharded)
    assert torch.equal(module.sharded.full_tensor(), torch.ones(num_rows, 3))
    return True


def test_empty_like_and_to_empty_keep_the_layout():
    for world_size, num_rows in SIZES:
        assert all(run_on_ranks(world_size, _empty_like_keeps_the_layout, num_rows))


def _stride_of_strided_blocks(num_rows):
    """Blocks of a transposed tensor (each a strided view) make a DTensor with the transposed stride one device
    has: not contiguous; .contiguous() and .t() give one device's values."""
    mesh, rank = _mesh(), dist.get_rank()
    whole = torch.arange(3.0 * num_rows).reshape(3, num_rows).t()  # (num_rows, 3), stride (1, num_rows)
    start, length = chunk_bounds(num_rows, mesh.size(0), rank)
    x = DTensor.from_local(whole[start:start + length], mesh, [Shard(0)], shape=whole.shape)
    def significant(stride):  # a size-1 dim's stride is free (torch ignores it for contiguity)
        return [step for step, size in zip(stride, whole.shape) if size > 1]

    assert significant(x.stride()) == significant(whole.stride()), (x.stride(), whole.stride())
    assert x.is_contiguous() == whole.is_contiguous()
    assert torch.equal(x.contiguous().view(-1).full_tensor(), whole.contiguous().view(-1))
    assert torch.equal(x.t().full_tensor(), whole.t())
    contiguous = DTensor.from_local(whole.contiguous()[start:start + length], mesh, [Shard(0)], shape=whole.shape)
    assert contiguous.stride() == (3, 1)
    return True


def test_from_local_stride_follows_the_blocks():
    for world_size, num_rows in SIZES:
        assert all(run_on_ranks(world_size, _stride_of_strided_blocks, num_rows))


def _outside_the_mesh(num_rows):
    """A mesh over ranks [0, 1] of 3: rank 2 holds empty placeholders, runs no collective and no local op on
    data; ranks 0 and 1 compute one device's values."""
    mesh = DeviceMesh("cpu", [0, 1])
    inside = mesh.get_coordinate() is not None
    whole = torch.arange(num_rows * 2.0).reshape(num_rows, 2)
    with dtp.comm_mode() as comm:
        made = {
            "distribute_tensor": dtp.distribute_tensor(whole, mesh, [Shard(0)]),
            "from_local": DTensor.from_local(whole, mesh, [Replicate()], run_check=True),
            "zeros": dtp.zeros(num_rows, 2, device_mesh=mesh, placements=[Shard(0)]) + whole[0],
        }
        results = {name: ((x * 2 + torch.ones(num_rows, 2)).sum(0), x.t() @ x) for name, x in made.items()}
        full = {name: tuple(r.full_tensor() for r in pair) for name, pair in results.items()}
    for name, x in made.items():
        if inside:
            expected = whole if name != "zeros" else whole[0].expand(num_rows, 2)
            torch.testing.assert_close(full[name][0], (expected * 2 + 1).sum(0))
            torch.testing.assert_close(full[name][1], expected.t() @ expected)
        else:
            assert x.to_local().numel() == 0, (name, x.to_local())
            assert all(r.to_local().numel() == 0 and r.full_tensor().numel() == 0 for r in results[name]), name
            assert x.shape == whole.shape and results[name][1].shape == (2, 2)
    if not inside:
        assert comm.count() == 0, comm
    return inside


def test_ranks_outside_the_mesh_hold_placeholders():
    for num_rows in (5, 1):
        assert run_on_ranks(3, _outside_the_mesh, num_rows) == [True, True, False]
