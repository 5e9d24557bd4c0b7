"""The dispatch mode of a simulated world: local tensors stay on the meta device, FLOPs counted per local op.

A ``TorchDispatchMode`` sees every aten op on plain tensors. An op on DTensors is left to DTensor's own dispatch
(the mode answers NotImplemented), which then runs the op's local form on the local blocks through this mode
again: so what is counted is what this rank computes, on its blocks, not the global op.

Device: an op asked for on the cpu (a factory's ``device=``, ``to("cpu")``) runs on meta instead (but a 0-d
factory: a scalar, an optimizer's step count, stays real and readable), and a real cpu tensor (a token batch, a buffer made before the world) meeting a meta one is moved to meta first. Nothing is
allocated, so a 70B-parameter model builds in seconds.

FLOPs: torch.utils.flop_counter's formulas (matmuls, convolutions, attention), by op, while ``counting``. The
dispatcher decides a plan by running the op on meta tensors of the global shapes (dispatch.py's ``_make_plan``,
``_run_on_meta``): that is shape propagation, not this rank's work, and is not counted (``planning_uncounted``).
Counted, it made every layout's first step look like each rank also ran the whole global op once per plan (the
"ZeRO-3 with tp+sp computes on more rows than its share" of the simulator's first version: more plans, more
global matmuls counted; nothing the ranks really computed).
"""

from __future__ import annotations

import contextlib
from collections import Counter

from types import MappingProxyType

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry

from .. import dispatch
from ..dtensor import DTensor

__all__ = ["LocalFlops", "MetaLocalOps", "MovesStayPut", "SimulationValueError"]

_META = torch.device("meta")
_READS_VALUE = frozenset({torch.ops.aten._local_scalar_dense.default})


class SimulationValueError(RuntimeError):
    """A simulated program read a tensor's value: only shapes exist in a simulated world."""


class LocalFlops(TorchDispatchMode):
    """FLOPs of this rank's local ops, by aten op (and by (module, phase) when ``module_of`` is set), while
    ``counting``. On its own it counts a real run (``step.measure_step``); ``MetaLocalOps`` adds the meta device."""

    def __init__(self):
        super().__init__()
        self.counting = False
        self.flops_by_op: Counter = Counter()  # aten op name -> FLOPs of this rank's local ops
        self.module_of = None  # () -> (module path, phase) while counting per module
        self.flops_by_module: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor dispatch runs the local op on the blocks, back through this mode
        kwargs = kwargs or {}
        return self._count(func, args, kwargs, func(*args, **kwargs))

    @contextlib.contextmanager
    def planning_uncounted(self):
        """For the block: ops the dispatcher runs to decide a plan (on meta tensors of the global shapes) are not
        counted; the local ops of the plan it then runs are."""
        originals = dispatch._make_plan, dispatch._run_on_meta

        def paused(function):
            def run(*args, **kwargs):
                counting, self.counting = self.counting, False
                try:
                    return function(*args, **kwargs)
                finally:
                    self.counting = counting
            return run

        dispatch._make_plan, dispatch._run_on_meta = (paused(f) for f in originals)
        try:
            yield
        finally:
            dispatch._make_plan, dispatch._run_on_meta = originals

    def _count(self, func, args, kwargs, out):
        if self.counting:
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                flops = formula(*args, **kwargs, out_val=out)
                self.flops_by_op[str(func._overloadpacket.__name__)] += flops
                if self.module_of is not None:
                    self.flops_by_module[self.module_of()] += flops
        return out


