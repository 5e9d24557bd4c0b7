"""torch.compile over examples/gpt.py's GPT under the 4-rank context-parallel layouts that hung compiled
(``-m slow``, ~1 min each here): USP (ring=2 x Ulysses=2) and ring cp=4 with every block recomputed but its
attention (keep_attention), as benchmarks/compile_step.py places them (benchmarks/layout_setups_nd.py:
gradients replicated over the outer cp mesh dim, loss_parallel). Two AdamW steps, backend aot_eager's min-cut
partitioner with the graphs kept: the compiled loss and every parameter gradient equal eager's and one device's,
one graph, no break, and every rank of each group issues the same collectives in the same order.

Both hung before traced_collectives kept every ring shift apart from AOTAutograd's CSE (a backward shift
merged with an identical forward one on some ranks only) and made every traced collective an ordered effect.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dtensor_plus import DTensor
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.testing.compiling import collective_sequences, counted_compile, graph_breaks, mismatched_collectives

_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_ROOT / "examples"))
sys.path.append(str(_ROOT / "benchmarks"))  # last: benchmarks/kernels.py must not hide the installed kernels package

WORLD, TOL = 4, 1e-5


def _whole(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _steps(placed, run, windows):
    record = []
    for window in windows:
        tokens, targets = placed.inputs(window[:, :-1], window[:, 1:])
        with placed.loss_ctx():
            logits = run(tokens)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(0, 1))
            loss.backward()
        record += [_whole(loss)] + [_whole(p.grad) for p in placed.model.parameters()]
        placed.opt.step()
        placed.opt.zero_grad(set_to_none=True)
    return record


def _gpt_compiled(layout):
    from functorch.compile import min_cut_rematerialization_partition
    from gpt import GPT, PRESETS
    from layout_setups_nd import config_for, place_ours_nd

    config = config_for(layout, PRESETS["debug"].replace(dropout=0.0))
    gen = torch.Generator().manual_seed(3)
    windows = [torch.randint(0, config.vocab_size, (4, 9), generator=gen) for _ in range(2)]
    torch.manual_seed(0)
    single = GPT(config)
    runs = []
    for compile_it in (False, True):
        placed = place_ours_nd(layout, copy.deepcopy(single), WORLD)
        run = placed.model
        if compile_it:
            run, counter, code = counted_compile(placed.model, keep_code=True,
                                                 partition_fn=min_cut_rematerialization_partition)
        runs.append(_steps(placed, run, windows))
    eager, got = runs
    one = []
    optimizer = torch.optim.AdamW(single.parameters(), lr=placed.opt.defaults["lr"], weight_decay=0.1, foreach=False)
    for window in windows:
        loss = F.cross_entropy(single(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten(0, 1))
        loss.backward()
        one += [loss.detach()] + [p.grad.clone() for p in single.parameters()]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for want, what in ((eager, "eager"), (one, "one device")):
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            torch.testing.assert_close(a, b, rtol=TOL, atol=TOL, msg=lambda m: f"{layout} against {what}, {i}: {m}")
    mesh = next(p for p in placed.model.parameters() if isinstance(p, DTensor)).device_mesh
    groups = [mesh.get_group(dim) for dim in range(mesh.ndim)]
    return counter.frame_count, graph_breaks(), collective_sequences(code, groups)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["cp usp", "cp keep_attention"])
def test_gpt_under_context_parallelism_trains_compiled_equal_to_eager_and_one_device(layout):
    results = run_on_ranks(WORLD, _gpt_compiled, layout, timeout=600)
    assert [result[:2] for result in results] == [(1, 0)] * WORLD  # one graph, no break, no recompile
    assert mismatched_collectives([result[2] for result in results]) == []
