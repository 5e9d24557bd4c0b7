"""Every schedule the executor can run, by name: the classic ones of ``schedules.py`` and the papers' schedules of
the ``schedules_*.py`` files (a registry of its own because those import ``schedules.py``).

The sequence-level schedules (``schedules_sequence.py``) are in its ``SEQUENCE_SCHEDULES`` instead: they take k,
the sequence chunks each sample is cut into (``build_schedule(..., sequence_chunks=k)``).
"""

from __future__ import annotations

from collections.abc import Callable

from .actions import Schedule
from .schedules import SCHEDULES as CLASSIC
from .schedules_bidirectional import chimera
from .schedules_looped import breadth_first
from .schedules_v import dualpipe_v, v_half, v_min

__all__ = ["SCHEDULES", "LOOPED"]

SCHEDULES: dict[str, Callable[..., Schedule]] = {
    **CLASSIC,
    "dualpipe_v": dualpipe_v,
    "v_half": v_half,
    "v_min": v_min,
    "breadth_first": breadth_first,
    "chimera": chimera,
}
LOOPED = ("interleaved_1f1b", "breadth_first")  # the generators that take v, the stages per rank
