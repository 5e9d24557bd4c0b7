"""torch.compile over the MoE layer's options under expert parallelism (layouts/moe.py): the token all-to-alls
pipelined in chunks (``dispatch_chunks``), FasterMoE's shadowed experts, DeepSeek-V3's balancing bias and its
shared experts; on 2 ranks, aot_eager, CPU fp32, three steps (forward, backward, SGD step, balance-bias update).

As for the plain layer (tests/compile/test_compile_moe.py), the MoE layer runs eagerly inside the compiled model:
``MoE.forward`` is ``torch._dynamo.disable``d, because its token dispatch needs the split sizes on the host (the
number of tokens each rank sends each expert is data, and a graph cannot hold host values it computes). That
break is inherent; each option adds none: exactly one counted graph break, two graphs (before and after the
layer), no recompilation on later steps. Loss, input gradient, every parameter gradient and every updated
parameter equal eager's and one device's.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dtensor_plus import DTensor, Shard, distribute_tensor, init_device_mesh
from dtensor_plus.layouts import replicate
from dtensor_plus.layouts.moe import MoE, expert_parallel
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.testing.compiling import counted_compile, graph_breaks

T, D, F_HIDDEN, TOL = 3, 8, 12, 1e-5
OPTIONS = {
    "dispatch_chunks": dict(dispatch_chunks=2),
    "shadowed": dict(),  # expert 0 shadowed on every rank, set below
    "balance_bias": dict(balance_rate=0.1),
    "shared_experts": dict(shared_hidden=6),
}


class Net(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.inp, self.out = nn.Linear(D, D), nn.Linear(D, D)
        self.moe = MoE(D, F_HIDDEN, 4, 2, aux_loss_coef=0.1, z_loss_coef=0.01, **options)

    def forward(self, x, y):
        return F.mse_loss(self.out(self.moe(self.inp(x))), y) + self.moe.aux_loss


def _whole(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _steps(run, net, place):
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    record = []
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        x = place(torch.randn(5, T, D, generator=gen)).requires_grad_()  # 5 rows: uneven over 2 ranks
        y = place(torch.randn(5, T, D, generator=gen))
        loss = run(x, y)
        loss.backward()
        record += [_whole(loss), _whole(x.grad)] + [_whole(p.grad) for p in net.parameters()]
        optimizer.step()
        optimizer.zero_grad()
        if net.moe.router.balance_rate is not None:
            net.moe.update_balance_bias()
        record += [_whole(p).detach().clone() for p in net.parameters()]
    return record


def _option_compiled(option):
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    single = Net(**OPTIONS[option])
    if option == "shadowed":
        single.moe.shadowed = (0,)
    eager, net = (expert_parallel(replicate(copy.deepcopy(single), mesh, "dp"), mesh, ep_mesh_dim="dp")
                  for _ in range(2))
    compiled, counter, _ = counted_compile(net)
    place = lambda whole: distribute_tensor(whole, mesh, [Shard(0)], src_data_rank=None)  # noqa: E731
    got = _steps(compiled, net, place)
    for reference in (_steps(eager, eager, place), _steps(single, single, lambda whole: whole)):
        for i, (a, b) in enumerate(zip(got, reference, strict=True)):
            torch.testing.assert_close(a, b, rtol=TOL, atol=TOL, msg=lambda m: f"{option}, value {i}: {m}")
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    return counter.frame_count, graph_breaks(), all("torch.compiler.disable" in reason for reason in breaks)


@pytest.mark.slow
@pytest.mark.parametrize("option", list(OPTIONS))
def test_moe_option_compiles_around_the_layer_equal_to_eager_and_one_device(option):
    # two graphs (around the MoE layer), one break (the layer, eager by design), none added by later steps
    assert run_on_ranks(2, _option_compiled, option, timeout=600) == [(2, 1, True)] * 2
