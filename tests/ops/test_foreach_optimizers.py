"""torch.optim's multi-tensor paths (foreach=True, fused=True) on DTensor parameters equal one device, with one
local multi-tensor kernel per op (no per-element dispatch, no collective beyond reducing Partial gradients).

Parameters on a 2-rank mesh: Shard(0) with rows no mesh divides (5 over 2), Replicate, and a 1-row Shard(0)
(an empty shard); gradients come from a real backward with the batch sharded, so the Replicate parameter's
gradient arrives Partial and is reduced inside the optimizer's first op.
"""

import pytest
import torch

import dtensor_plus as dtp
from dtensor_plus import Replicate, Shard
from dtensor_plus.layouts.data import reduce_gradients
from dtensor_plus.testing import run_on_ranks

OPTIMIZERS = [
    (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    (torch.optim.Adam, {"lr": 1e-2, "amsgrad": True}),
    (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True}),
    (torch.optim.Adagrad, {"lr": 1e-2}),
    (torch.optim.RMSprop, {"lr": 1e-2, "momentum": 0.5}),
]


def _train(optimizer_class, options, mode, steps=3):
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    wholes = [torch.randn(5, 3), torch.randn(3), torch.randn(1, 3)]
    layouts = [[Shard(0)], [Replicate()], [Shard(0)]]
    params = [torch.nn.Parameter(dtp.distribute_tensor(w, mesh, p)) for w, p in zip(wholes, layouts)]
    reference = [torch.nn.Parameter(w.clone()) for w in wholes]
    flag = {"foreach": {"foreach": True}, "fused": {"fused": True}}[mode]
    opt = optimizer_class(params, **options, **flag)
    ref_opt = optimizer_class(reference, **options, foreach=False)
    for step in range(steps):
        x = torch.randn(4, 3)
        for ps, batch in ((params, dtp.distribute_tensor(x, mesh, [Shard(0)])), (reference, x)):
            (batch @ ps[0].T).square().sum().backward()
            (batch * ps[1]).sum().backward()
            (batch @ ps[2].T).sum().backward()
        reduce_gradients(params)  # what data parallelism's hooks do: Partial gradients reduced once, before the step
        with dtp.comm_mode() as comm:
            opt.step()
        ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
    errors = [(p.full_tensor() - r).abs().max().item() for p, r in zip(params, reference)]
    return errors, comm.count(), dict(comm.fallbacks)


CASES = [(o, kw, mode) for o, kw in OPTIMIZERS for mode in ("foreach", "fused") if mode == "foreach" or o is not torch.optim.RMSprop]  # torch has no fused RMSprop


@pytest.mark.parametrize("optimizer_class,options,mode", CASES, ids=[f"{o.__name__}-{m}" for o, _, m in CASES])
def test_multi_tensor_optimizers_equal_one_device(optimizer_class, options, mode):
    errors, collectives, fallbacks = run_on_ranks(2, _train, optimizer_class, options, mode)[0]
    assert max(errors) < 1e-5, errors
    assert not fallbacks, fallbacks
    assert collectives == 0, collectives  # one local multi-tensor op per list op: no traffic, no fallback


def _moved_state():
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    p = dtp.distribute_tensor(torch.ones(4), mesh, [Shard(0)])
    state = dtp.distribute_tensor(torch.ones(4), mesh, [Replicate()])
    try:
        torch._foreach_lerp_([p], [state], 0.5)  # p written, state read: state moves, fine
        torch._foreach_lerp_([state], [p], 0.5)  # state written and already Replicate: fine
        torch._foreach_addcmul_([p], [p], [p], value=1.0)
        torch._fused_adamw_([p], [p.clone()], [state], [state.clone()], [], [torch.tensor(1.0)], lr=0.1, beta1=0.9,
                            beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    except ValueError as error:
        return str(error)


def test_dtensor_is_a_multi_tensor_type_for_torch_optim():
    """torch picks foreach by default (on devices that have it, CUDA) only for listed tensor types: DTensor is."""
    from torch.optim.optimizer import _foreach_supported_types as optim_types
    from torch.utils._foreach_utils import _foreach_supported_types as util_types

    assert dtp.DTensor in optim_types and dtp.DTensor in util_types


def test_a_written_state_in_another_layout_raises_naming_it():
    for message in run_on_ranks(2, _moved_state):
        assert message is not None and "exp_avgs[0]" in message and "redistribute" in message, message
