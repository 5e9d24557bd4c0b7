"""Weights shared across pipeline stages (a tied embedding on the first stage and head on the last): their gradient
is the sum of every holding stage's, so after the last backward of a step each holder all-reduces it over the
pipeline ranks that hold it (``collectives.all_reduce``, counted on the pp dim); every holder then steps the same
weight with the same gradient and the copies stay equal.

A stage declares its shared parameters by name, each with a key that names the weight across stages::

    shared = find_shared_parameters(pieces)     # from the whole model's pieces, before any layout
    stage = PipelineStage(pieces[s], s, num_stages, mesh, shared_parameters=shared[s])
    # e.g. shared[0] == {"tok_emb.weight": "tok_emb.weight"}, shared[-1] == {"head.weight": "tok_emb.weight"}

When the schedule is built, every rank tells every other (one small all-gather over the whole mesh) which shared
weights its stages hold, with their specs and a checksum of their values, so a tie that does not match across
stages (shape, dtype, layout, values, or a stage that declares it on some ranks only) raises the same ValueError
on every rank before any step. Stages of one rank that hold the same weight (the turn of a V schedule) need
nothing: one Parameter, one gradient. A simulated world (``dtensor_plus.simulate``) has no other ranks to hear
from: the ties are assumed to match, and the pp ranks holding each are what ``simulated_world(pipeline_ties=)``
says.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from dtensor_plus import collectives
from dtensor_plus.dtensor import DTensor
from dtensor_plus.mesh import DeviceMesh
from dtensor_plus.renamed import renamed_keywords
from dtensor_plus.simulate import current_world

__all__ = ["find_shared_parameters", "SharedWeights"]


def find_shared_parameters(pieces) -> list[dict[str, str]]:
    """For each stage module (model order), ``{name in that stage: key}`` for the Parameters held by more than one
    stage; the key is the weight's name in the first stage holding it. Call it on the pieces of one model, before
    laying them out (a layout replaces Parameters, which ends the sharing it detects)."""
    holders: dict[int, list[tuple[int, str]]] = {}
    for s, piece in enumerate(pieces):
        if not isinstance(piece, nn.Module):
            raise TypeError(f"find_shared_parameters takes the stage modules; piece {s} is a {type(piece).__name__}")
        seen = set()
        for name, p in piece.named_parameters(remove_duplicate=False):
            if id(p) not in seen:  # a weight tied inside one stage counts once there
                seen.add(id(p))
                holders.setdefault(id(p), []).append((s, name))
    shared = [{} for _ in pieces]
    for places in holders.values():
        if len({s for s, _ in places}) > 1:
            key = places[0][1]
            for s, name in places:
                shared[s][name] = key
    return shared


class SharedWeights:
    """The shared weights of this rank's stages and the pipeline ranks holding each; ``sum_gradients()`` after the
    step's last backward. Built collectively (every rank of the mesh, with its stages), like the schedule."""

    @renamed_keywords(pp_dim="pp_mesh_dim")
    def __init__(self, stages, mesh, pp_mesh_dim: str):
        self.mesh, self.pp_mesh_dim = mesh, pp_mesh_dim
        self.root = mesh._root
        self.root_pp_mesh_dim = mesh._root_dims[mesh.mesh_dim_index(pp_mesh_dim)]
        mine = _declarations(stages)
        simulated = current_world()
        if simulated is None:
            holders = _check_ties(_exchange(self.root, self._record(mine)))
        else:  # no other ranks' records (nor values) in a simulated world: the holders are what it is told
            holders = {key: list(simulated.tie_holders(key)) for key in sorted({key for key, _, _ in mine})}
        self._params = {}  # key -> this rank's distinct Parameters of it
        for key, name, param in mine:
            if not any(p is param for p in self._params.setdefault(key, [])):
                self._params[key].append(param)
        self._meshes = {key: self._holders_mesh(pp) for key, pp in sorted(holders.items()) if len(pp) > 1}

    def _record(self, mine) -> dict:
        coordinate = list(self.root.get_coordinate())
        pp = coordinate.pop(self.root_pp_mesh_dim)
        entries = sorted({(key, _spec_text(param), _checksum(param)) for key, _, param in mine})
        return {"pp": pp, "others": coordinate, "shared": [list(e) for e in entries]}

    def _holders_mesh(self, pp_indices: list[int]):
        """(mesh, mesh_dim) whose pp lines are the holding ranks: the stage mesh itself when every pp rank holds
        the weight, else a mesh over the root's holding pp indices (built on every rank: groups are collective)."""
        if len(pp_indices) == self.root.shape[self.root_pp_mesh_dim]:
            return self.mesh, self.mesh.mesh_dim_index(self.pp_mesh_dim)
        ranks = self.root.mesh.index_select(self.root_pp_mesh_dim, torch.tensor(pp_indices))
        sub = DeviceMesh(self.root.device_type, ranks, self.root.mesh_dim_names)
        return sub, self.root_pp_mesh_dim

    def sum_gradients(self) -> None:
        """Each shared weight's gradient becomes the sum over the stages holding it (one all-reduce per weight on
        the ranks holding it; a rank that holds it twice adds its copies' gradients first)."""
        for key, (mesh, mesh_dim) in self._meshes.items():
            params = self._params.get(key)
            if not params or mesh.get_coordinate() is None:
                continue
            locals_ = [_local_grad(p) for p in params]
            total = collectives.all_reduce(torch.stack(locals_).sum(0), mesh, mesh_dim, "sum")
            for p in params:
                _set_local_grad(p, total)


