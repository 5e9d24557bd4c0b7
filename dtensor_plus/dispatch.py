"""Op dispatch for DTensor: one op's trip, from the aten call to DTensor outputs.

1. The key: the op plus every argument with DTensors replaced by their specs. Python floats enter it only as
   their type (a learning rate or a loss scale changes every step and no rule may depend on a float value),
   except +-inf, which picks a mode (vector_norm's ord=inf); everything else enters by value.
2. On a miss, the decision: the op's record (op_record.py: its facts, read once) and the rule in force
   (rules.py: reads its arguments by name, returns one ``Sharding`` with any communication declared), or the
   gathering policy where there is no rule or the output shape depends on the data. The outputs' global
   metadata comes from running the op on meta tensors, once. The decision becomes a ``Plan`` (call_plan.py),
   adapted by the combinators of the op's kind: in place and ``out=`` (mutation.py), random draws
   (random.py), several meshes in one foreach op (foreach_meshes.py). It is cached under the rule set in force
   (the dispatcher object, dispatcher.py).
3. The run: inputs moved, the local op, outputs wrapped. A cache hit costs the key, a dict lookup and this.

Two policies stand beside the rules, by name: **gathering** (no rule: inputs gathered to Replicate, a one-time
warning, a counted fallback, never a wrong value) and **plain-tensor joining** (a plain tensor beside DTensors
joins as Replicate once known equal on every rank: plain_tensors.py).
"""

from __future__ import annotations

import warnings

import torch

from . import declared, explicit, foreach_meshes, local_blocks, mutation, plain_tensors, random, rules, strided, views
from .dispatcher import DISPATCHER
from .dtensor import DTensor
from .op_record import record_of
from .placement_tuples import replicated
from .call_plan import Plan, moving_inputs_collect, replicated_spec
from .spec import DTensorSpec, TensorMeta

__all__ = ["dispatch", "clear_cache", "cache_info"]

