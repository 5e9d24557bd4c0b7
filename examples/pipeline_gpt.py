"""The GPT of examples/gpt.py split into pipeline stages, laid out inside each stage, and trained beside one device.

This file owns ``split_gpt`` (stages by module boundaries: token and position embedding on the first stage,
``ln_f`` + head on the last, the blocks spread evenly), ``place_stage`` (tp / sp by gpt.py's ``tp_plan``, then
data parallelism or ZeRO on the mesh dims other than ``pp``), ``gpt_loss`` and ``compare_pipeline_with_single``,
what ``examples/train_gpt.py --pp N --schedule NAME`` runs::

    from pipeline_gpt import compare_pipeline_with_single
    result = compare_pipeline_with_single(config, layout, pp=2, schedule="1f1b", n_microbatches=4,
                                          batch_list=batch_list, lr=1e-3, seed=0)

The sequence schedules (``schedule="seq1f1b"`` or ``"terapipe"``, ``sequence_chunks=k``: train_gpt.py's
``--seq-chunks``) run each sample in k chunks along the sequence: ``GPTStage`` then takes ``sequence_chunk=`` and
its attention (``chunk_attention``) reads the earlier chunks' keys and values (with dp: each rank's rows).

A stage keeps gpt.py's module names ("tok_emb", "blocks.0.attn.q", "ln_f", "head"), so ``tp_plan`` applies to it
as to the whole model (patterns that name nothing in a stage are left out). Pipelining draws dropout per
microbatch, not as one device draws it over the batch: compare with one device at dropout 0.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dtensor_plus as dtp  # noqa: E402
from dtensor_plus import DTensor, Replicate, Shard  # noqa: E402
from dtensor_plus import collectives  # noqa: E402
from dtensor_plus.layouts import (ZeroRedundancyOptimizer, fully_shard, loss_parallel,  # noqa: E402
                                  parallelize_module, replicate)
from dtensor_plus.layouts.pipeline import PipelineSchedule, PipelineStage, build_schedule  # noqa: E402
from gpt import GPT, GPTConfig, tp_plan  # noqa: E402

__all__ = ["GPTStage", "chunk_attention", "split_gpt", "place_stage", "gpt_loss", "make_pp_mesh", "compare_pipeline_with_single"]


class GPTStage(nn.Module):
    """Blocks ``[first_block, first_block + len(blocks))`` of a GPT, with the embeddings when ``first`` and the
    final norm and head when ``last``. Shares the model's modules and Parameters (no copies)."""

    def __init__(self, model: GPT, first_block: int, num_blocks: int, *, first: bool, last: bool):
        super().__init__()
        self.config, self.first_block, self.is_first, self.is_last = model.config, first_block, first, last
        if first:
            self.tok_emb, self.pos_emb = model.tok_emb, model.pos_emb
        self.blocks = nn.ModuleList(model.blocks[first_block : first_block + num_blocks])
        if last:
            self.ln_f, self.head = model.ln_f, model.head

    def forward(self, x: torch.Tensor, sequence_chunk=None) -> torch.Tensor:
        """``sequence_chunk``: the ``SequenceChunk`` a sequence schedule (seq1f1b, terapipe) runs; x then holds
        positions [start, start + length) of its sample, and attention reads the earlier chunks' keys and values."""
        start = 0 if sequence_chunk is None else sequence_chunk.start
        if self.is_first:  # x: tokens (B, T)
            x = self.tok_emb(x) + self.pos_emb[start : start + x.shape[1]]  # (B, T, D)
            x = F.dropout(x, self.config.dropout, self.training)
        for block in self.blocks:
            if sequence_chunk is None:
                x = block(x)
            else:  # gpt.py's Block.forward with the chunk's attention
                x = x + chunk_attention(block.attn, block.ln1(x), sequence_chunk)
                x = x + block.mlp(block.ln2(x))
        return self.head(self.ln_f(x)) if self.is_last else x  # (B, T, V) or (B, T, D)

    def model_name(self, name: str) -> str:
        """The GPT's name of this stage's parameter ``name`` ("blocks.0.mlp.fc.weight" -> "blocks.2.mlp.fc.weight")."""
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            return f"blocks.{int(index) + self.first_block}.{rest}"
        return name


