"""distribute_tensor on sub-meshes: ``src_data_rank`` is the source's index on every mesh dim (as PyTorch's
``group_src``), so it means the same on every rank, whether or not the sub-mesh holds global rank 0.

Each rank starts from a tensor of its own (seeded by its global rank), so the result shows whose values won:
the rank at mesh coordinate (src, ..., src), or every rank's own with src_data_rank=None.
"""

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import DeviceMesh, Replicate, Shard
from dtensor_plus.testing import run_on_ranks


def _own_tensor(shape):
    """A tensor only this rank holds (its values name the rank)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + dist.get_rank()))


def _tensor_of(global_rank, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + global_rank))


def _distribute_on_submeshes(rows, placement_kinds, src):
    """4 ranks: the 2x2 mesh's "tp" slices ([0, 1] and [2, 3]: the second lacks rank 0) and "dp" slices ([0, 2],
    [1, 3]), a 1-D mesh over [1, 2, 3] built on every rank (rank 0 outside it) and the 2x2 mesh itself (src 1 is
    its coordinate (1, 1): rank 3)."""
    shape = (rows, 3)
    full = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    meshes = [full["tp"], full["dp"], DeviceMesh("cpu", [1, 2, 3], mesh_dim_names=("x",)), full]
    for mesh in meshes:
        kinds = placement_kinds[: mesh.ndim]
        placements = [Shard(0) if k == "shard0" else Shard(1) if k == "shard1" else Replicate() for k in kinds]
        x = dtp.distribute_tensor(_own_tensor(shape), mesh, placements, src_data_rank=src)
        if mesh.get_coordinate() is None:  # rank 0 outside [1, 2, 3]: it takes part in nothing
            continue
        if src is None:  # no data moves: each rank keeps its own tensor's block
            want_whole = _own_tensor(shape)
            block = want_whole
            for mesh_dim, p in enumerate(placements):
                if p.is_shard():
                    block = p.chunk(block, mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim))
            torch.testing.assert_close(x.to_local(), block, rtol=0, atol=0)
            continue
        source = int(mesh.mesh[(src,) * mesh.ndim])
        torch.testing.assert_close(x.full_tensor(), _tensor_of(source, shape), rtol=0, atol=0)
        assert x.shape == shape and x.placements == tuple(placements)


@settings(max_examples=4)
@given(rows=st.sampled_from([1, 2, 5, 7]),  # 1 row on 2 or 3 ranks: empty shards; 5 and 7: uneven ones
       kinds=st.lists(st.sampled_from(["shard0", "shard1", "replicate"]), min_size=2, max_size=2),
       src=st.sampled_from([0, 1, None]))
def test_src_data_rank_is_an_index_within_the_mesh(rows, kinds, src):
    run_on_ranks(4, _distribute_on_submeshes, rows, kinds, src)


def _bad_src_data_rank():
    """Every rank raises the same error, members of the sub-mesh or not, before any communication."""
    full = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    messages = []
    for mesh, src in ((full["tp"], 2), (DeviceMesh("cpu", [1, 2, 3]), 3), (full, -1)):
        with pytest.raises(ValueError) as error:
            dtp.distribute_tensor(torch.zeros(5, 2), mesh, [Shard(0)] * mesh.ndim, src_data_rank=src)
        messages.append(str(error.value))
    with pytest.raises(TypeError, match="src_data_rank must be an int"):
        dtp.distribute_tensor(torch.zeros(5, 2), full, [Shard(0), Replicate()], src_data_rank=1.0)
    return messages


def test_out_of_range_src_data_rank_raises_on_every_rank():
    results = run_on_ranks(4, _bad_src_data_rank)
    for rank, (tp, outside, negative) in enumerate(results):  # rank 0 too, though it is outside [1, 2, 3]
        assert (outside, negative) == tuple(results[0][1:]), f"rank {rank} raised another error than rank 0"
        line = [0, 1] if rank < 2 else [2, 3]  # each rank's own "tp" slice
        assert f"src_data_rank=2 is out of range for the mesh of shape (2,) ({line})" in tp
    tp, outside, negative = results[0]
    assert "not a global rank, so it must be in [0, 2)" in tp
    assert "src_data_rank=3 is out of range for the mesh of shape (3,) ([1, 2, 3])" in outside
    assert "pass 0 for the mesh's first rank (1)" in outside
    assert "src_data_rank=-1" in negative


def _torch_agrees(rows):
    """torch.distributed.tensor as a second oracle: the same sub-mesh (ranks [2, 3] of a 2x2 mesh), src 1."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard as TorchShard
    from torch.distributed.tensor import distribute_tensor as torch_distribute

    ours = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))["tp"]
    theirs = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))["tp"]
    mine = dtp.distribute_tensor(_own_tensor((rows, 2)), ours, [Shard(0)], src_data_rank=1)
    torch_local = torch_distribute(_own_tensor((rows, 2)), theirs, [TorchShard(0)], src_data_rank=1).to_local()
    return torch.equal(mine.to_local(), torch_local)


def test_src_data_rank_means_what_it_means_in_torch():
    assert run_on_ranks(4, _torch_agrees, 5) == [True] * 4
