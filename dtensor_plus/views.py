"""Views whose shards are not views: the DTensor a view op returns is, for torch's autograd and for the user, a
view of its input, but when the rule had to move data (``diagonal`` of a row-sharded matrix comes out as a
Partial, a view op that fell back gathered its input) its local block is fresh memory, not a view of the input's
block. Writing into such a view in place (``x.diagonal().fill_(1)``, which autograd formulas do) would change
the view and never reach its base: a silently wrong value. This module remembers those views with how they were
made; a write into one is done out of place and scattered back into the base by the view's inverse
(``diagonal_scatter``, ``select_scatter``, ``slice_scatter``, ``as_strided_scatter``, a reshape back), then the view is taken again.
A view with no known inverse raises instead.

Those marks are decided from the plan alone, so every rank takes the same (collective) write-through. One case is
rank-local: a view op whose local op is a view of the block, or, where this rank's block strides admit no view,
a reshaped copy (ops/views.py's ``view``). Whether it copied depends on this rank's block, so it is not decided
from the plan: the local op marks the copy (``copied``), the dispatcher notes the view as a ``LocalCopy`` on that
rank only, and a write into it runs the ordinary in-place plan (the same collectives on every rank) and then
copies the block back into the base's block on this rank (``copy_back``), with no communication. A view of
such a view is a ``LocalCopy`` with nothing to copy, so a write through it reaches the base too.
"""

from __future__ import annotations

from types import MappingProxyType

import torch

from .op_record import record_of

__all__ = ["moves_data", "aliasing", "copied", "note_view", "note_view_of", "LocalCopy", "copy_back", "write_through"]

MARK = "_dtensor_plus_unaliased"  # on DTensors whose block does not alias their base's: (base, view op, args)
COPIED = "_dtensor_plus_copied_from"  # on a plain block a view's local op had to copy: the block it copied
_aten = torch.ops.aten
# The view op's inverse: (base, new value of the view, the view op's own arguments) -> the new base.
_INVERSES = {
    _aten.diagonal.default: lambda base, value, *a, **k: _aten.diagonal_scatter.default(base, value, *a, **k),
    _aten.select.int: lambda base, value, *a, **k: _aten.select_scatter.default(base, value, *a, **k),
    _aten.slice.Tensor: lambda base, value, *a, **k: _aten.slice_scatter.default(base, value, *a, **k),
    _aten.as_strided.default: lambda base, value, *a, **k: _aten.as_strided_scatter.default(base, value, *a, **k),
    _aten.transpose.int: lambda base, value, dim0, dim1: value.transpose(dim0, dim1),
    _aten.t.default: lambda base, value: value.t(),
    _aten.permute.default: lambda base, value, dims: value.permute(_inverse_permutation(dims, base.ndim)),
}
# Views that keep every element where it is, only reshaped: the inverse is the value reshaped back.
for _op in (_aten.view.default, _aten._unsafe_view.default, _aten.detach.default, _aten.alias.default,
            _aten.lift_fresh.default, _aten.unsqueeze.default, _aten.squeeze.default, _aten.squeeze.dim,
            _aten.squeeze.dims, _aten.unflatten.int, _aten.view_as_real.default, _aten.view_as_complex.default):
    _INVERSES[_op] = lambda base, value, *a, **k: _reshaped_back(base, value)
_INVERSES = MappingProxyType(_INVERSES)  # read-only: a constant table


def _reshaped_back(base, value):
    if value.dtype != base.dtype:  # view_as_real / view_as_complex
        return torch.view_as_complex(value) if base.is_complex() else torch.view_as_real(value)
    return value.reshape(base.shape)


def _inverse_permutation(dims, ndim: int) -> list[int]:
    inverse = [0] * ndim
    for i, d in enumerate(dims):
        inverse[d % ndim] = i
    return inverse
def moves_data(plan) -> bool:
    """Does this plan of a view op leave its output's blocks not views of the input's blocks? Decided from the
    plan alone (the same on every rank), never from a rank's own block, which may be empty on one rank only.
    A local op declared ``aliasing`` does not move data: its result is a view of the block, or a copy it marks."""
    return (plan.fallback or plan.input_targets[0] is not None
            or (plan.func is not plan.aten_func and not getattr(plan.func, "aliases_block", False)))


