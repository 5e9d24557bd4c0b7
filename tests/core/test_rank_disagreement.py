"""Inputs that disagree across ranks raise one clear ValueError on every rank, never abort or hang the process.

``DTensor.from_local`` blocks that do not fit together (dtypes, ndims, torch.chunk sizes; checked at once with
run_check=True, at the first op when from_local guessed even blocks: dtensor_plus/local_blocks.py), and 0-d
plain tensors that differ across ranks (plain_tensors.py). Every rank catches its own error and returns the
message, so the tests see that each rank raised it (a rank that aborted or hung fails run_on_ranks instead).
Sizes the mesh does not divide: 5 rows on 2 ranks, 7 on 3, 1 on 2 (an empty shard).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import dtensor_plus as dtp
from dtensor_plus import DTensor, Replicate, Shard
from dtensor_plus.placements import chunk_bounds
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks

# (world size, rows): uneven, uneven on 3 ranks, an empty shard
SIZES = [(2, 5), (3, 7), (2, 1)]


def _mesh():
    return dtp.init_device_mesh("cpu", (dist.get_world_size(),))


def _message_of(fn):
    """The ValueError ``fn()`` raises on this rank (the test fails if it raises none)."""
    try:
        fn()
    except ValueError as error:
        return str(error)
    return "no error"


def _every_rank_says(messages, *parts):
    for rank, message in enumerate(messages):
        for part in parts:
            assert part in message, f"rank {rank}: {message!r} lacks {part!r}"


# -- from_local(run_check=True) -----------------------------------------------------------------------------


def _run_check_dtypes():
    dtype = torch.float32 if dist.get_rank() == 0 else torch.float64
    return _message_of(lambda: DTensor.from_local(torch.ones(2, 3, dtype=dtype), _mesh(), [Shard(0)], run_check=True))


def _run_check_ndims():
    local = torch.ones(2, 3) if dist.get_rank() == 0 else torch.ones(2, 3, 1)
    return _message_of(lambda: DTensor.from_local(local, _mesh(), [Replicate()], run_check=True))


@pytest.mark.parametrize("world_size", [2, 3])
def test_run_check_names_dtypes_and_ndims_on_every_rank(world_size):
    _every_rank_says(run_on_ranks(world_size, _run_check_dtypes), "dtypes differ", "torch.float32", "torch.float64",
                     "cast every block")
    _every_rank_says(run_on_ranks(world_size, _run_check_ndims), "numbers of dims differ", "rank 0: 2", "rank 1: 3")


def _run_check_uneven(num_rows):
    """torch.chunk blocks of num_rows rows: run_check finds the global shape; others' sizes raise everywhere."""
    mesh, rank, n = _mesh(), dist.get_rank(), dist.get_world_size()
    whole = torch.arange(num_rows * 2.0).reshape(num_rows, 2)
    start, length = chunk_bounds(num_rows, n, rank)
    x = DTensor.from_local(whole[start:start + length], mesh, [Shard(0)], run_check=True)
    assert x.shape == whole.shape and torch.equal(x.full_tensor(), whole)
    first_rows = chunk_bounds(num_rows, n, 0)[1]
    wrong_rows = first_rows + 1 if rank == n - 1 else length  # the last rank holds more rows than the first
    return _message_of(lambda: DTensor.from_local(torch.ones(wrong_rows, 2), mesh, [Shard(0)], run_check=True))


def test_run_check_on_uneven_blocks():
    for world_size, num_rows in SIZES:
        _every_rank_says(run_on_ranks(world_size, _run_check_uneven, num_rows), "not torch.chunk sizes")


# -- from_local without run_check or shape: even blocks guessed, checked at the first op ---------------------


