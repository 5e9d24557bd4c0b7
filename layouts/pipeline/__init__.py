"""Pipeline parallelism on the ``pp`` mesh dim: stages, schedules as data, a simulator and an executor.

    from dtensor_plus.layouts.pipeline import PipelineStage, PipelineSchedule
    stage = PipelineStage(piece, stage_index, num_stages, mesh)          # mesh has a "pp" dim
    PipelineSchedule(stage, "1f1b", n_microbatches=4, loss_fn=loss_fn).step(batch, target=targets)
"""

from .actions import Action, Event, Kind, Schedule
from .executor import PipelineSchedule, build_schedule, pipeline_step
from .microbatch import merge_microbatches, split_microbatches
from .registry import SCHEDULES
from .schedules import gpipe, interleaved_1f1b, one_f_one_b, zb_h1, zb_v
from .schedules_bidirectional import chimera
from .schedules_looped import breadth_first
from .schedules_sequence import seq1f1b, terapipe
from .schedules_v import dualpipe_v, v_half, v_min
from .shared import find_shared_parameters
from .simulate import SimResult, bubble_formula, costs_from_events, simulate
from .stage import PipelineStage
from .validate import validate

__all__ = ["Action", "Event", "Kind", "Schedule", "PipelineStage", "PipelineSchedule", "pipeline_step",
           "build_schedule", "split_microbatches", "merge_microbatches", "SCHEDULES", "gpipe", "one_f_one_b",
           "interleaved_1f1b", "zb_h1", "zb_v", "dualpipe_v", "v_half", "v_min", "breadth_first", "chimera", "seq1f1b",
           "terapipe", "validate", "simulate", "SimResult", "bubble_formula",
           "costs_from_events", "find_shared_parameters"]
