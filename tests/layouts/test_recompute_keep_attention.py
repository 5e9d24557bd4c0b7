"""DistFlashAttn's rematerialization-aware checkpointing as ``checkpoint_modules(..., policy="keep_attention")``:
under ring context parallelism on 3 ranks (sequence 8, which 3 does not divide) examples/gpt.py's SDPA GPT with
each block checkpointed has the gradients of one device (dropout 0.1, strict RNG: the recomputed residual
dropouts draw the forward's masks), and its backward runs exactly the ring shifts of a backward without
recomputation, where "full" also reruns every attention's forward shifts."""

import copy
import sys
from pathlib import Path

import torch

import dtensor_plus as dtp
from dtensor_plus import DTensor, comm_mode
from dtensor_plus.layouts import context_parallel, loss_parallel
from dtensor_plus.layouts.recompute import checkpoint_modules
from dtensor_plus.testing import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from gpt import GPT, PRESETS  # noqa: E402
from gpt_layouts import Layout, make_mesh, place_batch, place_model  # noqa: E402

CONFIG = PRESETS["debug"].replace(dropout=0.1, attention="sdpa")
TOL = 1e-5


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _shifts_and_gradients(policies):
    """Rank function: per policy, (forward shifts, backward shifts, max gradient difference from one device)."""
    layout = Layout(cp=3)
    mesh = make_mesh(layout)
    window = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.block_size + 1), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    reference = GPT(CONFIG)
    found = {}
    for policy in policies:
        model = copy.deepcopy(reference)
        place_model(model, mesh, layout)
        if policy != "none":
            checkpoint_modules(model, "blocks.*", policy)
        dtp.manual_seed(1, strict=True)
        with context_parallel("cp", "ring"), loss_parallel():
            with comm_mode() as forward:
                loss = model.loss(place_batch(window[:, :-1], mesh), place_batch(window[:, 1:], mesh))
            with comm_mode() as backward:
                loss.backward()
        found[policy] = (forward.count("ring_shift", "cp"), backward.count("ring_shift", "cp"),
                         {n: _full(p.grad) for n, p in model.named_parameters()})
    torch.manual_seed(1)
    reference.loss(window[:, :-1], window[:, 1:]).backward()
    expected = dict(reference.named_parameters())
    return {policy: (f, b, max((g - expected[n].grad).abs().max().item() for n, g in grads.items()))
            for policy, (f, b, grads) in found.items()}


def test_keep_attention_reruns_no_attention_shifts_and_equals_one_device():
    found = run_on_ranks(3, _shifts_and_gradients, ("none", "full", "keep_attention"), timeout=300.0)[0]
    for policy, (_, _, diff) in found.items():
        assert diff <= TOL, (policy, diff)
    (forward, none, _), (_, full, _), (_, keep, _) = found["none"], found["full"], found["keep_attention"]
    layers, n = CONFIG.num_layers, 3
    # per layer, forward: n - 1 shifts of the (k, v) block; backward: those and n - 1 of the (dk, dv) block
    assert forward == layers * (n - 1) and none == 2 * layers * (n - 1), found
    assert full == none + forward and keep == none, found  # 12 and 8 here
