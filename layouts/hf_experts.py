"""Expert parallelism for Hugging Face's MoE blocks (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ...): their
experts module's stacked weights sharded whole-expert on an ``ep`` mesh dim; called by ``expert_parallel``.

transformers (5.x) keeps a block's experts in one module (``MixtralExperts``...) holding 3-D parameters with
the experts first, ``gate_up_proj`` (E, 2F, D) and ``down_proj`` (E, D, F) (or ``up_proj``, and (E, F) biases),
and calling it as ``experts(hidden_states_ND, top_k_index_NK, top_k_weights_NK)``. That module is what we
recognise: a ``num_experts`` count and parameters whose first dim is that count.

Dispatch (Megatron's all-gather token dispatcher): each ep rank takes every token of its ep group (one
all-gather when the batch is split on ep), runs its own experts on the tokens routed to them, and the partial
outputs are summed back where the tokens came from (one reduce-scatter, or all-reduce). The local compute is
transformers' own experts forward (eager loop or grouped_mm) on local tensors: token slots routed to another
rank's experts get the sentinel index E_local, which both of its paths skip (``_is_expert_parallel``). Each
rank's token gradient covers only its experts' share: Partial on ep, summed by the collective's backward.

Legend: N tokens, K experts per token, D hidden, F expert hidden, E experts.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dtensor_plus import DTensor, Partial, Replicate, Shard
from dtensor_plus.placements import chunk_bounds
from dtensor_plus.renamed import renamed_keywords

from .moe_router import local_weight

__all__ = ["hf_experts_modules", "shard_hf_experts"]


def _expert_params(module: nn.Module) -> list[str]:
    count = getattr(module, "num_experts", None)
    if not isinstance(count, int) or isinstance(count, bool):
        return []
    return [n for n, p in module.named_parameters(recurse=False) if p.ndim >= 2 and p.shape[0] == count]


def hf_experts_modules(module: nn.Module) -> list[nn.Module]:
    """The transformers experts modules in ``module``: ``num_experts`` and stacked (E, ...) parameters, among
    them a 3-D one (``gate_up_proj`` / ``up_proj`` / ``down_proj``)."""
    found = []
    for m in module.modules():
        names = _expert_params(m)
        if names and any(m._parameters[n].ndim == 3 for n in names):
            found.append(m)
    return found


@renamed_keywords(ep_dim="ep_mesh_dim")
def shard_hf_experts(experts: nn.Module, mesh, ep_mesh_dim: str, place) -> list[nn.Parameter]:
    """Shard ``experts``' stacked parameters Shard(0) on ``ep_mesh_dim`` (a mesh dim name; Replicate elsewhere) and
    make its forward expert-parallel. ``place(tensor, mesh, placements)`` is expert_parallel's placing helper.
    Returns the new parameters."""
    ep_index = mesh.mesh_dim_index(ep_mesh_dim)  # placements are lists over mesh dims
    num_ranks = mesh.size(ep_index)
    if experts.num_experts % num_ranks:
        raise ValueError(
            f"expert_parallel: {type(experts).__name__} has {experts.num_experts} experts, which do not divide over "
            f"the {num_ranks} ranks of mesh dim {ep_mesh_dim!r}; use a number of experts that is a multiple of it"
        )
    placements = [Shard(0) if k == ep_index else Replicate() for k in range(mesh.ndim)]
    placed = []
    for name in _expert_params(experts):
        param = experts._parameters[name]
        experts._parameters[name] = nn.Parameter(place(param.detach(), mesh, placements), requires_grad=param.requires_grad)
        placed.append(experts._parameters[name])
    original = experts.forward
    experts.forward = lambda *args, **kwargs: _ep_forward(experts, original, mesh, ep_index, *args, **kwargs)
    return placed


def _rows(x: DTensor, ep_mesh_dim: int) -> list:
    """Where token rows go for the local compute: whole on ep (all of the group's tokens), split on the other
    mesh dims where the batch already is (Shard(0)), whole elsewhere."""
    return [Replicate() if k == ep_mesh_dim or not p.is_shard(0) else p for k, p in enumerate(x.placements)]


def _ep_forward(experts, original, mesh, ep_mesh_dim: int, hidden_ND, top_k_index_NK, top_k_weights_NK, *args,
                **kwargs):
    if not isinstance(hidden_ND, DTensor) or hidden_ND.device_mesh != mesh:
        raise TypeError(
            f"expert_parallel: {type(experts).__name__} got tokens as {type(hidden_ND).__name__} (on "
            f"{getattr(hidden_ND, 'device_mesh', None)}), but its experts are sharded on {mesh}; lift the rest of the "
            f"model onto that mesh (replicate(model, mesh) or fully_shard) so the tokens arrive as DTensors on it"
        )
    rows = _rows(hidden_ND, ep_mesh_dim)
    partial_on_ep = [Partial() if k == ep_mesh_dim else p for k, p in enumerate(rows)]
    x_local = hidden_ND.redistribute(placements=rows).to_local(grad_placements=partial_on_ep)
    index_local = _as_rows(top_k_index_NK, mesh, rows).to_local()
    gates_local = _as_rows(top_k_weights_NK, mesh, rows).to_local(grad_placements=partial_on_ep)
    num_ranks = mesh.size(ep_mesh_dim)
    num_local = experts.num_experts // num_ranks
    first, _ = chunk_bounds(experts.num_experts, num_ranks, mesh.get_local_rank(ep_mesh_dim))
    local_index = index_local - first
    # slots routed to another rank's experts: the sentinel num_local, which transformers' forwards skip
    local_index = local_index.masked_fill((local_index < 0) | (local_index >= num_local), num_local)
    with _local_experts(experts, num_local, rows):
        out_local = original(x_local, local_index, gates_local, *args, **kwargs)
    rows_shape = (hidden_ND.shape[0], out_local.shape[-1])
    out = DTensor.from_local(out_local, mesh, partial_on_ep, shape=rows_shape)
    return out.redistribute(placements=hidden_ND.placements)  # sum the ep ranks' shares where the tokens were


def _as_rows(t: torch.Tensor, mesh, rows) -> DTensor:
    if not isinstance(t, DTensor):
        raise TypeError(f"expert_parallel: the router's output must be a DTensor like the tokens, got {type(t).__name__}")
    return t.redistribute(placements=rows)


@contextlib.contextmanager
def _local_experts(experts: nn.Module, num_local: int, rows):
    """Inside: the experts module holds this rank's weight blocks as plain tensors and counts its own experts."""
    saved = {name: experts._parameters[name] for name in _expert_params(experts)}
    count, flag = experts.num_experts, getattr(experts, "_is_expert_parallel", None)
    try:
        for name, param in saved.items():
            experts._parameters[name] = local_weight(param, rows)
        experts.num_experts, experts._is_expert_parallel = num_local, True
        yield
    finally:
        experts._parameters.update(saved)
        experts.num_experts = count
        if flag is None:
            del experts._is_expert_parallel
        else:
            experts._is_expert_parallel = flag