def chunk_attention(attn, x_BTD: torch.Tensor, chunk) -> torch.Tensor:
    """gpt.py's ``CausalSelfAttention`` (its q, k, v, proj and causal mask) on one sequence chunk: queries at
    positions [start, start + T), keys and values of [0, start + T) from ``chunk.keys_values``, so causal
    attention is exactly one device's over the whole sequence."""
    B, T, D = x_BTD.shape
    H, K = attn.num_heads, D // attn.num_heads
    q_BHTK, k_BHTK, v_BHTK = (lin(x_BTD).view(B, T, H, K).transpose(1, 2) for lin in (attn.q, attn.k, attn.v))
    k_BHSK, v_BHSK = chunk.keys_values(attn, k_BHTK, v_BHTK)  # S = start + T: this chunk and the earlier ones
    S = k_BHSK.shape[2]
    masked_TS = attn.causal_TT[S - T : S, :S]
    if attn.kind == "sdpa":
        y_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHSK, v_BHSK, attn_mask=~masked_TS)
    else:
        scores_BHTS = (q_BHTK @ k_BHSK.transpose(-2, -1) / math.sqrt(K)).masked_fill(masked_TS, float("-inf"))
        y_BHTK = F.dropout(scores_BHTS.softmax(-1), attn.dropout, attn.training) @ v_BHSK
    y_BTD = y_BHTK.transpose(1, 2).reshape(B, T, D)
    return F.dropout(attn.proj(y_BTD), attn.dropout, attn.training)


def split_gpt(model: GPT, num_stages: int, *, boundaries=None, policies=None) -> list[GPTStage]:
    """``num_stages`` stages in model order, the blocks spread as evenly as they go (the earlier stages take the
    extra ones; a middle stage may hold none when there are fewer blocks than stages).

    ``boundaries``: cut there instead, over the L + 2 layers (embedding, blocks, head), e.g. the
    ``Partition.boundaries`` of ``partition_layers``, each stage recomputing by its ``policies`` entry
    (balanced_pipeline_gpt.py's ``split_gpt_at``)."""
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
    if boundaries is not None:
        from balanced_pipeline_gpt import split_gpt_at

        if len(boundaries) != num_stages + 1:
            raise ValueError(f"{num_stages} stages need {num_stages + 1} boundaries, got {tuple(boundaries)}")
        return split_gpt_at(model, boundaries, policies)
    if policies is not None:
        raise ValueError("policies go with boundaries (one per stage of the cut); the even split recomputes nothing")
    per, extra = divmod(model.config.num_layers, num_stages)
    stages, start = [], 0
    for s in range(num_stages):
        n = per + (s < extra)
        stages.append(GPTStage(model, start, n, first=s == 0, last=s == num_stages - 1))
        start += n
    return stages


def make_pp_mesh(pp: int, dp: int = 1, tp: int = 1):
    """A ("pp", "dp", "tp") mesh, pp outermost, keeping dp and tp only when larger than 1."""
    names, shape = zip(*[(n, s) for n, s in (("pp", pp), ("dp", dp), ("tp", tp)) if s > 1 or n == "pp"])
    return dtp.init_device_mesh("cpu", shape, mesh_dim_names=names)


def _inner(mesh):
    """The mesh dims other than pp as a mesh of its own (None when pp is all there is).

    Its own root, not a slice of the pp mesh: ``replicate`` lifts tp-placed parameters from ``inner["tp"]`` onto
    the mesh that sub-mesh was sliced from. No groups are created (the pp mesh made every one of them)."""
    names = tuple(n for n in mesh.mesh_dim_names if n != "pp")
    return dtp.DeviceMesh(mesh.device_type, mesh[names].mesh, mesh_dim_names=names) if names else None


def place_stage(stage: GPTStage, mesh, *, sp: bool = False, zero: int = 0) -> GPTStage:
    """Lay one stage out on the mesh dims other than pp, as gpt_layouts.py's ``place_model`` lays out the model."""
    inner = _inner(mesh)
    if inner is None or not any(True for _ in stage.parameters()):
        return stage
    names = inner.mesh_dim_names
    if "tp" in names:
        modules = [n for n, _ in stage.named_modules()]
        plan = {k: v for k, v in tp_plan(stage.config, sequence_parallel=sp).items()
                if any(fnmatch.fnmatchcase(n, k) for n in modules)}
        parallelize_module(stage, inner["tp"], plan)
    if "dp" not in names:
        dtp.distribute_module(stage, inner)
        return stage
    replicate(stage, inner, dp_mesh_dim="dp", reduce_in_backward=zero == 0)
    if zero == 3:
        for block in stage.blocks:
            fully_shard(block, inner, mesh_dim="dp")
        fully_shard(stage, inner, mesh_dim="dp")
    return stage


