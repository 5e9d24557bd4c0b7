"""``torch.compile`` with its graphs counted: what a test of a compiled DTensor program asserts (one graph, no
break, no recompilation) and, on request, the code of the graphs AOTAutograd made (to look for collectives)."""

from __future__ import annotations

import torch

__all__ = ["counted_compile", "graph_breaks"]


def counted_compile(fn, backend="aot_eager", *, keep_code: bool = False, **kwargs):
    """``(torch.compile(fn, ...), counter, code)``: ``counter.frame_count`` counts Dynamo's graphs (a recompilation
    is one more); with ``keep_code`` (aot_eager only) ``code`` collects each forward and backward graph's Python
    code, in the order AOTAutograd compiled them. Resets Dynamo and its counters first."""
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

        inner = aot_autograd(fw_compiler=keep, bw_compiler=keep)
    counter = torch._dynamo.testing.CompileCounterWithBackend(inner)
    return torch.compile(fn, backend=counter, **kwargs), counter, code


def graph_breaks() -> int:
    """Graph breaks Dynamo counted since ``counted_compile`` reset its counters."""
    return sum(torch._dynamo.utils.counters["graph_break"].values())
