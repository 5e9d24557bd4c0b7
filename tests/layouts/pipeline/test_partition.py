"""Balanced pipeline stages (partition.py, layer_costs.py, examples/balanced_pipeline_gpt.py).

The search against brute force over every cut and every policy per stage, on small random cost vectors: the
formula objective (sum + (m - 1) max, computed here by hand) and the simulator's step, both under a memory cap;
infeasible caps raise and name the least peak memory brute force finds. The branch and bound's lower bound never
passes the simulator.
The memory model: 1F1B's stage s keeps p - s microbatches, GPipe's m. The per-layer costs: simulated bytes equal
measured ones; a stage's kept bytes are the sum of its layers'. A GPT trained through balanced stages (with
recomputation on the stages the cap forces it on) on real gloo ranks equals one device.
"""

import copy
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtensor_plus.layouts.pipeline import PipelineSchedule, PipelineStage, build_schedule
from dtensor_plus.layouts.pipeline.layer_costs import measured_layer_costs, simulated_layer_costs
from dtensor_plus.layouts.pipeline.partition import LayerCost, evaluate_partition, least_peak_memory, partition_layers
from dtensor_plus.simulate import simulate_step, simulated_world
from dtensor_plus.testing import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))

POLICIES = ("none", "full")


@st.composite
def layer_costs(draw, max_layers=6):
    """Random layers: forward f, backward 2f + extra, "full" keeps less and recomputes f."""
    costs = []
    for i in range(draw(st.integers(1, max_layers))):
        f, kept = draw(st.integers(0, 6)), draw(st.integers(0, 9))
        costs.append(LayerCost(f"l{i}", f, 2 * f + draw(st.integers(0, 3)), draw(st.integers(0, 5)),
                               {"none": kept, "full": draw(st.integers(0, kept))}, {"full": f}))
    return costs


def _by_hand(costs, cuts, policies, schedule, m):
    """(formula, peak memory per stage) of cuts and policies, from the LayerCost fields alone."""
    p = len(cuts) - 1
    totals, memory = [], []
    for s, (i, j, policy) in enumerate(zip(cuts, cuts[1:], policies)):
        layers = costs[i:j]
        totals.append(sum(c.forward + c.backward + (c.recompute.get(policy, 0) if policy in c.activation_bytes else 0)
                          for c in layers))
        in_flight = min(p - s, m) if schedule == "1f1b" else m
        kept = sum(c.activation_bytes.get(policy, c.activation_bytes["none"]) for c in layers)
        transient = max(c.transient_bytes.get(policy, 0) if policy in c.activation_bytes else 0 for c in layers)
        memory.append(sum(c.state_bytes for c in layers) + in_flight * kept + transient)
    return sum(totals) + (m - 1) * max(totals), memory


def _every_partition(n, p):
    for inner in itertools.combinations(range(1, n), p - 1):
        for policies in itertools.product(POLICIES, repeat=p):
            yield (0, *inner, n), policies


@settings(max_examples=60, deadline=None)
@given(costs=layer_costs(), data=st.data(), schedule=st.sampled_from(["1f1b", "gpipe"]))
def test_formula_objective_is_optimal_against_brute_force(costs, data, schedule):
    n = len(costs)
    p, m = data.draw(st.integers(1, min(n, 4))), data.draw(st.integers(1, 5))
    cap = data.draw(st.one_of(st.none(), st.integers(0, 80)))
    options = [(_by_hand(costs, cuts, pols, schedule, m), cuts, pols) for cuts, pols in _every_partition(n, p)]
    fitting = [formula for (formula, memory), _, _ in options if cap is None or max(memory) <= cap]
    if not fitting:
        least = min(max(memory) for (_, memory), _, _ in options)
        with pytest.raises(ValueError, match=f"least peak any partition reaches is {least} bytes"):
            partition_layers(costs, p, m, schedule=schedule, memory_cap=cap, policies=POLICIES, objective="formula")
        return
    got = partition_layers(costs, p, m, schedule=schedule, memory_cap=cap, policies=POLICIES, objective="formula")
    assert got.formula == pytest.approx(min(fitting), abs=1e-9)
    formula, memory = _by_hand(costs, got.boundaries, got.policies, schedule, m)
    assert formula == pytest.approx(got.formula, abs=1e-9) and tuple(memory) == got.memory
    assert cap is None or got.peak_memory <= cap
    # the branch and bound's lower bound per stage: reach it, work m (F + BW), send the last gradient back
    lower = max(sum(got.forward[:s]) + m * (got.forward[s] + got.backward[s]) + sum(got.backward[:s])
                for s in range(p))
    assert lower <= got.step_time + 1e-9


