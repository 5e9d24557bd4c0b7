"""examples/gpt.py's GPT cut into balanced pipeline stages: its layer sequence, their costs, the stages built
from the cuts ``partition_layers`` returns (with each stage's recomputation).

The GPT as a layer sequence: layer 0 the token and position embedding, layers 1..L the blocks, layer L+1 the
final norm and the head (the loss counted with it). Each layer is a ``GPTStage`` (pipeline_gpt.py) of its own
and a stage of layers [i, j) is one ``GPTStage`` holding them, so the costs are measured on exactly the modules
the pipeline runs::

    costs = simulated_layer_costs(gpt_cost_model(config, micro_batch_size=2))
    plan = partition_layers(costs, num_stages=4, n_microbatches=8, memory_cap=cap)
    stages = split_gpt_at(model, plan.boundaries, plan.policies)      # in place of split_gpt(model, 4)

``plan_gpt_stages`` is those first two lines for a config; ``plan_gpt_stages_apart`` runs it in a fresh process
(a simulated world cannot start in a process already in a process group): what ``train_gpt.py --pp N
--balanced`` trains.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dtensor_plus.layouts.pipeline.layer_costs import GPT_RECOMPUTE_PATTERNS, simulated_layer_costs  # noqa: E402
from dtensor_plus.layouts.pipeline.partition import (POLICIES, SUPPORTED_SCHEDULES, Partition,  # noqa: E402
                                                     partition_layers)
from dtensor_plus.layouts.recompute import checkpoint_modules  # noqa: E402
from gpt import GPT, GPTConfig  # noqa: E402
from pipeline_gpt import GPTStage, gpt_loss  # noqa: E402

__all__ = ["gpt_layers", "gpt_cost_model", "split_gpt_at", "even_gpt_boundaries", "plan_gpt_stages",
           "plan_gpt_stages_apart"]


def gpt_layers(model: GPT) -> list[tuple[str, GPTStage]]:
    """[("embed", ...), ("block0", ...), ..., ("head", ...)]: L + 2 layers sharing the model's Parameters."""
    L = model.config.num_layers
    return ([("embed", GPTStage(model, 0, 0, first=True, last=False))]
            + [(f"block{i}", GPTStage(model, i, 1, first=False, last=False)) for i in range(L)]
            + [("head", GPTStage(model, L, 0, first=False, last=True))])


def gpt_cost_model(config: GPTConfig, micro_batch_size: int, seq_len: int | None = None, seed: int = 0):
    """The ``build`` of ``simulated_layer_costs`` / ``measured_layer_costs`` for ``config``: its layers, one
    microbatch of tokens, the cross-entropy against random targets."""
    T = config.block_size if seq_len is None else seq_len

    def build():
        torch.manual_seed(seed)
        tokens = torch.randint(0, config.vocab_size, (micro_batch_size, T))
        targets = torch.randint(0, config.vocab_size, (micro_batch_size, T))
        return gpt_layers(GPT(config)), tokens, lambda logits: gpt_loss(logits, targets)

    return build


def split_gpt_at(model: GPT, boundaries, policies=None) -> list[GPTStage]:
    """The stages of ``model`` for cuts over its L + 2 layers (``Partition.boundaries``), each recomputing by its
    policy ("none", "full": each block whole, "selective": each block's attention core)."""
    L, boundaries = model.config.num_layers, tuple(boundaries)
    if len(boundaries) < 2 or boundaries[0] != 0 or boundaries[-1] != L + 2 or any(
            a >= b for a, b in zip(boundaries, boundaries[1:])):
        raise ValueError(f"boundaries must rise strictly from 0 to {L + 2} (embedding, {L} blocks, head), "
                         f"got {boundaries}")
    policies = ("none",) * (len(boundaries) - 1) if policies is None else tuple(policies)
    if len(policies) != len(boundaries) - 1:
        raise ValueError(f"one policy per stage: {len(boundaries) - 1} stages, got {policies}")
    stages = []
    for start, end, policy in zip(boundaries, boundaries[1:], policies):
        first_block = max(start - 1, 0)
        num_blocks = max(min(end, L + 1) - max(start, 1), 0)
        stage = GPTStage(model, first_block, num_blocks, first=start == 0, last=end == L + 2)
        if policy != "none" and num_blocks:
            checkpoint_modules(stage, GPT_RECOMPUTE_PATTERNS[policy], policy)
        stages.append(stage)
    return stages


