"""The planner's answer as text: the ranked plans, why each losing family lost, and the winner as data."""

from __future__ import annotations

import shlex

from .families import size_text

__all__ = ["format_table", "format_winner"]

GIB = 1 << 30


def _comm(estimate) -> str:
    parts = [f"{dim} {s:.3g}" for dim, s in sorted(estimate.exposed_communication_s.items()) if s > 0]
    return ", ".join(parts) or "-"


def format_table(result, top: int | None = None) -> str:
    plans = result.plans[:top] if top else result.plans
    w = result.cluster
    head = (f"{result.workload.name} on {result.world} x {w.name} ({w.gpus_per_node}/node), global batch "
            f"{result.global_batch}, {size_text(result.memory_per_device)} per device: {result.priced} layouts "
            f"priced, {len(result.ruled_out)} layouts ruled out unpriced, {result.seconds:.1f} s")
    rows = [("#", "layout", "step s", "tokens/s", "MFU", "mem GiB", "exposed comm s by mesh dim", "bubble s")]
    for i, e in enumerate(plans, 1):
        rows.append((str(i), str(e.layout), f"{e.step_time:.4g}", f"{e.tokens_per_s:,.0f}", f"{e.mfu:.1%}",
                     f"{sum(e.memory.values()) / GIB:.2f}", _comm(e), f"{e.bubble_s:.3g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head, ""]
    for n, r in enumerate(rows):
        lines.append("  ".join(c.rjust(wd) if i in (0, 2, 3, 4, 5, 7) else c.ljust(wd)
                               for i, (c, wd) in enumerate(zip(r, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * wd for wd in widths))
    if not plans:
        lines.append("(no layout fits: see why below)")
    lines += ["", "why the other families lost:"]
    width = max((len(v.family) for v in result.families), default=0)
    lines += [f"  {v.family.ljust(width)}  {v.reason}" for v in result.families]
    lines += [f"note: {n}" for n in result.notes]
    if plans:
        lines += ["", format_winner(result)]
    return "\n".join(lines)


def format_winner(result) -> str:
    """The winner as data: mesh shape, memory by kind, and the train_gpt command line (or why it has none)."""
    best = result.winner
    names, sizes = best.layout.mesh_shape()
    memory = ", ".join(f"{k} {size_text(v)}" for k, v in best.memory.items())
    lines = [f"winner: {best.layout}",
             f"  mesh: init_device_mesh(device, {sizes}, mesh_dim_names={names})",
             f"  memory per device (worst stage): {memory}",
             f"  step {best.step_time:.4g} s: compute {best.compute_s:.4g} s, exposed communication "
             f"{sum(best.exposed_communication_s.values()):.4g} s, bubble {best.bubble_s:.3g} s; "
             f"{best.tokens_per_s:,.0f} tokens/s, MFU {best.mfu:.1%}"]
    try:
        flags = result.train_gpt_flags()
        lines.append(f"  examples/train_gpt.py flags: {shlex.join(flags)}")
    except ValueError as err:
        lines.append(f"  examples/train_gpt.py: {err}")
    if best.layout.tp > 1:
        try:
            plan = result.tp_plan()
            lines.append("  tp plan (parallelize_module(model, mesh['tp'], plan)):")
            lines += [f"    {k!r}: {type(v).__name__}" for k, v in plan.items()]
        except ValueError as err:
            lines.append(f"  tp plan: {err}")
    return "\n".join(lines)
