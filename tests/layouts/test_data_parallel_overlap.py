"""replicate's gradients on the local path (layouts/data_flat.py's flat buckets, layouts/data_local.py ``_leaf``):
each bucket's all-reduce starts from the hooks while backward still runs, and the gradients equal one
device's: with many small buckets, accumulated over several backwards on uneven batches, and for a parameter
with a hook of its own (which takes the per-parameter view, so its hook sees the gradient arrive).

Legend: B batch, T sequence, D model width, F MLP width.
"""

import copy

import torch

import dtensor_plus as dtp
from dtensor_plus import DTensor
from dtensor_plus.layouts.data import replicate, shard_batch
from dtensor_plus.layouts.data_local import LocalCompute
from dtensor_plus.testing import run_on_ranks
from test_data_parallel import Net  # noqa: E402  (the same small model)

T, D, F_ = 3, 8, 16


def _bucket(model):
    """replicate's GradientBucket, as its forward pre-hook holds it."""
    hooks = [getattr(h, "__self__", None) for h in model._forward_pre_hooks.values()]
    return next(h for h in hooks if isinstance(h, LocalCompute)).gradients


def _buckets_in_flight_during_backward():
    """Buckets of about one gradient each: by the time the input's gradient is computed (the last thing backward
    computes), the all-reduces of the buckets filled so far have started; afterwards every gradient equals one
    device's on an uneven batch (5 rows: 3 and 2)."""
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    reference = Net()
    model = replicate(copy.deepcopy(reference), mesh, bucket_cap_mb=4 / 2**20)  # 4 bytes: every gradient fills one
    bucket = _bucket(model)
    x = torch.randn(5, T, D, generator=torch.Generator().manual_seed(1))
    x_dt = shard_batch(x, mesh).requires_grad_()
    in_flight = []
    x_dt.register_hook(lambda grad: in_flight.append(sum(b.pending is not None for b in bucket.flat.buckets)) or grad)
    with dtp.comm_mode() as counter:
        model(x_dt).pow(2).mean().backward()
    x_ref = x.clone().requires_grad_()
    reference(x_ref).pow(2).mean().backward()
    torch.testing.assert_close(x_dt.grad.full_tensor(), x_ref.grad)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert isinstance(p.grad, DTensor) and p.grad._spec == p._spec, name
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, msg=lambda m: f"grad of {name}: {m}")
    return in_flight, counter.counts.get(("all_reduce", "dp"), 0), len(list(model.parameters()))


def test_bucket_all_reduces_start_during_backward():
    for in_flight, all_reduces, params in run_on_ranks(2, _buckets_in_flight_during_backward):
        assert in_flight and in_flight[0] >= 4, in_flight  # fc2's and fc1's weights and biases at least
        assert all_reduces == params, (all_reduces, params)  # one per bucket (the mean's count is known: no more)


def _accumulates_over_backwards():
    """Two backwards before a step (micro-batches of 5 and 3 rows, the second loss halved): .grad holds the sum of
    the reduced gradients, as one device's; then an AdamW step equal to one device's."""
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    reference = Net()
    model = replicate(copy.deepcopy(reference), mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False)
    g = torch.Generator().manual_seed(2)
    for rows, scale in ((5, 1.0), (3, 0.5)):
        x = torch.randn(rows, T, D, generator=g)
        (model(shard_batch(x, mesh)).pow(2).mean() * scale).backward()
        (reference(x).pow(2).mean() * scale).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, msg=lambda m: f"grad of {name}: {m}")
    opt.step()
    ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.full_tensor(), q, msg=lambda m: f"{name} after the step: {m}")
    return True


def test_gradients_accumulate_over_several_backwards():
    assert all(run_on_ranks(2, _accumulates_over_backwards))


def _own_hook():
    """A hook the user put on a parameter sees its gradient arrive (reduced, in the parameter's layout), once
    per backward; the gradients equal one device's."""
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    reference = Net()
    model = replicate(copy.deepcopy(reference), mesh)
    seen = []
    model.fc1.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.placements))
    x = torch.randn(5, T, D, generator=torch.Generator().manual_seed(3))
    model(shard_batch(x, mesh)).pow(2).mean().backward()
    reference(x).pow(2).mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, msg=lambda m: f"grad of {name}: {m}")
    return len(seen)


def test_a_parameter_hook_of_the_users_sees_the_gradient():
    assert run_on_ranks(2, _own_hook) == [1, 1]
