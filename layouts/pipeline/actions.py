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
    """

    name: str
    num_ranks: int
    n_microbatches: int  # torch.distributed.pipelining's name (ours was num_microbatches until this release)
    stage_to_rank: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]

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

    def __post_init__(self):
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