def aliasing(local_op):
    """Declare that a view op's local op returns a view of its input block, or a copy marked by ``copied``."""
    local_op.aliases_block = True
    return local_op


def copied(copy: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Mark ``copy``, the local result of a view op, as a copy of ``block`` (this rank's strides admit no view)."""
    setattr(copy, COPIED, block)
    return copy


class LocalCopy:
    """The mark of a view whose block on this rank is a reshaped copy of its base's block (``source`` set), or a
    view of such a view's block (``source`` None). The copy's geometry is kept, so an in-place view op on the view
    (``t_``) does not change how it is copied back."""

    __slots__ = ("base", "source", "copy", "shape", "stride", "offset")

    def __init__(self, base, source=None, copy=None):
        self.base, self.source, self.copy = base, source, copy
        if copy is not None:
            self.shape, self.stride, self.offset = copy.shape, copy.stride(), copy.storage_offset()


def note_view(out, func, args, kwargs) -> None:
    """Remember the views in ``out`` (a DTensor or a sequence of them: ``unbind``, ``split``) of ``args[0]``, whose
    blocks are not views of its blocks: with how they were made, for ``write_through``."""
    for view in out if isinstance(out, (list, tuple)) else (out,):
        setattr(view, MARK, (args[0], func, args[1:], kwargs) if view is out else (args[0], None, (), {}))


def note_view_of(out, func, args, kwargs, marked) -> None:
    """``out``'s views of ``args[0]``, a view marked ``marked``, made by a plan that moves no data: views of a
    rank-local copy stay rank-local (``LocalCopy``: their blocks alias it), others are noted as ``note_view``."""
    if type(marked) is not LocalCopy:
        return note_view(out, func, args, kwargs)
    for view in out if isinstance(out, (list, tuple)) else (out,):
        setattr(view, MARK, LocalCopy(args[0]))


def copy_back(view) -> None:
    """After an in-place op wrote ``view``'s block: the block copied back into its base's block on this rank, and
    on up while the base is such a view too."""
    marked = getattr(view, MARK, None)
    while type(marked) is LocalCopy:
        if marked.source is not None:
            written = marked.copy.as_strided(marked.shape, marked.stride, marked.offset)
            marked.source.copy_(written.reshape(marked.source.shape))
        marked = getattr(marked.base, MARK, None)


def write_through(func, args, kwargs):
    """Run in-place ``func`` on an unaliased view (``args[0]``): out of place, scattered back into the base by the
    view op's inverse, the view then taken again from the new base."""
    view = args[0]
    base, view_func, view_args, view_kwargs = getattr(view, MARK)
    inverse = _INVERSES.get(view_func)
    functional = _functional(record_of(func))
    if inverse is None or functional is None:
        raise _error(func, view, view_func)
    value = functional(*args, **(kwargs or {}))
    base.copy_(inverse(base, value, *view_args, **view_kwargs))  # base may be such a view too: it recurses
    fresh = view_func(base, *view_args, **view_kwargs)
    view._local_tensor, view._spec = fresh._local_tensor, fresh._spec
    setattr(view, MARK, getattr(fresh, MARK, None))
    return view


def _functional(record):
    """The out-of-place twin of an in-place op (``fill_.Scalar`` -> ``fill.Scalar``, from its record), or None;
    copy_'s is a fresh tensor filled (aten.copy would broadcast src into a new tensor under its own rule)."""
    if record.func is _aten.copy_.default:
        return lambda view, src, non_blocking=False: torch.empty_like(view).copy_(src)  # a fresh DTensor, no view
    return record.functional


def _error(func, target, view_func) -> RuntimeError:
    return RuntimeError(
        f"{func} writes in place into a view of a DTensor ({view_func}) whose block is not a view of its base's "
        f"block (the view op had to move data: placements {list(target._spec.placements)}), and the write cannot be "
        f"scattered back into the base. Write through an out-of-place op instead (torch.diagonal_scatter, torch.select_scatter, "
        f"index_put), or redistribute the base so the view needs no communication (e.g. Replicate on the viewed dims)"
    )
