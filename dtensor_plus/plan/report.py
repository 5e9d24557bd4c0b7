"""The planner's answer as a picture: memory per device stacked by kind, communication per mesh dim, and the
predicted pipeline timeline of the winner (or of the best pipelined plan when the winner has no pipeline).

    write_report(result, "plan.png")      # needs matplotlib (the "examples" extra); raises a clear error if absent

The layouts drawn: the ranked plans (up to 6) and each losing family's best (up to 6 more, the families with a
priced member, those closest to the winner first), so the picture shows why they lost next to the winner. The
timeline is ``layouts.pipeline``'s schedule simulator run on the layout's (pp, microbatches, virtual stages) with
each microbatch's forward and backward taking the cost model's compute time per microbatch (F : B = 1 : 2, or
F = B = W under ZB-H1's split backward): it shows the schedule's shape and bubble as the cost model prices it;
per-stage differences (the first stage's embedding, the last's head) are not drawn.
"""

from __future__ import annotations

import os
from types import MappingProxyType

from .layout import SPLIT_BACKWARD

__all__ = ["write_report", "MatplotlibMissing"]

GIB = 1 << 30
KIND_COLORS = MappingProxyType({"parameters": "#4C72B0", "gradients": "#DD8452", "optimizer": "#55A868",
                                "activations": "#C44E52"})
_MAX_TIMELINE_MICROBATCHES = 16  # more is unreadable; the timeline is drawn for at most this many (said in the title)


class MatplotlibMissing(RuntimeError):
    """The report needs matplotlib, which is not importable here."""


def _picked(result) -> list[tuple[str, object]]:
    rows = [(f"#{i} {e.layout}", e) for i, e in enumerate(result.plans[:6], 1)]
    losers = [v for v in result.families if v.best is not None and v.kind != "tie"]
    losers.sort(key=lambda v: v.best.step_time)
    seen = {e.layout for _, e in rows}
    for v in losers:
        if v.best.layout not in seen and len(rows) < 12:
            seen.add(v.best.layout)
            rows.append((f"{v.family} ({v.kind}): {v.best.layout}", v.best))
    return rows


def _timeline_events(estimate, global_batch: int):
    """Simulated pipeline events of ``estimate``'s layout, microbatches capped (see the module docstring)."""
    from dtensor_plus.layouts.pipeline.actions import Kind
    from dtensor_plus.layouts.pipeline.executor import build_schedule
    from dtensor_plus.layouts.pipeline.simulate import simulate

    layout = estimate.layout
    m_real = layout.microbatches(global_batch)
    m = min(m_real, _MAX_TIMELINE_MICROBATCHES)
    if layout.schedule in ("interleaved_1f1b", "chimera"):
        m = max(layout.pp, m - m % layout.pp)
    if layout.schedule == "dualpipe_v":
        m = max(m, 2 * layout.pp)
    per_microbatch = estimate.compute_s / m_real / layout.chunks_per_rank  # one chunk's share on one rank
    f = per_microbatch / 3
    costs = {Kind.F: f, Kind.B: 2 * f, Kind.W: 0.0, Kind.BW: 2 * f}
    if layout.schedule in SPLIT_BACKWARD:
        costs.update({Kind.B: f, Kind.W: f})
    sim = simulate(build_schedule(layout.schedule, layout.pp, m, layout.virtual_stages), costs)
    shown = f"{m} of {m_real} microbatches" if m != m_real else f"{m} microbatches"
    return sim.events, shown


