"""Pipeline schedules as data: the action vocabulary and the per-rank action lists every schedule produces.

A schedule is nothing but, for each pipeline rank, the ordered list of things that rank does in one step.
Generators (``schedules.py``) write these lists, the validator checks them, the simulator replays them with
costs, and the executor runs them with real p2p; all four speak only the types in this file.

Stages are numbered globally 0..num_stages-1 in model order; ``stage_to_rank[s]`` says which pipeline rank
holds stage s (looped placement for interleaved 1F1B: s % p; V placement for ZB-V: rank r holds r and
2p-1-r). Communication is explicit: a rank that runs F on stage s whose input lives on another rank has a
RECV_F(s, mb) before it; the rank of stage s has a SEND_F(s, mb) after it. Backward mirrors this with
SEND_B / RECV_B carrying the gradient of stage s's *input* to stage s-1. Sends never block (isend); a
receive blocks until its send was posted, which is the semantics the validator checks for deadlock.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

from dtensor_plus.renamed import renamed_keywords


class Kind(enum.Enum):
    F = "F"  # forward of one microbatch through one stage
    B = "B"  # backward for the stage's input only (zero-bubble split); W must follow later
    W = "W"  # backward for the stage's weights, after its B
    BW = "BW"  # full backward: B and W fused, what GPipe and 1F1B run
    SEND_F = "SEND_F"  # send stage s's output activation to the rank of stage s+1
    RECV_F = "RECV_F"  # receive stage s's input activation from the rank of stage s-1
    SEND_B = "SEND_B"  # send the gradient of stage s's input to the rank of stage s-1
    RECV_B = "RECV_B"  # receive the gradient of stage s's output from the rank of stage s+1
    STEP = "STEP"  # optimizer step, after the rank's last W/BW

    @property
    def is_compute(self) -> bool:
        return self in (Kind.F, Kind.B, Kind.W, Kind.BW)

    @property
    def is_comm(self) -> bool:
        return self in (Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B)


@dataclass(frozen=True)
class Action:
    """One thing one rank does: ``kind`` on ``stage`` for ``microbatch`` (STEP has neither: -1, -1)."""

    kind: Kind
    stage: int = -1
    microbatch: int = -1

    def __repr__(self) -> str:
        if self.kind is Kind.STEP:
            return "STEP"
        return f"{self.kind.value}{self.stage}.{self.microbatch}"


@dataclass(frozen=True)
class Schedule:
    """The whole step: which rank holds which stage, and each rank's ordered actions.

    ``actions[r]`` is rank r's list. ``name`` is the generator's ("gpipe", "1f1b", ...), for pictures and tables.

    Three optional shapes, each the default (plain) when left out:

    - ``overlapped``: pairs ``(first, second)`` of compute actions of one rank, adjacent in its list, that run as
      one overlapped chunk (DualPipe's forward of one microbatch beside the backward of another: their compute and
      communication hide each other on a GPU). The simulator charges such a pair its own duration (``f_and_b``);
      the executor may run the two one after the other, which is the same arithmetic.
    - ``num_pipelines``: independent chains of ``num_stages // num_pipelines`` stages each, stage numbers
      pipeline-major (Chimera: a down and an up pipeline); microbatch mb runs through pipeline
      ``mb % num_pipelines`` only, entering at its first stage.
    - ``sequence_chunks``: k > 1 splits every sample along the sequence (TeraPipe, Seq1F1B): "microbatch" u is
      chunk ``u % k`` of sequence microbatch ``u // k``; a chunk's forward needs the earlier chunk's forward on
      the same stage (its keys and values), and a chunk's backward the later chunk's backward on the same stage
      (which sends gradient into those keys and values).
    """

    name: str
    num_ranks: int
    n_microbatches: int  # torch.distributed.pipelining's name (ours was num_microbatches until this release)
    stage_to_rank: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]
    overlapped: frozenset[tuple[Action, Action]] = frozenset()
    num_pipelines: int = 1
    sequence_chunks: int = 1

    @property
    def num_stages(self) -> int:
        return len(self.stage_to_rank)

    @property
    def num_microbatches(self) -> int:
        """The old name of ``n_microbatches``; goes in the next release."""
        warnings.warn("Schedule.num_microbatches is now Schedule.n_microbatches; the old name goes in the next "
                      "release", DeprecationWarning, stacklevel=2)
        return self.n_microbatches

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages rank holds, in model order."""
        return tuple(s for s, r in enumerate(self.stage_to_rank) if r == rank)

    @property
    def stages_per_pipeline(self) -> int:
        return self.num_stages // self.num_pipelines

    def pipeline_of(self, microbatch: int) -> int:
        """The pipeline microbatch ``microbatch`` runs through."""
        return microbatch % self.num_pipelines

    def runs(self, stage: int, microbatch: int) -> bool:
        """Whether ``microbatch`` passes through ``stage`` (always, with one pipeline)."""
        return stage // self.stages_per_pipeline == self.pipeline_of(microbatch)

    def is_first(self, stage: int) -> bool:
        """Whether ``stage`` takes the model input: the first stage of its pipeline."""
        return stage % self.stages_per_pipeline == 0

    def is_last(self, stage: int) -> bool:
        """Whether ``stage`` computes the loss: the last stage of its pipeline."""
        return stage % self.stages_per_pipeline == self.stages_per_pipeline - 1

    def __post_init__(self):
        if not (isinstance(self.num_pipelines, int) and self.num_pipelines >= 1
                and self.num_stages % self.num_pipelines == 0):
            raise ValueError(f"{self.name}: {self.num_stages} stages do not split into num_pipelines="
                             f"{self.num_pipelines} equal pipelines")
        if not (isinstance(self.sequence_chunks, int) and self.sequence_chunks >= 1
                and self.n_microbatches % self.sequence_chunks == 0):
            raise ValueError(f"{self.name}: n_microbatches={self.n_microbatches} must be a multiple of "
                             f"sequence_chunks={self.sequence_chunks} (each sample's chunks are microbatches)")
        if len(self.actions) != self.num_ranks:
            raise ValueError(f"{self.name}: {len(self.actions)} action lists for {self.num_ranks} ranks")
        bad = [r for r in self.stage_to_rank if not 0 <= r < self.num_ranks]
        if bad:
            raise ValueError(f"{self.name}: stage_to_rank {self.stage_to_rank} names ranks outside 0..{self.num_ranks - 1}")


Schedule.__init__ = renamed_keywords(num_microbatches="n_microbatches")(Schedule.__init__)


@dataclass(frozen=True)
class Event:
    """One action as it ran (executor) or would run (simulator): seconds from the start of the step. ``cpu``: the
    executor's compute actions also record the CPU time the rank's thread spent in them; below ``end - start``
    when the OS ran something else meanwhile (more busy processes than cores)."""

    rank: int
    action: Action
    start: float
    end: float
    cpu: float | None = None
