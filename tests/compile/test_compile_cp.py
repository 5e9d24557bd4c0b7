"""torch.compile over context parallelism on real gloo ranks: an attention layer whose sequence is sharded on "cp",
under ring, load-balanced (zigzag) ring and Ulysses attention, compiled with ``fullgraph=True`` (aot_eager, CPU
fp32), gives eager's output, loss, every parameter gradient and the input gradient over three steps, in one graph
with no break and no recompilation. The ring's graphs hold exactly eager's traffic (a ring shift is one
functional all-to-all with two non-zero splits, traced_collectives._ring_shift); Ulysses' compiled backward
holds 3 all-to-alls more than eager's (it recomputes the forward's head-sharded attention; not yet found why).

Not covered (layouts/context_parallel.py, "Under torch.compile"): ``context_parallel`` entered inside the compiled
code; it is unsupported (see there).
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dtensor_plus as dtp
from dtensor_plus import Shard, distribute_module, distribute_tensor, init_device_mesh
from dtensor_plus.layouts import context_parallel
from dtensor_plus.placements import StridedShard
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.testing.compiling import counted_compile, graph_breaks

B, T, H, HEAD_DIM = 2, 8, 2, 4
D = H * HEAD_DIM
STEPS = 3


class Attention(nn.Module):
    """Causal self-attention: (B, T, D) -> (B, T, D)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (linear(x).view(b, t, H, HEAD_DIM).transpose(1, 2) for linear in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, D))


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")


def _steps(compiled, model, eager_model, mesh, placements, around):
    """Three forward/backward steps of ``compiled`` and ``eager_model`` on the same inputs, each inside ``around()``;
    returns the eager run's collective counts (comm_mode) of the first step."""
    counts = None
    for step in range(STEPS):
        whole = torch.randn(B, T, D, generator=torch.Generator().manual_seed(step))
        x, eager_x = (distribute_tensor(whole, mesh, placements, src_data_rank=None).requires_grad_() for _ in "ab")
        with around():
            out = compiled(x)
            loss = out.pow(2).sum()
            loss.backward()
            with dtp.comm_mode() as comm:
                eager_out = eager_model(eager_x)
                eager_loss = eager_out.pow(2).sum()
                eager_loss.backward()
        counts = counts or comm
        assert out.placements == eager_out.placements
        _close(out.full_tensor(), eager_out.full_tensor(), f"step {step} output")
        _close(loss.full_tensor(), eager_loss.full_tensor(), f"step {step} loss")
        _close(x.grad.full_tensor(), eager_x.grad.full_tensor(), f"step {step} input gradient")
        for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
            assert p.grad.placements == q.grad.placements, name
            _close(p.grad.full_tensor(), q.grad.full_tensor(), f"step {step} {name}.grad")
    return counts


def _context_parallel_attention(kind, load_balance):
    """``context_parallel`` around the compiled call: one graph, no break, no recompilation over three steps; the
    forward and backward graphs hold as many all-to-alls as eager runs ring shifts (or Ulysses all-to-alls)."""
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
    torch.manual_seed(0)
    model = distribute_module(Attention(), mesh)
    eager_model = copy.deepcopy(model)
    compiled, counter, code = counted_compile(model, keep_code=True, fullgraph=True)
    placements = [StridedShard(1, 1, zigzag=True)] if load_balance else [Shard(1)]
    counts = _steps(compiled, model, eager_model, mesh, placements,
                    lambda: context_parallel("cp", kind, load_balance=load_balance))
    eager_moves = counts.count("ring_shift" if kind == "ring" else "all_to_all", "cp")
    traced_moves = [graph.count("_c10d_functional.all_to_all_single") for graph in code]  # forward, backward
    return counter.frame_count, graph_breaks(), len(code), sum(traced_moves), eager_moves


@pytest.mark.parametrize("kind, load_balance", [("ring", False), ("ulysses", False),
                                                pytest.param("ring", True, marks=pytest.mark.slow)])
def test_context_parallel_attention_compiles_equal_to_eager(kind, load_balance):
    for frames, breaks, graphs, traced_moves, eager_moves in run_on_ranks(
            2, _context_parallel_attention, kind, load_balance, timeout=300):
        assert (frames, breaks, graphs) == (1, 0, 2)  # one graph (forward + backward), never recompiled
        # Ring: a shift is one all-to-all, exactly eager's traffic. Ulysses (known gap, values equal): the compiled
        # backward moves q, k, v to heads once more than eager does (11 all-to-alls against 8; forward 4 = 4).
        assert traced_moves == eager_moves + (3 if kind == "ulysses" else 0) and eager_moves > 0
