"""The inner optimizer of ZeRO-1/2 stepping flat segments (layouts/zero_flat.py) instead of one master per
parameter, while its public state stays per parameter: ``optimizer.state[master]`` holds DTensors in the
master's layout that are views of the segment's flat state, and the segment's scalars (AdamW's ``step``).

An element-wise update (local_step.ELEMENTWISE) of a concatenation is the concatenation of the updates, so one
step of a group's segments equals the step of each of its masters, provided every master is stepped (each
holds a gradient this step) and all share one step count. The step is flat for a group when:

* every master holds a reduced gradient and is tagged for a step on its block (local_step.TAG), and
* its masters' state is exactly the views this file installed, or there is none yet (the step creates it
  flat), or it can be copied into new flat state: every master has the same keys, each tensor a DTensor in
  its master's layout, each scalar equal across the segment (a state dict just loaded, a tensor set by hand).

Otherwise that group steps per master as before (local_step's blocks, or DTensor ops), its shared scalars
first given to each master as its own copy, so counts that diverge (a master without a gradient) stay exact;
its state is copied back into flat form at a later step once the conditions hold again (a group whose
step counts diverged stays per master: one count per segment cannot hold them).
"""

from __future__ import annotations

import torch

from dtensor_plus.dtensor import DTensor

from . import local_step
from .zero_flat import FlatMasters, state_spec

__all__ = ["FlatState"]


def _per_element(value, segment: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim == 1 and value.shape == segment.shape


class FlatState:
    """The flat state of each segment and the per-master views made of it (what ``step`` checks is intact)."""

    def __init__(self, flat: FlatMasters):
        self.flat = flat
        self._segment_state: dict = {}  # (group, k) -> the state dict of segment k of the group
        self._installed: dict = {}  # group -> {master index: {key: value}} as installed in optimizer.state
        self._made_from: dict = {}  # (group, k) -> {key: value} of the segment state the views were made of
        self.flat_groups: list = []  # the groups the last step stepped flat (the rest per master)
        self._indices = [[m.index for segment in segments for m in segment.members] for segments in flat.segments]

    def step(self, optimizer, masters) -> None:
        """One step of ``optimizer`` (the inner one, its groups holding ``masters``): flat where it can be."""
        state, segments = optimizer.state, self.flat.segments
        flat_groups = []
        for g in range(len(optimizer.param_groups)):
            indices = self._indices[g]
            if self._flat_ready(g, indices, masters, state):
                flat_groups.append(g)
            else:
                self._per_master(g, indices, masters, state)
        swapped = []
        try:
            for g in flat_groups:
                group = optimizer.param_groups[g]
                swapped.append((group, group["params"]))
                for k, segment in enumerate(segments[g]):
                    segment.tensor.grad = self.flat.grads[segment.dtype][segment.start : segment.stop]
                    state[segment.tensor] = self._segment_state.setdefault((g, k), {})
                group["params"] = [segment.tensor for segment in segments[g]]
            optimizer.step()
        finally:
            for group, params in swapped:
                group["params"] = params
            for g in flat_groups:
                for segment in segments[g]:
                    segment.tensor.grad = None
                    state.pop(segment.tensor, None)
        for g in flat_groups:
            self._install(g, masters, state)
        self.flat_groups = flat_groups

    def _flat_ready(self, g, indices, masters, state) -> bool:
        if not all(self.flat.received[i] and masters[i].__dict__.get(local_step.TAG) for i in indices):
            return False
        installed = self._installed.get(g)
        if installed is not None and all(_holds(state.get(masters[i]), installed.get(i)) for i in indices):
            return True
        if not any(state.get(masters[i]) for i in indices):  # no state yet: the step creates it flat
            self._forget(g)
            return True
        return self._copy_in(g, masters, state)

    def _forget(self, g: int) -> None:
        self._installed.pop(g, None)
        for k in range(len(self.flat.segments[g])):
            self._segment_state.pop((g, k), None)
            self._made_from.pop((g, k), None)

    def _per_master(self, g, indices, masters, state) -> None:
        """Group ``g`` steps per master: each its own copy of the shared scalars, its gradient as a DTensor."""
        if self._installed.get(g) is not None:
            for i in indices:
                held = state.get(masters[i]) or {}
                for key, value in list(held.items()):
                    if isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
                        held[key] = value.clone()
        self._forget(g)
        for i in indices:
            master = masters[i]
            master.grad = self.flat.grad_dtensor(i, master._spec) if self.flat.received[i] else None

    def _copy_in(self, g, masters, state) -> bool:
        """Copy the per-master state of group ``g`` into new flat segment state and install views of it, if
        every master's state can be: same keys, tensors DTensors in the master's layout, equal scalars."""
        made = {}
        for k, segment in enumerate(self.flat.segments[g]):
            held = [state.get(masters[m.index]) for m in segment.members]
            if not all(held) or any(h.keys() != held[0].keys() for h in held):
                return False
            new = {}
            for key in held[0]:
                values = [h[key] for h in held]
                if isinstance(values[0], DTensor):
                    if not all(isinstance(v, DTensor) and v._spec.placements == masters[m.index]._spec.placements
                               and v.shape == masters[m.index].shape and v.device_mesh == masters[m.index].device_mesh
                               for m, v in zip(segment.members, values)):
                        return False
                    buffer = segment.tensor.new_zeros(segment.tensor.shape, dtype=values[0].dtype)
                    for m, v in zip(segment.members, values):
                        segment.block(m, buffer).copy_(v._local_tensor)
                    new[key] = buffer
                elif isinstance(values[0], torch.Tensor):  # a scalar (the step count): one value for the segment
                    if not all(isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and not v.ndim
                               and torch.equal(v, values[0]) for v in values):
                        return False
                    new[key] = values[0].clone()
                else:
                    if not all(v == values[0] for v in values):
                        return False
                    new[key] = values[0]
            made[k] = new
        self._forget(g)
        for k, new in made.items():
            self._segment_state[(g, k)] = new
        self._install(g, masters, state)
        return True

    def _install(self, g, masters, state) -> None:
        """Put into each master's state dict the views of its segment's state (made again only when the step
        replaced a state tensor instead of updating it in place): per-element tensors as DTensors in the
        master's layout, scalars shared by the segment."""
        installed = self._installed.setdefault(g, {})
        for k, segment in enumerate(self.flat.segments[g]):
            source = self._segment_state.get((g, k), {})
            made_from = self._made_from.get((g, k))
            if made_from is not None and made_from.keys() == source.keys() and all(
                    source[key] is value for key, value in made_from.items()):
                continue  # stepped in place: the views still see it
            self._made_from[(g, k)] = dict(source)
            for m in segment.members:
                master = masters[m.index]
                views = {}
                for key, value in source.items():
                    if _per_element(value, segment.tensor):
                        views[key] = DTensor(segment.block(m, value), state_spec(master._spec, value.dtype))
                    else:
                        views[key] = value
                held = state[master]  # the same dict object a caller may hold: updated in place
                held.clear()
                held.update(views)
                installed[m.index] = views


def _holds(held, views) -> bool:
    return held is not None and views is not None and len(held) == len(views) and all(
        held.get(k) is v for k, v in views.items())
