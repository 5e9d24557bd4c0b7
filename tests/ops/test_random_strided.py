"""Dropout on a StridedShard sequence draws locally, as it does on a Shard (ops/random_ops.py, ops/factories.py).

A sequence split over two context mesh dims (USP, the double ring) folds to rows StridedShard(0, B) on both
mesh dims in nn.Linear, and a zigzag sequence is a StridedShard on its one mesh dim; dropout's ``empty_like``
and ``bernoulli_`` used to gather such a tensor first. Now, in the default random mode: no collective, the
placement kept, each shard its own stream (the shard index of rng_for), and the draw is the same whether the
rows are folded or not (dropout then fold equals fold then dropout, as on one device); the gradient is the
mask, scaled. Strict mode still draws whole, equal to one device.
"""

import torch
import torch.nn.functional as F

import dtensor_plus as dtp
from dtensor_plus import Shard, comm_mode
from dtensor_plus.placements import StridedShard
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor

P = 0.5


def _folded_dropout(batch, seq, width):
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
    whole = torch.randn(batch, seq, width, generator=torch.Generator().manual_seed(seq), dtype=torch.float64) + 3
    x = make_dtensor(whole, mesh, [Shard(1), Shard(1)], requires_grad=True)
    rows = x.reshape(batch * seq, width)
    assert rows.placements == (StridedShard(0, batch),) * 2, rows.placements
    dtp.manual_seed(5)
    with comm_mode() as comm:
        dropped = F.dropout(rows, P, True)
        native, mask = torch.native_dropout(rows, P, True)
    assert comm.count() == 0, comm.by_op
    assert dropped.placements == native.placements == mask.placements == rows.placements
    dtp.manual_seed(5)
    unfolded = F.dropout(x, P, True)  # the same stream, op for op: the fold does not change the draw
    torch.testing.assert_close(dropped.view(batch, seq, width).to_local(), unfolded.to_local(), rtol=0, atol=0)
    dropped.sum().backward()
    kept = dropped.full_tensor() != 0
    torch.testing.assert_close(x.grad.full_tensor(), kept.view(batch, seq, width).double() / (1 - P))
    dtp.manual_seed(5, strict=True)
    strict = F.dropout(rows, P, True).full_tensor()
    torch.manual_seed(5)
    torch.testing.assert_close(strict, F.dropout(whole.reshape(batch * seq, width), P, True), rtol=0, atol=0)
    return kept.view(batch, seq, width)


def _zigzag_dropout(seq):
    mesh = dtp.init_device_mesh("cpu", (4,), mesh_dim_names=("cp",))
    zigzag = StridedShard(1, 1, zigzag=True)
    x = make_dtensor(torch.ones(2, seq, 3, dtype=torch.float64), mesh, [zigzag])
    dtp.manual_seed(6)
    with comm_mode() as comm:
        y = F.dropout(x, P, True)
    assert comm.count() == 0 and y.placements == (zigzag,), (comm.by_op, y.placements)


def _dropouts():
    _folded_dropout(3, 7, 2)  # uneven: 7 tokens on 2 x 2 are pieces of 2, 2, 2 and 1
    kept = _folded_dropout(2, 8, 16)
    blocks = kept.split(2, dim=1)  # the four shards' tokens: their own streams, so different masks
    assert all(not blocks[i].equal(blocks[j]) for i in range(4) for j in range(i)), "two shards drew alike"
    _zigzag_dropout(7)


def test_dropout_on_a_strided_sequence_draws_locally():
    run_on_ranks(4, _dropouts)
