"""Seeing the layout and the communication: ``visualize_sharding`` (N-d tensors on N-d meshes, text and picture),
``comm_mode(per_module=True)`` (each collective attributed to a module and to forward or backward) and
``explicit_communication()`` (communication the user did not ask for by name raises, on every rank, naming it).
"""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.layouts import ColwiseParallel, RowwiseParallel, loss_parallel, parallelize_module
from dtensor_plus.placements import StridedShard
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.visualize import sharding_blocks


def _mesh():
    return dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))


# -- visualize_sharding ---------------------------------------------------------------------------------


def _texts():
    mesh = _mesh()
    x = dtp.distribute_tensor(torch.randn(5, 8), mesh, [Shard(0), Shard(1)])
    y = dtp.distribute_tensor(torch.randn(3, 5, 7), mesh, [Shard(0), Shard(2)])
    z = dtp.distribute_tensor(torch.randn(1, 4), mesh, [Shard(0), Replicate()])
    p = dtp.DTensor.from_local(torch.ones(2, 2), mesh, [Replicate(), Partial()])
    return [dtp.visualize_sharding(t, show=False) for t in (x, y, z, p)]


def test_text_of_2d_3d_empty_and_partial_layouts():
    grid, three_d, empty, partial = run_on_ranks(4, _texts)[0]
    assert grid.splitlines()[1:] == [
        "          [0:4]    [4:8]",
        "  [0:3]   rank 0   rank 1",
        "  [3:5]   rank 2   rank 3",
    ]
    assert " dim 0 [0:2]:" in three_d and " dim 0 [2:3]:" in three_d and "rank 3" in three_d.split("dim 0 [2:3]:")[1]
    assert "ranks 2,3 hold empty blocks" in empty
    assert "Partial on tp" in partial and "ranks 0,1,2,3" in partial


_PLACEMENT_CHOICES = [Replicate(), Shard(0), Shard(1), Shard(2), StridedShard(1, 2)]


def _blocks_match_local_values(shape, placements):
    mesh = _mesh()
    whole = torch.arange(float(torch.Size(shape).numel())).reshape(shape)
    x = dtp.distribute_tensor(whole, mesh, placements)
    mine = set()
    for bounds, ranks in sharding_blocks(x):
        if torch.distributed.get_rank() in ranks:
            mine |= set(whole[tuple(slice(a, b) for a, b in bounds)].flatten().tolist())
    covered = sum(torch.Size([b - a for a, b in bounds]).numel() for bounds, _ in sharding_blocks(x))
    return mine == set(x.to_local().flatten().tolist()), covered == whole.numel()


@settings(max_examples=6)
@given(st.tuples(st.integers(1, 5), st.integers(2, 6), st.integers(1, 4)), st.lists(st.sampled_from(_PLACEMENT_CHOICES), min_size=2, max_size=2))
def test_blocks_are_exactly_what_each_rank_holds(shape, placements):
    """Every block's ranks hold exactly its values (uneven, empty and strided shards), and blocks tile the tensor."""
    if any(isinstance(p, StridedShard) for p in placements):
        shape = (shape[0], 2 * shape[1], shape[2])  # outer 2 must divide the dim
        if sum(p.is_shard(1) or isinstance(p, StridedShard) for p in placements) > 1:
            placements = [Replicate(), placements[1]]  # a StridedShard never nests outside another split
    results = run_on_ranks(4, _blocks_match_local_values, shape, placements)
    assert all(held and tiled for held, tiled in results), (shape, placements, results)


def _picture(path):
    x = dtp.distribute_tensor(torch.randn(3, 5, 7), _mesh(), [Shard(0), Shard(2)])
    dtp.visualize_sharding(x, path=path, show=False)


def test_picture_is_written_by_one_rank(tmp_path):
    path = tmp_path / "layout.png"
    run_on_ranks(4, _picture, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- per-module communication report --------------------------------------------------------------------


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 6)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _report():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = parallelize_module(_MLP(), mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    x = torch.randn(3, 6, requires_grad=True)
    with dtp.comm_mode(per_module=True) as comm:
        model(x).sum().backward()
    return comm.report(), dict(comm.by_module)


def test_per_module_report_attributes_forward_and_backward():
    report, by_module = run_on_ranks(2, _report)[0]
    assert by_module.get(("_MLP.fc2", "forward", "all_reduce", "tp")) == 1, report
    assert by_module.get(("_MLP.fc1", "backward", "all_reduce", "tp")) == 1, report  # the input gradient's sum
    assert report.splitlines()[0].split() == ["module", "phase", "collective", "mesh", "dim", "calls", "bytes", "sent"]


# -- explicit communication -----------------------------------------------------------------------------


def _explicit_cases():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = parallelize_module(_MLP(), mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    errors = {}
    with dtp.explicit_communication():
        model(torch.randn(3, 6, requires_grad=True)).sum().backward()  # the styles ask for theirs: runs
        a = dtp.distribute_tensor(torch.randn(5, 4), mesh, [Shard(0)])
        b = dtp.distribute_tensor(torch.randn(5, 4), mesh, [Shard(1)])
        for name, fn in [("add", lambda: a + b), ("norm", lambda: a.norm()),
                         ("plain", lambda: a + torch.ones(5, 4))]:
            try:
                fn()
            except dtp.ImplicitCommunicationError as error:
                errors[name] = str(error)
        (a + b.redistribute(mesh, [Shard(0)])).sum()  # asked for by name: runs
        logits = dtp.distribute_tensor(torch.randn(4, 7, requires_grad=True), mesh, [Shard(1)])
        target = dtp.distribute_tensor(torch.tensor([0, 3, 6, 2]), mesh, [Replicate()], src_data_rank=None)
        with loss_parallel():
            F.cross_entropy(logits, target).backward()  # the layout's own collectives: asked for
    return errors


def test_explicit_mode_raises_on_every_rank_naming_the_op_and_collective():
    for errors in run_on_ranks(2, _explicit_cases):
        assert set(errors) == {"add", "norm", "plain"}, errors
        assert "aten.add.Tensor" in errors["add"] and "Shard(dim=" in errors["add"] and "] -> [" in errors["add"]
        assert "all_to_all on tp" in errors["add"] and "redistribute" in errors["add"]
        assert "all_reduce" in errors["norm"] or "all_gather" in errors["norm"], errors["norm"]
        assert "plain tensor" in errors["plain"] and "implicit_replication" in errors["plain"]
