"""Data parallelism's forward on each rank's own rows: no DTensor dispatch on the dp mesh dim (``replicate``'s
``local_compute``).

Why: on the dp mesh dim a replicated module's activations are only batch-sharded and its parameters whole, so
every op's rule there answers "Shard(0) stays Shard(0), nothing moves": per-op dispatch on dp decides nothing
and costs a key, a cache lookup and a wrap per op (data parallelism measured 2-5x DDP's step time). So around
the module's forward, the dp mesh dim is dropped and put back at the module's boundary:

    parameters, buffers    DTensors at rest (Replicate on dp). For compute each is bound (the attribute the
                           module's code reads, as ZeRO-3 binds its gathered wholes) to its view without dp:
                           on a 1-D dp mesh the plain local block, on (dp, tp) a DTensor on mesh["tp"] holding
                           the same block (the tp rules still decide, over the other mesh dims only).
    inputs                 a DTensor Shard(0) on dp becomes this rank's rows (Replicate on dp: the whole), the
                           other mesh dims kept.
    outputs                every tensor output is wrapped back: Shard(0) on dp with the global batch size read
                           from the inputs' specs, so a loss the user computes on it is the exact mean over the
                           global batch, uneven batches included.
    gradients              with replicate()'s buckets (``gradients``): each parameter computes through a
                           persistent local leaf sharing its block (no autograd Function, no DTensor per
                           gradient); this rank's rows' contribution lands, plain, in place in a view of its
                           flat bucket (the leaf's .grad, armed here before each backward: layouts/data_flat.py;
                           on (dp, tp) the leaf's hook hands it to the buckets), all-reduced while backward
                           goes on, and .grad is written in the parameter's layout when backward ends.
                           Without (reduce_in_backward=False), or for a parameter with hooks of its own:
                           the view's backward hands the parameter a gradient Partial(sum) on dp. A parameter
                           whose gradient an optimizer takes (``GRADIENT_OWNER``: ZeroRedundancyOptimizer's)
                           computes through a leaf too, whose hook puts that Partial gradient on it and runs its
                           hooks as autograd would. So, with the
                           buckets, the parameters themselves are not in the autograd graph (their leaves are):
                           ``torch.autograd.grad(loss, parameters)`` or ``backward(inputs=parameters)`` need
                           ``reduce_in_backward=False`` (Partial gradients, then ``sync_gradients``) or
                           ``local_compute=False``.

A forward takes the DTensor path instead (every op dispatched on the whole mesh, exact as one device) when this
view cannot be exact or is not known to be: under ``dtensor_plus.manual_seed(..., strict=True)`` (random ops
drawn as one device would need the global view), when no input is a DTensor Shard(0) on dp, when an input is a
plain tensor with dims (whose rows are unknown) or a DTensor on another mesh or with another dp placement,
when some dp rank's block of the global batch is empty (1 row on 2 ranks, 5 on 4: plain code can fail on 0 rows,
``view(0, T, -1, D)``, and other mesh dims' rules would decide that rank's ops on empty tensors),
when a parameter or buffer is not Replicate on dp (ZeRO-3, experts sharded on dp), under ``mixed_precision``
(its casts reduce gradients in ``reduce_dtype`` on the DTensor path) or with a ``MoE`` layer inside (routing
statistics and capacity over the global batch): both marked ``DTENSOR_PATH``. Under ``torch.compile`` too:
per-op dispatch is what this view saves, and a compiled graph pays it once, while tracing (the graph holds
local ops either way), so a compiled forward traces the DTensor path. An output tensor whose first
dim is not the batch (a loss computed inside forward, as Hugging Face models do with ``labels=``) cannot be put
back exactly: that call's local outputs are dropped, the forward runs again on the DTensor path, and the module
is marked ``DTENSOR_PATH`` from then on (one warning says so). Never a wrong value, never an error for a model
the DTensor path runs.

Random ops in the local forward (dropout) draw from torch's generator, forked for the forward and seeded by
(dtensor_plus's seed and op counter, this rank's dp coordinate): dp ranks draw different masks and runs
repeat, as in the DTensor path's default mode (the draws themselves differ from that path's).
"""

