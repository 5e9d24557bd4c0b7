"""torch.compile over HSDP / MiCS (layouts/zero_hybrid.py): examples/gpt.py's GPT, each block and the root
``fully_shard(..., mesh_dim=("replicate", "shard"))`` on a 2 x 2 mesh, batch 7 (uneven over the 4 ranks), three
AdamW steps, aot_eager, CPU fp32: the compiled model's loss, every gradient (and its placements) and every
updated parameter equal eager's and one device's; no graph break (``fullgraph=True``), no recompilation after
the first step.

Under compilation a unit's gather is a traced ``redistribute`` on the "shard" mesh dim (layouts/zero_compiled.py);
its backward reduce-scatters on "shard" and all-reduces on "replicate" (the two hops, in the backward graph),
where eager runs its hooks with both hops in flight.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dtensor_plus as dtp
from dtensor_plus import Shard
from dtensor_plus.layouts import fully_shard
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.testing.compiling import counted_compile, graph_breaks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

HSDP = ("replicate", "shard")
STEPS, TOL = 3, 1e-5


def _hsdp_compiled():
    from gpt import GPT, GPTConfig

    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=HSDP)
    torch.manual_seed(0)
    single = GPT(GPTConfig(vocab_size=64, block_size=16, num_layers=2, num_heads=2, dim=16, dropout=0.0))
    models = []
    for _ in range(2):  # eager, compiled
        model = copy.deepcopy(single)
        dtp.distribute_module(model, mesh)  # the causal-mask buffers: fully_shard places only parameters
        for block in model.blocks:
            fully_shard(block, mesh, mesh_dim=HSDP)
        fully_shard(model, mesh, mesh_dim=HSDP)
        models.append(model)
    eager, model = models
    compiled, counter, _ = counted_compile(model, fullgraph=True)
    runs = [(eager, eager, True), (compiled, model, True), (single, single, False)]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=False) for _, m, _ in runs]
    gen = torch.Generator().manual_seed(1)
    frames = []
    for step in range(STEPS):
        tokens, targets = (torch.randint(0, 64, (7, 16), generator=gen) for _ in range(2))
        values, grad_placements = [], []
        for (run, params, placed), optimizer in zip(runs, optimizers):
            whole = (lambda t: t.full_tensor()) if placed else (lambda t: t)  # noqa: E731
            x, y = ((dtp.distribute_tensor(t, mesh, [Shard(0), Shard(0)], src_data_rank=None) if placed else t)
                    for t in (tokens, targets))
            loss = F.cross_entropy(run(x).flatten(0, 1), y.flatten(0, 1))
            loss.backward()
            values.append([whole(loss)] + [whole(p.grad) for p in params.parameters()])
            grad_placements.append([p.grad.placements for p in params.parameters()] if placed else None)
            optimizer.step()
            optimizer.zero_grad()
            values[-1] += [whole(p).detach() for p in params.parameters()]
        want, got, one = values
        assert grad_placements[1] == grad_placements[0], f"step {step}: gradient placements differ from eager's"
        for reference, what in ((want, "eager"), (one, "one device")):
            for i, (a, b) in enumerate(zip(got, reference, strict=True)):
                torch.testing.assert_close(a, b, rtol=TOL, atol=TOL,
                                           msg=lambda m: f"step {step}, value {i}, against {what}: {m}")
        frames.append(counter.frame_count)
    return frames, graph_breaks()


@pytest.mark.slow
def test_hsdp_gpt_trains_compiled_equal_to_eager_and_one_device():
    for frames, breaks in run_on_ranks(4, _hsdp_compiled, timeout=600):
        assert breaks == 0
        # the root unit's pre-hook (its gather) and the forward: two graphs, both made on the first step only
        # (torch.compile(module) compiles hooks and forward as separate frames, tests/compile/test_compile_zero3.py)
        assert frames == [2] * STEPS
