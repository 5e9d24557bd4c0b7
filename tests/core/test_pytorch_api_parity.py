"""torch.distributed.tensor's public API, as code that moves over by an import change uses it: ``with mesh:``,
``distribute_tensor`` to Partial, ``redistribute(forward_dtype=, backward_dtype=, async_op=)``,
``parallelize_module(src_data_rank=, plan optional)``, ``PrepareModuleInputOutput``, ``torch.save``/``torch.load``.
Each against one device, and torch's own DTensor where its answer is the same.
"""

import io
import warnings

import pytest
import torch
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Partial, Replicate, Shard
from dtensor_plus.layouts import ColwiseParallel, PrepareModuleInputOutput, RowwiseParallel, parallelize_module
from dtensor_plus.testing import run_on_ranks


def _mesh_context():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    whole = torch.randn(5, 3)  # 5 rows on 2 ranks: 3 + 2
    with mesh as entered:
        assert entered is mesh
        a = dtp.distribute_tensor(whole, placements=[Shard(0)])
        b = dtp.ones(5, 3, placements=[Shard(0)])
        c = DTensor.from_local(torch.ones(2), placements=[Replicate()])
        module = dtp.distribute_module(nn.Linear(3, 2))
    assert a.device_mesh is mesh and b.device_mesh is mesh and c.device_mesh is mesh
    assert module.weight.device_mesh is mesh
    assert torch.equal(a.full_tensor(), whole) and torch.equal(b.full_tensor(), torch.ones(5, 3))
    with pytest.raises(ValueError, match="inside `with mesh:`"):
        dtp.distribute_tensor(whole, placements=[Shard(0)])
    return True


def test_with_mesh_is_the_default_mesh():
    assert run_on_ranks(2, _mesh_context) == [True, True]


def _distribute_partial(world, reduce_op):
    mesh = dtp.init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    whole = torch.randn(7, 2) if reduce_op != "product" else torch.rand(7, 2) + 0.5
    x = dtp.distribute_tensor(whole, mesh, [Partial(reduce_op)])
    assert x.placements == (Partial(reduce_op),)
    assert torch.equal(x.full_tensor(), whole)  # exact: the value at index 0, the op's identity elsewhere
    rank = mesh.get_local_rank(0)
    identity = {"sum": torch.zeros_like(whole), "product": torch.ones_like(whole)}.get(reduce_op, whole)
    assert torch.equal(x.to_local(), whole if rank == 0 else identity)
    y = x.redistribute(placements=[Shard(0)])  # a reduce-scatter of 7 rows over `world` ranks
    assert torch.equal(y.full_tensor(), whole)
    return True


@pytest.mark.parametrize("world, reduce_op", [(2, "sum"), (3, "sum"), (3, "product"), (2, "max"), (2, "avg")])
def test_distribute_tensor_to_partial(world, reduce_op):
    assert run_on_ranks(world, _distribute_partial, world, reduce_op) == [True] * world


def _redistribute_dtypes():
    from torch.distributed.device_mesh import init_device_mesh as torch_mesh
    from torch.distributed.tensor import Replicate as TReplicate, Shard as TShard, distribute_tensor as tdistribute

    mesh = dtp.init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    whole, weight = torch.randn(5, 3), torch.randn(5, 3)
    results = {}
    for name, make, shard, replicate in (
        ("ours", lambda t: dtp.distribute_tensor(t, mesh, [Shard(0)]), Shard(0), Replicate()),
        ("torch", lambda t: tdistribute(t, torch_mesh("cpu", (2,)), [TShard(0)]), TShard(0), TReplicate()),
    ):
        x = make(whole.clone().requires_grad_())
        y = x.redistribute(placements=[replicate], forward_dtype=torch.bfloat16, backward_dtype=torch.float16,
                           async_op=True)
        assert y.dtype == torch.bfloat16 and y.placements == (replicate,)
        (y.to_local().float() * weight).sum().backward()
        assert x.grad.dtype == torch.float32 and x.grad.placements == (shard,)
        results[name] = (y.to_local(), x.grad.full_tensor())
    for ours, theirs in zip(results["ours"], results["torch"]):
        assert torch.equal(ours, theirs)
    # one device: the bf16 value, and the gradient of a cast (weight in fp16 then fp32)
    assert torch.equal(results["ours"][0], whole.bfloat16())
    assert torch.equal(results["ours"][1], weight.bfloat16().half().float())
    with pytest.raises(TypeError, match="forward_dtype must be a torch.dtype"):
        dtp.distribute_tensor(whole, mesh, [Shard(0)]).redistribute(placements=[Replicate()], forward_dtype="bf16")
    return True