from __future__ import annotations

import warnings
from itertools import chain
from operator import attrgetter, is_

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from dtensor_plus import random as dtp_random
from dtensor_plus.dispatcher import DISPATCHER
from dtensor_plus.dtensor import DTensor
from dtensor_plus.placements import Partial, Replicate, Shard, chunk_bounds
from dtensor_plus.redistribute import redistribute_local
from dtensor_plus.spec import DTensorSpec, TensorMeta

__all__ = ["LocalCompute", "DTENSOR_PATH", "GRADIENT_OWNER"]

DTENSOR_PATH = "_dtp_dtensor_path"  # on a module or its class: take the DTensor path (mixed_precision, MoE)
# On a parameter's __dict__: an optimizer takes its gradient (ZeroRedundancyOptimizer), so without replicate's
# buckets it too computes through a local leaf whose gradient reaches it Partial on dp (``_to_partial``): no
# autograd.grad(loss, parameter) then, which would find the parameter outside the graph.
GRADIENT_OWNER = "_dtp_gradient_owner"
_TABLES = attrgetter("_parameters", "_buffers", "_modules")
_REQUIRES_GRAD = torch._C.TensorBase.requires_grad.__get__  # DTensor's requires_grad is a Python property


class LocalCompute:
    """The forward pre-hook and hook that run one replicated module on each rank's rows (module docstring)."""

    def __init__(self, mesh, dp_mesh_dim: int, gradients=None):
        self.mesh, self.k = mesh, dp_mesh_dim
        # replicate()'s GradientBucket: parameters compute through local leaves whose gradients go straight to
        # it (``_leaf``); None: through _DropDp, the gradient reaching the parameter Partial on dp.
        self.gradients = gradients
        self.leaves: dict = {}  # id(parameter) -> (parameter, its local block, the leaf sharing that block)
        others = tuple(n for i, n in enumerate(mesh.mesh_dim_names) if i != dp_mesh_dim)
        self.sub_mesh = mesh[others] if others else None  # None: the view is a plain tensor
        self.sub_specs: dict = {}  # a parameter's spec -> its view's spec (parameters keep their specs)
        self.partial_specs: dict = {}  # a parameter's spec -> its plain leaf's gradient's spec (``_to_partial``)
        self.output_specs: dict = {}  # (global rows, an output's shape, dtype, placements) -> its spec (``_wrap``)
        self.tree: _Tree | None = None  # the module tree as _entries last walked it
        self.bound: _Tree | None = None  # the tree bound for the forward in progress

    def install(self, module) -> None:
        module.register_forward_pre_hook(self.pre_forward, with_kwargs=True)
        module.register_forward_hook(self.post_forward, with_kwargs=True, always_call=True)

    # -- the forward's boundary ---------------------------------------------------------------------------

    def pre_forward(self, module, args, kwargs):
        if self.bound is not None:  # called again from inside its own forward: already local
            return None
        if DISPATCHER.rng_strict or torch.compiler.is_compiling():
            return None
        flat, tree = tree_flatten((args, kwargs))
        batch = self._batch(flat)
        if batch is None:
            return None
        bound = self._entries(module)
        if bound is None:
            return None
        self.batch, self.bound, self.call = batch, bound, (args, kwargs)
        grad_enabled = torch.is_grad_enabled()
        views = [self._view(t, grad_enabled) for t in bound.tensors]
        for attributes, name, i in bound.slots:
            attributes[name] = views[i]  # attribute lookup finds __dict__ before Module.__getattr__'s tables
        if self.gradients is not None and grad_enabled:
            self.gradients.arm()  # the plain leaves' .grad: views of their flat buckets, for this backward
        self._fork_rng()
        return tree_unflatten([self._input_view(t) if isinstance(t, DTensor) else t for t in flat], tree)

    def post_forward(self, module, args, kwargs, out):
        if self.bound is None:
            return None
        bound, self.bound = self.bound, None
        (args, kwargs), self.call = self.call, None
        for attributes, name, _ in bound.slots:
            attributes.pop(name, None)
        self._restore_rng()
        flat, tree = tree_flatten(out)
        rows = self.batch[1]
        if any(isinstance(t, torch.Tensor) and (t.ndim == 0 or t.shape[0] != rows) for t in flat):
            return self._rerun_on_dtensors(module, args, kwargs, flat)
        return tree_unflatten([self._wrap(t) if isinstance(t, torch.Tensor) else t for t in flat], tree)

    def _rerun_on_dtensors(self, module, args, kwargs, flat):
        """A tensor output that is not this rank's rows (a loss computed inside forward: a mean over this rank's
        rows only) cannot be put back exactly: drop this call's outputs, mark the module, run it again on the
        DTensor path (whose every op sees the global batch)."""
        shapes = [tuple(t.shape) for t in flat if isinstance(t, torch.Tensor)]
        warnings.warn(
            f"replicate(local_compute=True): {type(module).__name__} returned tensors of shapes {shapes}, not all "
            f"batch rows (a loss computed inside forward?), which the local path cannot put back exactly; this module "
            f"runs on the DTensor path from now on (exact, slower). Compute the loss outside the module on the "
            f"returned batch to keep the fast path, or pass replicate(..., local_compute=False) to say so up front",
            stacklevel=3)
        module.__dict__[DTENSOR_PATH] = True
        return module(*args, **kwargs)

    # -- what may take the local path ---------------------------------------------------------------------

    def _batch(self, flat):
        """(global rows, this rank's rows) of the inputs' batch, or None when the forward must take the DTensor
        path (the module docstring's list)."""
        batch = None
        for t in flat:
            if not isinstance(t, torch.Tensor):
                continue
            if not isinstance(t, DTensor):
                if t.ndim:
                    return None
                continue
            spec = t._spec
            if spec.mesh != self.mesh:
                return None
            on_dp = spec.placements[self.k]
            if on_dp.is_replicate():
                continue
            if not on_dp.is_shard(0):
                return None
            if any(i != self.k and (p.is_shard(0) or p.is_strided_shard()) for i, p in enumerate(spec.placements)):
                return None  # dim 0 split further on another mesh dim: keep the whole-mesh view
            n = self.mesh.size(self.k)
            if chunk_bounds(spec.shape[0], n, n - 1)[1] == 0:
                # Some dp rank holds no rows (torch.chunk leaves the last ones empty: 1 row on 2 ranks, 5 on 4).
                # Plain code on 0 rows can fail where the global shape is fine (``x.view(0, T, -1, D)`` is
                # ambiguous), and on a mesh with other mesh dims their rules would decide that rank's ops on
                # empty tensors, where every move costs 0 bytes, laying its outputs out unlike the others'.
                # Known from the global shape, so every rank takes the DTensor path together.
                return None
            rows = (spec.shape[0], t._local_tensor.shape[0])
            if batch is not None and batch != rows:
                return None
            batch = rows
        return batch

    def _entries(self, module):
        """The ``_Tree`` of every parameter and DTensor buffer, or None if one is not Replicate on dp. The last
        walk's tree while it holds (``_Tree.holds``): walking a GPT's modules cost a tenth of a millisecond."""
        tree = self.tree
        if tree is not None and tree.holds(module):
            return tree
        entries = self._walk(module)
        self.tree = None if entries is None else _Tree(module, entries)
        return self.tree

    def _walk(self, module):
        """(owner, name, tensor) of every parameter and DTensor buffer, or None if one is not Replicate on dp."""
        entries = []
        for owner in module.modules():
            if owner.__dict__.get(DTENSOR_PATH) or getattr(type(owner), DTENSOR_PATH, False):
                return None
            for table in (owner._parameters, owner._buffers):
                for name, t in table.items():
                    if t is None:
                        continue
                    if not isinstance(t, DTensor):
                        if table is owner._parameters:
                            return None
                        continue  # a plain buffer is the same on every rank already
                    if t._spec.mesh != self.mesh or not t._spec.placements[self.k].is_replicate():
                        return None
                    entries.append((owner, name, t))
        return entries

    # -- views ----------------------------------------------------------------------------------------------

    def _view(self, t: DTensor, grad_enabled: bool):
        spec = None
        if self.sub_mesh is not None:
            spec = self.sub_specs.get(t._spec, self)  # `self`: not seen yet
            if spec is self:
                spec = self.sub_specs[t._spec] = self._sub_spec(t._spec, t._spec.shape)
        if grad_enabled and _REQUIRES_GRAD(t):
            # a local leaf: replicate's buckets take the gradient, or ZeRO does (no autograd.grad on the parameter)
            deliver = "buckets" if self.gradients is not None else "partial" if t.__dict__.get(GRADIENT_OWNER) else None
            if deliver is not None and _only_our_hooks(t):
                leaf = self._leaf(t, spec, deliver)
                if leaf is not None:
                    return leaf
            return _DropDp.apply(t, spec, self.k)
        return t._local_tensor if spec is None else DTensor(t._local_tensor, spec)

    def _leaf(self, param: DTensor, spec, deliver: str):
        """The leaf ``param`` computes through: a plain tensor (or a DTensor on the sub-mesh) sharing its local
        block, so the optimizer's in-place updates of the block are the leaf's too. Made once per block: its
        hook hands each backward's gradient (this rank's rows' contribution, summed over tied uses) on:
        ``deliver`` "buckets" to replicate's buckets, which reduce it onto ``param.grad`` (layouts/data.py
        ``GradientBucket.leaf_hook``), "partial" to ``_to_partial`` (ZeRO reduce-scatters it). None for a
        tensor that is not a Parameter (it computes through _DropDp)."""
        entry = self.leaves.get(id(param))
        if entry is None or entry[0] is not param or entry[1] is not param._local_tensor or entry[3] != deliver:
            if not isinstance(param, nn.Parameter):
                return None
            local = param._local_tensor
            leaf = local.detach() if spec is None else DTensor(local.detach(), spec)
            leaf.requires_grad_()
            if deliver == "buckets":  # None: the flat buckets hook the plain leaf themselves (data_flat.py)
                hook = self.gradients.leaf_hook(param, leaf, self.k)
            else:
                hook = lambda leaf, param=param: self._to_partial(param, leaf)  # noqa: E731
            if hook is not None:
                leaf.register_post_accumulate_grad_hook(hook)
            entry = self.leaves[id(param)] = (param, local, leaf, deliver)
        return entry[2]

    def _to_partial(self, param: nn.Parameter, leaf) -> None:
        """The leaf's gradient onto ``param.grad`` as autograd would put _DropDp's there: Partial(sum) on dp, the
        parameter's tensor hooks applied, added to a gradient already there, then its post-accumulate-grad
        hooks run (ZeRO-2's bucket hook). Without the autograd Function per parameter and its backward."""
        grad, leaf.grad = leaf.grad, None
        if isinstance(grad, DTensor):
            grad = _DropDp.gradient(grad, param._spec, self.k)
        else:  # a plain block (1-D dp mesh): its gradient's spec, Partial on dp, made once per parameter spec
            spec = self.partial_specs.get(param._spec)
            if spec is None:
                spec = self.partial_specs[param._spec] = _DropDp.gradient(grad, param._spec, self.k)._spec
            grad = DTensor(grad, spec)
        for hook in tuple((param._backward_hooks or {}).values()):
            changed = hook(grad)
            grad = grad if changed is None else changed
        held = param.grad
        if held is None:
            param.grad = grad
        elif isinstance(held, DTensor) and isinstance(grad, DTensor) and held._spec == grad._spec:
            held._local_tensor.add_(grad._local_tensor)  # accumulation over micro-batches, in place as autograd's
        else:
            param.grad = held + grad
        for hook in tuple((param._post_accumulate_grad_hooks or {}).values()):
            hook(param)

    def _input_view(self, t: DTensor):
        """An input without the dp mesh dim; through _DropDp only when its gradient is wanted."""
        spec = self._input_spec(t)
        if t.requires_grad and torch.is_grad_enabled():
            return _DropDp.apply(t, spec, self.k)
        return t._local_tensor if spec is None else DTensor(t._local_tensor, spec)

    def _input_spec(self, t: DTensor):
        shape = list(t._spec.shape)
        if t._spec.placements[self.k].is_shard():
            shape[0] = self.batch[1]
        return self._sub_spec(t._spec, shape)

    def _sub_spec(self, spec: DTensorSpec, shape):
        """``spec`` without the dp mesh dim, with ``shape``; None on a 1-D dp mesh (the view is plain)."""
        if self.sub_mesh is None:
            return None
        placements = tuple(p for i, p in enumerate(spec.placements) if i != self.k)
        stride = _contiguous_stride(shape)
        return DTensorSpec(self.sub_mesh, placements, TensorMeta(torch.Size(shape), stride, spec.dtype))

    def _wrap(self, t: torch.Tensor) -> DTensor:
        """An output back on the whole mesh: Shard(0) on dp, the global batch's rows."""
        rows, _ = self.batch  # every output has this rank's rows: post_forward checked
        sub = t._spec.placements if isinstance(t, DTensor) else None
        key = (rows, t.shape, t.dtype, sub)
        spec = self.output_specs.get(key)
        if spec is None:  # made once per output shape: the same every step
            shape = [rows, *t.shape[1:]]
            if sub is not None:
                sub = list(sub)
                placements = [Shard(0) if i == self.k else sub.pop(0) for i in range(self.mesh.ndim)]
            else:
                placements = [Shard(0) if i == self.k else Replicate() for i in range(self.mesh.ndim)]
            meta = TensorMeta(torch.Size(shape), _contiguous_stride(shape), t.dtype)
            spec = self.output_specs[key] = DTensorSpec(self.mesh, tuple(placements), meta)
        flat = self.gradients.flat if self.gradients is not None else None
        return _AddDp.apply(t, spec, self.k, None if flat is None else flat.backward_started)

    def _fork_rng(self) -> None:
        """Random draws for this forward: torch's generators (CPU, and the mesh's CUDA device) forked and seeded
        per dp rank and forward; on a sub-mesh, dtensor_plus's seed mixed with the dp coordinate (module
        docstring). Undone by _restore_rng. The generators are seeded directly: ``torch.manual_seed`` also queues
        a lazy seeding of every CUDA device, with a formatted stack, on each call (a third of the forward here)."""
        DISPATCHER.rng_counter += 1  # like a random op: manual_seed resets it, so a rerun draws the same
        coordinate = self.mesh.get_coordinate()[self.k]
        seed = DISPATCHER.rng_seed
        generators = [torch.default_generator]
        if self.mesh.device_type == "cuda":
            generators.append(torch.cuda.default_generators[torch.cuda.current_device()])
        self.rng = [(g, g.get_state()) for g in generators]
        mixed = dtp_random._mix(torch.initial_seed() if seed is None else seed, DISPATCHER.rng_counter, coordinate)
        for g in generators:
            g.manual_seed(mixed)
        self.saved_seed = seed
        if seed is not None and self.sub_mesh is not None:
            DISPATCHER.rng_seed = dtp_random._mix(seed, coordinate)

    def _restore_rng(self) -> None:
        if self.saved_seed is not None and self.sub_mesh is not None:
            DISPATCHER.rng_seed = self.saved_seed
        for g, state in self.rng:
            g.set_state(state)


