"""Pictures of pipeline timelines: one row per rank, F/B/W/BW coloured, idle time left grey.

``plot_timelines([("recorded", executor_events), ("simulated", sim.events)], "timeline.png")`` draws the
panels side by side, each on its own time axis (a real run in seconds, a simulation in cost units);
``plot_recorded_vs_simulated`` simulates a real run with its measured costs and draws both.
matplotlib is imported only when a picture is drawn, through its object API (no pyplot global state).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .actions import Event, Kind, Schedule
from .simulate import SimResult, costs_from_events, simulate, stage_costs_from_events

COLORS = {Kind.F: "#4C72B0", Kind.B: "#DD8452", Kind.W: "#55A868", Kind.BW: "#C44E52", Kind.STEP: "#333333"}
IDLE = "#E6E6E6"
_MAX_LABELS = 400  # beyond this many bars per panel the microbatch numbers are unreadable anyway


def plot_timelines(panels: Sequence[tuple[str, Sequence[Event]]], path: str | os.PathLike) -> None:
    """Write a PNG with one panel per ``(title, events)``, side by side; rows are ranks, rank 0 on top.

    Compute actions are bars coloured by kind and labelled with their microbatch, hatched on a rank's later
    stages; communication actions are not drawn, so a rank waiting on a receive shows as idle (grey). Each
    row ends with its idle share.
    """
    if not panels:
        raise ValueError("plot_timelines needs at least one (title, events) panel")
    for title, events in panels:
        if not events:
            raise ValueError(f"panel {title!r} has no events to draw")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    num_ranks = max(e.rank for _, events in panels for e in events) + 1
    fig = Figure(figsize=(6.5 * len(panels), 0.55 * num_ranks + 1.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (title, events) in zip(axes, panels):
        _draw_panel(ax, title, events, num_ranks)
    axes[0].set_yticks(range(num_ranks), [f"rank {r}" for r in range(num_ranks)])
    axes[0].set_ylim(num_ranks - 0.5, -0.5)
    handles = [Patch(color=c, label=k.value) for k, c in COLORS.items()] + [Patch(color=IDLE, label="idle")]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    fig.savefig(os.fspath(path), dpi=110)


def plot_recorded_vs_simulated(schedule: Schedule, recorded: Sequence[Event], path: str | os.PathLike,
                               latency: float = 0.0, *, per_stage: bool = False) -> SimResult:
    """The picture of a real run beside its simulation with the run's own median action durations (so both
    panels share a time scale): per kind, or with ``per_stage`` per kind and stage (unequal stages kept).
    ``recorded``: the events of all ranks, e.g. every rank's executor timeline gathered on one rank. Returns the
    simulation, to compare step times and bubbles in numbers too."""
    costs = stage_costs_from_events(recorded) if per_stage else costs_from_events(recorded)
    sim = simulate(schedule, costs, latency)
    what = "per-stage measured costs" if per_stage else "measured costs"
    plot_timelines([(f"{schedule.name}: recorded", recorded),
                    (f"{schedule.name}: simulated, {what}", sim.events)], path)
    return sim


def _draw_panel(ax, title: str, events: Sequence[Event], num_ranks: int) -> None:
    t0 = min(e.start for e in events)
    end = max(e.end for e in events) - t0
    compute = [e for e in events if e.action.kind.is_compute or e.action.kind is Kind.STEP]
    label = len(compute) <= _MAX_LABELS
    busy = [0.0] * num_ranks
    stages = [sorted({e.action.stage for e in compute if e.rank == r and e.action.kind.is_compute})
              for r in range(num_ranks)]
    for r in range(num_ranks):
        ax.broken_barh([(0, end)], (r - 0.4, 0.8), facecolors=IDLE)  # the step's span; bars cover the busy part
    for e in compute:
        kind, start, width = e.action.kind, e.start - t0, e.end - e.start
        # a rank's later stages (interleaved chunks, the V's way back) hatched, to tell them from its first
        later = kind.is_compute and stages[e.rank].index(e.action.stage) > 0
        ax.broken_barh([(start, width)], (e.rank - 0.4, 0.8), facecolors=COLORS[kind], edgecolor="white",
                       linewidth=0.5, hatch="///" if later else None)
        if kind.is_compute:
            busy[e.rank] += width
            if label and width > end / 120:
                ax.text(start + width / 2, e.rank, str(e.action.microbatch), ha="center", va="center",
                        fontsize=6, color="white")
    for r in range(num_ranks):
        idle = 1 - busy[r] / end if end > 0 else 0.0
        ax.text(end * 1.01, r, f"idle {idle:.0%}", va="center", fontsize=7)
    ax.set_xlim(0, end * 1.12 if end > 0 else 1)
    ax.set_title(f"{title}  (step {end:.3g})", fontsize=10)
    ax.set_xlabel("time")
