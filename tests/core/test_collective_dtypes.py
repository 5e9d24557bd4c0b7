"""Every dtype torch has on CPU through every collective of collectives.py and through redistribute, on 2 real
gloo ranks: moves are bit-exact (NaN payloads included), reductions equal the narrow type's own arithmetic
(int16 sums wrap like int16 additions, uint64 max/min order as unsigned). Gloo itself rejects int16, uint16/32/64
and float8; collectives.py moves and reduces them through other types."""

import torch

from dtensor_plus import DTensor, Partial, Replicate, Shard, collectives, init_device_mesh
from dtensor_plus.testing import run_on_ranks

DTYPES = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex32, torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64,
    torch.bool, torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
)


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN payloads included)."""
    bits = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return got.dtype == want.dtype and got.shape == want.shape and torch.equal(bits(got), bits(want))


def _random_bits(shape, dtype, seed) -> torch.Tensor:
    """Any bit pattern of ``dtype`` (NaNs and infinities too); bools 0/1."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    size = dtype.itemsize
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * size), dtype=torch.uint8, generator=gen)
    return raw.view(dtype)


def _moves(dtype, expect):
    """all_gather, all_to_all, all_to_all_splits, broadcast, scatter, all_gather_flat and redistribute's moves
    of random bits, uneven shards (5 rows on 2 ranks) included."""
    mesh = init_device_mesh("cpu", (2,))
    rank = mesh.get_rank()
    rows = slice(0, 3) if rank == 0 else slice(3, 5)  # this rank's torch.chunk block of 5 rows
    whole = _random_bits((5, 4), dtype, 7)
    mine = whole[rows]
    expect(_same(collectives.all_gather(mine, mesh, 0, 0, 5), whole), "all_gather")
    blocks = [_random_bits((5, 4), dtype, 10 + r) for r in range(2)]  # rank r sends column block r of blocks[r]
    got = collectives.all_to_all(blocks[rank][:, 2 * rank : 2 * rank + 2], mesh, 0, 1, 4, 0)
    expect(_same(got, torch.cat([blocks[r][:, 2 * r : 2 * r + 2] for r in range(2)], 1)[rows]), "all_to_all")
    got = collectives.all_to_all_splits(blocks[rank], mesh, 0, [2, 3], [2, 2] if rank == 0 else [3, 3])
    want = torch.cat([blocks[0][:2], blocks[1][:2]]) if rank == 0 else torch.cat([blocks[0][2:], blocks[1][2:]])
    expect(_same(got, want), "all_to_all_splits")
    expect(_same(collectives.broadcast(blocks[rank].clone(), mesh, 0, 1), blocks[1]), "broadcast")
    expect(_same(collectives.scatter(blocks[rank], mesh, 0, 0, 0), blocks[0][rows]), "scatter")
    flat = collectives.all_gather_flat([mine, mine[:, :1]], mesh, 0, [0, 0], [5, 5])
    expect(_same(flat[0], whole) and _same(flat[1], whole[:, :1]), "all_gather_flat")
    x = DTensor.from_local(mine, mesh, [Shard(0)], shape=whole.shape, stride=whole.stride())
    expect(_same(x.redistribute(mesh, [Shard(1)]).full_tensor(), whole), "Shard(0) -> Shard(1)")
    expect(_same(x.redistribute(mesh, [Replicate()]).to_local(), whole), "Shard(0) -> Replicate")


