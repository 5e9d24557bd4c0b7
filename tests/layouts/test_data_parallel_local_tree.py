"""What replicate's local forward keeps between forwards (layouts/data_local.py ``_Tree``: the module walk and where
each parameter is bound): every change to the module tree after a forward is seen at the next one. A parameter
replaced, a buffer added, a submodule replaced: the next forward binds the new tensors (its output, input and
parameter gradients equal one device's); a module marked DTENSOR_PATH: the next forward takes the DTensor path
(ops dispatched on the whole mesh), exact all the same. On a batch no mesh divides (5 rows: 3 and 2).

Legend: B batch, T sequence, D model width, F MLP width.
"""

import copy

import torch
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor
from dtensor_plus.dispatcher import DISPATCHER
from dtensor_plus.layouts.data import replicate, shard_batch
from dtensor_plus.layouts.data_local import DTENSOR_PATH
from dtensor_plus.testing import run_on_ranks
from test_data_parallel import D, Net  # noqa: E402  (the same small model)

B, T = 5, 3


class Shift(nn.Module):
    """Adds a buffer, when it has one (registered after the first forward)."""

    def forward(self, x_BTD):
        shift = getattr(self, "shift", None)
        return x_BTD if shift is None else x_BTD + shift


def _tree_changes_are_seen():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    reference = Net()
    reference.norm = nn.Sequential(reference.norm, Shift())
    model = replicate(copy.deepcopy(reference), mesh)
    g = torch.Generator().manual_seed(1)
    dispatched = []

    def forward_backward(what):
        x = torch.randn(B, T, D, generator=g)
        x_dt, x_ref = shard_batch(x, mesh).requires_grad_(), x.clone().requires_grad_()
        seen, execute = [], DISPATCHER.execute
        DISPATCHER.execute = lambda func, args, kwargs: seen.append(func) or execute(func, args, kwargs)
        try:
            out = model(x_dt)
        finally:
            DISPATCHER.execute = execute
        dispatched.append(len(seen))
        ref_out = reference(x_ref)
        torch.testing.assert_close(out.full_tensor(), ref_out, msg=lambda m: f"{what}: output: {m}")
        out.pow(2).mean().backward()
        ref_out.pow(2).mean().backward()
        torch.testing.assert_close(x_dt.grad.full_tensor(), x_ref.grad, msg=lambda m: f"{what}: input grad: {m}")
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert isinstance(p.grad, DTensor), (what, name, p.grad)
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, msg=lambda m: f"{what}: grad of {name}: {m}")
            p.grad = q.grad = None

    forward_backward("the first forward")
    forward_backward("the second (the walk kept)")

    # fc2's weight replaced: a new Parameter, replicated by hand
    weight = torch.randn(reference.fc2.weight.shape, generator=g)
    model.fc2.weight = nn.Parameter(dtp.distribute_tensor(weight.clone(), mesh, [dtp.Replicate()], src_data_rank=None))
    reference.fc2.weight = nn.Parameter(weight.clone())
    forward_backward("fc2.weight replaced")

    shift = torch.randn(D, generator=g)  # a buffer registered on a module that had none
    model.norm[1].register_buffer("shift", dtp.distribute_tensor(shift, mesh, [dtp.Replicate()], src_data_rank=None))
    reference.norm[1].register_buffer("shift", shift.clone())
    forward_backward("a buffer added")

    torch.manual_seed(2)  # a submodule replaced by another with new parameters
    fc1 = nn.Linear(D, model.fc1.out_features)
    reference.fc1, model.fc1 = fc1, replicate(copy.deepcopy(fc1), mesh)
    forward_backward("fc1 replaced")
    assert dispatched == [0] * 5, dispatched  # each of them on the local path

    model.norm.__dict__[DTENSOR_PATH] = True
    forward_backward("a module marked for the DTensor path")
    assert dispatched[-1] > 0, dispatched
    return True


def test_changes_to_the_module_tree_are_seen_at_the_next_forward():
    assert all(run_on_ranks(2, _tree_changes_are_seen))
