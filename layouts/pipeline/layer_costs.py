"""Per-layer costs for ``partition.py``: each layer of a model run alone for one microbatch, without and with each
recomputation policy, either simulated (FLOPs and bytes on the meta device, ``dtensor_plus.simulate``: any size,
no values) or measured on this machine (thread CPU time, the same byte counts on real tensors).

    def build():                       # called inside the simulated world (meta tensors) or as is
        layers = [("embed", embed), ("blocks.0", block0), ..., ("head", head)]
        return layers, tokens_of_one_microbatch, lambda logits: cross_entropy(logits, targets)

    costs = simulated_layer_costs(build, flops_per_second=1e12)     # or measured_layer_costs(build)

Layer i's output is layer i+1's input; the last layer's output goes to the loss (counted in its forward).
Recomputation is applied to a copy of each layer as ``checkpoint_modules(layer, pattern, policy)`` would apply it
to a stage holding the layer (``patterns``: a policy's glob over the layer's module names); a layer no pattern
matches does not offer the policy. What each record holds, per layer:

- forward / backward: FLOPs / ``flops_per_second`` (simulated) or the median thread CPU seconds of ``repeats``
  runs (measured); recompute[policy]: what the policy adds to forward + backward, charged to the backward (the
  recomputation, and on a real run the checkpoint's own overhead: its dispatch modes slow the forward too);
- activation_bytes[policy]: bytes autograd keeps from the forward to the backward (``SavedTensorTracker``: each
  storage once, parameters not counted); transient_bytes[policy]: what the layer's recomputation re-creates in
  its backward, activation_bytes["none"] - activation_bytes[policy] (derived: torch's checkpoint holds the
  recomputed tensors itself, outside the saved-tensor hooks a tracker sees);
- state_bytes: parameters, gradients and optimizer state (``state_memory``) after one ``optimizer`` step.

A layer's kept bytes add up over a stage when no layer keeps its own output that the next one also keeps (the
GPT's layers keep their inputs: LayerNorm, the embedding's indices); the tests check a GPT stage's sum.
"""

from __future__ import annotations

import copy
import fnmatch
import statistics
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch

from dtensor_plus.simulate import simulate_step, simulated_world
from dtensor_plus.simulate.memory import SavedTensorTracker, state_memory, storage_key

from .partition import POLICIES, LayerCost

__all__ = ["simulated_layer_costs", "measured_layer_costs", "GPT_RECOMPUTE_PATTERNS"]

# examples/gpt.py's blocks (as GPTStage pieces name them): the whole block, or its attention core.
GPT_RECOMPUTE_PATTERNS: Mapping[str, str] = MappingProxyType({"full": "blocks.*", "selective": "blocks.*.attn"})


def _adamw(params):
    return torch.optim.AdamW(params, foreach=False)


def simulated_layer_costs(build: Callable, *, policies=POLICIES, patterns: Mapping[str, str] = GPT_RECOMPUTE_PATTERNS,
                          flops_per_second: float = 1.0, optimizer: Callable = _adamw) -> list[LayerCost]:
    """Costs from a one-rank simulated world: ``build()`` runs inside it, so its modules and tensors are meta."""
    if not flops_per_second > 0:
        raise ValueError(f"flops_per_second must be > 0, got {flops_per_second!r}")
    with simulated_world(1, 0) as world:
        def record(step, models, optimizers):
            result = simulate_step(world, step, models=models, optimizers=optimizers)
            return result.flops / flops_per_second, result.memory["activations"], result.state_bytes

        return _layer_costs(build(), policies, patterns, optimizer, record, repeats=1)


def measured_layer_costs(build: Callable, *, policies=POLICIES, patterns: Mapping[str, str] = GPT_RECOMPUTE_PATTERNS,
                         repeats: int = 3, optimizer: Callable = _adamw) -> list[LayerCost]:
    """Costs timed on this machine: each layer's forward and backward, the median of ``repeats`` thread CPU
    times (a rank descheduled by a loaded machine does not count the time it waited)."""
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")

    def record(step, models, optimizers):
        tracker = SavedTensorTracker(skip_keys={storage_key(p) for m in models for p in m.parameters()})
        with tracker.hooks():
            start = time.thread_time()
            step()
            elapsed = time.thread_time() - start
        return elapsed, tracker.peak_bytes, sum(state_memory(models, optimizers).values())

    return _layer_costs(build(), policies, patterns, optimizer, record, repeats)


def _layer_costs(built, policies, patterns, optimizer, record, repeats: int) -> list[LayerCost]:
    layers, x, loss = built
    unknown = set(policies) - set(POLICIES)
    if unknown or "none" not in policies:
        raise ValueError(f"policies must include 'none' and be among {POLICIES}, got {tuple(policies)}")
    missing = [p for p in policies if p != "none" and p not in patterns]
    if missing:
        raise ValueError(f"no recomputation pattern for policies {missing}: pass patterns={{policy: glob}}")
    costs = []
    for index, (name, layer) in enumerate(layers):
        last = index == len(layers) - 1
        runs = {}
        for policy in policies:
            piece = _with_policy(layer, policy, patterns.get(policy))
            if piece is not None:
                runs[policy] = _run(piece, x, loss if last else None, optimizer, record, repeats)
        none = runs["none"]
        costs.append(LayerCost(
            name, none["forward"], none["backward"], none["state"],
            activation_bytes={p: r["kept"] for p, r in runs.items()},
            recompute={p: max(r["forward"] + r["backward"] - none["forward"] - none["backward"], 0.0)
                       for p, r in runs.items()},
            transient_bytes={p: max(none["kept"] - r["kept"], 0) for p, r in runs.items()}))
        with torch.no_grad():
            x = layer(x)
    return costs


def _with_policy(layer, policy: str, pattern: str | None):
    """A copy of ``layer`` recomputing under ``policy`` (None when the pattern matches none of its modules)."""
    from dtensor_plus.layouts.recompute import checkpoint_modules

    piece = copy.deepcopy(layer)
    if policy == "none":
        return piece
    if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in piece.named_modules()):
        return None
    return checkpoint_modules(piece, pattern, policy)


def _run(piece, x, loss, optimizer, record, repeats: int) -> dict:
    """Forward (and the loss, on the last layer) then backward of ``piece`` on ``x``, ``repeats`` times; then one
    optimizer step for the state it makes."""
    params = [p for p in piece.parameters() if p.requires_grad]
    forward, backward, kept = [], [], 0
    for _ in range(repeats):
        x_in = x.detach().requires_grad_(x.is_floating_point())
        out = {}

        def run_forward():
            y = piece(x_in)
            out["root"] = loss(y) if loss is not None else y

        def run_backward():
            root = out.pop("root")
            root.backward(None if loss is not None else torch.ones_like(root))

        seconds, kept, _ = record(run_forward, [piece], [])
        forward.append(seconds)
        seconds, _, _ = record(run_backward, [piece], [])
        backward.append(seconds)
    opt = optimizer(params) if params else None
    _, _, state = record(opt.step if opt else (lambda: None), [piece], [opt] if opt else [])
    return dict(forward=statistics.median(forward), backward=statistics.median(backward), kept=kept, state=state)