def _declarations(stages) -> list[tuple[str, str, nn.Parameter]]:
    out = []
    for stage in stages:
        named = dict(stage.submodule.named_parameters(remove_duplicate=False))
        for name, key in stage.shared_parameters.items():
            out.append((key, name, named[name]))
    return out


def _spec_text(param) -> str:
    if isinstance(param, DTensor):
        placements = ", ".join(map(repr, param.placements))
        return f"{tuple(param.shape)} {param.dtype} on {param.device_mesh.mesh_dim_names} [{placements}]"
    return f"{tuple(param.shape)} {param.dtype} plain"


def _checksum(param) -> str:
    # NOTE: a device-to-host sync, once per shared weight when the schedule is built.
    local = param._local_tensor if isinstance(param, DTensor) else param
    return f"{local.detach().double().sum().item():.17g}"


def _exchange(root, record: dict) -> list[dict]:
    """Every rank's record (JSON, never a pickle), in the root mesh's flat order, via two small all-gathers."""
    flat = root.flatten("pipeline_shared")
    payload = json.dumps(record, separators=(",", ":")).encode()
    lengths = collectives.all_gather_sizes([len(payload)], flat, 0)[:, 0].tolist()
    width = max(lengths)
    mine = torch.zeros(width, dtype=torch.uint8)
    mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    if flat.device_type == "cuda":
        mine = mine.cuda()
    everyone = collectives.all_gather(mine, flat, 0, 0, width * len(lengths)).cpu().view(len(lengths), width)
    return [json.loads(bytes(row[:n].tolist())) for row, n in zip(everyone, lengths)]


def _check_ties(records: list[dict]) -> dict[str, list[int]]:
    """key -> the pp indices holding it; ValueError (the same on every rank: all see all records) when a tie does
    not match across stages or across the lines of the other mesh dims."""
    specs, values, lines = {}, {}, {}
    for r in records:
        line = tuple(r["others"])
        for key, spec, checksum in r["shared"]:
            specs.setdefault(key, {}).setdefault(spec, []).append(r["pp"])
            values.setdefault((key, line), {}).setdefault(checksum, []).append(r["pp"])
            lines.setdefault(key, {}).setdefault(line, set()).add(r["pp"])
    for key, by_spec in specs.items():
        if len(by_spec) > 1:
            seen = "; ".join(f"pp ranks {sorted(set(pp))}: {spec}" for spec, pp in by_spec.items())
            raise ValueError(f"shared parameter {key!r} has different specs on the stages holding it ({seen}); a weight "
                             "shared across stages needs one shape, dtype and layout on every stage")
    for (key, line), by_value in values.items():
        if len(by_value) > 1:
            seen = "; ".join(f"pp ranks {sorted(pp)}: sum {v}" for v, pp in by_value.items())
            raise ValueError(f"shared parameter {key!r} holds different values on the stages holding it ({seen}); build "
                             "every stage from one model (same seed) so the tied copies start equal")
    holders = {}
    for key, by_line in lines.items():
        sets = {tuple(sorted(pp)) for pp in by_line.values()}
        if len(sets) > 1:
            raise ValueError(f"shared parameter {key!r} is declared by pp ranks {sorted(sets)} on different lines of the "
                             "other mesh dims; declare it on every rank of a stage alike")
        holders[key] = list(sets.pop())
    return holders


def _local_grad(param) -> torch.Tensor:
    grad = param.grad
    if grad is None:
        local = param._local_tensor if isinstance(param, DTensor) else param
        return torch.zeros_like(local)
    if isinstance(grad, DTensor):
        if grad.placements != param.placements:  # e.g. Partial left for dp: sum blocks of one layout only
            grad = grad.redistribute(param.device_mesh, param.placements)
        return grad._local_tensor
    return grad


def _set_local_grad(param, total: torch.Tensor) -> None:
    if isinstance(param, DTensor):
        spec = param._spec
        param.grad = DTensor(total.clone(), spec, requires_grad=False)
    else:
        param.grad = total.clone()
