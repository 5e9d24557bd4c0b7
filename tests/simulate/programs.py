"""The program the simulation tests run: examples/gpt.py's GPT laid out by examples/gpt_layouts.py, one training
step (forward and backward under loss_parallel and, with cp, context_parallel; then AdamW), the same code in a
real gloo world and in a simulated one."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from dtensor_plus.layouts import context_parallel, loss_parallel  # noqa: E402
from dtensor_plus.simulate import Wire, measure_step, simulate_step, simulated_world  # noqa: E402
from gpt import PRESETS, GPT  # noqa: E402
from gpt_layouts import Layout, make_mesh, make_optimizer, place_batch, place_model  # noqa: E402

BATCH = 4

# name -> (Layout fields, GPTConfig changes)
LAYOUTS = {
    "one device": (dict(), {}),
    "dp": (dict(dp=2), {}),
    "zero-1": (dict(dp=2, zero=1), {}),
    "zero-2": (dict(dp=2, zero=2), {}),
    "zero-3": (dict(dp=2, zero=3), {}),
    "tp": (dict(tp=2), {}),
    "tp+sp": (dict(tp=2, sp=True), {}),
    "cp-ring": (dict(cp=2), dict(attention="sdpa")),
    "cp-ulysses": (dict(cp=2, cp_kind="ulysses"), dict(attention="sdpa")),
    "dp x tp+sp zero-3": (dict(dp=2, tp=2, sp=True, zero=3), {}),
    "dp x tp zero-1": (dict(dp=2, tp=2, zero=1), {}),
    "ep": (dict(dp=2), dict(moe_experts=4, moe_every=1)),
    "ep, all tokens to experts 0 and 1": (dict(dp=2), dict(moe_experts=4, moe_every=1)),
}

# name -> how its real routers are made to route as the simulated world assumes, and that assumption
ROUTINGS = {
    "ep": ("balanced", "balanced"),
    # a zero gate: equal logits, and the stable top-2 takes the lowest experts, 0 and 1 (both on ep rank 0)
    "ep, all tokens to experts 0 and 1": ("zero gate", lambda source, sources, assignments, experts:
                                          [assignments // 2, assignments // 2] + [0] * (experts - 2)),
}


def build(name: str, config=None, batch: int = BATCH):
    """(one_step, model, optimizer) for layout ``name``, built in the current world (real or simulated), stepping
    on ``batch`` sequences of the config's block_size (a dp rank needs at least one: fewer rows than dp ranks
    gather the activations over dp)."""
    fields, changes = LAYOUTS[name]
    layout = Layout(**fields)
    config = (config or PRESETS["debug"]).replace(**changes)
    torch.manual_seed(0)
    model = GPT(config)
    if config.moe_experts:
        route_balanced(model) if ROUTINGS.get(name, ("balanced",))[0] == "balanced" else zero_gates(model)
    mesh = make_mesh(layout)
    place_model(model, mesh, layout)
    opt = make_optimizer(model, mesh, layout, 1e-3)
    tokens = torch.randint(0, config.vocab_size, (batch, config.block_size), generator=torch.Generator().manual_seed(0))
    targets = torch.roll(tokens, -1, 1)
    scope = functools.partial(context_parallel, "cp", layout.cp_kind) if layout.cp > 1 else contextlib.nullcontext
    place = functools.partial(place_batch, mesh=mesh, balance=layout.cp_balance)

    def one_step():
        with scope(), loss_parallel():
            loss = model.loss(place(tokens), place(targets))
            loss.backward()
        opt.step()

    return one_step, model, opt


def route_balanced(model) -> None:
    """Every router of ``model`` routes token n of its rank's rows to experts n, n+1, ..., n+k-1 (mod E): each
    expert gets an equal share of every rank's assignments when E divides them, the routing a simulated world
    assumes by default (``expert_load="balanced"``). A real run routes by value; this forces the value, so the
    real ranks and the simulated one route alike and their all-to-alls can be compared exactly."""
    from dtensor_plus.layouts.moe_router import TopKRouter

    def balanced(router, inputs, routing):
        N, K = routing.expert_idx_NK.shape
        device = routing.expert_idx_NK.device
        idx_NK = (torch.arange(N, device=device)[:, None] + torch.arange(K, device=device)) % router.num_experts
        return dataclasses.replace(routing, expert_idx_NK=idx_NK)

    for module in model.modules():
        if isinstance(module, TopKRouter):
            module.register_forward_hook(balanced)


def zero_gates(model) -> None:
    """Every router's gate weight zero: each token's top-k are the k lowest experts (ties go to the lowest)."""
    from dtensor_plus.layouts.moe_router import TopKRouter

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TopKRouter):
                module.gate.weight.zero_()


def measured(name: str):
    """On a real rank: the record of one real step (collectives, memory, FLOPs), from an empty plan cache as a
    simulated world starts (a rank of the test pool keeps the plans of earlier tests)."""
    from dtensor_plus.dispatch import clear_cache

    clear_cache()
    one_step, model, opt = build(name)
    return measure_step(one_step, models=[model], optimizers=[opt])


def simulated(name: str, world_size: int, rank: int, config=None, batch: int = BATCH):
    """In this process: rank ``rank`` of a simulated ``world_size``-rank world doing the same step."""
    expert_load = ROUTINGS[name][1] if name in ROUTINGS else "balanced"
    with simulated_world(world_size, rank, expert_load=expert_load) as world:
        one_step, model, opt = build(name, config, batch)
        return simulate_step(world, one_step, models=[model], optimizers=[opt])


# -- pipeline parallelism: examples/pipeline_gpt.py's stages, one schedule step (forward, backward, AdamW) --------

PIPELINES = {  # name -> (Layout fields, schedule, the head tied to the token embedding)
    "pp 1f1b tied": (dict(), "1f1b", True),
    "pp x dp zero-1 zb_h1": (dict(dp=2, zero=1), "zb_h1", False),
}


def pipeline_ties(name: str, pp: int) -> dict | None:
    """What a simulated pipeline rank is told about weights tied across stages (a real one learns it from every
    rank's declarations): the tied embedding and head live on the first and the last pp rank."""
    return {"tok_emb.weight": [0, pp - 1]} if PIPELINES[name][2] else None


def build_pipeline(name: str, pp: int = 2, config=None):
    import pipeline_gpt
    from dtensor_plus.layouts.pipeline import PipelineSchedule, PipelineStage, build_schedule, find_shared_parameters

    fields, schedule, tied = PIPELINES[name]
    layout = Layout(**fields)
    config = config or PRESETS["debug"]
    mesh = pipeline_gpt.make_pp_mesh(pp, layout.dp, layout.tp)
    torch.manual_seed(0)
    model = GPT(config)
    if tied:
        model.head.weight = model.tok_emb.weight  # (V, D) both: the gradient summed over the two stages' ranks
    plan = build_schedule(schedule, pp, 4, stages_per_rank=2)
    pieces = pipeline_gpt.split_gpt(model, plan.num_stages)
    shared = find_shared_parameters(pieces)
    pp_rank = mesh.get_local_rank("pp")
    mine = [pipeline_gpt.place_stage(pieces[s], mesh, sp=layout.sp, zero=layout.zero) for s in plan.stages_of(pp_rank)]
    stages = [PipelineStage(piece, s, plan.num_stages, mesh, shared_parameters=shared[s])
              for piece, s in zip(mine, plan.stages_of(pp_rank))]
    params = list({id(p): p for piece in mine for p in piece.parameters()}.values())
    opt = pipeline_gpt._make_optimizer(params, mesh, layout.zero, 1e-3, 0.1)
    pipe = PipelineSchedule(stages, plan, loss_fn=pipeline_gpt.gpt_loss, optimizer=opt)
    tokens = torch.randint(0, config.vocab_size, (8, config.block_size), generator=torch.Generator().manual_seed(0))
    targets = torch.roll(tokens, -1, 1)

    def one_step():
        with loss_parallel():
            pipe.step(pipeline_gpt._place_batch(tokens, mesh), target=pipeline_gpt._place_batch(targets, mesh))

    return one_step, mine, [opt] if opt is not None else []


def measured_pipeline(name: str, pp: int = 2):
    from dtensor_plus.dispatch import clear_cache

    clear_cache()
    one_step, stages, opts = build_pipeline(name, pp)
    return measure_step(one_step, models=stages, optimizers=opts)


def simulated_pipeline(name: str, pp: int, world_size: int, ranks):
    """The records of ``ranks``, simulated in this order in worlds sharing one ``Wire`` (a stage learns its input's
    spec from the header its previous stage's simulation posted): simulate the pp ranks in pp order."""
    wire = Wire()
    out = {}
    for rank in ranks:
        with simulated_world(world_size, rank, wire=wire, pipeline_ties=pipeline_ties(name, pp)) as world:
            one_step, stages, opts = build_pipeline(name, pp)
            out[rank] = simulate_step(world, one_step, models=stages, optimizers=opts)
    return out
