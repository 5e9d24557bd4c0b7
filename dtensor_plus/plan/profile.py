"""What one microbatch costs one rank of one pipeline stage: FLOPs, collectives, memory, from the user's own code.

What is simulated: the workload's model with 1 and 2 layers, placed with the layout's tp / sp / cp on a world of
tp x cp ranks (``dtensor_plus.simulate``), running one microbatch (``workload.step``) and its optimizer step. The
difference of the two runs is one layer; the 1-layer run minus that layer is the rest (embeddings, final norm,
head, loss). A stage of k layers is the rest's share plus k layers: FLOPs, collective bytes and counts and state
memory are linear in the layers, so this extrapolation is exact for them (tests/plan/test_profile.py checks a
4-layer model simulated whole), and so is the peak of saved activations of a forward-then-backward step.

What is derived, not simulated again (so the search's thousands of layouts cost a handful of simulations, cached
by (workload, tp, sp, cp, micro_batch_size): gpt3-175b under tp 8 + sp takes ~3 s for its two simulations on
this 2-core VM, a derived profile ~0.1 ms):

- dp and ZeRO: the gradient sync is one all-reduce of the stage's gradient bytes over dp x cp ranks per step
  (ZeRO-1/2: reduce-scatter + all-gather of the parameters, the same bytes); ZeRO-3 all-gathers the parameters in
  forward and again in backward and reduce-scatters the gradients, per microbatch. State memory: ZeRO-1 divides
  the optimizer state by dp, ZeRO-2 also the gradients, ZeRO-3 also the parameters (plus two layers' gathered
  parameters: the one computing and the one prefetched).
- pp: the rest's parameters, FLOPs and collectives split by module: embedding modules (``nn.Embedding``) and the
  root's own parameters (the position embedding) go to the first stage, everything else (final norm, head, loss)
  to the last; the rest's saved activations go to the last stage (the logits; the embedding saves only indices).
  p2p bytes: the residual stream (micro_batch_size, seq_len, hidden) / cp (/ tp under sp) in the model's dtype.
- recompute: "full" keeps each layer's input only (plus one layer's activations while it is recomputed) and adds
  one more forward of the layers; "selective" recomputes the attention core, which sdpa (flash) attention does not
  save anyway: it changes nothing for such a model. offload: optimizer state leaves the device (cost.py times it).
- mixed precision: for a model in a 16-bit dtype the optimizer state is taken as mixed-precision Adam's (an fp32
  master copy and two fp32 moments: 12 bytes per parameter, DESIGN.md's ZeRO figures), not the 16-bit moments a
  plain AdamW of the 16-bit model would keep.

Simulator workaround: torch's FLOP counter has no formula for CPU flash attention
(``_scaled_dot_product_flash_attention_for_cpu`` and its backward), the kernel sdpa takes in a simulated world;
``_attention_flops_counted`` lends it the CUDA flash formulas (same math) during a simulation.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from .layout import ParallelLayout
from .workload import Workload

__all__ = ["StageProfile", "profile", "stage_layers", "simulate_layers", "LayerSplit"]

_EMPTY = MappingProxyType({})


@dataclass(frozen=True)
class StageProfile:
    """One microbatch through one pipeline stage on one rank (all bytes and FLOPs per rank).

    forward_flops / backward_flops: per microbatch (recompute_flops: the extra forward recomputation adds);
    *_attention_flops: the part of them in attention kernels (ops named "...attention...").
    microbatch_collectives: {(collective, mesh dim, phase): bytes sent per microbatch}; *_counts: calls.
    step_collectives: {(collective, mesh dim): bytes sent once per step} (dp gradient sync; ZeRO-1/2 gathers),
    step_counts: calls. parameter/gradient/optimizer bytes: state this rank holds (after ZeRO sharding);
    activation_bytes: saved for backward per microbatch in flight; activation_once_bytes: held once whatever the
    microbatches in flight (full recomputation: the layer being recomputed and the head's); p2p_bytes: sent to the next stage per
    microbatch (and the same gradient back). layers: this stage's layers; dp_group: ranks the gradients sync over.
    """

    layout: ParallelLayout
    stage: int
    layers: int
    forward_flops: float
    backward_flops: float
    recompute_flops: float
    forward_attention_flops: float = 0.0
    backward_attention_flops: float = 0.0
    microbatch_collectives: Mapping = field(default_factory=lambda: _EMPTY)
    microbatch_counts: Mapping = field(default_factory=lambda: _EMPTY)
    step_collectives: Mapping = field(default_factory=lambda: _EMPTY)
    step_counts: Mapping = field(default_factory=lambda: _EMPTY)
    parameter_bytes: int = 0
    gradient_bytes: int = 0
    optimizer_bytes: int = 0
    activation_bytes: int = 0
    activation_once_bytes: int = 0
    p2p_bytes: int = 0
    dp_group: int = 1

    @property
    def state_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes


@dataclass(frozen=True)
class LayerSplit:
    """The simulated costs of one rank, split into one layer and the rest (first stage's part, last stage's part).

    Each of ``layer``, ``first`` and ``last`` maps a quantity name to its value: "forward_flops", "backward_flops",
    "parameters", "gradients", "optimizer", "activations", and ("bytes"|"count", collective, mesh dim, phase)."""

    layer: Mapping
    first: Mapping
    last: Mapping
    dtype_bytes: int
    residual_elements: int  # elements of the residual stream (micro_batch_size, seq_len, hidden) of one rank


# -- simulation ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _attention_flops_counted():
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    lent = {aten._scaled_dot_product_flash_attention_for_cpu: aten._scaled_dot_product_flash_attention,
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
                aten._scaled_dot_product_flash_attention_backward}
    added = [op for op in lent if op not in flop_registry]
    for op in added:
        flop_registry[op] = flop_registry[lent[op]]
    try:
        yield
    finally:
        for op in added:
            flop_registry.pop(op, None)


def _sim_layout(layout: ParallelLayout) -> ParallelLayout:
    """The part of a layout that changes what one rank does per microbatch (dp, ZeRO, pp, ... are derived)."""
    return ParallelLayout(tp=layout.tp, cp=layout.cp, sequence_parallel=layout.sequence_parallel,
                          micro_batch_size=layout.micro_batch_size)


def run_simulation(workload: Workload, layout: ParallelLayout, num_layers: int, optimizer_step: bool = True):
    """(SimulatedStep, model facts) of rank 0 of a ``layout.world``-rank simulated world running the workload's
    model of ``num_layers`` layers for one microbatch (and its optimizer step); dp and ZeRO as the layout says."""
    import dtensor_plus as dtp
    from dtensor_plus.simulate import simulate_step, simulated_world

    sizes = [(name, layout.size(name)) for name in ("dp", "tp", "cp") if layout.size(name) > 1]
    names, shape = zip(*sizes) if sizes else (("dp",), (1,))
    with _attention_flops_counted(), simulated_world(layout.dp * layout.tp * layout.cp, 0) as world:
        mesh = dtp.init_device_mesh("cpu", shape, mesh_dim_names=names)
        model = workload.build(num_layers)
        optimizer = workload.place(model, mesh, layout)

        def one_step():
            workload.step(model, mesh, layout, layout.micro_batch_size)
            if optimizer_step:
                optimizer.step()

        result = simulate_step(world, one_step, models=[model], optimizers=[optimizer])
        facts = _model_facts(model)
    return result, facts


def _model_facts(model: nn.Module) -> dict:
    """Module names as the simulator's records spell them (root class, then the path) of the embeddings, the
    bytes of the parameters the first stage holds (embeddings' and the root's own), the parameters' dtype size."""
    from dtensor_plus.dtensor import DTensor

    root = type(model).__name__
    embeddings = {f"{root}.{name}" for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    first = [p for name, m in model.named_modules() if isinstance(m, nn.Embedding) for p in m.parameters(False)]
    first += list(model.parameters(recurse=False))
    local = [p._local_tensor if isinstance(p, DTensor) else p for p in first]
    param = next(model.parameters())
    return dict(embeddings=frozenset(embeddings), first_parameter_bytes=sum(t.untyped_storage().nbytes() for t in local),
                dtype_bytes=param.dtype.itemsize, parameter_count=sum(1 for _ in model.parameters()))


def _quantities(result, embeddings) -> tuple[Counter, Counter]:
    """(all, first-stage part) of one simulation as Counters of quantity name -> value."""
    total, first = Counter(), Counter()
    for (module, phase), flops in result.flops_by_module.items():
        total[f"{phase}_flops"] += flops
    for op, flops in result.flops_by_op.items():  # the attention core (what cp's ring shifts overlap)
        if "attention" in op:
            total["backward_attention_flops" if "backward" in op else "forward_attention_flops"] += flops
    for kind in ("parameters", "gradients", "optimizer", "activations"):
        total[kind] += result.memory.get(kind, 0)
    for c in result.collectives:
        for counter in (total, first) if c.module in embeddings else (total,):
            counter["bytes", c.collective, c.mesh_dim, c.phase] += c.bytes
            counter["count", c.collective, c.mesh_dim, c.phase] += 1
    return total, first


@functools.lru_cache(maxsize=256)
def simulate_layers(workload: Workload, tp: int, sequence_parallel: bool, cp: int, micro_batch_size: int) -> LayerSplit:
    """Simulate the workload with 1 and 2 layers under (tp, sp, cp, micro_batch_size): one layer and the rest.
    Cached: every layout with these four fields shares the two simulations."""
    layout = ParallelLayout(tp=tp, cp=cp, sequence_parallel=sequence_parallel, micro_batch_size=micro_batch_size)
    one, facts = run_simulation(workload, layout, 1)
    two, _ = run_simulation(workload, layout, 2)
    q1, first1 = _quantities(one, facts["embeddings"])
    q2, _ = _quantities(two, facts["embeddings"])
    layer = {k: q2[k] - q1[k] for k in q1.keys() | q2.keys()}
    rest = {k: q1[k] - layer[k] for k in q1.keys() | q2.keys()}
    # The first stage: embedding collectives and FLOPs (none in matmul terms), the embeddings' and root's params;
    # gradients and optimizer state in the same proportion as the parameters they belong to.
    share = facts["first_parameter_bytes"] / rest["parameters"] if rest.get("parameters") else 0.0
    first = {k: v for k, v in first1.items()}
    for kind in ("parameters", "gradients", "optimizer"):
        first[kind] = round(rest.get(kind, 0) * share)
    last = {k: rest.get(k, 0) - first.get(k, 0) for k in rest.keys() | first.keys()}
    shards = cp * (tp if sequence_parallel else 1)
    residual = micro_batch_size * workload.seq_len * workload.hidden // shards
    return LayerSplit(MappingProxyType(layer), MappingProxyType(first), MappingProxyType(last),
                      facts["dtype_bytes"], residual)


# -- deriving a stage -----------------------------------------------------------------------------------------


def stage_layers(workload: Workload, layout: ParallelLayout, stage: int) -> int:
    """Layers on pipeline rank ``stage``: num_layers over pp (v chunks per rank), the first ranks one more when
    it does not divide."""
    if not 0 <= stage < layout.pp:
        raise ValueError(f"stage {stage} out of range for pp={layout.pp}")
    base, extra = divmod(workload.num_layers, layout.pp)
    return base + (1 if stage < extra else 0)


def profile(workload: Workload, layout: ParallelLayout, stage: int = 0) -> StageProfile:
    """One microbatch through pipeline rank ``stage`` (0 first) of ``layout``, one rank's view (see the module
    docstring for what is simulated and what is derived)."""
    if workload.experts:
        raise NotImplementedError(
            f"profile({workload.name}): mixture-of-experts models are not profiled yet: their MoE blocks alternate "
            "with dense ones (so one layer is not the 2-layer run minus the 1-layer run) and ep's all-to-alls need a "
            "simulation with the ep ranks; plan the model with experts=0 (dense) for now")
    split = simulate_layers(workload, layout.tp, layout.sequence_parallel, layout.cp, layout.micro_batch_size)
    layers = stage_layers(workload, layout, stage)
    parts = [(split.layer, layers)]
    parts += [(split.first, 1)] if stage == 0 else []
    parts += [(split.last, 1)] if stage == layout.pp - 1 else []

    def total(key):
        return sum(part.get(key, 0) * n for part, n in parts)

    collectives, counts = Counter(), Counter()
    for key in {k for part, _ in parts for k in part if isinstance(k, tuple)}:
        kind, collective, mesh_dim, phase = key
        if collective == "all_reduce" and mesh_dim == "cp" and total(key) and _is_gradient_sync(split, key):
            continue  # cp's gradient reduction (replicate over cp): derived per step below, with dp's
        (collectives if kind == "bytes" else counts)[collective, mesh_dim, phase] += total(key)

    params, grads = total("parameters"), total("gradients")
    optimizer = total("optimizer")
    if split.dtype_bytes == 2:  # mixed-precision Adam: fp32 master + 2 fp32 moments, 12 B per 2 B parameter
        optimizer = 6 * params
    activations, activations_once = _activations(split, layers, stage, layout)
    forward, backward = total("forward_flops"), total("backward_flops")
    recompute = split.layer.get("forward_flops", 0) * layers if layout.recompute == "full" else 0.0

    step_collectives, step_counts = Counter(), Counter()
    group = layout.dp * layout.cp
    sync_dim = "dp" if layout.dp > 1 else "cp"
    if group > 1:
        if layout.zero == 3:
            # all-gather in forward and backward, reduce-scatter of the gradients: every microbatch
            collectives["all_gather", sync_dim, "forward"] += (group - 1) * params // group
            collectives["all_gather", sync_dim, "backward"] += (group - 1) * params // group
            collectives["reduce_scatter", sync_dim, "backward"] += (group - 1) * grads // group
            for phase in ("forward", "backward"):
                counts["all_gather", sync_dim, phase] += layers + 1
            counts["reduce_scatter", sync_dim, "backward"] += layers + 1
        elif layout.zero in (1, 2):
            step_collectives["reduce_scatter", sync_dim] += (group - 1) * grads // group
            step_collectives["all_gather", sync_dim] += (group - 1) * params // group
            step_counts["reduce_scatter", sync_dim] = step_counts["all_gather", sync_dim] = layers + 1
        else:
            step_collectives["all_reduce", sync_dim] += 2 * (group - 1) * grads // group
            step_counts["all_reduce", sync_dim] = layers + 1
    if layout.zero >= 1 and group > 1:
        optimizer = -(-optimizer // group)
    if layout.zero >= 2 and group > 1:
        grads = -(-grads // group)
    if layout.zero == 3 and group > 1:
        # the shard, plus two layers gathered whole (computing and prefetched)
        params = -(-params // group) + 2 * split.layer.get("parameters", 0)
    if layout.offload:
        optimizer = 0
    p2p = split.residual_elements * split.dtype_bytes if layout.pp > 1 else 0
    return StageProfile(
        layout=layout, stage=stage, layers=layers, forward_flops=float(forward), backward_flops=float(backward),
        recompute_flops=float(recompute), forward_attention_flops=float(total("forward_attention_flops")),
        backward_attention_flops=float(total("backward_attention_flops")),
        microbatch_collectives=MappingProxyType(dict(collectives)), microbatch_counts=MappingProxyType(dict(counts)),
        step_collectives=MappingProxyType(dict(step_collectives)), step_counts=MappingProxyType(dict(step_counts)),
        parameter_bytes=int(params), gradient_bytes=int(grads), optimizer_bytes=int(optimizer),
        activation_bytes=int(activations), activation_once_bytes=int(activations_once), p2p_bytes=int(p2p), dp_group=group,
    )


def _is_gradient_sync(split: LayerSplit, key) -> bool:
    """cp's all-reduces in backward are the gradient reduction of ``replicate`` over cp (ring attention moves
    k/v by ring shifts, not all-reduces)."""
    return key[3] == "backward"


def _activations(split: LayerSplit, layers: int, stage: int, layout: ParallelLayout) -> tuple[int, int]:
    """Saved-for-backward bytes (per microbatch in flight, held once) on this stage, by the recomputation policy."""
    per_layer = split.layer.get("activations", 0)
    rest = (split.first.get("activations", 0) if stage == 0 else 0)
    rest += split.last.get("activations", 0) if stage == layout.pp - 1 else 0
    if layout.recompute == "full":
        # each layer keeps its input; one layer's whole activations live while it is recomputed for backward
        return layers * split.residual_elements * split.dtype_bytes, per_layer + rest
    return layers * per_layer + rest, 0
