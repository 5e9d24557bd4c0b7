"""Mixture-of-experts with expert parallelism: the ``MoE`` layer and ``expert_parallel``, the layout that shards
its experts over an ``ep`` mesh dim (optionally tensor-parallel inside each expert on a ``tp`` mesh dim).

The layer is ordinary torch: on plain tensors it is the single-device MoE (the oracle); on DTensors (batch
``Shard(0)`` on the data-parallel mesh dims) it routes exactly as one device would on the whole batch
(moe_router.py) and moves tokens to their experts' ranks and back by all-to-all (moe_dispatch.py). Experts
are one DTensor per weight, shape (E, ...): ``w1`` (E, D, F) and ``w2`` (E, F, D), ``Shard(0)`` on ep; with tp
inside experts ``w1`` is also ``Shard(2)`` and ``w2`` ``Shard(1)`` on tp (Megatron's column / row split), so
each expert's output rows are Partial on tp and all-reduced there before the gates weigh them (the gates'
gradient then stays whole on every tp rank; the input's is Partial, Megatron's f/g). Expert compute is a grouped GEMM
(``dtensor_plus.kernels.grouped_gemm``: Triton on GPU, a loop of matmuls elsewhere).

The ep mesh dim must shard the batch: each ep rank routes its own tokens (ep carved out of the data-parallel
ranks, as DeepSpeed-MoE and Megatron do). Non-expert parameters (the router) keep whatever layout the rest of
the model has (``replicate``, ZeRO, ``distribute_module``)::

    mesh = dtp.init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
    moe = MoE(dim=16, hidden=64, num_experts=8, top_k=2)
    replicate(model, mesh, "dp")                  # everything Replicate on dp, gradients all-reduced
    expert_parallel(model, mesh, ep_mesh_dim="dp")  # then experts Shard(0) on dp: 2 experts per rank
    y = moe(x)                                    # x: (B, T, D) DTensor, Shard(0) on dp
    loss = task_loss + moe.aux_loss               # load-balancing + z-loss, over the global batch

Under torch.compile (tests/compile/test_compile_moe.py): ``MoE.forward`` runs eagerly, a counted graph break
(Dynamo's "Skip inlining `torch.compiler.disable()`d function"): the token dispatch reads its all-to-all
split sizes on the host (``.tolist()``, moe_dispatch.py), and a graph broken inside the layer would have to
hand placements across the break, which torch 2.13's AOTAutograd cannot (``cannot create weak reference to
'Shard' object``). The model around it compiles: two graphs around each MoE layer, equal to eager, no
recompilation from step to step.

Legend: B batch, T sequence, D width, F expert hidden width, E experts, N tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Partial, Replicate, Shard
from dtensor_plus.kernels.grouped_gemm import grouped_mm
from dtensor_plus.renamed import renamed_keywords
from dtensor_plus.tracing import after_dynamo_import

from .data import reduce_grad_in_backward
from .hf_experts import hf_experts_modules, shard_hf_experts
from .moe_dispatch import dispatch_combine
from .moe_router import Routing, TopKRouter, local_weight
from .moe_shadow import dispatch_with_shadows, shadow_weights
from .moe_switch import EXPERT_MODES, choose_mode, gathered_experts

__all__ = ["MoE", "GroupedExperts", "SharedExperts", "expert_parallel"]


class GroupedExperts(nn.Module):
    """E two-layer GELU MLPs as two stacked weights: ``w1`` (E, D, F), ``w2`` (E, F, D), no biases."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.randn(num_experts, dim, hidden) * 0.02)
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, dim) * 0.02)

    @staticmethod
    def run(rows_RD: torch.Tensor, counts_L: torch.Tensor, w1_LDF: torch.Tensor, w2_LFD: torch.Tensor) -> torch.Tensor:
        """The experts on rows grouped by expert (``counts_L`` rows each), with this rank's weight blocks."""
        return grouped_mm(F.gelu(grouped_mm(rows_RD, w1_LDF, counts_L)), w2_LFD, counts_L)


