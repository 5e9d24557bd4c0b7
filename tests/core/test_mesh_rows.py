"""The mesh as the one source of rows and process groups: ``row_ranks`` / ``rows`` against a brute-force
definition on a 3-d mesh and its slices, and one group per (ranks, use) shared by every mesh that runs over them."""

import itertools

import torch
import torch.distributed as dist

from dtensor_plus import DeviceMesh, init_device_mesh
from dtensor_plus.mesh import PROCESS_GROUPS
from dtensor_plus.point_to_point import p2p_group, send_recv
from dtensor_plus.testing import run_on_ranks

SHAPE = (2, 2, 2)
NAMES = ("pp", "dp", "tp")


def _brute_force_row(rank: int, mesh_dim: int) -> list[int]:
    """The ranks of the row-major 2x2x2 mesh whose coordinates equal ``rank``'s except along ``mesh_dim``."""
    coordinates = {r: c for r, c in enumerate(itertools.product(*map(range, SHAPE)))}
    mine = coordinates[rank]
    same = [r for r, c in coordinates.items() if all(c[k] == mine[k] for k in range(3) if k != mesh_dim)]
    return sorted(same, key=lambda r: coordinates[r][mesh_dim])


def _rows_on_a_3d_mesh():
    mesh = init_device_mesh("cpu", SHAPE, mesh_dim_names=NAMES)
    sliced, transposed = mesh["dp", "tp"], mesh["tp", "pp"]
    flat = mesh["dp", "tp"].flatten()
    probe = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(probe, group=mesh.get_group("dp"))  # the group holds exactly row_ranks("dp")
    return dict(
        rows={name: list(mesh.row_ranks(name)) for name in NAMES},
        by_index=[list(mesh.row_ranks(k)) for k in range(3)],
        sliced=[list(sliced.row_ranks("dp")), list(sliced.row_ranks("tp"))],
        transposed=[list(transposed.row_ranks(0)), list(transposed.row_ranks(1))],
        every_tp_row=mesh.rows("tp"),
        every_tp_row_of_a_slice=transposed.rows("tp"),
        merged=mesh.rows("dp", "tp"),
        flat=list(flat.row_ranks(0)),
        dp_sum=probe.item(),
        coordinate_of_5=mesh.coordinate_of(5),
        coordinate_in_slice=sliced.coordinate_of(dist.get_rank()),
    )


def test_row_ranks_are_the_ranks_sharing_every_other_coordinate():
    for rank, facts in enumerate(run_on_ranks(8, _rows_on_a_3d_mesh)):
        expected = {name: _brute_force_row(rank, k) for k, name in enumerate(NAMES)}
        assert facts["rows"] == expected and facts["by_index"] == [expected[n] for n in NAMES]
        assert facts["sliced"] == [expected["dp"], expected["tp"]]
        assert facts["transposed"] == [expected["tp"], expected["pp"]]
        assert facts["dp_sum"] == sum(expected["dp"])
        # every row, slices included (their siblings' rows: what creating groups collectively needs)
        assert facts["every_tp_row"] == facts["every_tp_row_of_a_slice"] == [(0, 1), (2, 3), (4, 5), (6, 7)]
        assert facts["merged"] == [(0, 1, 2, 3), (4, 5, 6, 7)]
        assert facts["flat"] == list(next(row for row in facts["merged"] if rank in row))
        assert facts["coordinate_of_5"] == (1, 0, 1)
        assert facts["coordinate_in_slice"] == (rank // 2 % 2, rank % 2)


def _shared_groups():
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    rank = dist.get_rank()
    halves = [DeviceMesh("cpu", [0, 1]), DeviceMesh("cpu", [2, 3])]  # built on every rank: creation is collective
    my_half = halves[rank // 2]
    p2p = p2p_group(mesh, "tp")
    return dict(
        built_apart_share=my_half.get_group() is mesh.get_group("tp"),
        slice_shares=mesh["tp"].get_group() is mesh.get_group("tp") and mesh["dp"].get_group() is mesh.get_group(0),
        cache_holds_it=PROCESS_GROUPS.get(mesh.row_ranks("tp"), "gloo") is mesh.get_group("tp"),
        whole_world_is_default=mesh.flatten().get_group() is dist.group.WORLD,
        p2p_apart=p2p is not mesh.get_group("tp"),
        p2p_shared=p2p_group(mesh["tp"], 0) is p2p and p2p_group(my_half, 0) is p2p,
        p2p_ranks=dist.get_process_group_ranks(p2p),
    )


def test_equal_rows_share_one_group_per_use():
    for rank, facts in enumerate(run_on_ranks(4, _shared_groups)):
        assert facts.pop("p2p_ranks") == [rank // 2 * 2, rank // 2 * 2 + 1]
        assert all(facts.values()), facts


def _send_recv_without_its_group():
    # ranks (0, 3): a row no other test pairs, so the pool's ranks have no point-to-point group for it
    ends = DeviceMesh("cpu", [0, 3], mesh_dim_names=("ends",))
    if ends.get_coordinate() is None:
        return None
    try:
        send_recv([], [], ends, "ends")
    except RuntimeError as error:
        return str(error)
    return "no error"


def test_send_recv_names_the_missing_point_to_point_group():
    messages = run_on_ranks(4, _send_recv_without_its_group)
    assert messages[1] is None and messages[2] is None
    for message in (messages[0], messages[3]):
        assert "no point-to-point group for ranks [0, 3]: call p2p_group(mesh, 0) on every rank first" in message
