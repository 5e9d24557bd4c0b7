"""``torch.compile`` with its graphs counted: what a test of a compiled DTensor program asserts (one graph, no
break, no recompilation) and, on request, the code of the graphs AOTAutograd made (to look for collectives, and
to check that every rank of a group issues the same collectives in the same order)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

__all__ = ["collective_sequences", "counted_compile", "graph_breaks", "mismatched_collectives"]

# A functional collective's call in a graph's code: its op name, then its arguments, the group's name last
_COLLECTIVE_CALL = re.compile(r"torch\.ops\._c10d_functional\.(\w+)\.default\((.*)'([^']*)'\)")


def counted_compile(fn, backend="aot_eager", *, keep_code: bool = False, partition_fn=None, **kwargs):
    """``(torch.compile(fn, ...), counter, code)``: ``counter.frame_count`` counts Dynamo's graphs (a recompilation
    is one more); with ``keep_code`` (aot_eager only) ``code`` collects each forward and backward graph's Python
    code, in the order AOTAutograd compiled them, partitioned by ``partition_fn`` (None: AOTAutograd's default
    partitioner, what a user-written ``aot_autograd`` backend gets; torch.compile's "aot_eager" uses
    ``functorch.compile.min_cut_rematerialization_partition``). Resets Dynamo and its counters first."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    code: list[str] = []
    inner = backend
    if keep_code:
        if backend != "aot_eager":
            raise ValueError(f"keep_code reads AOTAutograd's graphs under aot_eager, not under {backend!r}")
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def keep(gm, example_inputs):
            code.append(gm.code)
            return make_boxed_func(gm)

        partitioning = {"partition_fn": partition_fn} if partition_fn is not None else {}
        inner = aot_autograd(fw_compiler=keep, bw_compiler=keep, **partitioning)
    counter = torch._dynamo.testing.CompileCounterWithBackend(inner)
    return torch.compile(fn, backend=counter, **kwargs), counter, code


def graph_breaks() -> int:
    """Graph breaks Dynamo counted since ``counted_compile`` reset its counters."""
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def collective_sequences(code: Iterable[str], groups: Iterable) -> dict[str, list[str]]:
    """The functional collectives that ``code`` (``counted_compile``'s kept graphs, in order) issues on each of
    ``groups`` (this rank's process groups, e.g. its mesh's), by group name: ``{name: [op, ...]}`` in program
    order. A collective on a group not in ``groups`` raises (the caller named too few groups)."""
    sequences = {group.group_name: [] for group in groups}
    for graph_code in code:
        for op, _, group_name in _COLLECTIVE_CALL.findall(graph_code):
            if group_name not in sequences:
                raise ValueError(f"a {op} on group {group_name!r}, not among the groups given "
                                 f"({sorted(sequences)}): pass every process group this rank belongs to")
            sequences[group_name].append(op)
    return sequences


def mismatched_collectives(per_rank: Sequence[dict[str, list[str]]]) -> list[str]:
    """Given each rank's ``collective_sequences``: one line per group whose ranks' sequences differ (empty when
    every rank of every group issues the same collectives in the same order, as SPMD programs must: a rank
    that drops, adds or reorders one pairs its peers' collectives with the wrong ones, a hang or wrong values)."""
    by_group: dict[str, dict[int, list[str]]] = {}
    for rank, sequences in enumerate(per_rank):
        for name, ops in sequences.items():
            by_group.setdefault(name, {})[rank] = ops
    problems = []
    for name, ops_by_rank in sorted(by_group.items()):
        distinct = {tuple(ops) for ops in ops_by_rank.values()}
        if len(distinct) > 1:
            problems.append(f"group {name!r}: " + "; ".join(f"rank {rank}: {ops}" for rank, ops in ops_by_rank.items()))
    return problems