def even_gpt_boundaries(num_layers: int, num_stages: int) -> tuple[int, ...]:
    """pipeline_gpt.split_gpt's cuts in layer indices: the blocks spread evenly, the embedding with the first
    stage's blocks, the head with the last's."""
    per, extra = divmod(num_layers, num_stages)
    cuts, block = [0], 0
    for s in range(num_stages - 1):
        block += per + (s < extra)
        cuts.append(block + 1)
    return (*cuts, num_layers + 2)


def plan_gpt_stages(config: GPTConfig, num_stages: int, n_microbatches: int, micro_batch_size: int,
                    seq_len: int | None = None, schedule: str = "1f1b", memory_cap: float | None = None) -> Partition:
    """``partition_layers``' cut of ``config``'s GPT into ``num_stages`` stages for ``schedule`` with
    ``n_microbatches`` of ``micro_batch_size`` sequences, from simulated per-layer costs (FLOPs and bytes: the
    same on every rank, so each rank plans the same cut without talking to the others). Without a
    ``memory_cap`` recomputation only slows a stage, so only "none" is costed (a third of the simulating)."""
    if schedule not in SUPPORTED_SCHEDULES:
        raise ValueError(f"balanced stages are planned for {SUPPORTED_SCHEDULES} (one stage per rank); got "
                         f"{schedule!r}: use --schedule 1f1b or gpipe with --balanced, or drop --balanced")
    if num_stages > config.num_layers + 2:
        raise ValueError(f"{num_stages} stages cannot each hold one of the {config.num_layers + 2} layers "
                         f"(embedding, {config.num_layers} blocks, head): use fewer stages or drop --balanced")
    policies = ("none",) if memory_cap is None else POLICIES
    costs = simulated_layer_costs(gpt_cost_model(config, micro_batch_size, seq_len), policies=policies)
    return partition_layers(costs, num_stages, n_microbatches, schedule=schedule, memory_cap=memory_cap,
                            policies=policies)


_PLAN_APART = """
import dataclasses, json, sys
from balanced_pipeline_gpt import plan_gpt_stages
from gpt import GPTConfig
request = json.loads(sys.argv[1])
print(json.dumps(dataclasses.asdict(plan_gpt_stages(GPTConfig(**request.pop("config")), **request))))
"""


def plan_gpt_stages_apart(config: GPTConfig, num_stages: int, n_microbatches: int, micro_batch_size: int,
                          seq_len: int | None = None, schedule: str = "1f1b") -> Partition:
    """``plan_gpt_stages`` in a fresh Python process, for a caller already in a process group (a torchrun rank):
    the simulated world the costs come from runs a fake process group of its own. Raises ValueError with the
    child's error when the planning fails (bad schedule, too many stages)."""
    request = dict(config=dataclasses.asdict(config), num_stages=num_stages, n_microbatches=n_microbatches,
                   micro_batch_size=micro_batch_size, seq_len=seq_len, schedule=schedule)
    here = Path(__file__).resolve().parent
    # none of the caller's torchrun variables: the child is a world of its own
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _PLAN_APART, json.dumps(request)], capture_output=True, text=True,
                          env=env)
    if done.returncode:
        raise ValueError(f"planning the balanced stages failed: {done.stderr.strip().splitlines()[-1]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return Partition(**{k: tuple(v) if isinstance(v, list) else v for k, v in found.items()})
