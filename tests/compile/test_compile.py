"""torch.compile over DTensor programs on real gloo ranks: equal to eager, no graph break, no recompilation.

A function of DTensors and a tensor-parallel MLP (forward and backward) compile with ``fullgraph=True`` under
``aot_eager``; their graphs hold local aten ops and functional collectives only (docs/architecture.md, "Under
torch.compile"). Inductor compiles the MLP too, but its C++ build takes a minute on a loaded CPU: marked slow.
"""

import copy

import pytest
import torch
import torch.nn as nn

from dtensor_plus import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh
from dtensor_plus.layouts import ColwiseParallel, RowwiseParallel, parallelize_module
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.testing.compiling import counted_compile, graph_breaks


# -- a function of DTensors -------------------------------------------------------------------------------------


def _program(x, w):
    y = (x @ w).relu()  # x Shard(1) @ w Shard(0): Partial, reduced before relu (one all-reduce)
    z = y.redistribute(placements=[Shard(0)])  # Replicate -> Shard(0): a local slice
    return (z * 2 + 1).sum()  # Partial, reduced when read


def _function_of_dtensors():
    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(0)
    whole_x, whole_w = torch.randn(6, 8, generator=gen), torch.randn(8, 4, generator=gen)

    def leaves():
        return (distribute_tensor(whole_x.clone().requires_grad_(), mesh, [Shard(1)]),
                distribute_tensor(whole_w.clone().requires_grad_(), mesh, [Shard(0)]))

    x, w = leaves()
    eager = _program(x, w)
    eager.backward()
    compiled, counter, code = counted_compile(_program, keep_code=True, fullgraph=True)
    for _ in range(2):  # the second call must reuse the graph
        cx, cw = leaves()
        out = compiled(cx, cw)
        out.backward()
        assert isinstance(out, DTensor) and out.placements == eager.placements
        torch.testing.assert_close(out.full_tensor(), eager.full_tensor(), rtol=1e-6, atol=1e-6)
        for a, b in ((cx, x), (cw, w)):
            assert a.grad.placements == b.grad.placements
            torch.testing.assert_close(a.grad.full_tensor(), b.grad.full_tensor(), rtol=1e-6, atol=1e-6)
    forward = code[0]
    return counter.frame_count, graph_breaks(), "_c10d_functional.all_reduce" in forward, "c10d.allreduce_" in forward


def test_function_of_dtensors_compiles_equal_to_eager():
    for frames, breaks, functional, in_place in run_on_ranks(2, _function_of_dtensors, timeout=120):
        assert (frames, breaks) == (1, 0)  # one graph, no break, no recompilation on the second call
        assert functional and not in_place  # the collective is the functional one, not c10d's in-place call


# -- a tensor-parallel MLP, forward and backward --------------------------------------------------------------------


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _tensor_parallel_mlp(backend):
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model = _MLP()
    parallelize_module(model, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    eager_model = copy.deepcopy(model)
    compiled, counter, _ = counted_compile(model, backend, fullgraph=True)
    for step in range(2):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        out, eager = compiled(x), eager_model(x)
        torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
        out.pow(2).sum().backward()
        eager.pow(2).sum().backward()
        for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
            assert p.grad.placements == q.grad.placements, name
            torch.testing.assert_close(p.grad.full_tensor(), q.grad.full_tensor(), rtol=1e-6, atol=1e-6, msg=name)
    return counter.frame_count, graph_breaks()


def test_tensor_parallel_mlp_compiles_equal_to_eager():
    assert run_on_ranks(2, _tensor_parallel_mlp, "aot_eager", timeout=120) == [(1, 0)] * 2


@pytest.mark.slow
def test_tensor_parallel_mlp_compiles_with_inductor():
    assert run_on_ranks(2, _tensor_parallel_mlp, "inductor", timeout=600) == [(1, 0)] * 2


# -- what eager checks across ranks by reading values: checked in the graph, at run time --------------------------


def _guessing_from_local(x):
    # from_local without shape= takes even blocks; eager checks them across ranks at first use, a graph at run time
    return DTensor.from_local(x.to_local() * 2, x.device_mesh, [Shard(0)]).full_tensor()


def _from_local_guesses_in_the_graph(rows_per_rank):
    mesh = init_device_mesh("cpu", (2,))
    rank = torch.distributed.get_rank()
    x = DTensor.from_local(torch.arange(rows_per_rank[rank] * 2.0).reshape(-1, 2), mesh, [Shard(0)],
                           shape=(sum(rows_per_rank), 2))
    compiled, counter, _ = counted_compile(_guessing_from_local, fullgraph=True)
    try:
        out = compiled(x)
    except RuntimeError as e:
        return str(e)
    torch.testing.assert_close(out, torch.cat([torch.arange(n * 2.0).reshape(-1, 2) for n in rows_per_rank]) * 2)
    return counter.frame_count, graph_breaks()


def test_from_local_without_shape_compiles_and_checks_even_blocks_at_run_time():
    assert run_on_ranks(2, _from_local_guesses_in_the_graph, (3, 3), timeout=120) == [(1, 0)] * 2
    for message in run_on_ranks(2, _from_local_guesses_in_the_graph, (3, 2), timeout=120):  # uneven: every rank raises
        assert "takes each Shard dim as even blocks" in message and "pass shape=" in message


def _times_plain(x, plain):
    return (x * plain).full_tensor()


def _plain_tensor_joins(differs_on_rank_1):
    mesh = init_device_mesh("cpu", (2,))
    x = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])
    plain = torch.full((4, 2), 3.0)
    if differs_on_rank_1 and torch.distributed.get_rank() == 1:
        plain[2, 1] = 4.0
    compiled, counter, _ = counted_compile(_times_plain, fullgraph=True)
    try:
        out = compiled(x, plain)
    except RuntimeError as e:
        return str(e)
    torch.testing.assert_close(out, torch.full((4, 2), 3.0))
    return counter.frame_count, graph_breaks()


def test_plain_tensor_joining_compiles_and_checks_values_at_run_time():
    assert run_on_ranks(2, _plain_tensor_joins, False, timeout=120) == [(1, 0)] * 2
    for message in run_on_ranks(2, _plain_tensor_joins, True, timeout=120):  # one element differs: every rank raises
        assert "differs between ranks" in message and "make it a DTensor first" in message
