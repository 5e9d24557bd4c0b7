"""A plan: what one cached decision does to a call, from DTensor arguments to DTensor outputs.

``Plan`` is the functional op's plan: move each DTensor input to the placements the rule chose (the planner
picks the collectives), run the local op on the blocks (with ``comm=`` when the rule declared communication),
wrap each output block with the spec the rule chose. Every other kind of call is a ``Plan`` adapted by a
combinator, never a branch here: in place and ``out=`` (mutation.py), random draws (random.py), several
meshes in one foreach op (foreach_meshes.py).
"""

from __future__ import annotations

from types import MappingProxyType

import torch

from . import collectives, views, whole_batch
from .dispatcher import DISPATCHER
from .declared import cost_terms
from .dtensor import DTensor
from .explicit import collective_for_step
from .placement_tuples import replicated
from .redistribute import redistribute_local
from .spec import DTensorSpec, TensorMeta

__all__ = ["Plan", "substitute", "replicated_spec", "result"]

_NO_KWARGS = MappingProxyType({})  # the kwargs of a call that passed none
_make_wrapper_subclass = torch.Tensor._make_wrapper_subclass


class Plan:
    """What to do for one cache key: input moves, local op, output specs."""

    __slots__ = ("func", "aten_func", "input_targets", "out_specs", "shape_arg", "inplace", "fallback", "positions",
                 "view", "comm", "input_collectives", "whole_batch_index")

    def __init__(self, func, aten_func, input_targets, out_specs, shape_arg, inplace, fallback, positions, view, comm):
        self.func = func  # the aten op, or the rule's local_op standing in for it
        self.aten_func = aten_func  # the aten op itself
        self.input_targets = input_targets  # per DTensor input: placements to move it to, None to leave it
        self.out_specs = out_specs  # None entries: the output's global metadata comes from the local result
        self.shape_arg = shape_arg  # index of a shape argument to replace by output 0's local shape
        self.inplace = inplace  # writes into its first argument, which keeps its layout
        self.fallback = fallback  # the gathering policy decided it (counted in comm_mode)
        self.positions = positions  # argument indices of the DTensors when all are top-level positional
        self.view = view  # the aten op returns a view of its first argument
        self.comm = comm  # a declared.Communicator for the rule's declared communication, or None
        # Can an input move run a collective? Any move, unless the caller knows the specs (moving_inputs_collect)
        self.input_collectives = any(t is not None for t in input_targets)
        # The DTensor input (an index into the call's DTensors) whose whole batch the local op takes as
        # ``whole_batch=`` (whole_batch.py, the rule's ``whole_batch_of``), or None.
        self.whole_batch_index = None

    def run(self, args, kwargs, dtensors):
        local_args, local_kwargs = self.localize(args, kwargs, dtensors)
        if self.whole_batch_index is not None:
            local_kwargs = dict(local_kwargs, whole_batch=whole_batch.whole_of(dtensors[self.whole_batch_index]))
        if self.comm is not None:
            out = self.func(*local_args, comm=self.comm, **local_kwargs)
        else:
            out = self.func(*local_args, **local_kwargs)
        return self.finish(out, args, kwargs, dtensors)

    def localize(self, args, kwargs, dtensors):
        """The local op's arguments: each DTensor moved to its target and replaced by its block."""
        locals_ = [
            dt._local_tensor if target is None else redistribute_local(dt._local_tensor, dt._spec, target)
            for dt, target in zip(dtensors, self.input_targets)
        ]
        if self.positions is not None:
            local_args = list(args)
            for position, local in zip(self.positions, locals_):
                local_args[position] = local
            local_kwargs = kwargs or _NO_KWARGS
        else:
            it = iter(locals_)
            local_args = substitute(args, it)
            local_kwargs = {k: substitute(v, it) for k, v in kwargs.items()} if kwargs else _NO_KWARGS
        if self.shape_arg is not None:
            local_args = list(local_args)
            local_args[self.shape_arg] = list(self.out_specs[0].local_shape_and_offset()[0])
        if self.fallback:
            collectives.record_fallback(str(self.aten_func))
        return local_args, local_kwargs

    def finish(self, out, args, kwargs, dtensors):
        """The DTensor result of the local op's ``out``."""
        if self.inplace:
            return dtensors[0] if self.out_specs else None  # None: an in-place foreach op returns ()
        wrapped = self._wrap(out, dtensors)
        if (self.view or self.aten_func in whole_batch.COPIES) and isinstance(wrapped, DTensor):
            whole_batch.carry_view(wrapped, args[0], self.aten_func, args, kwargs)
        if self.view:
            if views.moves_data(self):
                views.note_view(wrapped, self.aten_func, args, kwargs)
            else:
                _note_aliasing_view(wrapped, out, self, args, kwargs)
        return wrapped

    def _wrap(self, out, dtensors):
        if isinstance(out, torch.Tensor):
            return result(out, next(iter(self.out_specs), None) or replicated_spec(out, dtensors))
        specs = iter(self.out_specs)

        def wrap(o):
            if isinstance(o, torch.Tensor):
                spec = next(specs, None)  # no specs: the metadata comes from the local result (fallback)
                return result(o, spec or replicated_spec(o, dtensors))
            if isinstance(o, (list, tuple)):
                return type(o)(wrap(x) for x in o)
            return o

        return wrap(out)


    def direct_run(self):
        """``run`` as one tight function: what a cache hit of this plan calls, with every fact that is the same for
        each call of its key read here once (which inputs move where, the shape argument's local value, the
        fallback's name, how outputs are wrapped, whether to look for unaliased views). None where a DTensor
        sits in a list or a keyword (``run`` substitutes those recursively). Why: a warm op's cost beyond the
        local op is Python bookkeeping, and most of what ``run`` tests per call is fixed per key.

        The op stack and the explicit-mode audit are the caller's (dispatch._entry), and only for plans that
        communicate (``communicates``): nothing reads them unless a collective runs."""
        if self.positions is None:
            return None
        func, aten_func, positions, view, inplace = self.func, self.aten_func, self.positions, self.view, self.inplace
        # OpOverload.__call__ only forwards to its _op: calling that skips one Python frame per op.
        call = func._op if type(func) is torch._ops.OpOverload else func
        comm, whole_index, whole_of = self.comm, self.whole_batch_index, whole_batch.whole_of
        carry_whole = whole_batch.carry_view
        moves = tuple((i, target) for i, target in enumerate(self.input_targets) if target is not None)
        shape_arg = self.shape_arg
        local_shape = None if shape_arg is None else tuple(self.out_specs[0].local_shape_and_offset()[0])
        fallback_name = str(aten_func) if self.fallback else None
        specs = self.out_specs
        # Outputs as the aten op's schema returns them: one tensor, or a flat tuple of tensors, each with its spec.
        returns = aten_func._schema.returns if type(aten_func) is torch._ops.OpOverload else ()
        flat = (len(returns) == len(specs) > 0 and all(s is not None for s in specs)
                and all(type(r.type) is torch.TensorType for r in returns))
        single = specs[0] if flat and len(specs) == 1 else None
        carries = single is not None and (view or aten_func in whole_batch.COPIES)  # a whole batch's record
        returns_self = bool(specs)  # an in-place foreach op returns nothing
        mark = views.MARK
        note_always = view and views.moves_data(self)  # the view's blocks are fresh memory: every result is noted
        # A local op declared views.aliasing may copy on this rank only (views.copied says so): a rank-local mark.
        may_copy, copied = single is not None and getattr(func, "aliases_block", False), views.COPIED
        wrap = self._wrap

        if not (inplace or moves or view or carries or comm is not None) and shape_arg is None \
                and fallback_name is None and single is not None:
            # Most ops of a step: blocks in, the op, one output out. Its own closure, with none of the tests
            # below: a warm op pays only what it does.
            def run_one_output(args, kwargs, dtensors):
                local_args = list(args)
                for position, dt in zip(positions, dtensors):
                    local_args[position] = dt._local_tensor
                return result(call(*local_args, **kwargs) if kwargs else call(*local_args), single)

            return run_one_output

        def run(args, kwargs, dtensors):
            local_copy = None
            if inplace:
                marked = getattr(args[0], mark, None)
                if marked is not None:
                    if type(marked) is not views.LocalCopy:  # a view whose block is not a view of its base's
                        return views.write_through(aten_func, args, kwargs)
                    local_copy = args[0]  # this rank's block is a copy: written here, then copied back
            local_args = list(args)
            for position, dt in zip(positions, dtensors):
                local_args[position] = dt._local_tensor
            for i, target in moves:
                dt = dtensors[i]
                local_args[positions[i]] = redistribute_local(dt._local_tensor, dt._spec, target)
            if shape_arg is not None:
                local_args[shape_arg] = list(local_shape)
            if fallback_name is not None:
                collectives.record_fallback(fallback_name)
            if whole_index is not None:
                out = call(*local_args, comm=comm, whole_batch=whole_of(dtensors[whole_index]), **(kwargs or {}))
            elif comm is not None:
                out = call(*local_args, comm=comm, **kwargs) if kwargs else call(*local_args, comm=comm)
            else:
                out = call(*local_args, **kwargs) if kwargs else call(*local_args)
            if inplace:
                if local_copy is not None:
                    views.copy_back(local_copy)
                return dtensors[0] if returns_self else None
            if single is not None:
                wrapped = result(out, single)
            elif flat:
                wrapped = tuple(map(result, out, specs))
            else:
                wrapped = wrap(out, dtensors)
            if carries:
                carry_whole(wrapped, args[0], aten_func, args, kwargs)
            if view:
                if note_always:
                    views.note_view(wrapped, aten_func, args, kwargs)
                else:
                    marked = getattr(args[0], mark, None)
                    if marked is not None:
                        views.note_view_of(wrapped, aten_func, args, kwargs, marked)
                    elif may_copy and getattr(out, copied, None) is not None:
                        setattr(wrapped, mark, views.LocalCopy(args[0], getattr(out, copied), out))
            return wrapped

        return run

    @property
    def communicates(self) -> bool:
        """Can a call of this plan issue a collective (an input move that needs one, or declared communication
        that acts: on mesh dims of one rank a declared all-reduce issues nothing, ``declared.cost_terms``)?"""
        return self.input_collectives or (self.comm is not None and bool(cost_terms(self.comm.declared, self.comm.mesh)))