@settings(max_examples=12, deadline=None)
@given(costs=layer_costs(max_layers=5), data=st.data())
def test_simulated_objective_is_optimal_against_brute_force(costs, data):
    n = len(costs)
    p, m = data.draw(st.integers(1, min(n, 3))), data.draw(st.integers(1, 4))
    cap = data.draw(st.one_of(st.none(), st.integers(10, 60)))
    steps = [part.step_time for part in (evaluate_partition(costs, cuts, m, policies=pols)
                                         for cuts, pols in _every_partition(n, p))
             if cap is None or part.peak_memory <= cap]
    if not steps:
        with pytest.raises(ValueError, match="no partition of"):
            partition_layers(costs, p, m, memory_cap=cap, policies=POLICIES)
        return
    got = partition_layers(costs, p, m, memory_cap=cap, policies=POLICIES)
    assert got.step_time == pytest.approx(min(steps), abs=1e-9)
    assert cap is None or got.peak_memory <= cap


def test_memory_model_and_clear_errors():
    costs = [LayerCost(f"l{i}", 1, 2, 10, {"none": 100, "full": 1}, {"full": 1}, {"full": 99}) for i in range(4)]
    one_f_one_b = evaluate_partition(costs, (0, 1, 2, 3, 4), 8)
    assert one_f_one_b.in_flight == (4, 3, 2, 1) and one_f_one_b.memory == (410, 310, 210, 110)
    gpipe = evaluate_partition(costs, (0, 2, 4), 3, schedule="gpipe", policies=("full", "none"))
    assert gpipe.in_flight == (3, 3) and gpipe.memory == (20 + 3 * 2 + 99, 20 + 3 * 200)
    # BPipe's point: with a cap, the first stage (4 in flight) recomputes, the last (1 in flight) need not
    capped = partition_layers(costs, 4, 8, memory_cap=300)
    assert capped.policies == ("full", "full", "none", "none") and capped.peak_memory <= 300
    with pytest.raises(ValueError, match="num_stages must be an int in \\[1, 4\\]"):
        partition_layers(costs, 5, 8)
    with pytest.raises(ValueError, match="balances .*gpipe.*1f1b.*got 'zb_v'"):
        partition_layers(costs, 2, 8, schedule="zb_v")
    with pytest.raises(ValueError, match="boundaries must rise strictly from 0 to the layer count 4"):
        evaluate_partition(costs, (0, 2, 2, 4), 8)
    with pytest.raises(ValueError, match="needs a 'none' entry"):
        LayerCost("x", 1, 1, activation_bytes={"full": 1})
    with pytest.raises(ValueError, match="finite and >= 0"):
        LayerCost("x", -1, 1)
    with pytest.raises(ValueError, match="least peak any partition reaches is 113 bytes.*Raise memory_cap"):
        partition_layers(costs, 4, 8, memory_cap=100)


def _tiny_gpt(num_layers=1, vocab_size=96):
    from gpt import GPTConfig

    return GPTConfig(vocab_size=vocab_size, block_size=6, num_layers=num_layers, num_heads=2, dim=8)


def test_layer_costs_simulated_bytes_equal_measured_and_add_up_over_a_stage():
    from balanced_pipeline_gpt import gpt_cost_model, split_gpt_at
    from gpt import GPT
    from pipeline_gpt import gpt_loss

    config = _tiny_gpt(num_layers=1)
    build = gpt_cost_model(config, micro_batch_size=2)
    simulated = simulated_layer_costs(build, policies=POLICIES)
    measured = measured_layer_costs(build, policies=POLICIES, repeats=1)
    for s, m in zip(simulated, measured):
        assert (s.name, s.state_bytes, dict(s.activation_bytes)) == (m.name, m.state_bytes, dict(m.activation_bytes))
    assert [c.name for c in simulated] == ["embed", "block0", "head"]
    assert set(simulated[0].activation_bytes) == {"none"} and set(simulated[1].activation_bytes) == set(POLICIES)
    assert simulated[1].activation_bytes["full"] < simulated[1].activation_bytes["none"]
    # full recomputation runs the forward again, up to the last op whose output backward needs (torch's checkpoint
    # stops there: the block's last matmul and residual add are not recomputed)
    assert 0 < simulated[1].recompute["full"] < simulated[1].forward
    with simulated_world(1, 0) as world:  # the whole model as one stage keeps the sum of its layers' bytes
        tokens, targets = torch.randint(0, 96, (2, 6)), torch.randint(0, 96, (2, 6))
        (stage,) = split_gpt_at(GPT(config), (0, 3))
        result = simulate_step(world, lambda: gpt_loss(stage(tokens), targets), models=[stage])
    assert result.memory["activations"] == sum(c.activation_bytes["none"] for c in simulated)
    assert result.flops == sum(c.forward for c in simulated)


