"""torch.compile over the sequence-parallel attention schemes beyond the plain ring and Ulysses
(tests/compile/test_compile_cp.py has those): striped and DistFlashAttn load balancing of the ring, USP (Ulysses
inside a ring), LoongTrain's double ring and its head-context 2-D attention (double ring x Ulysses).

An attention layer (q, k, v, output projections, causal SDPA, 2 heads) on a sequence sharded over the context
mesh dims, three training steps (forward, loss, backward, SGD step) with ``context_parallel`` entered around the
compiled call (layouts/context_parallel.py, "Under torch.compile"), backend aot_eager, CPU fp32: the compiled
model's output, loss, input gradient, every parameter gradient and every updated parameter equal eager's and one
device's; one graph (forward and backward), no graph break, no recompilation on steps 2 and 3 (``fullgraph=True``:
a break would raise); every rank of each group issues the same collectives in the same order in its compiled
graphs (aot_eager's min-cut partitioner, the graphs kept). Sizes: sequence 12 on 2 ranks (6 a rank) and on 4 (3 a
rank, odd), 16 on 8.

The double ring (and LoongTrain, which nests it) hung compiled on 4 ranks: AOTAutograd's CSE merged a backward
ring shift with an identical forward one on the ranks whose causal blocks made them identical only
(traced_collectives._ring_shift now keeps every shift apart).
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dtensor_plus import Shard, distribute_module, distribute_tensor, init_device_mesh
from dtensor_plus.layouts import context_parallel
from dtensor_plus.layouts.context_parallel import striped_placement
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.testing.compiling import collective_sequences, counted_compile, graph_breaks, mismatched_collectives

B, H, HEAD_DIM, STEPS, LR = 2, 2, 4, 3, 0.1
D = H * HEAD_DIM
# scheme: (mesh shape, mesh dim names, sequence length, context_parallel arguments)
SCHEMES = {
    "striped": ((2,), ("cp",), 12, dict(mesh_dim="cp", load_balance="striped")),
    "distflash": ((2,), ("cp",), 12, dict(mesh_dim="cp", load_balance="distflash")),
    "usp": ((2, 2), ("ring", "ulysses"), 12, dict(mesh_dim=("ring", "ulysses"), kind="usp")),
    "double_ring": ((2, 2), ("outer", "inner"), 12, dict(mesh_dim=("outer", "inner"), kind="double_ring")),
    "loongtrain": ((2, 2, 2), ("outer", "inner", "ulysses"), 16,
                   dict(mesh_dim=("outer", "inner", "ulysses"), kind="loongtrain")),
}


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


def _step(model, optimizer, x):
    """One training step; (output, loss, input gradient, parameter gradients, parameters after the step), whole."""
    out = model(x)
    loss = out.pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    optimizer.step()
    optimizer.zero_grad()
    whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    return ([whole(out), whole(loss), whole(x.grad)] + [whole(g) for g in grads]
            + [whole(p).detach().clone() for p in model.parameters()])


def _scheme_steps(scheme):
    shape, names, seq, cp_args = SCHEMES[scheme]
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    seq_placement = striped_placement(1, seq, shape[0]) if scheme == "striped" else Shard(1)
    torch.manual_seed(0)
    one_device = Attention()
    eager = distribute_module(copy.deepcopy(one_device), mesh)
    model = distribute_module(copy.deepcopy(one_device), mesh)
    from functorch.compile import min_cut_rematerialization_partition

    compiled, counter, code = counted_compile(model, keep_code=True, partition_fn=min_cut_rematerialization_partition,
                                              fullgraph=True)
    runs = {name: (m, torch.optim.SGD(p.parameters(), lr=LR))
            for name, m, p in (("one device", one_device, one_device), ("eager", eager, eager),
                               ("compiled", compiled, model))}
    for step in range(STEPS):
        whole = torch.randn(B, seq, D, generator=torch.Generator().manual_seed(step))
        results = {"one device": _step(*runs["one device"], whole.clone().requires_grad_())}
        with context_parallel(**cp_args):
            for name in ("eager", "compiled"):
                x = distribute_tensor(whole, mesh, [seq_placement] * len(shape), src_data_rank=None)
                results[name] = _step(*runs[name], x.requires_grad_())
        for name in ("eager", "one device"):
            for i, (got, want) in enumerate(zip(results["compiled"], results[name])):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{scheme} step {step}, value {i}, against {name}: {m}")
    groups = [mesh.get_group(name) for name in names]
    return counter.frame_count, graph_breaks(), len(code), collective_sequences(code, groups)


# All slow: the suite's budget (tests/compile/test_compile_cp.py runs the plain ring and Ulysses by default).
@pytest.mark.parametrize("scheme", [
    pytest.param("striped", marks=pytest.mark.slow),
    pytest.param("distflash", marks=pytest.mark.slow),
    pytest.param("usp", marks=pytest.mark.slow),
    pytest.param("double_ring", marks=pytest.mark.slow),
    pytest.param("loongtrain", marks=pytest.mark.slow),
])
def test_attention_scheme_trains_compiled_equal_to_eager_and_one_device(scheme):
    world = 1
    for size in SCHEMES[scheme][0]:
        world *= size
    results = run_on_ranks(world, _scheme_steps, scheme, timeout=600)
    # one graph (forward + backward), no break (fullgraph), never recompiled
    assert [result[:3] for result in results] == [(1, 0, 2)] * world
    assert mismatched_collectives([result[3] for result in results]) == []