def write_report(result, path: str | os.PathLike) -> str:
    """Draw the picture of ``result`` (a SearchResult) into ``path`` (PNG). Returns the path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as err:
        raise MatplotlibMissing(f"the report picture needs matplotlib ({err}); install it (pip install "
                                f"'matplotlib>=3.5,<4', the project's 'examples' extra) or leave out --report") from None
    from dtensor_plus.layouts.pipeline.timeline import COLORS, IDLE, _draw_panel

    rows = _picked(result)
    if not rows:
        raise ValueError("nothing was priced: no picture to draw (see the table's reasons)")
    labels = [label for label, _ in rows]
    fig = Figure(figsize=(15, 4.5 + 0.45 * len(rows) + 0.35 * 8), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=(0.5 * len(rows) + 1, 0.35 * 8 + 1.5))
    mem_ax, comm_ax, time_ax = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])

    ys = range(len(rows))
    left = [0.0] * len(rows)
    for kind, color in KIND_COLORS.items():
        widths = [e.memory.get(kind, 0) / GIB for _, e in rows]
        mem_ax.barh(ys, widths, left=left, color=color, label=kind)
        left = [a + b for a, b in zip(left, widths)]
    mem_ax.axvline(result.memory_per_device / GIB, color="black", linestyle="--", linewidth=1, label="memory per device")
    mem_ax.set_yticks(list(ys), labels, fontsize=6)
    mem_ax.invert_yaxis()
    mem_ax.set(xlabel="GiB per device (worst stage)", title="memory per device, by kind")
    mem_ax.legend(fontsize=7, loc="lower right")

    dims = sorted({d for _, e in rows for d in e.communication_s})
    palette = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3")
    left_total, left_exposed = [0.0] * len(rows), [0.0] * len(rows)
    for dim, color in zip(dims, palette * 2):
        total = [e.communication_s.get(dim, 0.0) for _, e in rows]
        exposed = [e.exposed_communication_s.get(dim, 0.0) for _, e in rows]
        comm_ax.barh([y - 0.2 for y in ys], total, height=0.4, left=left_total, color=color, alpha=0.45)
        comm_ax.barh([y + 0.2 for y in ys], exposed, height=0.4, left=left_exposed, color=color, label=dim)
        left_total = [a + b for a, b in zip(left_total, total)]
        left_exposed = [a + b for a, b in zip(left_exposed, exposed)]
    comm_ax.set_yticks(list(ys), [""] * len(rows))
    comm_ax.invert_yaxis()
    comm_ax.set(xlabel="seconds per step: all collectives (pale, upper) and exposed (solid, lower)",
                title="communication per mesh dim")
    if dims:
        comm_ax.legend(fontsize=7, loc="lower right")

    pipelined = [e for e in [result.plans[0] if result.plans else None] + list(result.plans) if e and e.layout.pp > 1]
    pipelined += [v.best for v in result.families if v.best is not None and v.best.fits and v.best.layout.pp > 1]
    if pipelined:
        shown = pipelined[0]
        events, which = _timeline_events(shown, result.global_batch)
        winner = result.plans and shown is result.plans[0]
        title = (f"{'winner' if winner else 'best pipelined plan'} {shown.layout}: predicted timeline, {which} "
                 f"(bubble {shown.bubble_s:.3g} s of a {shown.step_time:.3g} s step)")
        _draw_panel(time_ax, title, events, shown.layout.pp)
        time_ax.set_yticks(range(shown.layout.pp), [f"pp rank {r}" for r in range(shown.layout.pp)], fontsize=7)
        time_ax.set_ylim(shown.layout.pp - 0.5, -0.5)
        time_ax.set_xlabel("seconds (cost model)")
        handles = [Patch(color=c, label=k.value) for k, c in COLORS.items()] + [Patch(color=IDLE, label="idle")]
        time_ax.legend(handles=handles, fontsize=7, ncols=len(handles), loc="upper center",
                       bbox_to_anchor=(0.5, -0.25), frameon=False)
    else:
        time_ax.set_axis_off()
        time_ax.text(0.5, 0.5, "no priced plan uses a pipeline: no timeline to draw", ha="center", va="center")
    fig.suptitle(f"{result.workload.name} on {result.world} x {result.cluster.name}, global batch "
                 f"{result.global_batch}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(os.fspath(path), dpi=100)
    return os.fspath(path)