def test_redistribute_forward_and_backward_dtype_match_torch():
    assert run_on_ranks(2, _redistribute_dtypes) == [True, True]


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 7), nn.Linear(7, 4)  # 7 hidden features on 2 ranks: 4 + 3

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _parallelize_src_data_rank():
    mesh = dtp.init_device_mesh("cpu", (2,))
    rank = mesh.get_local_rank(0)
    torch.manual_seed(rank)  # ranks initialise differently
    plan = {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
    default, own = parallelize_module(_MLP(), mesh, plan), _MLP()
    own_whole = own.fc1.weight.detach().clone()
    parallelize_module(own, mesh, plan, src_data_rank=None)
    torch.manual_seed(0)
    rank0 = _MLP()  # what rank 0 drew
    assert torch.equal(default.fc1.weight.full_tensor(), rank0.fc1.weight)  # src_data_rank=0: rank 0's values
    assert torch.equal(own.fc1.weight.to_local(), Shard(0).chunk(own_whole, 2, rank))  # None: each rank's own block
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        untouched = parallelize_module(_MLP(), mesh)
    assert not isinstance(untouched.fc1.weight, DTensor) and "no parallelize_plan" in str(caught[0].message)
    with mesh:
        assert isinstance(parallelize_module(_MLP(), parallelize_plan=plan).fc2.weight, DTensor)
    return True


def test_parallelize_module_src_data_rank_and_optional_plan():
    assert run_on_ranks(2, _parallelize_src_data_rank) == [True, True]


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _MLP()

    def forward(self, x):
        return self.inner(x)


def _prepare_input_output():
    mesh = dtp.init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model, reference = _Block(), _Block()
    reference.load_state_dict(model.state_dict())
    parallelize_module(model, mesh, {
        "inner": PrepareModuleInputOutput(input_layouts=Shard(0), desired_input_layouts=Replicate(),
                                          output_layouts=Replicate(), desired_output_layouts=Shard(0)),
        "inner.fc1": ColwiseParallel(), "inner.fc2": RowwiseParallel(use_local_output=False),
    })
    x = torch.randn(5, 4)  # 5 rows on 2 ranks: each feeds its block, gets its block back
    rank = mesh.get_local_rank(0)
    out = model(Shard(0).chunk(x, 2, rank).contiguous())
    expected = reference(x)
    assert not isinstance(out, DTensor)
    torch.testing.assert_close(out, Shard(0).chunk(expected, 2, rank))
    return True


def test_prepare_module_input_output_uneven_batch():
    assert run_on_ranks(2, _prepare_input_output) == [True, True]


def _save_load(world):
    mesh = dtp.init_device_mesh("cpu", (world,), mesh_dim_names=("saved",))
    torch.manual_seed(0)
    model = nn.Linear(3, 7)  # 7 rows on `world` ranks (one empty block on 4)
    parallelize_module(model, mesh, {"": ColwiseParallel()})
    x = dtp.distribute_tensor(torch.randn(5, 3), mesh, [Partial("product")])
    buffer = io.BytesIO()
    torch.save({"state": model.state_dict(), "x": x}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["x"].placements == (Partial("product"),) and loaded["x"].device_mesh is mesh
    assert torch.equal(loaded["x"].full_tensor(), x.full_tensor())
    fresh = nn.Linear(3, 7)
    parallelize_module(fresh, mesh, {"": ColwiseParallel()})
    fresh.load_state_dict(loaded["state"])
    assert torch.equal(fresh.weight.full_tensor(), model.weight.full_tensor())
    return buffer.getvalue()


def _load_elsewhere(data):
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except ValueError as error:
        return str(error)
    return "loaded"


def test_torch_save_and_weights_only_load():
    saved = run_on_ranks(3, _save_load, 3)
    # A process without that mesh: the error names it and the fix, on every rank (and in a plain process).
    for message in run_on_ranks(2, _load_elsewhere, saved[0]) + [_load_elsewhere(saved[0])]:
        assert "no such mesh" in message and "dtensor_plus.checkpoint" in message, message