class MetaLocalOps(LocalFlops):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor dispatch runs the local op on the blocks, back through this mode
        kwargs = kwargs or {}
        if func in _READS_VALUE and args[0].device.type == "meta":
            raise SimulationValueError(
                "a simulated world has shapes, not values: this program read a tensor's value (.item(), "
                ".tolist(), a data-dependent branch or size). Simulate a program whose communication and memory "
                "do not depend on values, or compute the value outside the simulation and pass it in"
            )
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cpu" and not _makes_scalar(func, args):
            kwargs = dict(kwargs, device=_META)
        if _has_meta(args, kwargs):
            args, kwargs = tree_map(_to_meta, (args, kwargs))
        if func is _BINCOUNT and args[0].device.type == "meta":
            return self._count(func, args, kwargs, _bincount_on_meta(*args, **kwargs))
        if func is _TO_COPY and _changes_nothing_on_meta(args[0], kwargs):
            # ``t.to("cpu")`` of a cpu tensor is ``t`` itself, no copy: its meta stand-in shares storage too (in
            # backward, where MovesStayPut does not run: autograd does not carry Python function modes there)
            return torch.ops.aten.alias.default(args[0])
        try:
            out = func(*args, **kwargs)
        except NotImplementedError as error:
            if "meta" not in str(error).lower():
                raise
            raise SimulationValueError(
                f"{func} has no meta kernel: its output's shape depends on its input's values (e.g. nonzero or a "
                f"boolean mask: a mixture-of-experts router dropping over capacity, moe_capacity_factor; simulate "
                f"dropless routing), which a simulated world does not have"
            ) from error
        return self._count(func, args, kwargs, out)


_TO_COPY = torch.ops.aten._to_copy.default
_BINCOUNT = torch.ops.aten.bincount.default


def _bincount_on_meta(values, weights=None, minlength=0):
    # Its length is max(minlength, max(values) + 1): a value. With a minlength the simulated world assumes the values
    # stay below it, as a router's expert indices do (bincount(idx, minlength=E)); without one it cannot know.
    if minlength <= 0:
        raise SimulationValueError(
            "bincount without minlength has no meta kernel: its length is its largest input value plus one, which "
            "a simulated world does not have; give minlength (e.g. the number of experts)")
    dtype = (torch.int64 if weights is None else weights.dtype if weights.dtype in (torch.float32, torch.float64)
             else torch.float64)  # as the cpu kernel: float weights count in float, others in double
    return torch.empty(minlength, dtype=dtype, device=_META)

_NO_CHANGE = MappingProxyType({"device": (None, _META), "layout": (None, torch.strided), "pin_memory": (None, False),
                               "memory_format": (None, torch.preserve_format), "non_blocking": (None, False, True)})


def _changes_nothing_on_meta(t, kwargs) -> bool:
    if t.device.type != "meta" or kwargs.get("dtype") not in (None, t.dtype):
        return False
    return all(kwargs.get(k) in allowed for k, allowed in _NO_CHANGE.items()) and set(kwargs) <= {"dtype", *_NO_CHANGE}


def _makes_scalar(func, args) -> bool:
    # A 0-d factory stays real: scalars cost nothing and some are read (an optimizer's step count, a loss scale).
    if func is torch.ops.aten.scalar_tensor.default:
        return True
    return bool(args) and isinstance(args[0], (list, tuple)) and len(args[0]) == 0


def _has_meta(args, kwargs) -> bool:
    found = False

    def look(x):
        nonlocal found
        if isinstance(x, torch.Tensor) and x.device.type == "meta":
            found = True
        return x

    tree_map(look, (args, kwargs))
    return found


def _to_meta(x):
    # a real cpu tensor beside meta ones; 0-d cpu tensors mix with any device and stay (optimizer step counts)
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dim() > 0:
        return x.to(_META)
    return x


class MovesStayPut(TorchFunctionMode):
    """``t.to("cpu")`` / ``t.cpu()`` of a meta tensor is ``t.to("meta")``: ``t`` itself, as the real call on a cpu
    tensor returns ``t`` itself (no copy). A layout that moves a block to the mesh's device "just in case" then
    keeps sharing storage with what it came from, as on the real world, and the memory walk sees one storage."""

    _MOVES = {torch.Tensor.to, torch.Tensor.cpu}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._MOVES and args and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta":
            if func is torch.Tensor.cpu:
                return func(*args, **kwargs) if isinstance(args[0], DTensor) else args[0].to(_META)
            args = tuple(_META if _is_cpu(a) else a for a in args)
            kwargs = {k: (_META if k == "device" and _is_cpu(v) else v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _is_cpu(x) -> bool:
    return isinstance(x, (str, torch.device)) and not isinstance(x, bool) and _device_type(x) == "cpu"


def _device_type(x) -> str | None:
    try:
        return torch.device(x).type
    except (RuntimeError, TypeError):
        return None
