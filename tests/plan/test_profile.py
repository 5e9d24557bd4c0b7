"""profile(): a stage's costs extrapolated from the 1- and 2-layer simulations equal the whole model simulated
(examples/gpt.py's GPT, 4 layers), and the derived parts (pp stages, dp / ZeRO, recomputation) follow their rules."""

from collections import Counter
from dataclasses import replace

import pytest

from dtensor_plus.plan.layout import ParallelLayout
from dtensor_plus.plan.profile import _sim_layout, profile, run_simulation, simulate_layers, stage_layers
from dtensor_plus.plan.workload import GPT_PRESETS, gpt_workload

TINY = gpt_workload(dict(name="tiny-4", num_layers=4, dim=64, num_heads=4, block_size=32, vocab_size=256))


def _simulated_whole(layout):
    result, _ = run_simulation(TINY, _sim_layout(layout), TINY.num_layers)
    by_key = Counter()
    for c in result.collectives:
        by_key[c.collective, c.mesh_dim, c.phase] += c.bytes
    phases = Counter()
    for (_, phase), flops in result.flops_by_module.items():
        phases[phase] += flops
    return result, by_key, phases


@pytest.mark.parametrize("layout", [ParallelLayout(tp=2, sequence_parallel=True, micro_batch_size=2),
                                    ParallelLayout(tp=2), ParallelLayout(cp=2)], ids=str)
def test_extrapolated_profile_equals_the_whole_model_simulated(layout):
    prof = profile(TINY, layout)
    whole, collectives, flops = _simulated_whole(layout)
    assert (prof.forward_flops, prof.backward_flops) == (flops["forward"], flops["backward"])
    assert (prof.parameter_bytes, prof.gradient_bytes, prof.optimizer_bytes, prof.activation_bytes) == (
        whole.memory["parameters"], whole.memory["gradients"], whole.memory["optimizer"], whole.memory["activations"])
    if layout.cp > 1:  # cp's gradient all-reduce (backward, outside any op) moves to the per-step sync
        collectives.pop(("all_reduce", "cp", "backward"))
        assert prof.step_collectives[("all_reduce", "cp")] > 0
    assert dict(prof.microbatch_collectives) == dict(collectives)


def test_pipeline_stages_split_the_model():
    whole = profile(TINY, ParallelLayout(tp=2))
    stages = [profile(TINY, ParallelLayout(tp=2, pp=2), s) for s in range(2)]
    assert [s.layers for s in stages] == [2, 2]
    for name in ("forward_flops", "backward_flops", "parameter_bytes", "gradient_bytes", "activation_bytes"):
        assert sum(getattr(s, name) for s in stages) == getattr(whole, name), name
    # the head's matmuls are on the last stage, the embeddings' parameters on the first
    assert stages[1].forward_flops > stages[0].forward_flops
    assert stages[0].p2p_bytes == 1 * 32 * 64 * 4  # the residual stream (mbs 1, s 32, h 64) in fp32, whole (no sp)


def test_zero_stages_shard_state_and_dp_sync_is_derived():
    plain = profile(TINY, ParallelLayout(dp=4))
    assert plain.step_collectives == {("all_reduce", "dp"): 2 * 3 * plain.gradient_bytes // 4}
    z1, z2, z3 = (profile(TINY, ParallelLayout(dp=4, zero=z)) for z in (1, 2, 3))
    assert z1.optimizer_bytes == -(-plain.optimizer_bytes // 4) and z1.gradient_bytes == plain.gradient_bytes
    assert z2.gradient_bytes == -(-plain.gradient_bytes // 4)
    layer = simulate_layers(TINY, 1, False, 1, 1).layer["parameters"]  # one layer's parameters, unsharded
    assert z3.parameter_bytes == -(-plain.parameter_bytes // 4) + 2 * layer
    assert z3.microbatch_collectives[("all_gather", "dp", "forward")] == 3 * plain.parameter_bytes // 4


def test_full_recomputation_keeps_layer_inputs_and_adds_a_forward():
    none = profile(TINY, ParallelLayout())
    full = profile(TINY, ParallelLayout(recompute="full"))
    assert full.activation_bytes < none.activation_bytes
    assert full.recompute_flops > 0 and none.recompute_flops == 0


def test_uneven_layers_go_to_the_first_stages():
    assert [stage_layers(replace(TINY, num_layers=5), ParallelLayout(pp=2), s)
            for s in range(2)] == [3, 2]


def test_presets_hold_the_published_shapes():
    assert dict(GPT_PRESETS["megatron-1t"]) == dict(num_layers=128, dim=25600, num_heads=160, block_size=2048,
                                                    vocab_size=51200, dtype="bfloat16")
    with pytest.raises(ValueError, match="unknown GPT preset"):
        gpt_workload("gpt-5")


def test_moe_models_are_refused_not_mispriced():
    moe = replace(TINY, experts=4)
    with pytest.raises(NotImplementedError, match="mixture-of-experts"):
        profile(moe, ParallelLayout(dp=2, ep=2))
