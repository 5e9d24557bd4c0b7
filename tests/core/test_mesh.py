"""DeviceMesh over real gloo groups: slicing, flattening, coordinates, group reuse, bad input."""

import pytest
import torch
import torch.distributed as dist

from dtensor_plus import DeviceMesh, init_device_mesh
from dtensor_plus.testing import run_on_ranks


def _mesh_facts():
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    tp, dp = mesh["tp"], mesh["dp"]
    both = mesh["tp", "dp"]
    flat = mesh.flatten("dp_tp")
    probe = torch.ones(1) * dist.get_rank()
    dist.all_reduce(probe, group=tp.get_group())  # sums the ranks of my tp row
    again = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    return dict(
        coordinate=mesh.get_coordinate(),
        tp_ranks=tp.mesh.tolist(),
        dp_ranks=dp.mesh.tolist(),
        transposed=both.mesh.tolist(),
        flat=flat.mesh.tolist(),
        local=(mesh.get_local_rank("dp"), mesh.get_local_rank("tp")),
        tp_sum=probe.item(),
        reused=again.get_group("tp") is mesh.get_group("tp") and tp.get_group() is mesh.get_group(1),
        sizes=(mesh.size(), mesh.size("tp"), flat.size()),
    )


def test_slicing_flattening_coordinates():
    facts = run_on_ranks(4, _mesh_facts)
    for rank, f in enumerate(facts):
        assert f["coordinate"] == (rank // 2, rank % 2) and f["local"] == f["coordinate"]
        assert f["tp_ranks"] == [rank // 2 * 2, rank // 2 * 2 + 1]
        assert f["dp_ranks"] == [rank % 2, rank % 2 + 2]
        assert f["transposed"] == [[0, 2], [1, 3]]
        assert f["flat"] == [0, 1, 2, 3] and f["sizes"] == (4, 2, 4)
        assert f["tp_sum"] == sum(f["tp_ranks"]) and f["reused"]


def _bad_meshes():
    errors = []
    for make in (
        lambda: init_device_mesh("cpu", (3,)),
        lambda: init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp",)),
        lambda: init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))["tp"],
        lambda: DeviceMesh("cpu", [0, 0, 1, 2]),
    ):
        try:
            make()
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_bad_meshes_raise_value_errors_naming_the_fix():
    errors = run_on_ranks(4, _bad_meshes)[0]
    assert "3 = 3 != world size(4)" in errors[0]
    assert "one per mesh dim" in errors[1]
    assert "'tp' does not exist" in errors[2]
    assert "distinct ranks" in errors[3]


def test_mesh_on_one_rank():
    assert run_on_ranks(1, _one_rank) == [(1, (0,))]


def _one_rank():
    mesh = init_device_mesh("cpu", (1,))
    return mesh.size(), mesh.get_coordinate()


def test_init_device_mesh_needs_an_environment():
    if dist.is_initialized():
        pytest.skip("the test process itself runs a process group")
    with pytest.raises(RuntimeError, match="torchrun"):
        import os

        env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
        try:
            init_device_mesh("cpu", (1,))
        finally:
            os.environ.update(env)


def _flatten_slices():
    mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("pp", "dp", "tp"))
    dp_tp = mesh["dp", "tp"].flatten()
    pp_tp = mesh["pp", "tp"].flatten("pp_tp")
    probe = torch.ones(1)
    dist.all_reduce(probe, group=dp_tp.get_group())
    return dp_tp.mesh.tolist(), pp_tp.mesh.tolist(), pp_tp.mesh_dim_names, probe.item()


def test_flatten_a_slice_of_a_3d_mesh():
    for rank, (dp_tp, pp_tp, names, total) in enumerate(run_on_ranks(8, _flatten_slices)):
        base = rank // 4 * 4
        assert dp_tp == [base, base + 1, base + 2, base + 3] and total == 4
        d = rank // 2 % 2
        assert pp_tp == [2 * d, 2 * d + 1, 4 + 2 * d, 5 + 2 * d]
        assert names == ("pp_tp",)


def _uneven_on_flattened():
    from dtensor_plus import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    flat = mesh["dp", "tp"].flatten()
    whole = torch.arange(7 * 3.0).view(7, 3)
    x = distribute_tensor(whole, flat, [Shard(0)])
    return torch.equal(x.full_tensor(), whole)


def test_all_gather_over_a_flattened_mesh_keeps_uneven_rows_in_order():
    assert all(run_on_ranks(4, _uneven_on_flattened))  # upstream PyTorch returns them out of order (#194457)


def _out_of_order_meshes():
    import dtensor_plus as dtp
    from dtensor_plus import DeviceMesh

    messages = []
    for build in (lambda: DeviceMesh("cpu", [[1, 0], [3, 2]], mesh_dim_names=("dp", "tp")),
                  lambda: dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))["tp", "dp"].flatten()):
        try:
            build()
        except ValueError as error:
            messages.append(str(error))
    ok = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))["dp", "tp"].flatten()
    return messages, ok.mesh.tolist()


def test_a_mesh_dim_with_ranks_out_of_order_raises_on_every_rank():
    """torch numbers a group's ranks ascending; a mesh dim listing them otherwise would gather out of order."""
    from dtensor_plus.testing import run_on_ranks

    for messages, flattened in run_on_ranks(4, _out_of_order_meshes):
        assert len(messages) == 2 and all("not in ascending order" in m for m in messages), messages
        assert "[1, 0]" in messages[0] and "[0, 2, 1, 3]" in messages[1]
        assert flattened == [0, 1, 2, 3]
