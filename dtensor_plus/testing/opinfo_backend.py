"""The OpInfo sweep's dtensor_plus backend, and the layout tokens every backend shares.

A backend tells the sweep (``opinfo.run_cases(cases, backend="module:attribute")``) how to build a mesh, lay a
tensor out as a layout's tokens (S<dim>, R, P, Pavg, Pmax, Pmin), tell a distributed result from a plain one,
gather it, read its layout back, and count fallbacks. benchmarks/op_sweep.py has the one for
torch.distributed.tensor.
"""

from __future__ import annotations

__all__ = ["DTENSOR_PLUS", "layout_tokens", "placements_of"]


class _DTensorPlus:
    """How the sweep puts tensors on a mesh with dtensor_plus; a backend for another library has the same methods."""

    def mesh(self, mesh_shape):
        from ..mesh import init_device_mesh
        return init_device_mesh("cpu", mesh_shape)

    def distribute(self, tensor, mesh, layout):
        from .strategies import make_dtensor
        return make_dtensor(tensor.detach(), mesh, placements_of(layout), requires_grad=tensor.requires_grad)

    def is_distributed(self, value) -> bool:
        from ..dtensor import DTensor
        return isinstance(value, DTensor)

    def full(self, value):
        from ..dtensor import DTensor
        return value.full_tensor() if isinstance(value, DTensor) else value

    def layout(self, value) -> tuple[str, ...]:
        return layout_tokens(value.placements)

    def counting(self):
        return _counting()


class _counting:
    def __enter__(self):
        from ..collectives import comm_mode
        self._mode = comm_mode()
        counter = self._mode.__enter__()
        return lambda: set(counter.fallbacks)

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def layout_tokens(placements) -> tuple[str, ...]:
    """Layout tokens (S<dim>, R, P, Pavg, Pmax, Pmin) of placements of either library (duck-typed)."""
    def token(p):
        if "Strided" in type(p).__name__:  # torch's _StridedShard, our StridedShard: not Shard's layout
            return f"SS{p.dim}"
        if p.is_shard():
            return f"S{p.dim}"
        if p.is_partial():
            op = str(getattr(p, "reduce_op", "sum")).lower().replace("reduceop.", "")
            return "P" if op == "sum" else f"P{op}"
        return "R"
    return tuple(token(p) for p in placements)


def placements_of(layout):
    from ..placements import Partial, Replicate, Shard
    return [Replicate() if t == "R" else Partial(t[1:] or "sum") if t.startswith("P") else Shard(int(t[1:]))
            for t in layout]


DTENSOR_PLUS = _DTensorPlus()