class _Tree:
    """A module tree as ``LocalCompute._walk`` found it: its parameters and DTensor buffers (``tensors``, each
    once: a tied weight is one) and where each is bound (``slots``: a module's ``__dict__``, the attribute
    name, the tensor's index). The walk's answer stands while ``holds``: the same modules holding the same
    tables (parameters, buffers, children) holding the same objects, each tensor in the same layout (one
    ``.data =`` may change it), no module marked DTENSOR_PATH since."""

    def __init__(self, root, entries):
        self.root, self.modules = root, list(root.modules())
        self.tables = list(chain.from_iterable(map(_TABLES, self.modules)))
        self.values = tuple(chain.from_iterable(map(dict.values, self.tables)))
        index: dict = {}
        self.tensors, self.slots = [], []
        for owner, name, t in entries:
            if id(t) not in index:
                index[id(t)] = len(self.tensors)
                self.tensors.append(t)
            self.slots.append((owner.__dict__, name, index[id(t)]))
        self.specs = [t._spec for t in self.tensors]

    def holds(self, root) -> bool:
        return (root is self.root and _same(list(chain.from_iterable(map(_TABLES, self.modules))), self.tables)
                and _same(tuple(chain.from_iterable(map(dict.values, self.tables))), self.values)
                and _same([t._spec for t in self.tensors], self.specs)
                and not any(m.__dict__.get(DTENSOR_PATH) for m in self.modules))


