"""``collectives.reduce`` (SUMMA's partial products, ops/summa.py) on 2 real gloo ranks: every dtype reduces in its
own arithmetic onto the destination (sum, max, min; int16 wraps, uint64 orders as unsigned, float8 and bool
through the types gloo has), the other rank gets None, and the bytes are the non-destination's tensor as
sent (in the wider type a narrow one is reduced in)."""

from dtensor_plus import collectives, init_device_mesh
from dtensor_plus.testing import run_on_ranks

from test_collective_dtypes import _every_dtype, _reference, _same, _values


def _reduce(dtype, expect):
    mesh = init_device_mesh("cpu", (2,))
    rank = mesh.get_rank()
    pieces = [_values(dtype, 30 + r) for r in range(2)]
    for op in ("sum", "max", "min"):
        if dtype.is_complex and op != "sum":
            continue  # complex numbers have no order
        want = _reference(dtype, pieces[0], pieces[1], op)
        for dst in (0, 1):
            with collectives.comm_mode() as comm:
                got = collectives.reduce(pieces[rank], mesh, 0, dst, op)
            expect(_same(got, want) if rank == dst else got is None, f"reduce {op} onto {dst}")
            wire = collectives._reducible(pieces[rank], op)[0]  # what goes on the wire: int16 as int32, float8 as fp32
            sent = 0 if rank == dst else wire.numel() * wire.element_size()
            expect(comm.count("reduce") == 1 and comm.bytes("reduce") == sent, f"reduce {op} bytes")


def test_reduce_onto_one_rank_in_every_dtype():
    assert run_on_ranks(2, _every_dtype, _reduce) == [[], []]
