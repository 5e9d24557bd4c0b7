"""torch.compile over 2-D (Optimus/SUMMA), 2.5-D (Tesseract) and 3-D tensor parallelism (layouts/tensor_2d.py,
layouts/tensor_3d.py, ops/summa.py incl. its reduce, ops/sharded_norm.py) on real gloo ranks, CPU fp32.

- A linear layer and a layer norm on a 2x2 grid: three SGD steps on a batch of 6 rows and a hidden width 5 that
  q = 2 does not divide; the compiled model's output, loss, input gradient, parameter gradients and updated
  parameters equal eager's and one device's; one graph, no break, no recompilation; and every rank of each
  group issues the same collectives in the same order in its compiled graphs. Under both of AOTAutograd's
  partitioners: the default one (default run; what a user-written aot_autograd backend gets) and the min-cut
  one (``-m slow``; torch.compile's "aot_eager"). SUMMA's reduces run as all-to-alls onto the root
  (traced_collectives._reduce) whose result a non-root never reads: the default partitioner dropped that
  all-to-all on non-roots (the root's then paired with the layer norm's all-reduce: wrong values) until
  every traced collective became an ordered effect (traced_collectives._collective_done). A root's panel is
  a copy of its block under tracing (a traced broadcast writes into its buffer: on a graph input, an input
  mutation).
- examples/gpt.py's GPT under examples/gpt_tensor_nd.py's plans (``-m slow``): 2-D on 4 ranks (aot_eager and
  Inductor), 2.5-D and 3-D on 8, two AdamW steps: losses, gradients and final parameters equal one device's and
  the eager run's, one graph, no break.

The layouts enter their rules around the compiled call (``with tensor_parallel_2d(grid)``), as
``context_parallel`` does; whether the SUMMA rules are in force is checked when Dynamo traces the forward
(tracing.constant_when_traced), not at every call.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, distribute_tensor
from dtensor_plus.layouts import loss_parallel, parallelize_module
from dtensor_plus.layouts.tensor_2d import Grid2D, LayerNorm2D, Linear2D, tensor_parallel_2d
from dtensor_plus.layouts.tensor_3d import Cube3D, tensor_parallel_3d
from dtensor_plus.mesh import init_device_mesh
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.testing.compiling import collective_sequences, counted_compile, graph_breaks, mismatched_collectives

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

TOL = 1e-5


def _whole(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _assert_close(got, want, what):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL, msg=lambda m: f"{what}, value {i}: {m}")


# -- a linear layer and a layer norm on the grid -------------------------------------------------------------------


class _LinearNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.ln = nn.Linear(3, 5), nn.LayerNorm(5)

    def forward(self, x):
        return self.ln(F.gelu(self.fc(x)))


def _linear_norm_steps(run, params, place, scope, input_grad):
    optimizer = torch.optim.SGD(params, lr=0.1)
    record = []
    for step in range(3):
        x = place(torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(step))).requires_grad_(input_grad)
        with scope():
            y = run(x)
            loss = y.pow(3).mean()
            whole_y = _whole(y).detach().clone()
            loss.backward()
        grads = [_whole(p.grad) for p in params] + ([_whole(x.grad)] if input_grad else [])
        optimizer.step()
        optimizer.zero_grad()
        record += [whole_y, _whole(y).detach(), _whole(loss), *grads, *(_whole(p).detach().clone() for p in params)]
    return record


def _linear_norm_compiled(input_grad, partitioner):
    from functorch.compile import min_cut_rematerialization_partition

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("row", "col"))
    grid = Grid2D()
    torch.manual_seed(0)
    single = _LinearNorm()
    eager, model = (parallelize_module(copy.deepcopy(single), mesh, {"fc": Linear2D(), "ln": LayerNorm2D()})
                    for _ in range(2))
    partition_fn = min_cut_rematerialization_partition if partitioner == "min_cut" else None
    compiled, counter, code = counted_compile(model, keep_code=True, partition_fn=partition_fn)
    place = lambda whole: distribute_tensor(whole, mesh, grid.activation(mesh, 3), src_data_rank=None)  # noqa: E731
    scope = lambda: tensor_parallel_2d(grid)  # noqa: E731
    got = _linear_norm_steps(compiled, list(model.parameters()), place, scope, input_grad)
    _assert_close(got, _linear_norm_steps(eager, list(eager.parameters()), place, scope, input_grad), "against eager")
    _assert_close(got, _linear_norm_steps(single, list(single.parameters()), lambda t: t, torch.enable_grad,
                                          input_grad), "against one device")
    assert len(code) == 2, f"expected one forward and one backward graph, got {len(code)}"
    sequences = collective_sequences(code, [mesh.get_group("row"), mesh.get_group("col")])
    return counter.frame_count, graph_breaks(), sequences


@pytest.mark.parametrize("input_grad, partitioner", [
    (True, "default"),
    pytest.param(True, "min_cut", marks=pytest.mark.slow),
    pytest.param(False, "min_cut", marks=pytest.mark.slow),
])
def test_linear_and_norm_on_the_grid_train_compiled_equal_to_eager_and_one_device(input_grad, partitioner):
    results = run_on_ranks(4, _linear_norm_compiled, input_grad, partitioner, timeout=600)
    assert [(frames, breaks) for frames, breaks, _ in results] == [(1, 0)] * 4  # one graph, no break, no recompile
    sequences = [per_group for _, _, per_group in results]
    assert all(ops for per_group in sequences for ops in per_group.values()), sequences  # SUMMA on both mesh dims
    assert mismatched_collectives(sequences) == []


# -- the GPT under each scheme ---------------------------------------------------------------------------------------

SCHEMES = {  # name: (world, mesh shape, mesh dim names)
    "2d": (4, (2, 2), ("row", "col")),
    "2.5d": (8, (2, 2, 2), ("depth", "row", "col")),
    "3d": (8, (2, 2, 2), ("seq", "batch", "hidden")),
}


def _gpt_steps(model, run, scope, place_targets, windows):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    record = []
    for window in windows:
        with scope(), loss_parallel():
            logits = run(window[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), place_targets(window[:, 1:]).flatten(0, 1))
            loss.backward()
        record += [_whole(loss)] + [_whole(p.grad) for p in model.parameters()]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return record + [_whole(p).detach() for p in model.parameters()]


def _gpt_compiled(scheme, backend):
    from gpt import GPT, PRESETS
    from gpt_tensor_nd import plan_2d, plan_3d

    _, shape, names = SCHEMES[scheme]
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    config = PRESETS["debug"].replace(dim=12, num_heads=2, vocab_size=13, num_layers=1)  # vocab 13: uneven
    config = config.replace(attention="sdpa") if scheme == "3d" else config  # as layouts/tensor_3d.py needs
    gen = torch.Generator().manual_seed(3)
    windows = [torch.randint(0, config.vocab_size, (4, 8), generator=gen) for _ in range(2)]
    torch.manual_seed(0)
    single = GPT(config)
    runs = []
    for compile_it in (False, True):
        model = copy.deepcopy(single)
        if scheme == "3d":
            cube = Cube3D()
            parallelize_module(model, mesh, plan_3d(cube))
            scope, targets_at = tensor_parallel_3d, cube.targets(mesh)
        else:
            grid = Grid2D(depth_mesh_dim="depth" if scheme == "2.5d" else None)
            parallelize_module(model, mesh, plan_2d(grid))
            scope, targets_at = (lambda grid=grid: tensor_parallel_2d(grid)), grid.tokens(mesh)
        dtp.distribute_module(model, mesh)  # the causal mask buffer, replicated
        run = model
        if compile_it:
            run, counter, _ = counted_compile(model, backend)
        place_targets = lambda t: distribute_tensor(t, mesh, targets_at, src_data_rank=None)  # noqa: E731
        runs.append(_gpt_steps(model, run, scope, place_targets, windows))
    eager, got = runs
    _assert_close(got, eager, f"{scheme} against eager")
    one = []
    optimizer = torch.optim.AdamW(single.parameters(), lr=1e-3)
    for window in windows:
        loss = F.cross_entropy(single(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten(0, 1))
        loss.backward()
        one += [loss.detach()] + [p.grad.clone() for p in single.parameters()]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _assert_close(got, one + [p.detach() for p in single.parameters()], f"{scheme} against one device")
    return counter.frame_count, graph_breaks()


@pytest.mark.slow
@pytest.mark.parametrize("scheme, backend", [("2d", "aot_eager"), ("2d", "inductor"), ("2.5d", "aot_eager"),
                                             ("3d", "aot_eager")])
def test_gpt_trains_compiled_equal_to_eager_and_one_device(scheme, backend):
    world = SCHEMES[scheme][0]
    assert run_on_ranks(world, _gpt_compiled, scheme, backend, timeout=600) == [(1, 0)] * world
