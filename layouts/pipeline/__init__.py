"""Pipeline parallelism on the ``pp`` mesh dim: stages, schedules as data, a simulator and an executor."""

from .actions import Action, Kind, Schedule

__all__ = ["Action", "Kind", "Schedule"]