def _same(a, b) -> bool:
    """Whether two sequences hold the same objects in the same order (identity: no tensor comparison)."""
    return len(a) == len(b) and all(map(is_, a, b))


def _only_our_hooks(param: DTensor) -> bool:
    """Whether ``param`` has no hooks but replicate's bucket hook and grad_layout's: a hook of the user's must
    see the gradient arrive at the parameter (the _DropDp view), which a local leaf would bypass."""
    return len(param._post_accumulate_grad_hooks or ()) <= 1 and len(param._backward_hooks or ()) <= 1


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


class _DropDp(torch.autograd.Function):
    """forward: a DTensor on the whole mesh -> the same block without the dp mesh dim (plain, or a DTensor on the
    sub-mesh of the others) / backward: that view's gradient -> a DTensor on the whole mesh, Shard(0) on dp for a
    batch-sharded input, Partial(sum) on dp for a replicated one (each rank's rows' contribution)."""

    @staticmethod
    def forward(ctx, t, sub_spec, k):
        ctx.spec, ctx.k = t._spec, k
        local = t._local_tensor.view_as(t._local_tensor)
        return local if sub_spec is None else DTensor(local, sub_spec, requires_grad=False)

    @staticmethod
    def backward(ctx, grad):
        return _DropDp.gradient(grad, ctx.spec, ctx.k), None, None

    @staticmethod
    def gradient(grad, spec: DTensorSpec, k: int) -> DTensor:
        """The view's gradient ``grad`` as the gradient of the tensor laid out as ``spec`` (class docstring)."""
        on_dp = spec.placements[k]
        on_dp = on_dp if on_dp.is_shard() else Partial()
        if isinstance(grad, DTensor):
            sub = list(grad._spec.placements)
            placements = tuple(on_dp if i == k else sub.pop(0) for i in range(spec.mesh.ndim))
            grad = grad._local_tensor
        else:
            placements = tuple(on_dp if i == k else Replicate() for i in range(spec.mesh.ndim))
        return DTensor(grad, spec.with_placements(placements))