_CACHE_MAX = 8192
_SCALAR_TYPES = (int, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
_SCALAR_KINDS = frozenset(_SCALAR_TYPES)  # exactly these types: one set lookup
_KEYWORDS = object()  # in a key, where the keyword arguments start (equal to no argument's key material)
_D = DISPATCHER


def clear_cache() -> None:
    _D.clear_plans()


def cache_info() -> dict:
    return dict(_D.stats, size=len(_D.cache))


# -- argument scanning ----------------------------------------------------------------------------------


def _key(value, dtensors: list, scalars: list):
    """Hashable key material of one argument; appends the DTensors found to ``dtensors`` and the 0-d plain
    tensors to ``scalars``."""
    kind = type(value)
    if kind in _SCALAR_KINDS:  # the commonest, before any isinstance (which costs more where it fails)
        return value
    if isinstance(value, DTensor):
        dtensors.append(value)
        return value._spec
    if kind is float or kind is complex:
        return value if kind is float and abs(value) == float("inf") else kind  # +-inf picks a mode (norm ord)
    if kind is list or kind is tuple:
        # Inline for DTensor elements: foreach and fused-optimizer ops pass lists of a hundred or more.
        out = []
        for v in value:
            if type(v) is int:  # sizes and dims (view, reshape, permute): by value, no call
                out.append(v)
            elif isinstance(v, DTensor):
                dtensors.append(v)
                out.append(v._spec)
            else:
                out.append(_key(v, dtensors, scalars))
        return tuple(out)
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:  # a 0-d plain tensor acts as a replicated scalar, once checked (plain_tensors.py)
            scalars.append(value)
            return ("scalar_tensor", value.dtype, value.device)
        raise _PlainTensorError
    if isinstance(value, _SCALAR_TYPES):
        return value
    return kind  # opaque objects (generators...) never decide a rule


class _PlainTensorError(Exception):
    pass


def _flatten_outputs(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten_outputs(o)]
    return []


def _schema_value(value):
    if isinstance(value, DTensor):
        return value._spec
    if type(value) is list or type(value) is tuple:
        return type(value)(_schema_value(v) for v in value)
    return value


def _outside_the_mesh(func, plan, args, kwargs, dtensors):
    """The op on a rank outside the DTensors' mesh: it takes part in nothing (no collective, no local op on
    data it does not hold) and returns empty placeholders laid out as the rule says, as its inputs are."""
    record = record_of(func)
    if record.inplace:
        return args[0]
    if record.out_names:
        outs = tuple(kwargs[name] for name in record.out_names)
        return outs[0] if len(outs) == 1 else outs
    out = _run_on_meta(func, args, kwargs)
    specs = iter(getattr(plan, "out_specs", None) or ())
    device = dtensors[0]._local_tensor.device

    def placeholder(value):
        if isinstance(value, torch.Tensor):
            spec = next(specs, None) or replicated_spec(value, dtensors)
            return DTensor(torch.empty(0, dtype=value.dtype, device=device), spec)
        if isinstance(value, (list, tuple)):
            return type(value)(placeholder(v) for v in value)
        return None  # a Python scalar result (item()): this rank holds no value

    return placeholder(out)


def _run_on_meta(func, args, kwargs):
    """The op's output on meta tensors of the global shapes; None if it can't run there."""

    def to_meta(value):
        if isinstance(value, DTensor):
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


def _meta_outputs(func, args, kwargs):
    """Global metadata of each tensor output, from running the op on meta tensors; None if it can't run there."""
    out = _run_on_meta(func, args, kwargs)
    return None if out is None else [TensorMeta.of(t) for t in _flatten_outputs(out)]


def _gathering_policy(schema: rules.OpSchema, num_outputs: int) -> rules.Sharding:
    """The decision where no rule can decide: every input gathered to Replicate, every output Replicate."""
    replicate = replicated(schema.mesh.ndim)
    return rules.Sharding(inputs=(replicate,) * len(schema.specs), outputs=(replicate,) * num_outputs)


_ONTO_ONE_MESH = (
    "Move one onto the other's mesh by value: `y = dtp.distribute_tensor(y.full_tensor(), x.device_mesh, "
    "placements, src_data_rank=None)` (gathers y; every rank of both meshes must run it), or lay both out on "
    "one mesh from the start (a DTensor on mesh['tp'] and one on the whole (dp, tp) mesh: lift the first with "
    "layouts.data.replicate or distribute it on the whole mesh)"
)


def _make_plan(func, args, kwargs, dtensors):
    record = record_of(func)
    if record.out_names:  # out=: the functional op under its own plan, copied into out
        return mutation.OutVariantPlan(record)
    mesh = dtensors[0]._spec.mesh
    for dt in dtensors[1:]:
        if dt._spec.mesh != mesh:
            if record.multi_tensor:  # elements never meet: one call per mesh
                return foreach_meshes.PerMeshPlan(func)
            raise ValueError(
                f"{func}: DTensors on different meshes ({mesh} and {dt._spec.mesh}); an op needs all its DTensors "
                f"on one mesh. {_ONTO_ONE_MESH}"
            )
    schema = rules.OpSchema(_deciding_op(record), _schema_value(args), {k: _schema_value(v) for k, v in kwargs.items()},
                            tuple(d._spec for d in dtensors))
    metas = _meta_outputs(func, args, kwargs)
    if metas is None and not record.returns_tensors:
        metas = []  # a Python scalar result (item()): no tensor output to describe, the rule still places inputs
    sharding, fallback = _decide(schema, metas)
    inputs = sharding.inputs_for(schema)
    targets = tuple(
        None if want is None or tuple(want) == spec.placements else tuple(want) for want, spec in zip(inputs, schema.specs)
    )
    out_specs = None if metas is None else tuple(
        DTensorSpec(mesh, tuple(p), meta) if p is not None else None for p, meta in zip(sharding.outputs, metas)
    )
    positions = tuple(i for i, a in enumerate(args) if isinstance(a, DTensor))
    if len(positions) != len(dtensors):
        positions = None  # some DTensor sits in a list or a keyword: substitute recursively
    comm = None
    if sharding.communication:
        entry = _D.rule_set.entry(schema.func)  # a layout entered by name asks for its rules' communication
        comm = declared.Communicator(func, mesh, tuple(sharding.communication), entry is not None and entry.asked_for)
    plan = Plan(sharding.local_op or func, func, targets, out_specs or (), sharding.shape_arg, record.inplace, fallback,
                positions, record.returns_view, comm)
    plan.input_collectives = moving_inputs_collect(schema.specs, targets)
    if sharding.whole_batch_of is not None:
        plan.whole_batch_index = schema.names.index(sharding.whole_batch_of)
    if record.inplace and (out_specs is None or (schema.func is not func and sharding.local_op is not None)):
        # The gathered result, or a local op written for the functional twin, cannot write into self as is.
        return mutation.OutOfPlacePlan(record)
    return mutation.in_place(record, plan, dtensors) or random.seeded(record, plan)


def _deciding_op(record):
    """The op whose rule decides: the op's own, or for an in-place op without one (``abs_``) its functional
    twin's, which ``mutation.in_place`` then keeps in self's layout or computes out of place and copies back."""
    func = record.func
    twin = record.functional
    if record.inplace and rules.rule_for(func) is None and isinstance(twin, torch._ops.OpOverload) \
            and rules.rule_for(twin) is not None:
        return twin
    return func


def _decide(schema: rules.OpSchema, metas):
    """(the Sharding, whether the gathering policy made it)."""
    func = schema.func
    rule = rules.rule_for(func)
    if rule is None or metas is None:
        if str(func) not in _D.warned:
            _D.warned.add(str(func))
            reason = "has no sharding rule" if rule is None else "has a data-dependent output shape"
            warnings.warn(f"dtensor_plus: {func} {reason}; gathering its inputs to Replicate (correct, slow)")
        return _gathering_policy(schema, len(metas) if metas is not None else 0), True
    if strided.has_strided(schema.specs):
        return strided.decide(rule, schema, metas), False
    return rule(schema), False


def dispatch(func, args, kwargs, plain_checked: bool = False):
    """Run aten op ``func`` on DTensor arguments; the body of ``DTensor.__torch_dispatch__``."""
    dtensors: list = []
    scalars: list = []
    key = [func]
    try:
        for value in args:  # the top level inline: this loop runs for every op
            kind = type(value)  # type tests first: isinstance(v, DTensor) costs more where v is no tensor
            if kind is DTensor:
                dtensors.append(value)
                key.append(value._spec)
            elif kind is int or kind is bool or value is None:
                key.append(value)
            elif kind is float:
                key.append(value if abs(value) == float("inf") else float)  # as in _key
            else:
                key.append(_key(value, dtensors, scalars))  # lists, subclasses of DTensor, the rest
        if kwargs:
            key.append(_KEYWORDS)  # then name, value, name, value...: no tuple per pair
            for name, value in kwargs.items():
                key.append(name)
                key.append(_key(value, dtensors, scalars))
    except _PlainTensorError:  # a plain tensor beside DTensors: joins as Replicate once known equal on all ranks
        if _D.explicit_depth:
            with explicit.checking_plain():
                args, kwargs = plain_tensors.join_as_replicate(func, args, kwargs or {})
        else:
            args, kwargs = plain_tensors.join_as_replicate(func, args, kwargs or {})
        return dispatch(func, args, kwargs, plain_checked=True)
    if _D.unchecked_blocks:  # a from_local that guessed its global shape is checked at its first op
        local_blocks.check_marked(dtensors)
    if scalars and not plain_checked:  # a 0-d plain tensor stays plain, but only once known equal on all ranks
        if _D.explicit_depth:
            with explicit.checking_plain():
                plain_tensors.check_plain(func, args, kwargs or {})
        else:
            plain_tensors.check_plain(func, args, kwargs or {})
    run = _D.cache.get(tuple(key))
    if run is None:
        run = _cached_run(tuple(key), func, args, kwargs or {}, dtensors)
    else:
        _D.stats["hits"] += 1
    return run(args, kwargs, dtensors)


def _cached_run(key, func, args, kwargs, dtensors):
    """On a miss: the decision made into a plan, and the plan into the function every hit of ``key`` calls."""
    _D.stats["misses"] += 1
    plan = _make_plan(func, args, kwargs, dtensors)
    run = _entry(func, plan, dtensors)
    cache = _D.cache
    if len(cache) >= _CACHE_MAX:
        del cache[next(iter(cache))]  # oldest entry first: dicts keep insertion order
    cache[key] = run
    return run


def _entry(func, plan, dtensors):
    """What a cache hit runs: ``run(args, kwargs, dtensors)``. Every fact that is the same for every call of one
    key is settled here, once: the plan's kind, whether this rank is in the mesh (the mesh is in the key), whether
    the op writes in place (its record), whether the plan can communicate. A plan that only runs the local op
    (``Plan.direct_run``, no input move that needs a collective, no declared communication) skips the rest: nothing
    reads the op stack or the explicit-mode audit unless a collective runs. Declared communication that cannot act
    (mesh dims of one rank) skips them too, but for explicit mode's audit."""
    if type(plan) is foreach_meshes.PerMeshPlan:  # a multi-tensor op over several meshes (before any mesh test)
        return lambda args, kwargs, dtensors: plan.run(args, kwargs, dispatch)
    if dtensors and dtensors[0]._spec.mesh.get_coordinate() is None:
        return lambda args, kwargs, dtensors: _outside_the_mesh(func, plan, args, kwargs or {}, dtensors)
    direct = plan.direct_run() if type(plan) is Plan else None
    if direct is not None and not plan.communicates and plan.comm is None:
        return direct  # only the local op: nothing reads the op stack or the explicit audit
    inplace = record_of(func).inplace
    body = direct or plan.run

    def run(args, kwargs, dtensors):
        local_copy = None
        if inplace and dtensors:
            marked = getattr(args[0], views.MARK, None)
            if marked is not None:
                if type(marked) is not views.LocalCopy:  # a view whose block is not a view of its base's
                    return views.write_through(func, args, kwargs)
                if body is not direct:  # (the direct closure copies back itself)
                    local_copy = args[0]  # this rank's block is a copy: written here, then copied back
        # The op being run, for divergence and failure reports and comm_mode's by_op (formatted only there).
        op_stack = _D.op_stack
        op_stack.append((func, dtensors))
        try:
            if _D.explicit_depth:  # auditing: whatever this op would communicate unasked raises, before any of it runs
                specs = [dt._spec for dt in dtensors]
                explicit.check_input_moves(func, specs, getattr(plan, "input_targets", ()))
                explicit.check_declared(func, specs, getattr(plan, "comm", None))
            out = body(args, kwargs, dtensors)
        finally:
            op_stack.pop()
        if local_copy is not None:
            views.copy_back(local_copy)
        return out

    if direct is not None and not plan.communicates:
        # Declared communication that issues nothing here (its mesh dims have one rank): the op stack is read by
        # collectives only, but explicit mode still audits the declaration as it does everywhere.
        return lambda args, kwargs, dtensors: (run if _D.explicit_depth else direct)(args, kwargs, dtensors)
    if type(plan) is random.SeededPlan and type(plan.plan) is Plan and not plan.plan.communicates \
            and plan.plan.comm is None:
        # sdpa, dropout: a call that draws no random numbers (dropout_p == 0) is its plan without the draw.
        fast = plan.plan.direct_run()
        if fast is not None:
            draws = plan.record.draws
            return lambda args, kwargs, dtensors: (run if draws(args, kwargs) else fast)(args, kwargs, dtensors)
    return run


_D.execute = dispatch  # DTensor.__torch_dispatch__ calls the executor through the dispatcher object