class SharedExperts(nn.Module):
    """DeepSeek-V3's shared experts: one dense GELU MLP (D -> S -> D, no biases) that every token goes through.
    Not an expert to place: its weights take the layout of the rest of the model (``replicate``...)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class MoE(nn.Module):
    """A mixture-of-experts MLP: ``TopKRouter`` + ``GroupedExperts``; a drop-in for a (B, T, D) -> (B, T, D) MLP.

    Args:
        dim: D. hidden: F, each expert's hidden width. num_experts: E. top_k: experts per token.
        capacity_factor: None (default) for dropless; else each expert takes ceil(factor N k / E) assignments
            of the global batch and drops the rest (those tokens get no expert output from that slot).
        jitter: multiplicative router-input noise in training (Switch: 0.01); 0 for none.
        aux_loss_coef, z_loss_coef: weights of the load-balancing loss and the router z-loss in ``aux_loss``.
        renormalize: with top_k > 1, the gates of a token sum to 1.
        balance_rate: DeepSeek-V3's auxiliary-loss-free balancing: a routing bias for top-k selection only,
            moved by ``balance_rate`` per ``update_balance_bias()`` call (once per optimizer step); None for none.
        shared_hidden: DeepSeek-V3's shared experts: the hidden width of a dense GELU MLP every token goes
            through, its output added to the routed experts'; 0 for none.
        dispatch_chunks: under ep, the token all-to-alls pipelined with expert compute in this many chunks
            (Tutel, PipeMoE; moe_pipelined.py); 1 for one all-to-all each way.
        expert_mode: under ep, how a step runs (Tutel's switch, moe_switch.py; the weights never move): "ep"
            tokens to the experts' ranks; "dp" every expert all-gathered for the step, tokens stay; "auto" per
            step, whichever moves fewer bytes for the step's routing. A plain attribute: change it any time.

    ``comm_priority`` (None by default): Lina's scheduler (``moe_priority.AllToAllFirst``), the one given to
    ``replicate(..., all_reduce_launcher=...)``: the gradient all-reduce goes in pieces in the gaps between this
    layer's backward all-to-alls instead of ahead of them.

    Expert placement: ``expert_slot`` (a buffer, (E,) ints) holds where each expert's weights lie along the
    expert dim of ``w1`` / ``w2``: expert e is row ``expert_slot[e]`` (ep rank ``expert_slot[e] // (E / ep)``).
    It starts as the identity; ``moe_placement.place_experts`` changes it and moves the weights with it.
    ``shadowed`` (a tuple of expert ids, empty by default) names FasterMoE's shadow experts: broadcast to every
    ep rank and run there on its own tokens (moe_shadow.py); on one device it changes nothing.

    After each forward: ``aux_loss`` (coefficients applied; add it to the task loss), ``routing`` (the
    ``Routing``: raw losses, gates), ``mode`` (the expert mode the step ran: "ep" or "dp"; "ep" on one device) and
    ``load`` (assignments per expert over the global batch, an (E,) int tensor, e.g. to print the balance).
    """

    # Its routing statistics, losses and capacity are over the global batch: replicate's local compute (each
    # rank's rows only) must leave a module holding it to the DTensor path.
    _dtp_dtensor_path = True

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int = 2, *,
                 capacity_factor: float | None = None, jitter: float = 0.0, aux_loss_coef: float = 0.01,
                 z_loss_coef: float = 0.001, renormalize: bool = True, balance_rate: float | None = None,
                 shared_hidden: int = 0, dispatch_chunks: int = 1, expert_mode: str = "ep"):
        super().__init__()
        if shared_hidden < 0:
            raise ValueError(f"shared_hidden must be >= 0 (0 for no shared experts), got {shared_hidden}")
        self.router = TopKRouter(dim, num_experts, top_k, capacity_factor=capacity_factor, jitter=jitter,
                                 renormalize=renormalize, balance_rate=balance_rate)
        self.experts = GroupedExperts(num_experts, dim, hidden)
        self.shared = SharedExperts(dim, shared_hidden) if shared_hidden else None
        self.register_buffer("expert_slot", torch.arange(num_experts))
        self.shadowed: tuple[int, ...] = ()  # experts broadcast to every ep rank this step (moe_shadow.py)
        if dispatch_chunks < 1:
            raise ValueError(f"dispatch_chunks must be >= 1 (1: no pipelining), got {dispatch_chunks}")
        self.dispatch_chunks = dispatch_chunks
        self.expert_mode, self.mode = expert_mode, None
        self.comm_priority = None  # Lina's scheduler (moe_priority.AllToAllFirst), shared with replicate's buckets
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.aux_loss: torch.Tensor | None = None
        self.routing: Routing | None = None
        self.load: torch.Tensor | None = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.experts.w1, self.experts.w2
        if isinstance(x_BTD, DTensor) != isinstance(w1, DTensor):
            raise TypeError(
                "MoE: the tokens and the expert weights must both be DTensors or both plain tensors; place the "
                "experts with expert_parallel(model, mesh, ep_mesh_dim=...) (or distribute_module) first"
            )
        layout = _Layout(x_BTD, w1) if isinstance(x_BTD, DTensor) else None
        x_in = layout.tokens(x_BTD) if layout else x_BTD
        routing = self.router(x_in)
        self.routing, self.load = routing, routing.load_E
        self.aux_loss = self.aux_loss_coef * routing.aux_loss + self.z_loss_coef * routing.z_loss
        if layout is None:
            x_local, w1_local, w2_local, mesh, ep_mesh_dim = x_in, w1, w2, None, None
        else:
            x_local, w1_local, w2_local = layout.local_tokens(x_in), layout.local_weight(w1), layout.local_weight(w2)
            mesh, ep_mesh_dim = layout.mesh, layout.ep_mesh_dim
        shape = x_local.shape
        slot_E = self.expert_slot._local_tensor if isinstance(self.expert_slot, DTensor) else self.expert_slot
        x_ND = x_local.reshape(-1, shape[-1])
        run_mine = lambda rows, counts: self._run_experts(rows, counts, w1_local, w2_local, layout)  # noqa: E731
        self.mode = self._mode(routing, slot_E, w1_local, w2_local, ep_mesh_dim)
        if self.mode == "dp":  # every expert here for this step; the tokens stay
            w1_E, w2_E = (gathered_experts(w, layout.ep_mesh_dims, layout.batch) for w in (w1, w2))
            y_ND = dispatch_combine(x_ND, slot_E[routing.expert_idx_NK], routing.gates_NK, routing.keep_NK,
                                    self.experts.num_experts,
                                    lambda rows, counts: self._run_experts(rows, counts, w1_E, w2_E, layout))
        elif self._shadowed() and ep_mesh_dim is not None:
            if isinstance(ep_mesh_dim, tuple):
                raise ValueError("MoE.shadowed: shadow experts run on one ep mesh dim; the hierarchical (two-mesh-dim) "
                                 "dispatch takes none (set MoE.shadowed = ())")
            slots = [int(s) for s in slot_E[list(self.shadowed)].tolist()]
            w1_S, w2_S = (shadow_weights(w, slots, mesh, ep_mesh_dim) for w in (w1_local, w2_local))
            y_ND = dispatch_with_shadows(
                x_ND, routing.expert_idx_NK, routing.gates_NK, routing.keep_NK, slot_E, self.shadowed, run_mine,
                lambda rows, counts: self._run_experts(rows, counts, w1_S, w2_S, layout), mesh, ep_mesh_dim,
                self.dispatch_chunks, self.comm_priority)
        else:
            y_ND = dispatch_combine(x_ND, slot_E[routing.expert_idx_NK], routing.gates_NK, routing.keep_NK,
                                    self.experts.num_experts, run_mine, mesh, ep_mesh_dim, self.dispatch_chunks,
                                    self.comm_priority)
        y_BTD = y_ND.view(shape)
        y_BTD = layout.output(y_BTD, x_in, x_BTD) if layout else y_BTD
        return y_BTD if self.shared is None else y_BTD + self.shared(x_BTD)

    def _shadowed(self) -> bool:
        E = self.experts.num_experts
        if len(set(self.shadowed)) != len(self.shadowed) or not all(0 <= e < E for e in self.shadowed):
            raise ValueError(f"MoE.shadowed must name distinct experts in 0..{E - 1}, got {self.shadowed}")
        return bool(self.shadowed)

    def _mode(self, routing, slot_E, w1_local, w2_local, ep_mesh_dim) -> str:
        if self.expert_mode not in EXPERT_MODES:
            raise ValueError(f"MoE.expert_mode must be one of {EXPERT_MODES}, got {self.expert_mode!r}")
        if ep_mesh_dim is None:  # every expert is here: nothing to switch
            return "ep"
        if self.expert_mode != "auto":
            return self.expert_mode
        ep = self.experts.num_experts // w1_local.shape[0]
        params = w1_local[0].numel() + w2_local[0].numel()  # one expert's block here (its tp slice under tp)
        return choose_mode(routing.load_E, slot_E, ep, w1_local.shape[1], params, w1_local.element_size())

    def update_balance_bias(self) -> None:
        """DeepSeek-V3's bias step from the last forward's global load (call it once per optimizer step)."""
        if self.routing is None:
            raise ValueError("update_balance_bias: run a forward first (the update follows its load)")
        self.router.update_balance_bias(self.routing.chosen_E)

    @staticmethod
    def _run_experts(rows_RD, counts_L, w1_LDF, w2_LFD, layout) -> torch.Tensor:
        out_RD = GroupedExperts.run(rows_RD, counts_L, w1_LDF, w2_LFD)
        if layout is None or layout.tp_mesh_dim is None:
            return out_RD
        # tp inside experts: each tp rank's output covers its slice of F; sum them here, before the gates
        # weigh them, so the gates' gradient (and all the router's) stays whole on every tp rank.
        return _sum_over(out_RD, layout.mesh, layout.tp_mesh_dim)


def _sum_over(t: torch.Tensor, mesh, mesh_dim: int) -> torch.Tensor:
    """forward: all-reduce (sum) on ``mesh_dim`` / backward: identity (Megatron's "g"), through a DTensor on the
    1-D sub-mesh, so the library counts and differentiates the collective."""
    sub = mesh[mesh.mesh_dim_name(mesh_dim)]
    return DTensor.from_local(t, sub, [Partial()]).redistribute(placements=[Replicate()]).to_local()


class _Layout:
    """Where tokens and experts lie on the mesh for one forward: the batch dims (tokens Shard(0)), the ep dim
    (experts Shard(0)) and the tp dim (experts' hidden width sharded), and the gradient layouts that follow."""

    def __init__(self, x: DTensor, w1: DTensor):
        if x.device_mesh != w1.device_mesh:
            raise ValueError(f"MoE: tokens live on {x.device_mesh} but the experts on {w1.device_mesh}; use one mesh")
        self.mesh = x.device_mesh
        names = [self.mesh.mesh_dim_name(k) for k in range(self.mesh.ndim)]
        # ep on two mesh dims (nodes x ranks per node): the hierarchical dispatch (moe_hierarchical.py)
        self.ep_mesh_dims = tuple(k for k, p in enumerate(w1.placements) if p.is_shard(0))
        if len(self.ep_mesh_dims) > 2:
            raise ValueError(f"MoE: w1 is Shard(0) on mesh dims {[names[k] for k in self.ep_mesh_dims]}; ep takes "
                             f"one mesh dim, or two (nodes, ranks per node)")
        self.ep_mesh_dim = self.ep_mesh_dims if len(self.ep_mesh_dims) == 2 else (
            self.ep_mesh_dims[0] if self.ep_mesh_dims else None)
        self.tp_mesh_dim = self._only(w1, 2, names, "tp")
        for k, p in enumerate(w1.placements):
            if k not in (*self.ep_mesh_dims, self.tp_mesh_dim) and not p.is_replicate():
                raise ValueError(f"MoE: expert weight w1 is {p!r} on mesh dim {names[k]!r}; place it with expert_parallel")
        # Tokens keep their batch shards; any other shard (sequence parallelism) is gathered for routing, and
        # tokens whole on the ep dim (e.g. an uneven batch a Linear gathered) are split there: a local slice.
        self.batch = [p if p.is_shard(0) else Replicate() for p in x.placements]
        for k in self.ep_mesh_dims:
            self.batch[k] = Shard(0)
        if self.tp_mesh_dim is not None and self.batch[self.tp_mesh_dim].is_shard(0):
            raise ValueError(f"MoE: tp inside experts needs the tokens Replicate on {names[self.tp_mesh_dim]!r}, "
                             f"not Shard(0)")

    @staticmethod
    def _only(w1: DTensor, dim: int, names, role: str) -> int | None:
        found = [k for k, p in enumerate(w1.placements) if p.is_shard(dim)]
        if len(found) > 1:
            raise ValueError(f"MoE: w1 is Shard({dim}) on mesh dims {[names[k] for k in found]}; one {role} dim only")
        return found[0] if found else None

    def tokens(self, x: DTensor) -> DTensor:
        return x if list(x.placements) == self.batch else x.redistribute(placements=self.batch)

    def local_tokens(self, x: DTensor) -> torch.Tensor:
        # With tp inside experts each tp rank's input gradient covers its slice of F: Partial (Megatron's "f").
        grad = [Partial() if k == self.tp_mesh_dim else p for k, p in enumerate(self.batch)]
        return x.to_local(grad_placements=grad)

    def local_weight(self, w: DTensor) -> torch.Tensor:
        return local_weight(w, self.batch)

    def output(self, y_local: torch.Tensor, x_in: DTensor, x: DTensor) -> DTensor:
        y = DTensor.from_local(y_local, self.mesh, self.batch, shape=x_in.shape, stride=x_in.stride())
        return y if list(y.placements) == list(x.placements) else y.redistribute(placements=x.placements)


def _moe_runs_eagerly_under_compile() -> None:
    import torch._dynamo

    MoE.forward = torch._dynamo.disable(MoE.forward, reason="MoE's token dispatch needs its split sizes on the "
                                                            "host (layouts/moe.py, 'Under torch.compile')")


after_dynamo_import(_moe_runs_eagerly_under_compile)  # when torch._dynamo is imported: eager never pays for it


@renamed_keywords(ep_dim="ep_mesh_dim", tp_dim="tp_mesh_dim")
def expert_parallel(module: nn.Module, mesh, ep_mesh_dim: str | tuple[str, str] | None = "ep",
                    tp_mesh_dim: str | None = None, *, reduce_in_backward: bool = True) -> nn.Module:
    """Shard the experts of every ``MoE`` in ``module`` on ``mesh``: Shard(0) (whole experts) on ``ep_mesh_dim``, the
    hidden width on ``tp_mesh_dim`` (``w1`` Shard(2), ``w2`` Shard(1)), Replicate on the other mesh dims. The experts
    modules of transformers' MoE blocks (Mixtral, Qwen-MoE, DeepSeek-V3...) are sharded on ``ep_mesh_dim`` too
    (hf_experts.py; no tp inside them). A module with neither raises ValueError.

    Args:
        module: changed in place; its expert weights are plain tensors (the same on every rank, as after a
            same-seed init) or DTensors on ``mesh`` that are Replicate on ``ep_mesh_dim`` and ``tp_mesh_dim``.
        mesh: the whole mesh; the batch must be Shard(0) on ``ep_mesh_dim`` when the model runs.
        ep_mesh_dim, tp_mesh_dim: mesh dim names (either may be None). ``ep_mesh_dim`` may be a pair of names,
            (nodes, ranks per node): experts Shard(0) on both (ep rank i G + j at (i, j)) and the tokens dispatched
            inside the node first, then between nodes (TA-MoE's topology-aware dispatch, moe_hierarchical.py).
        reduce_in_backward: reduce gradients that come out Partial (experts replicated over other
            data-parallel mesh dims) in a post-accumulate-grad hook, as ``replicate`` does.

    Call it after ``replicate`` / ``distribute_module`` when ep is the data-parallel mesh dim itself (those
    would refuse experts already sharded there); before them otherwise. Returns ``module``.
    """
    names = list(mesh.mesh_dim_names or ())
    ep_names = () if ep_mesh_dim is None else tuple(ep_mesh_dim) if isinstance(ep_mesh_dim, tuple) else (ep_mesh_dim,)
    for name in (*ep_names, tp_mesh_dim):
        if name is not None and name not in names:
            raise ValueError(f"expert_parallel: mesh {mesh} has no mesh dim {name!r}; its dims are {names}")
    if tp_mesh_dim in ep_names or len(set(ep_names)) != len(ep_names) or len(ep_names) > 2:
        raise ValueError(f"expert_parallel: ep_mesh_dim {ep_mesh_dim!r} and tp_mesh_dim {tp_mesh_dim!r} must name "
                         f"distinct mesh dims, ep one or two (nodes, ranks per node)")
    if len(ep_names) == 2 and names.index(ep_names[0]) > names.index(ep_names[1]):
        raise ValueError(f"expert_parallel: the ep mesh dims {ep_names} must be in mesh order (nodes first, then "
                         f"ranks per node); the mesh's dims are {names}")
    ep_size = math.prod(mesh.size(name) for name in ep_names)
    placed = []
    for moe in (m for m in module.modules() if isinstance(m, MoE)):
        experts = moe.experts
        if experts.num_experts % ep_size:
            raise ValueError(
                f"expert_parallel: {experts.num_experts} experts do not divide over {ep_size} ranks of "
                f"mesh dim {ep_mesh_dim!r}; use a number of experts that is a multiple of it"
            )
        for key, tp_tensor_dim in (("w1", 2), ("w2", 1)):
            by_name = {**{name: Shard(0) for name in ep_names}, tp_mesh_dim: Shard(tp_tensor_dim)}
            placements = [by_name.get(name, Replicate()) for name in names]
            param = experts._parameters[key]
            sharded = _place(param.detach(), mesh, placements)
            experts._parameters[key] = nn.Parameter(sharded, requires_grad=param.requires_grad)
            placed.append(experts._parameters[key])
    # Our own GroupedExperts (placed above, inside MoE) look like transformers' stacked experts: leave them out.
    hf_experts = [] if ep_mesh_dim is None else [m for m in hf_experts_modules(module) if not isinstance(m, GroupedExperts)]
    if hf_experts and len(ep_names) > 1:
        raise ValueError(f"expert_parallel: transformers' experts modules ({type(hf_experts[0]).__name__}) take one "
                         f"ep mesh dim, not {ep_mesh_dim!r}")
    if hf_experts and tp_mesh_dim is not None:
        raise ValueError(
            f"expert_parallel: tp inside experts (tp_mesh_dim={tp_mesh_dim!r}) covers dtensor_plus MoE layers, not "
            f"transformers' experts modules ({type(hf_experts[0]).__name__}); pass tp_mesh_dim=None for them"
        )
    for experts in hf_experts:
        placed += shard_hf_experts(experts, mesh, ep_mesh_dim, _place)
    if not placed and not any(isinstance(m, MoE) for m in module.modules()):
        # Nothing recognised: returning quietly would train a replicated model the caller thinks is sharded.
        raise ValueError(
            f"expert_parallel: {type(module).__name__} has no MoE layer it knows: a dtensor_plus MoE, or a "
            f"transformers experts module (num_experts and stacked (E, ...) weights such as gate_up_proj/down_proj, "
            f"e.g. MixtralExperts); parallelize the MoE blocks' parent, or place unknown experts with distribute_module"
        )
    if reduce_in_backward and placed:
        reduce_grad_in_backward(placed)
    return module


def _place(t: torch.Tensor, mesh, placements) -> DTensor:
    if not isinstance(t, DTensor):
        return dtp.distribute_tensor(t, mesh, placements, src_data_rank=None)  # every rank holds the same values
    if t.device_mesh != mesh:
        raise ValueError(f"expert_parallel: an expert weight lives on {t.device_mesh}, not on {mesh}")
    for k, (have, want) in enumerate(zip(t.placements, placements)):
        if not have.is_replicate() and have != want:
            raise ValueError(
                f"expert_parallel: an expert weight is {have!r} on mesh dim {mesh.mesh_dim_name(k)!r}; it must be "
                f"Replicate there (or plain) before experts are sharded"
            )
    return t.redistribute(placements=placements)  # Replicate -> Shard takes the local chunk: no data moves