def _guessed_even(num_rows, first_op_name):
    """Blocks of a num_rows tensor given without shape=: the guess (local rows x ranks) is wrong on some rank;
    the first op raises on every rank, before any collective could abort. Even blocks cost one check, once."""
    mesh, rank, n = _mesh(), dist.get_rank(), dist.get_world_size()
    start, length = chunk_bounds(num_rows, n, rank)
    x = DTensor.from_local(torch.arange(float(start), start + length).unsqueeze(1).expand(length, 3).contiguous(),
                           mesh, [Shard(0)])
    message = _message_of(lambda: FIRST_OPS[first_op_name](x))
    even = DTensor.from_local(torch.full((2, 3), float(rank)), mesh, [Shard(0)])
    with dtp.comm_mode() as comm:
        y = even * 2
        z = even + 1
    assert comm.count() == 1, comm  # the check, once: even blocks pass it
    torch.testing.assert_close(y.full_tensor(), torch.arange(n).repeat_interleave(2).unsqueeze(1).expand(2 * n, 3) * 2.0)
    assert torch.equal(z.to_local(), even.to_local() + 1)
    return message


FIRST_OPS = {
    "full_tensor": lambda x: x.full_tensor(),
    "mul": lambda x: x * 2,
    "redistribute": lambda x: x.redistribute(placements=[Replicate()]),
    "sum": lambda x: x.sum(),
}


@settings(max_examples=6)
@given(size=st.sampled_from(SIZES), first_op=st.sampled_from(sorted(FIRST_OPS)))
def test_guessed_even_blocks_raise_at_the_first_op(size, first_op):
    world_size, num_rows = size
    messages = run_on_ranks(world_size, _guessed_even, num_rows, first_op)
    _every_rank_says(messages, "assumed even Shard blocks", f"shape=({num_rows}, 3)")


def _guessed_dtypes():
    dtype = torch.float32 if dist.get_rank() == 0 else torch.float64
    x = DTensor.from_local(torch.ones(2, 3, dtype=dtype), _mesh(), [Shard(0)])
    return _message_of(lambda: x.full_tensor())


def test_guessed_blocks_of_other_dtypes_raise_at_the_first_op():
    _every_rank_says(run_on_ranks(2, _guessed_dtypes), "dtypes differ")


# -- 0-d plain tensors beside DTensors ----------------------------------------------------------------------


def _zero_d_plain(num_rows, kind):
    mesh, rank = _mesh(), dist.get_rank()
    whole = torch.arange(num_rows * 3.0).reshape(num_rows, 3)
    x = dtp.distribute_tensor(whole, mesh, [Shard(0)])
    if kind == "values":
        scale = torch.tensor(float(rank + 1))
    elif kind == "dtype":
        scale = torch.tensor(2.0, dtype=torch.float32 if rank == 0 else torch.float64)
    else:  # the same on every rank: joins, and the result is one device's
        torch.testing.assert_close((x * torch.tensor(2.5)).full_tensor(), whole * 2.5)
        return "same"
    return _message_of(lambda: x * scale)


def test_zero_d_plain_tensors_are_checked():
    for world_size, num_rows in SIZES:
        _every_rank_says(run_on_ranks(world_size, _zero_d_plain, num_rows, "values"),
                         "plain torch.Tensor of shape ()", "values differ between ranks", "make it a DTensor")
        _every_rank_says(run_on_ranks(world_size, _zero_d_plain, num_rows, "dtype"), "shape or dtype differ")
        assert run_on_ranks(world_size, _zero_d_plain, num_rows, "same") == ["same"] * world_size


def _zero_d_index(num_rows, placement):
    """A plain 0-d index (the same on every rank) beside a DTensor weight: embedding, index_select and gather,
    outputs and gradients against one device."""
    mesh = _mesh()
    weight = dtp.distribute_tensor(torch.randn(num_rows, 4, generator=torch.Generator().manual_seed(0)), mesh,
                                   [placement]).requires_grad_()
    index = torch.tensor(num_rows - 1)
    assert_spmd_equal(lambda w: F.embedding(index, w), weight)
    assert_spmd_equal(lambda w: w.index_select(0, index), weight)
    assert_spmd_equal(lambda w: w.gather(0, index.expand(1, 4)) * w[index], weight)
    return True


def test_zero_d_index_beside_a_dtensor():
    for world_size, num_rows in SIZES:
        for placement in (Shard(0), Shard(1), Replicate()):
            assert all(run_on_ranks(world_size, _zero_d_index, num_rows, placement))
