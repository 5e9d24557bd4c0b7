"""A mean nll over targets cut by shard_batch counts its kept targets on the whole batch each rank holds
(dtensor_plus/whole_batch.py): no collective in the loss, the value and gradients equal to one device's; and once
the whole or the targets may have changed, the count is all-reduced again, on every rank alike."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dtensor_plus import Replicate, comm_mode, distribute_tensor, init_device_mesh
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.layouts.data import shard_batch

CLASSES = 5


def _mean_loss(logits, targets, shift, **kwargs):
    """cross_entropy's mean over (B, T, C) logits, optionally after the next-token shift."""
    if shift:
        logits, targets = logits[:, :-1], targets[:, 1:]
    return F.cross_entropy(logits.reshape(-1, CLASSES), targets.flatten(0, 1), **kwargs)


def check_cases(cases):
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    for rows, steps, ignored, use_weight, ignore_index, shift, seed in cases:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(rows, steps, CLASSES, generator=g, dtype=torch.float64)
        y = torch.randint(0, CLASSES, (rows, steps), generator=g)
        y = torch.where(torch.rand(rows, steps, generator=g) < ignored, ignore_index, y)
        kwargs = dict(ignore_index=ignore_index)
        if use_weight:
            kwargs["weight"] = torch.rand(CLASSES, generator=g, dtype=torch.float64) + 0.1
        expected_x = x.clone().requires_grad_()
        expected = _mean_loss(expected_x, y, shift, **kwargs)
        expected.backward()
        if use_weight:  # a class weight is replicated: a DTensor on the same mesh
            kwargs["weight"] = distribute_tensor(kwargs["weight"], mesh, [Replicate()], src_data_rank=None)
        dx = shard_batch(x, mesh).requires_grad_()
        dy = shard_batch(y, mesh)
        with comm_mode() as comm:
            loss = _mean_loss(dx, dy, shift, **kwargs)
        # The count came from the whole targets (a view of rows no rank split evenly may still move the logits).
        assert comm.count("all_reduce") == 0, (dict(comm.counts), rows, shift)
        loss.backward()
        torch.testing.assert_close(loss.full_tensor(), expected.detach(), rtol=1e-12, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(dx.grad.full_tensor(), expected_x.grad, rtol=1e-12, atol=1e-12, equal_nan=True)

    # Written into since: the record is void and the count is all-reduced (every rank alike), still exact.
    y = torch.tensor([[1, -100, 2], [3, 4, -100], [0, 0, 1], [-100, 2, 2]])  # even blocks: no view moves data
    x = torch.randn(4, 3, CLASSES, dtype=torch.float64)
    expected = F.cross_entropy(x.flatten(0, 1), y.flatten(0, 1))
    counts = []
    dy = shard_batch(y, mesh)
    view = dy.flatten(0, 1)
    dy.add_(0)  # an in-place op on the targets (values unchanged): its views' record is void too
    users = y.clone()
    dz = shard_batch(users, mesh)
    users.fill_(-100)  # the user reuses the batch buffer: dz still holds the old rows, the whole changed
    for targets in (dy.flatten(0, 1), view, dz.flatten(0, 1)):
        with comm_mode() as comm:
            loss = F.cross_entropy(shard_batch(x, mesh).flatten(0, 1), targets)
        counts.append(comm.count("all_reduce"))
        torch.testing.assert_close(loss.full_tensor(), expected, rtol=1e-12, atol=1e-12)
    assert counts == [1, 1, 1], counts
    return True


case = st.tuples(
    st.integers(1, 5),  # rows: 1 leaves rank 1 an empty block, odd counts uneven ones
    st.integers(2, 4),
    st.sampled_from([0.0, 0.3, 1.0]),  # none, some or every target ignored (the mean of nothing is nan)
    st.booleans(),
    st.sampled_from([-100, 0]),
    st.booleans(),  # the next-token shift: slices of the targets carry the whole's slice
    st.integers(0, 2**16),
)


@settings(max_examples=1, deadline=None)  # eight cases in one call of the ranks: one process start
@given(cases=st.lists(case, min_size=8, max_size=8))
def test_mean_loss_counts_on_the_whole_batch(cases):
    assert run_on_ranks(2, check_cases, cases) == [True, True]
