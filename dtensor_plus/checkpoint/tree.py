"""A state (nested dicts and lists, tensors and plain values at the leaves) as flat (path, leaf) lists.

A path is the tuple of keys from the root: dict keys (str or int, as torch optimizers key state by parameter
index) and list indices. Tensor leaves go to safetensors files; every other leaf must be a JSON value (number,
string, bool, None, or a list/tuple of those) and goes into the index. Loading puts saved values back at their
paths in the caller's containers (a tuple stays a tuple).
"""

from __future__ import annotations

import math

import torch

__all__ = ["flatten", "set_value"]

_SCALARS = (bool, int, float, str, type(None))


def flatten(state) -> tuple[list[tuple[tuple, torch.Tensor]], list[tuple[tuple, object]]]:
    """(tensor leaves, value leaves), each a list of (path, leaf) in the state's order."""
    if not isinstance(state, dict):
        raise TypeError(f"a checkpoint state must be a dict (e.g. {{'model': model.state_dict()}}), got {type(state).__name__}")
    tensors, values = [], []
    _walk(state, (), tensors, values)
    return tensors, values


def _walk(node, path: tuple, tensors: list, values: list) -> None:
    if isinstance(node, torch.Tensor):
        tensors.append((path, node))
    elif isinstance(node, dict):
        for key, child in node.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"state key {key!r} at {_name(path) or '<root>'} is a {type(key).__name__}; "
                                "checkpoint keys must be str or int")
            _walk(child, path + (key,), tensors, values)
    elif isinstance(node, (list, tuple)) and not _is_json_value(node):
        for i, child in enumerate(node):
            _walk(child, path + (i,), tensors, values)
    elif _is_json_value(node):
        values.append((path, list(node) if isinstance(node, tuple) else node))
    else:
        raise TypeError(
            f"state value at {_name(path)} is a {type(node).__name__}; a checkpoint stores tensors and JSON values "
            f"(numbers, strings, bools, None and lists of them), never pickles: convert it to one of those"
        )


def _is_json_value(node) -> bool:
    if isinstance(node, float):
        return True  # nan and inf are written as JSON's NaN / Infinity extensions, which json reads back
    if isinstance(node, _SCALARS):
        return True
    return isinstance(node, (list, tuple)) and all(_is_json_value(v) for v in node)


def set_value(state, path: tuple, value) -> None:
    """Put ``value`` at ``path`` in ``state`` (the parent container must exist and be a dict or list)."""
    parent = state
    for key in path[:-1]:
        parent = parent[key]
    old = parent[path[-1]]
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(parent, tuple):
        if old != value and not (_is_nan(old) and _is_nan(value)):
            raise TypeError(f"cannot load {_name(path)}: it sits in a tuple, which cannot be changed in place; use a list")
        return
    parent[path[-1]] = value


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _name(path) -> str:
    return ".".join(str(p) for p in path)
