"""A model's and an optimizer's state as one checkpointable dict, and back: what a training script resumes with.

``get_state_dict(model, optimizer)`` returns ``{"model": model.state_dict(), "optimizer": ...}`` where the
optimizer's state and hyperparameters are keyed by parameter name instead of torch's parameter index (so a
checkpoint does not depend on the order parameters were handed to the optimizer, and pipeline stages, each
holding its own parameters, never collide), and created first if the optimizer has not stepped yet (a fresh
optimizer has no state to load into). ``set_state_dict`` hands a loaded state back.
Model tensors are the parameters' own storage: ``load`` writes into them in place.

Resume in a training script::

    state = get_state_dict(model, opt)
    state["step"] = 0
    if os.path.isdir(ckpt):
        load(state, ckpt)
        set_state_dict(model, opt, state)
    ...
    state["step"] = step
    save(state, ckpt)                  # get_state_dict again only if the optimizer object changed
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["get_state_dict", "set_state_dict"]


def get_state_dict(model: nn.Module, optimizer=None) -> dict:
    """``{"model": ..., "optimizer": ...}`` for ``save`` and ``load``; the optimizer part only with an optimizer."""
    state = {"model": model.state_dict()}
    if optimizer is not None:
        _create_state(optimizer)
        state["optimizer"] = _by_name(model, optimizer, optimizer.state_dict())
    return state


def set_state_dict(model: nn.Module, optimizer, state: dict) -> None:
    """Give a loaded ``state`` (from ``get_state_dict``) back to the optimizer (the model's tensors were loaded
    in place). Hyperparameters saved in the checkpoint (learning rate, betas...) replace the optimizer's."""
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(_by_index(model, optimizer, state["optimizer"]))


def _param_names(model: nn.Module, optimizer) -> list[str] | None:
    """The model's name of each optimizer parameter, in torch's index order; None if one is not the model's."""
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = [names.get(id(p)) for p in params]
    return None if None in out or len(set(out)) != len(out) else out


def _by_name(model, optimizer, state: dict) -> dict:
    """Per-parameter state and hyperparameters keyed by parameter name. Hyperparameters are stored per parameter
    (not per group) so that ranks holding different parameters (pipeline stages) never disagree on a value."""
    names = _param_names(model, optimizer)
    if names is None:  # e.g. ZeRO-1/2 steps on master copies the model does not hold: keep torch's indices
        return state
    hyper = {names[i]: {k: v for k, v in group.items() if k != "params"}
             for group in state["param_groups"] for i in group["params"]}
    return {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": hyper}


def _by_index(model, optimizer, state: dict) -> dict:
    names = _param_names(model, optimizer)
    if names is None:
        return state
    index = {name: i for i, name in enumerate(names)}
    groups, start = [], 0
    for group in optimizer.param_groups:  # the optimizer's own grouping, the saved hyperparameters
        ids = list(range(start, start + len(group["params"])))
        start += len(ids)
        groups.append({**(state["param_groups"][names[ids[0]]] if ids else {}), "params": ids})
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


@torch.no_grad()
def _create_state(optimizer) -> None:
    """Step once with learning rate 0 and zero gradients, so every parameter has its optimizer state tensors
    (exactly as after a real step, values aside: load overwrites them). Parameters do not change: with lr 0,
    Adam(W)'s and SGD's updates, weight decay included, are multiplications by 1 and additions of 0."""
    if optimizer.state:
        return
    groups = optimizer.param_groups
    made = []
    for group in groups:
        for p in group["params"]:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
                made.append(p)
    saved_lr = [group["lr"] for group in groups]
    for group in groups:
        group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], torch.Tensor) else 0.0
    try:
        optimizer.step()
    finally:
        for group, lr in zip(groups, saved_lr):
            group["lr"] = lr
        for p in made:
            p.grad = None