def gpt_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of one microbatch (vocab-sharded logits under ``loss_parallel``)."""
    return F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten(0, 1))


def _place_batch(batch: torch.Tensor, mesh):
    inner = _inner(mesh)
    if inner is None:
        return batch
    placements = [Shard(0) if n == "dp" else Replicate() for n in inner.mesh_dim_names]
    return dtp.distribute_tensor(batch, inner, placements, src_data_rank=None)


def _make_optimizer(params, mesh, zero: int, lr: float, weight_decay: float):
    if not params:  # a middle stage without blocks (more stages than layers)
        return None
    kwargs = dict(lr=lr, weight_decay=weight_decay, foreach=False)
    if zero in (1, 2):
        return ZeroRedundancyOptimizer(params, _inner(mesh), torch.optim.AdamW, stage=zero, mesh_dim="dp", **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _balanced_cut(config: GPTConfig, mesh, pp: int, n_microbatches: int, micro_batch_size: int, seq_len, schedule,
                  log) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The balanced cut (boundaries, policies), planned once by the rank at the mesh's origin and shared with the
    others (a sum over each mesh dim in turn, the others adding zeros): one planning process, not one per rank."""
    from balanced_pipeline_gpt import POLICIES, plan_gpt_stages_apart

    origin = all(mesh.get_local_rank(name) == 0 for name in mesh.mesh_dim_names)
    shared = torch.zeros(1 + (pp + 1) + pp, dtype=torch.float64)  # [failed, boundaries..., policy indices...]
    failure = None
    if origin:
        try:
            cut = plan_gpt_stages_apart(config, pp, n_microbatches, micro_batch_size, seq_len, schedule)
            shared[1:] = torch.tensor([*cut.boundaries, *(POLICIES.index(p) for p in cut.policies)])
            if log is not None:
                log(f"balanced stages: {cut.boundaries} over (embedding, {config.num_layers} blocks, head), "
                    f"recompute {cut.policies}; simulated step {cut.step_time:.3g} FLOPs, bubble {cut.bubble:.3f}")
        except ValueError as error:
            shared[0], failure = 1, error
    for mesh_dim in range(mesh.ndim):
        shared = collectives.all_reduce(shared, mesh, mesh_dim, "sum")
    if shared[0]:
        raise failure or ValueError("the balanced stages could not be planned: see the first rank's error")
    values = [int(v) for v in shared[1:].tolist()]
    return tuple(values[: pp + 1]), tuple(POLICIES[i] for i in values[pp + 1:])


