"""The public DTensor API: from_local / to_local / full_tensor, factories, distribute_module, bad input."""

import pytest
import torch
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Partial, Replicate, Shard, distribute_tensor, init_device_mesh
from dtensor_plus.testing import run_on_ranks


def _from_local_shapes():
    import torch.distributed as dist

    mesh = init_device_mesh("cpu", (3,))
    rank = dist.get_rank()
    rows = [3, 3, 1][rank]  # torch.chunk of 7 rows over 3 ranks
    x = DTensor.from_local(torch.full((rows, 2), float(rank)), mesh, [Shard(0)], run_check=True)
    assert x.shape == (7, 2)
    assert x.full_tensor()[:, 0].tolist() == [0, 0, 0, 1, 1, 1, 2]
    even = DTensor.from_local(torch.ones(2, 2), mesh, [Shard(-1)])  # no check: shards assumed even
    assert even.shape == (2, 6) and even.placements == (Shard(1),)
    errors = []
    for local, placements in (
        (torch.ones(rank + 1, 2), [Shard(1)]),  # dim 0 differs but is not sharded
        (torch.ones([1, 3, 3][rank], 2), [Shard(0)]),  # not a torch.chunk pattern
    ):
        with pytest.raises(ValueError) as info:
            DTensor.from_local(local, mesh, placements, run_check=True)
        errors.append(str(info.value))
    return errors


def test_from_local_infers_uneven_shapes_and_checks_consistency():
    errors = run_on_ranks(3, _from_local_shapes)[0]
    assert "differ in dim 0" in errors[0] and "not torch.chunk sizes" in errors[1]


def _local_round_trip():
    mesh = init_device_mesh("cpu", (2,))
    local = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    x = DTensor.from_local(local, mesh, [Shard(0)])
    y = (x * 2).to_local()
    y.sum().backward()  # gradient flows back through to_local and from_local
    assert torch.equal(local.grad, torch.full((2, 3), 2.0))
    p = DTensor.from_local(torch.ones(3), mesh, [Partial()])
    assert torch.equal(p.full_tensor(), torch.full((3,), 2.0))
    w = distribute_tensor(torch.ones(4, requires_grad=True), mesh, [Shard(0)])
    g = w.to_local(grad_placements=[Shard(0)])
    (g * 3).sum().backward()
    return w.grad.placements, w.grad.full_tensor().tolist()


def test_to_local_and_from_local_are_differentiable():
    placements, grad = run_on_ranks(2, _local_round_trip)[0]
    assert placements == (Shard(0),) and grad == [3.0] * 4


def _factories():
    mesh = init_device_mesh("cpu", (2, 2))
    z = dtp.zeros(5, 3, device_mesh=mesh, placements=[Shard(0), Shard(1)])
    assert z.shape == (5, 3) and z.to_local().shape == z._spec.local_shape_and_offset()[0]
    f = dtp.full((4, 4), 7.0, device_mesh=mesh, placements=[Replicate(), Shard(0)])
    assert torch.equal(f.full_tensor(), torch.full((4, 4), 7.0))
    o = dtp.ones((3,), device_mesh=mesh, dtype=torch.float64)
    assert o.dtype == torch.float64 and torch.equal(o.full_tensor(), torch.ones(3, dtype=torch.float64))
    dtp.manual_seed(5)
    r1 = dtp.randn(8, 4, device_mesh=mesh, placements=[Shard(0), Replicate()])
    dtp.manual_seed(5)
    r2 = dtp.randn(8, 4, device_mesh=mesh, placements=[Shard(0), Replicate()])
    assert torch.equal(r1.full_tensor(), r2.full_tensor())
    rep = dtp.rand(3, device_mesh=mesh)
    blocks = r1.full_tensor().view(2, 4, 4)
    dtp.manual_seed(11, strict=True)
    strict = dtp.randn(6, 5, device_mesh=mesh, placements=[Shard(1), Shard(0)])
    torch.manual_seed(11)
    single = torch.randn(6, 5)
    dtp.manual_seed(0)
    return rep.to_local().tolist(), not torch.equal(blocks[0], blocks[1]), torch.equal(strict.full_tensor(), single)


def test_factories_build_local_blocks_and_random_is_consistent():
    results = run_on_ranks(4, _factories)
    assert all(r[0] == results[0][0] for r in results), "Replicate random tensors must agree on every rank"
    assert all(r[1] for r in results), "shards of a sharded random tensor must differ"
    assert all(r[2] for r in results), "strict mode must equal the single-device draw"


def _module():
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model = nn.Linear(4, 6)
    reference = nn.Linear(4, 6)
    reference.load_state_dict(model.state_dict())

    def shard_weight(name, module, mesh):
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(distribute_tensor(module.weight.detach(), mesh, [Shard(0)]))

    def to_dtensor(module, inputs, mesh):
        return tuple(distribute_tensor(t, mesh, [Replicate()]) for t in inputs)

    dtp.distribute_module(model, mesh, shard_weight, input_fn=to_dtensor, output_fn=lambda m, out, mesh: out.full_tensor())
    assert model.weight.placements == (Shard(0),) and model.bias.placements == (Replicate(),)
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), reference(x))


def test_distribute_module():
    run_on_ranks(2, _module)


def _bad_inputs():
    mesh = init_device_mesh("cpu", (2,))
    messages = []
    for make in (
        lambda: distribute_tensor(torch.ones(2, 2), mesh, [Shard(2)]),
        lambda: distribute_tensor(torch.ones(2, 2), mesh, [Shard(0), Replicate()]),
        lambda: distribute_tensor(torch.ones(2), mesh, Shard(0)),
    ):
        try:
            make()
            messages.append(None)
        except (ValueError, TypeError) as e:
            messages.append(f"{type(e).__name__}: {e}")
    return messages


def test_bad_input_names_problem_and_fix():
    out_of_range, count, not_a_list = run_on_ranks(2, _bad_inputs)[0]  # [Partial()] is fine: test_pytorch_api_parity
    assert out_of_range.startswith("ValueError") and "Shard(dim=2) is out of range" in out_of_range
    assert "2 placements" in count and "one placement per mesh dim" in count
    assert not_a_list.startswith("TypeError") and "[Shard(dim=0)]" in not_a_list


def _copies():
    import copy

    mesh = init_device_mesh("cpu", (2,))
    model = nn.Linear(4, 4)
    dtp.distribute_module(model, mesh, lambda name, m, mesh: None)
    clone = copy.deepcopy(model)
    x = distribute_tensor(torch.arange(8.0).view(4, 2), mesh, [Shard(0)])
    y = copy.deepcopy(x)
    y.add_(1)  # a deep copy owns its blocks
    assert isinstance(clone.weight, DTensor) and clone.weight.device_mesh is mesh
    assert torch.equal(x.full_tensor() + 1, y.full_tensor()) and y.placements == x.placements


def test_deepcopy_of_modules_and_dtensors():
    run_on_ranks(2, _copies)
