"""The papers' pipeline schedules simulated beside the papers' own figures (``benchmarks/pipeline.py --papers P M``):
bubble fraction and the busiest rank's peak activations, one process, no ranks.

    .venv/bin/python benchmarks/pipeline.py --papers 8 64
"""

from __future__ import annotations

from dtensor_plus.layouts.pipeline import SCHEDULES, Kind, seq1f1b, terapipe
from dtensor_plus.layouts.pipeline.simulate import bubble_formula, peak_until_w, simulate

PAPERS = ("1f1b", "zb_v", "dualpipe_v", "v_half", "v_min", "breadth_first", "chimera", "seq1f1b", "terapipe")


def papers_table(p: int, m: int) -> None:
    """The papers' schedules simulated (T_F = T_B = T_W; Chimera T_F = T_B, its paper's; Seq1F1B and TeraPipe with
    k = 4 chunks): bubble against the paper's figure, and peak activations of the busiest rank as a share of
    1F1B's p microbatches (V stages are half a 1F1B stage, sequence chunks a quarter of a microbatch)."""
    k = 4
    approx = {"v_half": (p / (2 * m), "~p/(2m)"), "v_min": (2 * p / (3 * m), "~2p/(3m)")}
    print(f"p = {p} ranks, m = {m} microbatches (k = {k} sequence chunks)")
    print(f"{'schedule':14} {'sim bubble':>10} {'paper':>8}  {'formula':18} {'peak act / 1F1B':>15}")
    for name in PAPERS:
        gen = {"seq1f1b": seq1f1b, "terapipe": terapipe}.get(name) or SCHEDULES[name]
        schedule = gen(p, m, k) if name in ("seq1f1b", "terapipe") else gen(p, m)
        unit = {"seq1f1b": k, "terapipe": k}.get(name, schedule.num_stages // schedule.num_pipelines // p)
        costs = {Kind.F: 1.0, Kind.BW: 1.0} if name == "chimera" else None
        sim = simulate(schedule, costs)
        if name in approx:
            paper, text = approx[name]
        else:
            paper = bubble_formula(name, p, m, schedule.num_stages // p if name == "breadth_first" else 1, k=k)
            text = "bubble_formula" if name != "dualpipe_v" else "DeepSeek, F&B=F+B"
        held = max(peak_until_w(schedule) if name in approx else sim.peak_in_flight)
        print(f"{name:14} {sim.bubble:10.3f} {paper:8.3f}  {text:18} {held / unit / min(p, m):15.2f}")