def _values(dtype, seed):
    """Values that exercise wrap-around and the sign bit: each dtype's whole range for ints, small ints for
    floats (exact in every float type), 0/1 for bools."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, (6, 3), generator=gen).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randint(1, 4, (6, 3), generator=gen).to(torch.float32).to(dtype)
    info = torch.iinfo(dtype)
    if dtype == torch.uint64:  # beyond int64's range: build the bits, then read them as unsigned
        return torch.randint(-(2**63), 2**63 - 1, (6, 3), generator=gen).view(torch.uint64)
    return torch.randint(info.min, info.max, (6, 3), generator=gen).to(dtype)


def _as_int(t):
    """Exact integer (Python int) values, for references of types whose arithmetic torch lacks on CPU."""
    if t.dtype == torch.uint64:
        return [[v % 2**64 for v in row] for row in t.view(torch.int64).tolist()]
    return t.to(torch.int64).tolist()


def _reference(dtype, a, b, op):
    """The single-device reduction of the two pieces, in ``dtype``'s own arithmetic."""
    if dtype == torch.bool:
        return (a | b) if op in ("sum", "max") else (a & b)
    if dtype.is_floating_point or dtype.is_complex:
        wide = torch.complex64 if dtype.is_complex else torch.float32
        x, y = a.to(wide), b.to(wide)
        return {"sum": x + y, "max": torch.maximum(x, y) if not dtype.is_complex else None,
                "min": torch.minimum(x, y) if not dtype.is_complex else None}[op].to(dtype)
    bits = dtype.itemsize * 8
    xs, ys = _as_int(a), _as_int(b)
    fn = {"sum": lambda u, v: u + v, "max": max, "min": min}[op]
    out = [[fn(u, v) % 2**bits for u, v in zip(r, s)] for r, s in zip(xs, ys)]  # wrap as the type's bits do
    signed = dtype.is_signed
    out = [[v - 2**bits if signed and v >= 2 ** (bits - 1) else v for v in row] for row in out]
    if dtype == torch.uint64:
        return torch.tensor([[v - 2**64 if v >= 2**63 else v for v in row] for row in out]).view(torch.uint64)
    return torch.tensor(out, dtype=torch.int64).to(dtype)


def _reductions(dtype, expect):
    """all_reduce, reduce_scatter, reduce_scatter_flat and redistribute of Partial(sum|max|min)."""
    mesh = init_device_mesh("cpu", (2,))
    rank = mesh.get_rank()
    rows = slice(0, 3) if rank == 0 else slice(3, 6)
    pieces = [_values(dtype, 20 + r) for r in range(2)]
    for op in ("sum", "max", "min"):
        if dtype.is_complex and op != "sum":
            continue  # complex numbers have no order (torch.maximum rejects them too)
        want = _reference(dtype, pieces[0], pieces[1], op)
        expect(_same(collectives.all_reduce(pieces[rank], mesh, 0, op), want), f"all_reduce {op}")
        expect(_same(collectives.reduce_scatter(pieces[rank], mesh, 0, 0, op), want[rows]), f"reduce_scatter {op}")
        flat = collectives.reduce_scatter_flat([pieces[rank], pieces[rank][:, :1]], mesh, 0, [0, 0], op)
        expect(_same(flat[0], want[rows]) and _same(flat[1], want[rows, :1]), f"reduce_scatter_flat {op}")
        x = DTensor.from_local(pieces[rank], mesh, [Partial(op)])
        expect(_same(x.redistribute(mesh, [Replicate()]).to_local(), want), f"Partial({op}) -> Replicate")
        expect(_same(x.redistribute(mesh, [Shard(0)]).to_local(), want[rows]), f"Partial({op}) -> Shard(0)")


def _every_dtype(check) -> list[str]:
    """Run ``check(dtype, expect)`` for every dtype in one call (one mesh set-up); the failures, named. A failed
    expectation is noted, not raised, so every rank goes on issuing the same collectives."""
    failures = []
    for dtype in DTYPES:
        check(dtype, lambda ok, what: ok or failures.append(f"{dtype}: {what}"))
    return failures


def test_moves_are_bit_exact():
    assert run_on_ranks(2, _every_dtype, _moves) == [[], []]


def test_reductions_match_the_dtypes_arithmetic():
    assert run_on_ranks(2, _every_dtype, _reductions) == [[], []]


def test_int16_sum_wraps_like_int16():
    a = torch.tensor([[32767, -32768, 1000]], dtype=torch.int16)
    assert torch.equal(_reference(torch.int16, a, a, "sum"), a + a)  # the reference is torch's own int16 addition
    run_on_ranks(2, _int16_wrap, a)


def _int16_wrap(a):
    mesh = init_device_mesh("cpu", (2,))
    assert _same(collectives.all_reduce(a, mesh, 0, "sum"), a + a)