def _train_balanced(boundaries, policies, schedule, batch_list, config_kwargs):
    """Train the GPT through ``boundaries``' stages on a pp mesh and as one process: losses and parameters."""
    import dtensor_plus as dtp
    from balanced_pipeline_gpt import split_gpt_at
    from gpt import GPT, GPTConfig
    from pipeline_gpt import gpt_loss

    config = GPTConfig(**config_kwargs)
    pp = torch.distributed.get_world_size()
    mesh = dtp.init_device_mesh("cpu", (pp,), mesh_dim_names=("pp",))
    torch.manual_seed(0)
    model = GPT(config)
    reference = copy.deepcopy(model)
    piece = split_gpt_at(model, boundaries, policies)[mesh.get_local_rank("pp")]
    plan = build_schedule(schedule, pp, 4)
    opt = torch.optim.AdamW(piece.parameters(), lr=1e-2, foreach=False)
    pipe = PipelineSchedule(PipelineStage(piece, mesh.get_local_rank("pp"), pp, mesh), plan, loss_fn=gpt_loss)
    single_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False)
    ref = dict(reference.named_parameters())
    for tokens, targets in batch_list:
        losses = []
        pipe.step(tokens, target=targets, losses=losses)
        single = gpt_loss(reference(tokens), targets)
        single.backward()
        if piece.is_last:
            torch.testing.assert_close(torch.stack(losses).mean(), single, atol=1e-5, rtol=1e-5)
        for name, p in piece.named_parameters():  # gradients before the step, then the stepped weights
            torch.testing.assert_close(p.grad, ref[piece.model_name(name)].grad, atol=1e-5, rtol=1e-5)
        for o in (opt, single_opt):
            o.step()
            o.zero_grad(set_to_none=True)
    for name, p in piece.named_parameters():
        torch.testing.assert_close(p, ref[piece.model_name(name)], atol=1e-5, rtol=1e-5)
    return True


@pytest.mark.parametrize("pp, schedule, policy", [
    (4, "1f1b", "full"),
    pytest.param(2, "gpipe", "selective", marks=pytest.mark.slow),
    pytest.param(3, "1f1b", "selective", marks=pytest.mark.slow),
])
def test_gpt_trained_through_balanced_stages_equals_one_device(pp, schedule, policy):
    from balanced_pipeline_gpt import gpt_cost_model
    from gpt import GPTConfig

    kwargs = dict(vocab_size=64, block_size=16, num_layers=4, num_heads=2, dim=8)  # vocab >> dim: a heavy head
    costs = simulated_layer_costs(gpt_cost_model(GPTConfig(**kwargs), micro_batch_size=2), policies=("none", policy))
    # a cap no partition fits without recomputation, but one with it does: the search must recompute
    cap = least_peak_memory(costs, pp, 4, schedule=schedule, policies=("none",)) - 1
    assert least_peak_memory(costs, pp, 4, schedule=schedule, policies=("none", policy)) <= cap
    plan = partition_layers(costs, pp, 4, schedule=schedule, policies=("none", policy), memory_cap=cap)
    assert policy in plan.policies and plan.peak_memory <= cap
    g = torch.Generator().manual_seed(1)
    batch_list = [(torch.randint(0, 64, (8, 16), generator=g), torch.randint(0, 64, (8, 16), generator=g))
                  for _ in range(2)]
    assert all(run_on_ranks(pp, _train_balanced, plan.boundaries, plan.policies, schedule, batch_list, kwargs,
                            timeout=120))
