"""torch.compile of a fully_shard-ed GPT (ZeRO-3) equals eager: the loss and every gradient over several AdamW
steps (aot_eager, CPU fp32, 1e-6), with fullgraph=True (no graph break) and no recompilation after the first step.

Under compilation each unit's gather is a traced ``redistribute`` (layouts/zero_compiled.py); eager runs its own
hooks (local compute, prefetch, re-gather, reduce-scatter in flight). The two must agree step by step.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import dtensor_plus as dtp
from dtensor_plus.layouts import fully_shard
from dtensor_plus.layouts.data import shard_batch
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.testing.compiling import counted_compile, graph_breaks


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

STEPS = 3


def _sharded_gpt(mesh):
    from gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, num_layers=2, num_heads=2, dim=16, dropout=0.0))
    dtp.distribute_module(model, mesh)  # the causal-mask buffers: fully_shard places only parameters
    for block in model.blocks:
        fully_shard(block, mesh)
    fully_shard(model, mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)


def _compiled_equals_eager(batch):
    mesh = dtp.init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    eager, eager_opt = _sharded_gpt(mesh)
    model, opt = _sharded_gpt(mesh)
    compiled, counter, code = counted_compile(model, keep_code=True, fullgraph=True)  # fullgraph: a graph break raises
    gen = torch.Generator().manual_seed(1)
    frames = []
    for step in range(STEPS):
        tokens, targets = (torch.randint(0, 64, (batch, 16), generator=gen) for _ in range(2))
        x, y = shard_batch(tokens, mesh), shard_batch(targets, mesh)
        losses = []
        for net, optimizer in ((eager, eager_opt), (compiled, opt)):
            loss = F.cross_entropy(net(x).flatten(0, 1), y.flatten(0, 1))
            loss.backward()
            losses.append(loss.full_tensor())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6, msg=lambda m: f"step {step} loss: {m}")
        for (name, want), got in zip(eager.named_parameters(), model.parameters()):
            assert got.grad.placements == want.grad.placements, name
            torch.testing.assert_close(got.grad.full_tensor(), want.grad.full_tensor(), rtol=1e-6, atol=1e-6,
                                       msg=lambda m, name=name: f"step {step} {name}.grad: {m}")
        for optimizer in (eager_opt, opt):
            optimizer.step()
            optimizer.zero_grad()
        frames.append(counter.frame_count)
    # Graphs in the order compiled: the two forwards, then their backwards. The backward re-gathers the blocks'
    # weights (MUST_RECOMPUTE: no gathered whole saved from forward) and reduce-scatters their gradients.
    backward = "".join(code[2:])
    regathers = "_c10d_functional.all_gather_into_tensor" in backward
    return frames, graph_breaks(), len(code), regathers, "_c10d_functional.reduce_scatter_tensor" in backward


def test_fully_shard_gpt_compiles_equal_to_eager():
    # 7 rows over 2 ranks (4 + 3): uneven batches, the loss's mean over the global batch.
    for frames, breaks, graphs, regathers, reduce_scatters in run_on_ranks(2, _compiled_equals_eager, 7, timeout=300):
        assert breaks == 0
        assert graphs == 4 and regathers and reduce_scatters
        # Two graphs, both made on the first step and never again: torch.compile(module) runs the compiled
        # module's own _call_impl eagerly and compiles its hooks and its forward as separate frames, so the root
        # unit's pre-hook (the gather of the embeddings, final norm and head) is one graph, the forward another.
        assert frames == [2] * STEPS