def moving_inputs_collect(specs, input_targets) -> bool:
    """Does moving these inputs (specs -> targets, None: stays) run a collective? Not where every step is local
    (Replicate -> Shard keeps a slice, a 1-rank mesh dim moves nothing): the same judgement as explicit mode's
    audit (explicit.collective_for_step), so a plan it passes needs no audit and no op-stack entry."""
    return any(
        target is not None and any(collective_for_step(spec.mesh.size(k), a, b)
                                   for k, (a, b) in enumerate(zip(spec.placements, target)))
        for spec, target in zip(specs, input_targets)
    )


def _note_aliasing_view(wrapped, out, plan, args, kwargs) -> None:
    """The marks of a view made by a plan that moves no data: a view of a marked view is marked in turn
    (views.note_view_of), and a block the local op had to copy on this rank (views.copied) is a LocalCopy."""
    marked = getattr(args[0], views.MARK, None)
    if marked is not None:
        views.note_view_of(wrapped, plan.aten_func, args, kwargs, marked)
    elif isinstance(out, torch.Tensor) and getattr(plan.func, "aliases_block", False):
        source = getattr(out, views.COPIED, None)
        if source is not None:
            setattr(wrapped, views.MARK, views.LocalCopy(args[0], source, out))


def result(local: torch.Tensor, spec: DTensorSpec) -> DTensor:
    """``DTensor(local, spec)`` for the block a local op returned on this rank, without the constructor's checks
    that cannot fire here (a DTensor block: local ops see plain blocks; a rank outside the mesh: its ops never
    run the local op, dispatch._outside_the_mesh) and without requires_grad (autograd sets it on an op's outputs).
    Every op's result is made here, so it is kept in step with ``DTensor.__new__``: the same fields
    (tests/core/test_dispatch_hits.py compares them)."""
    meta = spec.tensor_meta
    r = _make_wrapper_subclass(DTensor, meta.shape, strides=meta.stride, dtype=meta.dtype, device=local.device,
                               layout=local.layout)
    r._local_tensor = local
    r._spec = spec
    r._created = next(DISPATCHER.created)  # the order DTensors are made in (DTensor.__new__ says why)
    return r


def substitute(value, locals_iter):
    """``value`` with each DTensor (at the top or inside a list) replaced by the next of ``locals_iter``."""
    if isinstance(value, DTensor):
        return next(locals_iter)
    if type(value) is list or type(value) is tuple:
        return type(value)([next(locals_iter) if isinstance(v, DTensor) else substitute(v, locals_iter) for v in value])
    return value


def replicated_spec(local: torch.Tensor, dtensors) -> DTensorSpec:
    mesh = dtensors[0]._spec.mesh
    return DTensorSpec(mesh, replicated(mesh.ndim), TensorMeta.of(local))
