"""Op dispatch for DTensor: specs in -> rule (cached) -> redistribute inputs -> local op -> wrap outputs.

The cache key is the op plus every argument with DTensors replaced by their specs. Python floats enter the
key only as their type (a learning rate or a loss scale changes every step and no rule may depend on a float
value), except +-inf, which picks a mode (vector_norm's ord=inf); everything else enters by value. A cached
``Plan`` holds all the rule decided, plus the global metadata of the outputs (computed once by running the op
on meta tensors), so a cache hit costs a dict lookup, the local op and the wrapping.

Ops without a rule fall back to gathering their DTensor inputs to Replicate and running locally: a
one-time warning, a counted fallback, never a wrong value.
"""

from __future__ import annotations

import warnings

import torch

from . import collectives, debug, declared, explicit, foreach_meshes, local_blocks, mutation, plain_tensors, random, rules, strided, views
from .dispatcher import DISPATCHER
from .op_record import record_of
from .placements import Replicate
from .redistribute import redistribute_local
from .spec import DTensorSpec, TensorMeta

__all__ = ["dispatch", "clear_cache", "cache_info"]

_CACHE_MAX = 8192
_NO_KWARGS: dict = {}  # never written: the kwargs of a call that passed none
_SCALAR_TYPES = (int, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
_D = DISPATCHER


def clear_cache() -> None:
    _D.clear_plans()


def cache_info() -> dict:
    return dict(_D.stats, size=len(_D.cache))


# -- argument scanning ----------------------------------------------------------------------------------


def _key(value, dtensors: list, dtensor_cls, scalars: list):
    """Hashable key material of one argument; appends the DTensors found to ``dtensors`` and the 0-d plain
    tensors to ``scalars``."""
    if isinstance(value, dtensor_cls):
        dtensors.append(value)
        return value._spec
    kind = type(value)
    if kind is float or kind is complex:
        return value if kind is float and abs(value) == float("inf") else kind  # +-inf picks a mode (norm ord)
    if kind is list or kind is tuple:
        # Inline for DTensor elements: foreach and fused-optimizer ops pass lists of a hundred or more.
        out = []
        for v in value:
            if isinstance(v, dtensor_cls):
                dtensors.append(v)
                out.append(v._spec)
            else:
                out.append(_key(v, dtensors, dtensor_cls, scalars))
        return tuple(out)
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:  # a 0-d plain tensor acts as a replicated scalar, once checked (plain_tensors.py)
            scalars.append(value)
            return ("scalar_tensor", value.dtype, value.device)
        raise _PlainTensorError
    if isinstance(value, _SCALAR_TYPES):
        return value
    return kind  # opaque objects (generators...) never decide a rule


def _kwargs_key(kwargs: dict, dtensors: list, dtensor_cls, scalars: list):
    return tuple((name, _key(value, dtensors, dtensor_cls, scalars)) for name, value in kwargs.items())


class _PlainTensorError(Exception):
    pass


def _substitute(value, locals_iter, dtensor_cls):
    if isinstance(value, dtensor_cls):
        return next(locals_iter)
    if type(value) is list or type(value) is tuple:
        return type(value)([next(locals_iter) if isinstance(v, dtensor_cls) else _substitute(v, locals_iter, dtensor_cls)
                            for v in value])
    return value


def _schema_value(value, dtensor_cls):
    if isinstance(value, dtensor_cls):
        return value._spec
    if type(value) is list or type(value) is tuple:
        return type(value)(_schema_value(v, dtensor_cls) for v in value)
    return value


def _flatten_outputs(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten_outputs(o)]
    return []


# -- the plan -------------------------------------------------------------------------------------------


class Plan:
    """What to do for one cache key: input moves, local op, output specs."""

    __slots__ = ("func", "input_targets", "out_specs", "shape_arg", "inplace", "random", "fallback", "positions", "view",
                 "aten_func", "comm")

    def __init__(self, func, input_targets, out_specs, shape_arg, inplace, random_op, fallback, positions, view=False):
        self.func = func  # the aten op, or the rule's local_op standing in for it
        self.positions = positions  # argument indices of the DTensors when all are top-level positional
        self.input_targets = input_targets
        self.out_specs = out_specs  # None entries: the output's global metadata comes from the local result
        self.shape_arg = shape_arg
        self.inplace = inplace
        self.random = random_op  # the aten op when it is tagged nondeterministic_seeded, else None
        self.fallback = fallback
        self.view = view  # the aten op returns a view of its first argument
        self.aten_func = None  # set with view: the aten op itself (func may be the rule's local op)
        self.comm = None  # a Communicator for the rule's declared communication, passed to its local op as comm=

    def run(self, args, kwargs, dtensors, dtensor_cls):
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
            local_args = _substitute(args, it, dtensor_cls)
            local_kwargs = {k: _substitute(v, it, dtensor_cls) for k, v in kwargs.items()} if kwargs else _NO_KWARGS
        if self.shape_arg is not None:
            local_args = list(local_args)
            local_args[self.shape_arg] = list(self.out_specs[0].local_shape_and_offset()[0])
        if self.fallback:
            collectives.record_fallback(str(self.func))
        if self.random is not None and random.draws(self.random, args, kwargs):
            out = self._run_random(args, kwargs, local_args, local_kwargs, dtensors, dtensor_cls)
        elif self.comm is not None:
            out = self.func(*local_args, comm=self.comm, **local_kwargs)
        else:
            out = self.func(*local_args, **local_kwargs)
        if self.inplace:
            return dtensors[0] if self.out_specs else None  # None: an in-place foreach op returns ()
        wrapped = self._wrap(out, dtensor_cls, dtensors)
        if self.view and (views.moves_data(self) or getattr(args[0], views.MARK, None) is not None):
            views.note_view(wrapped, self.aten_func, args, kwargs)
        return wrapped

    def _run_random(self, args, kwargs, local_args, local_kwargs, dtensors, dtensor_cls):
        """Random ops: each shard draws its own stream; in strict mode, the single-device draw, sliced."""
        if not random.is_strict():
            with random.rng_for(self.out_specs):
                return self.func(*local_args, **local_kwargs)
        # Strict: every rank runs the op on whole inputs with torch's own generator (seeded alike by
        # manual_seed), exactly as one device would, then keeps its slice of each output.
        it = iter([redistribute_local(dt._local_tensor, dt._spec, (Replicate(),) * dt._spec.mesh.ndim) for dt in dtensors])
        full_args = _substitute(args, it, dtensor_cls)
        full_kwargs = {k: _substitute(v, it, dtensor_cls) for k, v in kwargs.items()}
        out = self.func(*full_args, **full_kwargs)
        if self.inplace:  # the op drew into a whole copy of self: keep this rank's block of it
            local_args[0].copy_(self._slice(out, self.out_specs[0]))
            return local_args[0]
        if isinstance(out, torch.Tensor):
            return self._slice(out, self.out_specs[0])
        return type(out)(self._slice(o, s) for o, s in zip(out, self.out_specs))

    @staticmethod
    def _slice(full, spec):
        replicated = spec.with_placements((Replicate(),) * spec.mesh.ndim)
        return redistribute_local(full, replicated, spec.placements)

    def _wrap(self, out, dtensor_cls, dtensors):
        if isinstance(out, torch.Tensor):
            return dtensor_cls(out, next(iter(self.out_specs), None) or self._replicated(out, dtensors))
        specs = iter(self.out_specs)

        def wrap(o):
            if isinstance(o, torch.Tensor):
                spec = next(specs, None)  # no specs: the metadata comes from the local result (fallback)
                return dtensor_cls(o, spec or self._replicated(o, dtensors))
            if isinstance(o, (list, tuple)):
                return type(o)(wrap(x) for x in o)
            return o

        return wrap(out)

    @staticmethod
    def _replicated(local, dtensors):
        mesh = dtensors[0]._spec.mesh
        return DTensorSpec(mesh, (Replicate(),) * mesh.ndim, TensorMeta.of(local))


def _outside_the_mesh(func, plan, args, kwargs, dtensors, dtensor_cls):
    """The op on a rank outside the DTensors' mesh: it takes part in nothing (no collective, no local op on
    data it does not hold) and returns empty placeholders laid out as the rule says, as its inputs are."""
    if mutation.is_inplace(func):
        return args[0]
    out_names = mutation.out_arguments(func)
    if out_names:
        outs = tuple(kwargs[name] for name in out_names)
        return outs[0] if len(outs) == 1 else outs
    out = _run_on_meta(func, args, kwargs, dtensor_cls)
    specs = iter(getattr(plan, "out_specs", None) or ())
    device = dtensors[0]._local_tensor.device

    def placeholder(value):
        if isinstance(value, torch.Tensor):
            spec = next(specs, None) or Plan._replicated(value, dtensors)
            return dtensor_cls(torch.empty(0, dtype=value.dtype, device=device), spec)
        if isinstance(value, (list, tuple)):
            return type(value)(placeholder(v) for v in value)
        return None  # a Python scalar result (item()): this rank holds no value

    return placeholder(out)


def _run_on_meta(func, args, kwargs, dtensor_cls):
    """The op's output on meta tensors of the global shapes; None if it can't run there."""

    def to_meta(value):
        if isinstance(value, dtensor_cls):
            spec = value._spec
            return torch.empty_strided(spec.shape, spec.tensor_meta.stride, dtype=spec.dtype, device="meta")
        if isinstance(value, torch.Tensor):  # a plain 0-d tensor (a replicated scalar, e.g. pinverse's rtol)
            return value.to("meta")
        if type(value) is list or type(value) is tuple:
            return type(value)(to_meta(v) for v in value)
        return value

    run = rules.meta_for(func) or func  # ops torch has no meta kernel for may have one in our registry
    try:
        # A device keyword (autograd's ToCopyBackward passes device=cpu) would copy out of meta: keep it meta.
        out = run(*to_meta(args), **{k: torch.device("meta") if k == "device" else to_meta(v) for k, v in kwargs.items()})
    except (NotImplementedError, RuntimeError, ZeroDivisionError):  # no meta kernel, data-dependent shape, numel 0
        return None
    return out


def _meta_outputs(func, args, kwargs, dtensor_cls):
    """Global metadata of each tensor output, from running the op on meta tensors; None if it can't run there."""
    out = _run_on_meta(func, args, kwargs, dtensor_cls)
    return None if out is None else [TensorMeta.of(t) for t in _flatten_outputs(out)]


def _fallback_sharding(schema: rules.OpSchema, num_outputs: int) -> rules.Sharding:
    replicate = (Replicate(),) * schema.mesh.ndim
    return rules.Sharding(inputs=(replicate,) * len(schema.specs), outputs=(replicate,) * num_outputs)


_ONTO_ONE_MESH = (
    "Move one onto the other's mesh by value: `y = dtp.distribute_tensor(y.full_tensor(), x.device_mesh, "
    "placements, src_data_rank=None)` (gathers y; every rank of both meshes must run it), or lay both out on "
    "one mesh from the start (a DTensor on mesh['tp'] and one on the whole (dp, tp) mesh: lift the first with "
    "layouts.data.replicate or distribute it on the whole mesh)"
)


def _make_plan(func, args, kwargs, dtensors, dtensor_cls):
    out_names = mutation.out_arguments(func)
    if out_names:
        return mutation.OutVariantPlan(func, out_names)
    mesh = dtensors[0]._spec.mesh
    for dt in dtensors[1:]:
        if dt._spec.mesh != mesh:
            if foreach_meshes.is_multi_tensor(func):  # elements never meet: one call per mesh
                return foreach_meshes.PerMeshPlan(func)
            raise ValueError(
                f"{func}: DTensors on different meshes ({mesh} and {dt._spec.mesh}); an op needs all its DTensors "
                f"on one mesh. {_ONTO_ONE_MESH}"
            )
    schema = rules.OpSchema(
        func, _schema_value(args, dtensor_cls), {k: _schema_value(v, dtensor_cls) for k, v in kwargs.items()}, tuple(d._spec for d in dtensors)
    )
    metas = _meta_outputs(func, args, kwargs, dtensor_cls)
    if metas is None and not any(isinstance(r.type, torch.TensorType) for r in func._schema.returns):
        metas = []  # a Python scalar result (item()): no tensor output to describe, the rule still places inputs
    rule = rules.rule_for(func)
    fallback = rule is None or metas is None
    if fallback:
        if str(func) not in _D.warned:
            _D.warned.add(str(func))
            reason = "has no sharding rule" if rule is None else "has a data-dependent output shape"
            warnings.warn(f"dtensor_plus: {func} {reason}; gathering its inputs to Replicate (correct, slow)")
        sharding = _fallback_sharding(schema, len(metas) if metas is not None else 0)
    elif strided.has_strided(schema.specs):
        sharding = strided.decide(rule, schema, metas)
    else:
        sharding = rule(schema)
    targets = tuple(
        None if want is None or tuple(want) == spec.placements else tuple(want)
        for want, spec in zip(sharding.inputs, schema.specs)
    )
    if metas is None:
        out_specs = None
    else:
        out_specs = tuple(
            DTensorSpec(mesh, tuple(p), meta) if p is not None else None for p, meta in zip(sharding.outputs, metas)
        )
    if func.overloadpacket in mutation.INPLACE_VIEWS:
        return mutation.InplaceViewPlan(func)
    inplace = mutation.is_inplace(func)
    # An in-place foreach op (_foreach_mul_) returns nothing (out_specs == ()); its rule keeps every element.
    if inplace and (out_specs is None or targets[0] is not None
                    or (out_specs and out_specs[0].placements != dtensors[0]._spec.placements)):
        return mutation.OutOfPlacePlan(func)
    local_op = sharding.local_op or func
    positions = tuple(i for i, a in enumerate(args) if isinstance(a, dtensor_cls))
    if len(positions) != len(dtensors):
        positions = None  # some DTensor sits in a list or a keyword: substitute recursively
    random_op = func if _is_random(func) else None
    plan = Plan(local_op, targets, out_specs or (), sharding.shape_arg, inplace, random_op, fallback, positions,
                views.returns_view(func))
    plan.aten_func = func
    if sharding.communication:
        plan.comm = declared.Communicator(func, mesh, tuple(sharding.communication))
    return plan


def _is_random(func) -> bool:
    return torch.Tag.nondeterministic_seeded in func.tags


def dispatch(func, args, kwargs, dtensor_cls, plain_checked: bool = False):
    """Run aten op ``func`` on DTensor arguments; the body of ``DTensor.__torch_dispatch__``."""
    dtensors: list = []
    scalars: list = []
    key = [func]
    try:
        for value in args:  # the top level inline: this loop runs for every op
            if isinstance(value, dtensor_cls):
                dtensors.append(value)
                key.append(value._spec)
            elif type(value) is float:
                key.append(value if abs(value) == float("inf") else float)  # as in _key
            elif type(value) is int or type(value) is bool:
                key.append(value)
            else:
                key.append(_key(value, dtensors, dtensor_cls, scalars))
        if kwargs:
            key.append(_kwargs_key(kwargs, dtensors, dtensor_cls, scalars))
    except _PlainTensorError:  # a plain tensor beside DTensors: joins as Replicate once known equal on all ranks
        if explicit._STATE.explicit:
            with explicit.in_op("plain", None):
                args, kwargs = plain_tensors.join_as_replicate(func, args, kwargs or {}, dtensor_cls)
        else:
            args, kwargs = plain_tensors.join_as_replicate(func, args, kwargs or {}, dtensor_cls)
        return dispatch(func, args, kwargs, dtensor_cls, plain_checked=True)
    if local_blocks._PENDING[0]:  # a from_local that guessed its global shape is checked at its first op
        local_blocks.check_marked(dtensors)
    if scalars and not plain_checked:  # a 0-d plain tensor stays plain, but only once known equal on all ranks
        if explicit._STATE.explicit:
            with explicit.in_op("plain", None):
                plain_tensors.check_plain(func, args, kwargs or {}, dtensor_cls)
        else:
            plain_tensors.check_plain(func, args, kwargs or {}, dtensor_cls)
    key = tuple(key)
    cache = _D.cache
    plan = cache.get(key)
    if plan is None:
        _D.stats["misses"] += 1
        plan = _make_plan(func, args, kwargs or {}, dtensors, dtensor_cls)
        if len(cache) >= _CACHE_MAX:
            del cache[next(iter(cache))]  # oldest entry first: dicts keep insertion order
        cache[key] = plan
    else:
        _D.stats["hits"] += 1
    if type(plan) is foreach_meshes.PerMeshPlan:  # a multi-tensor op over several meshes (before any mesh test)
        return plan.run(args, kwargs, dtensor_cls, dispatch)
    if dtensors and dtensors[0]._spec.mesh.get_coordinate() is None:
        return _outside_the_mesh(func, plan, args, kwargs or {}, dtensors, dtensor_cls)
    if dtensors and views.writes_to_unaliased_view(func, args[0]):
        return views.write_through(func, args, kwargs)
    if explicit._STATE.explicit:  # auditing: whatever this op would communicate unasked raises
        specs = [dt._spec for dt in dtensors]
        explicit.check_input_moves(func, specs, getattr(plan, "input_targets", ()))
        with explicit.in_op(func, specs):
            return plan.run(args, kwargs, dtensors, dtensor_cls)
    with debug.at_op(func, dtensors):  # names the op in divergence and failure reports (formatted only there)
        return plan.run(args, kwargs, dtensors, dtensor_cls)
