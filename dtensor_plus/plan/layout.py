"""One candidate layout of a training run: how many ways of each parallelism, in which mesh order, and the
per-step choices (ZeRO stage, microbatches, schedule, recomputation, offload).

A ``ParallelLayout`` is plain data the planner enumerates, the cost model prices and the user reads and edits:
``mesh_shape()`` is what ``init_device_mesh`` takes, ``intra_node(gpus_per_node)`` says which mesh dims stay
inside a node (the fastest-changing dims, innermost in ``order``, as ranks are numbered node by node).
``problems(...)`` says why a layout cannot run a given model / world / batch (the planner's cheapest prune),
``to_train_gpt_flags(global_batch)`` is the command line of ``examples/train_gpt.py`` that runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["ParallelLayout", "SCHEDULES", "RECOMPUTE", "LOOPED", "V_SHAPED", "SPLIT_BACKWARD"]

# layouts.pipeline.registry's SCHEDULES, every schedule the executor runs (a test keeps the two equal; named here
# so that building a layout imports no torch.distributed)
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zb_v", "dualpipe_v", "v_half", "v_min", "breadth_first",
             "chimera")
LOOPED = ("interleaved_1f1b", "breadth_first")  # virtual_stages chunks per rank, looped placement
V_SHAPED = ("zb_v", "dualpipe_v", "v_half", "v_min")  # two half-stage chunks per rank in a V
SPLIT_BACKWARD = ("zb_h1", "zb_v", "dualpipe_v", "v_half", "v_min")  # backward as B (input) and W (weights)
RECOMPUTE = ("none", "selective", "full")
_DIMS = ("pp", "dp", "cp", "tp")


@dataclass(frozen=True)
class ParallelLayout:
    """dp x tp x pp x cp ranks (ep: experts sharded over an ep-sized part of dp, MoE models only).

    zero: 0 plain data parallelism, 1 optimizer state sharded over dp, 2 plus gradients, 3 plus parameters.
    micro_batch_size: sequences per microbatch on one dp rank; the global batch sets the microbatch count.
    schedule / virtual_stages: the pipeline schedule (``layouts.pipeline`` names) and model chunks per pp rank.
    recompute: "none", "selective" (the attention core, Korthikanti et al.) or "full" (each layer's forward).
    offload: optimizer state and its step on the host. order: mesh dims outermost first (``tp`` innermost keeps
    its per-layer collectives on NVLink).
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    zero: int = 0
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    recompute: str = "none"
    offload: bool = False
    order: tuple[str, ...] = _DIMS

    def __post_init__(self):
        for name in ("dp", "tp", "pp", "cp", "ep", "micro_batch_size", "virtual_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelLayout.{name} must be a positive int, got {value!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"ParallelLayout.zero must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.zero and self.dp == 1:
            raise ValueError(f"zero={self.zero} shards over the dp mesh dim and needs dp > 1; set dp or zero=0")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel=True needs tp > 1: it shards the sequence on the tp mesh dim")
        if self.dp % self.ep:
            raise ValueError(f"ep({self.ep}) must divide dp({self.dp}): experts are sharded over part of dp")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.virtual_stages > 1 and self.schedule not in LOOPED:
            raise ValueError(f"virtual_stages > 1 needs a looped schedule {LOOPED}, got {self.schedule!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if sorted(self.order) != sorted(_DIMS):
            raise ValueError(f"order must be a permutation of {_DIMS}, got {self.order!r}")

    @property
    def chunks_per_rank(self) -> int:
        """Model chunks a pp rank holds: virtual_stages (looped), 2 halves of a stage (V), else 1 (Chimera's rank
        holds two whole stages, but each microbatch passes only one of them)."""
        return 2 if self.schedule in V_SHAPED else self.virtual_stages

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def size(self, mesh_dim: str) -> int:
        return getattr(self, mesh_dim)

    def mesh_shape(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """(names, sizes) of the mesh dims of size > 1, outermost first: ``init_device_mesh("cuda", sizes,
        mesh_dim_names=names)``. A one-rank layout is the mesh ("dp",) of size 1."""
        dims = [(name, self.size(name)) for name in self.order if self.size(name) > 1]
        names, sizes = zip(*dims) if dims else (("dp",), (1,))
        return tuple(names), tuple(sizes)

    def intra_node(self, gpus_per_node: int) -> dict[str, bool]:
        """{mesh dim: whether its groups stay inside one node}: ranks are numbered node by node, so a dim's group
        is inside a node when its size times the sizes of every dim inside it fits in ``gpus_per_node``."""
        out, inner = {}, 1
        for name in reversed(self.order):
            inner *= self.size(name)
            out[name] = inner <= gpus_per_node
        return out

    def microbatches(self, global_batch: int) -> int:
        """Microbatches per step on each pipeline: global_batch / (dp x micro_batch_size), which must divide."""
        per_replica = self.dp * self.micro_batch_size
        if global_batch % per_replica:
            raise ValueError(f"global batch {global_batch} does not divide into dp({self.dp}) x "
                             f"micro_batch_size({self.micro_batch_size}) = {per_replica}")
        return global_batch // per_replica

    def problems(self, *, world: int | None = None, num_layers: int | None = None, num_heads: int | None = None,
                 seq_len: int | None = None, global_batch: int | None = None, experts: int | None = None) -> list[str]:
        """Why this layout cannot run that model on that world with that batch: one sentence per reason, naming
        the sizes and the fix; empty when it can. Only the facts given are checked."""
        out = []
        if world is not None and self.world != world:
            out.append(f"dp({self.dp}) x tp({self.tp}) x pp({self.pp}) x cp({self.cp}) = {self.world} ranks, "
                       f"not the {world} given")
        if num_heads is not None and num_heads % self.tp:
            out.append(f"{num_heads} heads do not divide over tp({self.tp}): tp shards whole heads")
        if num_layers is not None and num_layers % (self.pp * self.chunks_per_rank):
            out.append(f"{num_layers} layers do not divide into pp({self.pp}) x {self.chunks_per_rank} chunks per "
                       f"rank ({self.schedule}) = {self.pp * self.chunks_per_rank} equal stages")
        if self.pp > 1 and self.schedule == "chimera" and self.pp % 2:
            out.append(f"chimera pairs rank r with pp-1-r and needs an even pp, got pp({self.pp})")
        if seq_len is not None and seq_len % self.cp:
            out.append(f"sequence length {seq_len} does not divide over cp({self.cp})")
        if global_batch is not None:
            per_replica = self.dp * self.micro_batch_size
            if global_batch % per_replica:
                out.append(f"global batch {global_batch} does not divide into dp({self.dp}) x "
                           f"micro_batch_size({self.micro_batch_size}) = {per_replica}")
            elif self.schedule == "interleaved_1f1b" and self.pp > 1 and (global_batch // per_replica) % self.pp:
                out.append(f"interleaved_1f1b needs the microbatches ({global_batch // per_replica}) to be a "
                           f"multiple of pp({self.pp})")
            elif self.schedule == "dualpipe_v" and self.pp > 1 and global_batch // per_replica < 2 * self.pp:
                out.append(f"dualpipe_v needs at least 2 pp = {2 * self.pp} microbatches, got "
                           f"{global_batch // per_replica}: raise the batch or lower micro_batch_size")
            elif self.schedule == "chimera" and self.pp > 1 and global_batch // per_replica < 2:
                out.append("chimera needs at least 2 microbatches (one per direction)")
        if experts is not None:
            if self.ep > 1 and (not experts or experts % self.ep):
                out.append(f"ep({self.ep}) must divide the {experts} experts")
        return out

    def check(self, **facts) -> ParallelLayout:
        """``problems(**facts)`` as a ValueError (all of them at once); returns self when there are none."""
        found = self.problems(**facts)
        if found:
            raise ValueError(f"layout {self} cannot run: " + "; ".join(found))
        return self

    def to_train_gpt_flags(self, global_batch: int) -> list[str]:
        """The ``examples/train_gpt.py`` flags that run this layout with ``global_batch`` sequences a step.

        train_gpt runs dp / tp / sp / zero / cp, or a pipeline (``--pp``, ``--schedule``, ``--microbatches``;
        interleaved with 2 stages per rank) composed with dp / tp / sp / zero. What it has no flag for (ep,
        recomputation, offload, other virtual stage counts, a mesh order other than pp outermost then dp,
        tp, cp) is an error naming the field, not a silently different run."""
        missing = []
        if self.ep > 1:
            missing.append(f"ep={self.ep} (train_gpt's --moe shards experts over all of dp)")
        if self.recompute != "none":
            missing.append(f"recompute={self.recompute!r}")
        if self.offload:
            missing.append("offload=True")
        if self.pp > 1 and self.cp > 1:
            missing.append("pp with cp")
        if self.pp > 1 and self.schedule in LOOPED and self.virtual_stages != 2:
            missing.append(f"virtual_stages={self.virtual_stages} (train_gpt interleaves 2 stages per rank)")
        if self.mesh_shape()[0] != tuple(n for n in ("pp", "dp", "tp", "cp") if self.size(n) > 1):
            missing.append(f"order={self.order} (train_gpt's mesh is pp, dp, tp, cp outermost first)")
        if missing:
            raise ValueError(f"examples/train_gpt.py cannot run {self}: it has no flag for " + ", ".join(missing))
        flags = ["--dp", str(self.dp), "--tp", str(self.tp)]
        flags += ["--sp"] if self.sequence_parallel else []
        flags += ["--zero", str(self.zero)]
        flags += ["--cp", str(self.cp)] if self.cp > 1 else []
        if self.pp > 1:
            flags += ["--pp", str(self.pp), "--schedule", self.schedule,
                      "--microbatches", str(self.microbatches(global_batch))]
        elif self.microbatches(global_batch) != 1:
            raise ValueError(f"examples/train_gpt.py runs each rank's whole batch at once without --pp: "
                             f"micro_batch_size must be global_batch / dp = {global_batch // self.dp}, "
                             f"not {self.micro_batch_size}")
        return flags + ["--batch-size", str(global_batch)]

    def replace(self, **changes) -> ParallelLayout:
        return replace(self, **changes)

    def __str__(self) -> str:
        sizes = " ".join(f"{n}{self.size(n)}" for n in self.order if self.size(n) > 1) or "1 rank"
        extras = [f"ep{self.ep}"] if self.ep > 1 else []
        extras += ["sp"] if self.sequence_parallel else []
        extras += [f"zero-{self.zero}"] if self.zero else []
        if self.pp > 1:
            extras.append(self.schedule + (f"(v{self.virtual_stages})" if self.virtual_stages > 1 else ""))
        extras += [f"mbs{self.micro_batch_size}"]
        extras += [f"recompute-{self.recompute}"] if self.recompute != "none" else []
        extras += ["offload"] if self.offload else []
        return " ".join([sizes, *extras])