class _AddDp(torch.autograd.Function):
    """forward: a local output -> a DTensor on the whole mesh, Shard(0) on dp / backward: its gradient moved to
    Shard(0) on dp (Partial on other mesh dims may stay), returned without the dp mesh dim; ``started`` (the flat
    buckets' ``backward_started``, or None) called first: the backward reaching the outputs queues the buckets'
    flush, whose last bucket no gradient hook announces."""

    @staticmethod
    def forward(ctx, t, spec, k, started=None):
        ctx.k, ctx.sub_spec, ctx.started = k, t._spec if isinstance(t, DTensor) else None, started
        local = t._local_tensor if isinstance(t, DTensor) else t
        return DTensor(local.view_as(local), spec, requires_grad=False)

    @staticmethod
    def backward(ctx, grad):
        if ctx.started is not None:
            ctx.started()
        k, placements = ctx.k, list(grad._spec.placements)
        placements[k] = Shard(0)
        if ctx.sub_spec is None:
            placements = [Replicate()] * len(placements)
            placements[k] = Shard(0)
        local = redistribute_local(grad._local_tensor, grad._spec, tuple(placements))
        if ctx.sub_spec is None:
            return local, None, None, None
        sub = tuple(p for i, p in enumerate(placements) if i != k)
        return DTensor(local, ctx.sub_spec.with_placements(sub)), None, None, None

