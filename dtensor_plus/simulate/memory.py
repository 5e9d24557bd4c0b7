"""What one rank holds: parameters, gradients and optimizer state by walking the models and optimizers (their
local blocks), and activations as the tensors autograd saves for backward, at their peak over the step.

Every figure counts storages, each once (a view or a tied weight is not counted twice), in bytes: a storage's
size, so a shard padded for an uneven split counts its padding. The walk works alike on real tensors and on
meta ones, so a real run and a simulated one are measured by the same code.
"""

from __future__ import annotations

import torch

from ..dtensor import DTensor

__all__ = ["state_memory", "SavedTensorTracker", "storage_key"]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def storage_key(t: torch.Tensor) -> int:
    """The identity of ``t``'s (local) storage: its StorageImpl's address (meta storages all have data pointer 0)."""
    return _local(t).untyped_storage()._cdata


def _storage_bytes(t: torch.Tensor) -> int:
    return _local(t).untyped_storage().nbytes()


def _inner_optimizers(opt):
    """The optimizer and the ones it wraps (ZeRO-1/2 wraps a torch optimizer in ``.optimizer``; torch's Zero ``.optim``)."""
    found, todo = [], [opt]
    while todo:
        o = todo.pop()
        if o is None or any(o is f for f in found):
            continue
        found.append(o)
        todo += [getattr(o, "optimizer", None), getattr(o, "optim", None)]
    return found


def state_memory(models, optimizers) -> dict[str, int]:
    """Bytes this rank holds, by kind: "parameters" (the models' parameters), "gradients" (theirs and the
    optimizer's masters'), "optimizer" (masters the optimizer steps that are not model parameters, and its state)."""
    seen: set[int] = set()
    out = {"parameters": 0, "gradients": 0, "optimizer": 0}

    def add(kind, t):
        if isinstance(t, torch.Tensor) and _local(t).numel():
            key = storage_key(t)
            if key not in seen:
                seen.add(key)
                out[kind] += _storage_bytes(t)

    params = [p for m in models for p in m.parameters()]
    for p in params:
        add("parameters", p)
    for p in params:
        add("gradients", p.grad)
    for opt in optimizers:
        for inner in _inner_optimizers(opt):
            for group in getattr(inner, "param_groups", ()):
                for p in group["params"]:
                    add("optimizer", p)  # a master copy (ZeRO-1/2): a model parameter was counted above
                    add("gradients", p.grad)
            for state in getattr(inner, "state", {}).values():
                for t in (state.values() if isinstance(state, dict) else ()):
                    add("optimizer", t)
    return out


class _Saved:
    """What autograd keeps for one saved tensor while the tracker runs: the tensor, and the tracker's count of it."""

    __slots__ = ("value", "key", "tracker", "__weakref__")

    def __init__(self, value, key, tracker):
        self.value, self.key, self.tracker = value, key, tracker

    def __del__(self):
        if self.key is not None:
            self.tracker._release(self.key)


class SavedTensorTracker:
    """Bytes of the storages autograd holds for backward, live and at their peak (``peak_bytes``).

    A storage is live from the first time a tensor on it is saved until autograd lets go of the last one
    (after the backward of the node that saved it). Parameters' storages are not activations and are skipped.
    Layouts that save through their own ``saved_tensors_hooks`` (ZeRO-3 saves a handle in place of a gathered
    weight) are composed with, not replaced: whatever they keep as the tensor itself is counted, what they swap
    for a handle (re-gathered in backward) is not."""

    def __init__(self, skip_keys=()):
        self.skip = set(skip_keys)
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0

    def pack(self, t):
        if not isinstance(t, torch.Tensor):
            return _Saved(t, None, self)
        key = storage_key(t)
        if key in self.skip:
            return _Saved(t, None, self)
        if self.refs.get(key, 0) == 0:
            self.sizes[key] = _storage_bytes(t)
            self.live_bytes += self.sizes[key]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.refs[key] = self.refs.get(key, 0) + 1
        return _Saved(t, key, self)

    @staticmethod
    def unpack(saved):
        return saved.value

    def _release(self, key) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live_bytes -= self.sizes.pop(key)

    def hooks(self):
        return _composing_hooks(self)


class _composing_hooks:
    """``saved_tensors_hooks(tracker.pack, tracker.unpack)`` for the block, and every ``saved_tensors_hooks``
    entered inside it composed with the tracker: autograd applies only the innermost hooks, so a layout's own
    (ZeRO-3's) would otherwise hide its saved tensors."""

    def __init__(self, tracker):
        self.tracker = tracker

    def __enter__(self):
        graph, tracker = torch.autograd.graph, self.tracker
        original = self.original = graph.saved_tensors_hooks

        class Composed(original):
            def __init__(self, pack, unpack):
                def composed_pack(t):
                    packed = pack(t)
                    # kept as itself: counted; swapped for a handle (re-made in backward): not
                    return tracker.pack(t) if packed is t else _Saved(packed, None, tracker)

                super().__init__(composed_pack, lambda saved: unpack(saved.value))

        graph.saved_tensors_hooks = Composed
        self.outer = original(tracker.pack, tracker.unpack)
        self.outer.__enter__()
        return tracker

    def __exit__(self, *exc):
        self.outer.__exit__(*exc)
        torch.autograd.graph.saved_tensors_hooks = self.original
        return False
