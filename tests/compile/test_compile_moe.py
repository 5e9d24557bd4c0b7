"""torch.compile over mixture-of-experts with expert parallelism (layouts/moe.py) on real gloo ranks.

A model Linear -> MoE (4 experts, top-2) -> Linear under ``replicate`` + ``expert_parallel`` on one 2-rank mesh dim,
compiled under aot_eager (CPU fp32), gives eager's loss, every parameter gradient and the input gradient over
three steps. The MoE layer itself runs eagerly: exactly one counted graph break (``MoE.forward`` is
``torch._dynamo.disable``d, layouts/moe.py "Under torch.compile": its dispatch needs split sizes on the host),
two graphs (before and after it), no recompilation on later steps. ``fullgraph=True`` therefore raises.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dtensor_plus import Shard, distribute_tensor, init_device_mesh
from dtensor_plus.layouts import replicate
from dtensor_plus.layouts.moe import MoE, expert_parallel
from dtensor_plus.testing import run_on_ranks

T, D, F_HIDDEN = 3, 8, 12


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(D, D), nn.Linear(D, D)
        self.moe = MoE(D, F_HIDDEN, 4, 2, aux_loss_coef=0.1, z_loss_coef=0.01)

    def forward(self, x, y):
        return F.mse_loss(self.out(self.moe(self.inp(x))), y) + self.moe.aux_loss


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")


def _expert_parallel_steps(fullgraph):
    import torch._dynamo
    import torch._dynamo.testing

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    net = expert_parallel(replicate(Net(), mesh, "dp"), mesh, ep_mesh_dim="dp")
    eager = copy.deepcopy(net)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(net, backend=counter, fullgraph=fullgraph)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        whole_x, whole_y = torch.randn(4, T, D, generator=gen), torch.randn(4, T, D, generator=gen)
        x, eager_x = (distribute_tensor(whole_x, mesh, [Shard(0)], src_data_rank=None).requires_grad_() for _ in "ab")
        y = distribute_tensor(whole_y, mesh, [Shard(0)], src_data_rank=None)
        try:
            loss = compiled(x, y)
        except torch._dynamo.exc.Unsupported as error:
            return "Unsupported", "torch.compiler.disable" in str(error)
        eager_loss = eager(eager_x, y)
        loss.backward()
        eager_loss.backward()
        _close(loss.full_tensor(), eager_loss.full_tensor(), f"step {step} loss")
        _close(x.grad.full_tensor(), eager_x.grad.full_tensor(), f"step {step} input gradient")
        for (name, p), q in zip(net.named_parameters(), eager.parameters()):
            if name.startswith("moe.experts"):  # the others are replicate's: eager leaves them Partial (reduced
                # later), compiled Replicate, the same global gradient (layouts/data.py's gradient hooks under
                # compile are the data-parallel work's, not this test's)
                assert p.grad.placements == q.grad.placements, (name, p.grad.placements, q.grad.placements)
            _close(p.grad.full_tensor(), q.grad.full_tensor(), f"step {step} {name}.grad")
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    return counter.frame_count, sum(breaks.values()), all("torch.compiler.disable" in reason for reason in breaks)


def test_expert_parallel_moe_compiles_around_the_layer_equal_to_eager():
    # two graphs (around the MoE layer), one break (the layer itself, eager), none added by later steps
    assert run_on_ranks(2, _expert_parallel_steps, False, timeout=300) == [(2, 1, True)] * 2


@pytest.mark.slow
def test_expert_parallel_moe_refuses_fullgraph():
    assert run_on_ranks(2, _expert_parallel_steps, True, timeout=300) == [("Unsupported", True)] * 2
