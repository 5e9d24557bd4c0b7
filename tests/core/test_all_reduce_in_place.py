"""``collectives.all_reduce(..., in_place=True)`` (replicate's flat gradient buckets, layouts/data_flat.py) on 2
real gloo ranks: in every dtype (a sample by default), for sum, avg, max and min, sync and async, the result is
written into the tensor given and that tensor returned, bit-equal to the out-of-place all-reduce; a contiguous
tensor gloo moves as it is is reduced where it lies (no copy), a strided view and a dtype gloo lacks through a
copy written back (the view's base keeps its other elements); bytes counted as out of place."""

import pytest
import torch

from dtensor_plus import collectives, init_device_mesh
from dtensor_plus.testing import run_on_ranks

from test_collective_dtypes import DTYPES, _same, _values

# The default run: one dtype reduced where it lies, one widened by the wire (int16), one viewed (uint64), one
# through float32 (float8); every dtype under -m slow.
SAMPLE = (torch.float32, torch.int16, torch.uint64, torch.float8_e4m3fn)


def _in_place_in(dtypes):
    failures = []
    for dtype in dtypes:
        _in_place(dtype, lambda ok, what: ok or failures.append(f"{dtype}: {what}"))
    return failures


def _in_place(dtype, expect):
    mesh = init_device_mesh("cpu", (2,))
    rank = mesh.get_rank()
    for op in ("sum", "avg", "max", "min"):
        if (dtype.is_complex and op in ("max", "min")) or (op == "avg" and (dtype.is_complex or dtype == torch.bool)):
            continue  # complex numbers have no order (and complex32 no division); a mean of bools is no bool
        piece = _values(dtype, 40 + rank)
        want = collectives.all_reduce(piece, mesh, 0, op)
        for async_op in (False, True):
            t = piece.clone()
            storage = t.untyped_storage().data_ptr()
            with collectives.comm_mode() as comm:
                got = collectives.all_reduce(t, mesh, 0, op, async_op=async_op, in_place=True)
                got = got.wait() if async_op else got
            expect(got is t and _same(t, want), f"{op} async={async_op}: into the tensor given")
            expect(comm.count("all_reduce") == 1 and comm.bytes("all_reduce") == _bytes(t, op), f"{op} bytes")
            if collectives._reducible(t, op)[0] is t:  # gloo moves it as it is: reduced where it lies
                expect(t.untyped_storage().data_ptr() == storage, f"{op}: reduced through a copy")
        base = torch.stack([piece, piece])  # every other row of base is the view reduced
        view = base.transpose(0, 1)[:, 0]
        got = collectives.all_reduce(view, mesh, 0, op, in_place=True)
        expect(got is view and _same(base[0], want) and _same(base[1], piece), f"{op}: a strided view")


def _bytes(t, op) -> int:
    wire = collectives._reducible(t, op)[0]
    return wire.numel() * wire.element_size()  # 2 ranks: 2(n-1)/n of the tensor is all of it


@pytest.mark.parametrize("dtypes", [SAMPLE, pytest.param(DTYPES, marks=pytest.mark.slow)], ids=["sample", "every"])
def test_all_reduce_in_place(dtypes):
    assert run_on_ranks(2, _in_place_in, dtypes) == [[], []]
