"""Pipeline parallelism on the ``pp`` mesh dim: stages, schedules as data, a simulator and an executor."""

from .actions import Action, Event, Kind, Schedule

__all__ = ["Action", "Event", "Kind", "Schedule"]
