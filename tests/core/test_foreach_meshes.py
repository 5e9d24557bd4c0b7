"""Foreach ops over DTensors on several meshes (dtensor_plus/foreach_meshes.py): global-norm clipping of
parameters on mesh["tp"] and on mesh["dp"] of a 2x2 mesh, written as torch's clip_grad_norm_(foreach=True)
does it, equals one device; each element keeps its own mesh and layout; functional ops come back in order.
"""

import pytest
import torch

import dtensor_plus as dtp
from dtensor_plus import Replicate, Shard
from dtensor_plus.testing import run_on_ranks


def _clip(norm_type, max_norm):
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    a1, b1, c1 = torch.randn(5, 3), torch.randn(7), torch.randn(1, 2)  # uneven: 5 and 7 rows, 1 row on 2 ranks
    wa, wb, wc = torch.randn(5, 3), torch.randn(7), torch.randn(1, 2)
    on_tp = [dtp.distribute_tensor(a1.clone().requires_grad_(), mesh["tp"], [Shard(0)]),
             dtp.distribute_tensor(c1.clone().requires_grad_(), mesh["tp"], [Shard(0)])]
    on_dp = [dtp.distribute_tensor(b1.clone().requires_grad_(), mesh["dp"], [Shard(0)])]
    loss = sum(((t * w).sum() ** 2).full_tensor() for t, w in zip(on_tp + on_dp, (wa, wc, wb)))
    loss.backward()
    params = [on_tp[0], on_dp[0], on_tp[1]]  # interleaved meshes, as a model's parameters() may be
    grads = [p.grad for p in params]

    # torch.nn.utils.clip_grad_norm_(foreach=True), with the norms of both meshes combined as plain values
    norms = torch._foreach_norm(grads, norm_type)
    assert [n.device_mesh for n in norms] == [g.device_mesh for g in grads]
    total = torch.linalg.vector_norm(torch.stack([n.full_tensor() for n in norms]), norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef)
    assert [g.placements for g in grads] == [(Shard(0),)] * 3

    singles = [a1.clone().requires_grad_(), b1.clone().requires_grad_(), c1.clone().requires_grad_()]
    single_loss = sum(((t * w).sum() ** 2) for t, w in zip(singles, (wa, wb, wc)))
    single_loss.backward()
    single_total = torch.nn.utils.clip_grad_norm_(singles, max_norm, norm_type, foreach=True)
    torch.testing.assert_close(total, single_total)
    for p, s in zip(params, singles):
        torch.testing.assert_close(p.grad.full_tensor(), s.grad)

    # functional foreach ops return each element on its own mesh, in the caller's order
    doubled = torch._foreach_add(grads, grads)
    for d, g in zip(doubled, grads):
        assert d.device_mesh == g.device_mesh
        torch.testing.assert_close(d.full_tensor(), 2 * g.full_tensor())
    return True


@pytest.mark.parametrize("norm_type, max_norm", [(2.0, 0.5), (float("inf"), 0.1), (1.0, 1e6)])
def test_global_norm_clipping_over_tp_and_dp_submeshes(norm_type, max_norm):
    assert run_on_ranks(4, _clip, norm_type, max_norm) == [True] * 4


def _optimizer_over_meshes(fused):
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    wholes = [torch.randn(5, 3), torch.randn(3)]
    params = [torch.nn.Parameter(dtp.distribute_tensor(wholes[0], mesh["tp"], [Shard(0)])),
              torch.nn.Parameter(dtp.distribute_tensor(wholes[1], mesh["dp"], [Replicate()]))]
    singles = [torch.nn.Parameter(w.clone()) for w in wholes]
    flags = {"fused": True} if fused else {"foreach": True}
    opt, single_opt = torch.optim.AdamW(params, lr=0.1, **flags), torch.optim.AdamW(singles, lr=0.1, **flags)
    for _ in range(2):
        for p, s in zip(params, singles):
            s.grad = torch.randn(s.shape)
            p.grad = dtp.distribute_tensor(s.grad, p.device_mesh, p.placements)
        opt.step()
        single_opt.step()
    for p, s in zip(params, singles):
        torch.testing.assert_close(p.full_tensor(), s.detach())
    return True


@pytest.mark.parametrize("fused", [False, True])
def test_multi_tensor_adamw_over_two_meshes(fused):
    assert run_on_ranks(4, _optimizer_over_meshes, fused) == [True] * 4
