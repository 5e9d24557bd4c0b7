"""Fused cross-entropy kernel (Triton interpreter): per-shard statistics, their combination across 2 real
gloo ranks, and loss_parallel's fused path, against F.cross_entropy on one device, forward and backward.

Legend: N rows, V vocabulary (37: not a multiple of the interpreter's BLOCK_V of 16), n ranks sharing V.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from kernel_compare import LOW_PRECISION, assert_kernel_matches

from dtensor_plus import DTensor, Shard, collectives, comm_mode, init_device_mesh
from dtensor_plus.kernels import cross_entropy as ce
from dtensor_plus.kernels import kernel_counts, use_kernels
from dtensor_plus.layouts.loss import parallel_cross_entropy
from dtensor_plus.testing import run_on_ranks


def _data(num_rows=7, vocab=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits_NV = (torch.randn(num_rows, vocab, generator=g) * 3).to(dtype)
    target_N = torch.randint(0, vocab, (num_rows,), generator=g)
    target_N[2] = -100  # an ignored row
    return logits_NV, target_N


@pytest.mark.parametrize("dtype, reduction", [(torch.float32, "mean"), (torch.float32, "none"),
                                              *((dt, "mean") for dt in LOW_PRECISION)])
def test_cross_entropy_matches_reference(dtype, reduction):
    logits_NV, target_N = _data(dtype=dtype)
    assert_kernel_matches(lambda x: ce.cross_entropy(x, target_N, reduction=reduction),
                          [logits_NV.requires_grad_()], kernel="cross_entropy", dtype=dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_one_device_equals_torch(reduction):
    logits_NV, target_N = _data()
    logits_NV.requires_grad_()
    want = F.cross_entropy(logits_NV, target_N, reduction=reduction)
    (want_grad,) = torch.autograd.grad(want.sum(), logits_NV)
    with use_kernels(True):
        got = ce.cross_entropy(logits_NV, target_N, reduction=reduction)
        (grad,) = torch.autograd.grad(got.sum(), logits_NV)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize("offset, width", [(0, 16), (16, 21), (30, 7), (5, 0)])  # last: an empty vocab shard
def test_stats_of_a_vocab_block(offset, width):
    logits_NV, target_N = _data()
    block = logits_NV[:, offset:offset + width]
    want = ce.cross_entropy_stats_reference(block, target_N, offset)
    with use_kernels(True):
        got = ce.cross_entropy_stats(block, target_N, offset)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert kernel_counts()["cross_entropy"] == 1


def test_bad_shapes_name_the_fix():
    with pytest.raises(ValueError, match="flatten the batch dims"):
        ce.cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction='avg'"):
        parallel_cross_entropy(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), reduction="avg")


# ---------------------------------------------------------------- 2 gloo ranks share the vocab


def _sharded_cross_entropy_rank():
    os.environ["TRITON_INTERPRET"] = "1"  # before this rank's first kernel call (see conftest.py)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    logits_NV, target_N = _data()
    logits_NV.requires_grad_()
    want = F.cross_entropy(logits_NV, target_N)
    (want_grad,) = torch.autograd.grad(want, logits_NV)
    rank = mesh.get_coordinate()[0]
    offset = 19 * rank  # torch.chunk of 37 columns over 2 ranks: 19 and 18
    local = logits_NV.detach()[:, offset:offset + 19].clone().requires_grad_()

    # the kernel-level pieces: statistics here, combined across the tp ranks by the caller
    with use_kernels(True), comm_mode() as comm:
        loss = ce.cross_entropy(local, target_N, vocab_offset=offset,
                                all_reduce=lambda t, op: collectives.all_reduce(t, mesh, 0, op))
        (grad,) = torch.autograd.grad(loss, local)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad, want_grad[:, offset:offset + 19])
    assert comm.count("all_reduce") == 3 and kernel_counts()["cross_entropy"] == 1  # max, sum-exp, target logit

    # loss_parallel's fused path on a DTensor sharded on the vocab
    dlogits = DTensor.from_local(local.detach(), mesh, [Shard(1)], shape=logits_NV.shape).requires_grad_()
    with use_kernels(True):
        loss = parallel_cross_entropy(dlogits, target_N)
        loss.backward()
    torch.testing.assert_close(loss.full_tensor(), want)
    torch.testing.assert_close(dlogits.grad.full_tensor(), want_grad)
    assert kernel_counts()["cross_entropy"] == 2

    # rows split over the ranks instead (4 + 3), the vocab whole: no statistics cross ranks, the mean does
    drows = DTensor.from_local(logits_NV.detach().chunk(2)[rank].clone(), mesh, [Shard(0)],
                               shape=logits_NV.shape).requires_grad_()
    with use_kernels(True):
        loss = parallel_cross_entropy(drows, target_N)
        loss.backward()
    torch.testing.assert_close(loss.full_tensor(), want)
    torch.testing.assert_close(drows.grad.full_tensor(), want_grad)
    assert kernel_counts()["cross_entropy"] == 3


def test_vocab_sharded_over_two_ranks_equals_one_device():
    run_on_ranks(2, _sharded_cross_entropy_rank)