def compare_pipeline_with_single(config: GPTConfig, layout, *, pp: int, schedule: str, n_microbatches: int,
                                 batch_list, lr: float = 1e-3, seed: int = 0, weight_decay: float = 0.1,
                                 log=None, compile_stages=None, balanced: bool = False, boundaries=None,
                                 policies=None, sequence_chunks: int = 1):
    """Train ``config`` pipelined over ``pp`` ranks by ``schedule``, each stage laid out by ``layout`` (gpt_layouts'
    Layout: dp, tp, sp, zero; cp must be 1), and as one process from the same weights. AdamW steps at the
    schedule's STEP; ``n_microbatches`` must divide the per-dp-rank batch.

    Call on every rank of a pp * dp * tp group. Returns (pipeline losses, single-process losses, largest final
    parameter difference), the same on every rank. ``compile_stages``: a ``torch.compile`` backend name to run
    each stage's module compiled (the pipeline sends, receives and steps around it). ``balanced``: cut the stages
    where ``partition_layers`` puts them for this config, microbatch and schedule (balanced_pipeline_gpt.py's
    ``plan_gpt_stages``, planned once and shared) instead of evenly; ``boundaries`` and ``policies``: cut there
    (``split_gpt``'s), recomputing by stage. ``sequence_chunks``: k for the sequence schedules (``seq1f1b``,
    ``terapipe``): each of the ``n_microbatches`` samples cut into k chunks along the sequence (pp, with dp / ZeRO-1/2).
    """
    if getattr(config, "moe_experts", 0):
        raise ValueError("pipeline_gpt splits dense GPTs: the MoE auxiliary losses do not cross stages yet; "
                         "use moe_experts=0 with --pp")
    if getattr(layout, "cp", 1) != 1:
        raise ValueError("pipeline_gpt composes pp with dp / ZeRO, tp and sp; context parallelism (cp) is not wired in")
    if sequence_chunks > 1 and (layout.tp != 1 or layout.zero == 3 or compile_stages or balanced
                                or boundaries is not None):
        raise ValueError(f"sequence chunks (--seq-chunks {sequence_chunks}) run on pp (x dp, ZeRO-1/2) meshes with the "
                         "even cut and eager stages: their attention caches the keys and values of each rank's rows as "
                         "plain tensors (replicate's local compute); drop --tp, --zero 3, --balanced and --compile")
    mesh = make_pp_mesh(pp, layout.dp, layout.tp)
    pp_rank = mesh.get_local_rank("pp")
    torch.manual_seed(seed)
    model = GPT(config)
    reference = copy.deepcopy(model)

    plan = build_schedule(schedule, pp, n_microbatches, stages_per_rank=2, sequence_chunks=sequence_chunks)
    # Chimera's two pipelines are one model twice: stage s runs model piece s % per_pipeline, and the two replicas
    # of a piece declare every weight shared, so the schedule sums their gradients before the optimizer step.
    per_pipeline = plan.stages_per_pipeline
    if balanced:
        if boundaries is not None:
            raise ValueError("balanced plans the boundaries itself: pass balanced=True or boundaries, not both")
        batch, seq_len = batch_list[0][0].shape if batch_list else (n_microbatches, None)
        boundaries, policies = _balanced_cut(config, mesh, pp, n_microbatches, batch // layout.dp // n_microbatches,
                                             seq_len, schedule, log)
    pieces = split_gpt(model, per_pipeline, boundaries=boundaries, policies=policies)
    placed = {i: place_stage(pieces[i], mesh, sp=layout.sp, zero=layout.zero)
              for i in sorted({s % per_pipeline for s in plan.stages_of(pp_rank)})}
    mine = list(placed.values())
    run = (lambda piece: torch.compile(piece, backend=compile_stages)) if compile_stages else (lambda piece: piece)
    stages = []
    for s in plan.stages_of(pp_rank):
        piece = placed[s % per_pipeline]
        shared = ({n: f"piece{s % per_pipeline}.{n}" for n, _ in piece.named_parameters()}
                  if plan.num_pipelines > 1 else None)
        stages.append(PipelineStage(run(piece), s, plan.num_stages, mesh, shared_parameters=shared,
                                    num_pipelines=plan.num_pipelines))
    params = [p for piece in mine for p in piece.parameters()]
    opt = _make_optimizer(params, mesh, layout.zero, lr, weight_decay)
    pipe = PipelineSchedule(stages, plan, loss_fn=gpt_loss, optimizer=opt)

    losses = []
    for step, (tokens, targets) in enumerate(batch_list):
        mb_losses = []
        with loss_parallel():
            pipe.step(_place_batch(tokens, mesh), target=_place_batch(targets, mesh), losses=mb_losses)
        if plan.sequence_chunks > 1:  # one pipeline: every chunk's loss here, weighted by its share of the tokens
            total = sum(w * _full(x) for w, x in zip(pipe.loss_weights, mb_losses)) if mb_losses else torch.zeros(())
        else:
            total = torch.stack([_full(x) for x in mb_losses]).sum() / n_microbatches if mb_losses else torch.zeros(())
        # NOTE: one all-reduce over pp per step: the microbatch losses sit on the last stage of each pipeline.
        losses.append(collectives.all_reduce(total.reshape(1).clone(), mesh, mesh.mesh_dim_index("pp"), "sum").item())
        if log is not None:
            log(f"step {step:4d}  loss {losses[-1]:.4f}")

    single_opt = torch.optim.AdamW(reference.parameters(), lr=lr, weight_decay=weight_decay, foreach=False)
    single_losses = []
    for tokens, targets in batch_list:
        loss = gpt_loss(reference(tokens), targets)
        loss.backward()
        single_opt.step()
        single_opt.zero_grad(set_to_none=True)
        single_losses.append(loss.item())

    ref = dict(reference.named_parameters())
    diff = max(((_full(p) - ref[piece.model_name(n)]).abs().max().item() for piece in mine
                for n, p in piece.named_parameters()), default=0.0)
    diff = collectives.all_reduce(torch.tensor([diff]), mesh, mesh.mesh_dim_index("pp"), "max").item()
    return losses, single_losses, diff
