"""Gradients of plain tensors that meet DTensors, and of ``to_local()`` blocks (grad_layout.keep_plain_gradient).

A plain parameter beside DTensor activations gets the plain, whole gradient one device gives, reduced once per
backward (an optimizer step then communicates nothing); a block ``to_local()`` returned that meets DTensors gives
its DTensor a DTensor gradient with a plain block, never a DTensor inside a DTensor. Batches the mesh does not
divide: 5 rows on 2 ranks, 7 on 3, 1 on 2 (an empty shard).

Legend: B batch (sharded), D width.
"""

import copy

import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Replicate, Shard
from dtensor_plus.testing import run_on_ranks

D = 4
# (world size, batch rows): uneven, uneven on 3 ranks, and an empty shard
SIZES = [(2, 5), (3, 7), (2, 1)]


class Net(nn.Module):
    """Plain parameters: LayerNorm, two Linears, a 0-d learnable temperature."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x_BD):
        return self.fc2(F.gelu(self.fc1(self.norm(x_BD)))) * self.temperature


def _train_plain_parameters(x_placement, num_rows, steps=2):
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, foreach=False)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.1, foreach=False)
    num_params = len(list(model.parameters()))
    for step in range(steps):
        whole_x, whole_y = torch.randn(num_rows, D), torch.randn(num_rows, D)
        x = dtp.distribute_tensor(whole_x, mesh, [x_placement]).requires_grad_()
        y = dtp.distribute_tensor(whole_y, mesh, [x_placement])
        ref_x = whole_x.clone().requires_grad_()
        loss = (model(x) - y).pow(2).mean()
        with dtp.comm_mode() as in_backward:
            loss.backward()
        with dtp.comm_mode() as in_step:
            opt.step()
        ref_loss = (reference(ref_x) - whole_y).pow(2).mean()
        ref_loss.backward()
        ref_opt.step()
        torch.testing.assert_close(loss.full_tensor(), ref_loss)
        assert isinstance(x.grad, DTensor) and x.grad.placements == (x_placement,), x.grad
        torch.testing.assert_close(x.grad.full_tensor(), ref_x.grad)
        for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
            assert type(p.grad) is torch.Tensor, f"{name}: a {type(p.grad).__name__} gradient"
            torch.testing.assert_close(p.grad, ref.grad, msg=lambda m: f"grad of {name} at step {step}: {m}")
            torch.testing.assert_close(p, ref, msg=lambda m: f"{name} after step {step}: {m}")
        assert in_step.count() == 0, in_step
        # each parameter's gradient is reduced once: one all-reduce of a Partial one (batch sharded), none
        # of a Replicate one (every rank computed the whole gradient)
        expected = num_params if x_placement.is_shard() else 0
        assert in_backward.count() == in_backward.count("all_reduce") == expected, in_backward
        opt.zero_grad()
        ref_opt.zero_grad()
    return True


@settings(max_examples=4)
@given(size=st.sampled_from(SIZES), x_placement=st.sampled_from([Shard(0), Replicate()]))
def test_plain_parameters_get_plain_reduced_gradients(size, x_placement):
    world_size, num_rows = size
    assert all(run_on_ranks(world_size, _train_plain_parameters, x_placement, num_rows))


def _autograd_grad_and_double_backward(num_rows):
    """torch.autograd.grad gives the plain tensor a plain gradient too, and with create_graph the reduction is
    differentiable: the gradient of a function of the gradient equals one device's."""
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    torch.manual_seed(1)
    whole_x, whole_w = torch.randn(num_rows, D), torch.randn(D, 3)
    x = dtp.distribute_tensor(whole_x, mesh, [Shard(0)])
    w, ref_w = whole_w.clone().requires_grad_(), whole_w.clone().requires_grad_()
    (g,) = torch.autograd.grad((x @ w).tanh().sum(), w, create_graph=True)
    (ref_g,) = torch.autograd.grad((whole_x @ ref_w).tanh().sum(), ref_w, create_graph=True)
    assert type(g) is torch.Tensor, type(g)
    torch.testing.assert_close(g, ref_g)
    g.pow(2).sum().backward()
    ref_g.pow(2).sum().backward()
    assert type(w.grad) is torch.Tensor, type(w.grad)
    torch.testing.assert_close(w.grad, ref_w.grad)
    return True


def test_autograd_grad_and_double_backward():
    for world_size, num_rows in SIZES:
        assert all(run_on_ranks(world_size, _autograd_grad_and_double_backward, num_rows))


def _to_local_block_meets_dtensors(num_rows):
    """w.to_local() of a Replicate DTensor parameter used with a sharded DTensor activation: w.grad is a
    DTensor laid out as w, its block a plain tensor, equal to one device; an optimizer steps on it."""
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    torch.manual_seed(2)
    whole_x, whole_w = torch.randn(num_rows, D), torch.randn(D, 3)
    x = dtp.distribute_tensor(whole_x, mesh, [Shard(0)]).requires_grad_()
    w = nn.Parameter(dtp.distribute_tensor(whole_w, mesh, [Replicate()]))
    ref_x, ref_w = whole_x.clone().requires_grad_(), nn.Parameter(whole_w.clone())
    (x @ w.to_local()).sin().sum().backward()
    (ref_x @ ref_w).sin().sum().backward()
    assert isinstance(w.grad, DTensor) and type(w.grad._local_tensor) is torch.Tensor, type(w.grad._local_tensor)
    assert w.grad.placements == (Replicate(),)
    torch.testing.assert_close(w.grad.full_tensor(), ref_w.grad)
    torch.testing.assert_close(x.grad.full_tensor(), ref_x.grad)
    opt, ref_opt = torch.optim.AdamW([w], lr=0.1), torch.optim.AdamW([ref_w], lr=0.1)
    opt.step()
    ref_opt.step()
    torch.testing.assert_close(w.full_tensor(), ref_w.detach())
    return True


def test_to_local_block_meets_dtensors():
    for world_size, num_rows in SIZES:
        assert all(run_on_ranks(world_size, _to_local_block_meets_dtensors, num_rows))


def _nested_dtensor_refused():
    mesh = dtp.init_device_mesh("cpu", (2,))
    x = dtp.distribute_tensor(torch.ones(3), mesh, [Replicate()])
    try:
        DTensor(x, x._spec)
    except TypeError as error:
        return str(error)
    return "no error"


def test_a_dtensor_never_holds_a_dtensor():
    for message in run_on_ranks(2, _nested_dtensor_refused):
        assert "local block must be a plain tensor" in message, message
