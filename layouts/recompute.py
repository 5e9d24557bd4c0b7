"""Activation recomputation: ``checkpoint_modules(model, "blocks.*", policy="full")``,
``checkpoint_modules(model, "blocks.*.attn", policy="selective")`` or
``checkpoint_modules(model, "blocks.*", policy="keep_attention")``.

Two policies as Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") define
them, and DistFlashAttn's (Li et al. 2023) rematerialization-aware one:

* "full": each matching module's forward runs under ``torch.utils.checkpoint.checkpoint`` (non-reentrant): only
  its inputs are kept, the whole forward runs again in backward.
* "selective": only the attention core is recomputed -- softmax(Q K^T), its dropout and the product with V, or a
  scaled-dot-product-attention kernel -- the (B, H, T, T) tensors that cost 5·a·s/h of the paper's per-layer
  34 + 5·a·s/h. What else the module computes (the linear layers' outputs, Q, K and V themselves, collectives'
  outputs) is kept, through ``create_selective_checkpoint_contexts`` with ``attention_core_policy``, so no
  collective runs again. Kept beyond the paper's count: what the module computes that autograd alone would not
  keep, e.g. a row-parallel layer's partial sum, which its collective reads (benchmarks/activation_memory.py
  names each such term).
* "keep_attention": the whole module is recomputed except its attention ops (``scaled_dot_product_attention``'s
  kernels, and under ``context_parallel`` the ring / Ulysses / DistFlashAttn attention that SDPA dispatches to),
  whose outputs are kept (``keep_attention_policy``): the backward needs the attention's output and log-sum-exp,
  which its forward alone makes, so "full" reruns the attention in backward -- under context parallelism with
  all its shifts -- while here the recomputation stops at Q, K and V. Kept beyond "full": each attention's
  outputs, O(B H T D), no (T, T) tensor. A module without an SDPA op (attention written out as matmuls) is
  recomputed as under "full".

The attention core is found by data flow, not by name, so any model's attention works (examples/gpt.py's
written-out matmuls, Hugging Face's eager attention, SDPA): a batched matmul (``bmm``) whose inputs are not core
starts it (Q K^T), every op with a core input is core, and a batched matmul with a core input (P V) ends it (it is
recomputed, its output is not core). An SDPA op is recomputed whole. Layout ops (views, transposes, the copies a
reshape makes) are recomputed too: they cost no FLOPs, and keeping Q, K, V once (the linear outputs) is enough.

Random numbers: each random op in the region draws in recomputation exactly what it drew in forward, in both RNG
modes of ``dtensor_plus.random`` and whatever the policy caches. torch's checkpoint restores torch's generator at
the region's start only, which is right only if every random op before the recomputed one is recomputed too,
and it does not know dtensor_plus's op counter (default mode seeds each draw from it). So a tape records the
generator state and the counter before every random op in forward and sets them again before the same op in
recomputation; dtensor_plus's counter is put back after recomputation, so later draws are those of a run
without recomputation.

Under torch.compile (tests/compile/test_compile_switch_recompute.py: keep_attention under ring cp, one graph, no
break, equal to eager and one device): torch's checkpoint takes the policy's two caching modes alone and turns the
policy into tags on the traced graph's nodes, which AOTAutograd's partitioner follows; no random tape there (the
partitioner saves a random op's output rather than draw it again); "full" is torch's plain checkpoint.

Composes with every layout (tested: tp+sp, dp, ZeRO-2, ZeRO-3, cp ring, a Hugging Face Llama on tp+sp): the
region is the module's ``forward``, so its own hooks (``fully_shard``'s gather, ``PrepareModuleInput``) run once,
outside the region, and the hooks of its submodules (tensor-parallel styles) run again in a full recomputation,
with their collectives. A Hugging Face model must run with ``use_cache=False`` (as its own gradient checkpointing
sets): a recomputed layer would append its keys and values to the KV cache a second time.
"""

from __future__ import annotations

import fnmatch
import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dtensor_plus.dispatcher import DISPATCHER

__all__ = ["checkpoint_modules", "attention_core_policy", "keep_attention_policy", "POLICIES"]

POLICIES = ("full", "selective", "keep_attention")

_aten = torch.ops.aten
_BATCHED_MATMULS = frozenset({_aten.bmm.default, _aten.baddbmm.default})
# No FLOPs: recomputed rather than kept (Q, K, V stay kept once, as the linear layers' outputs).
_LAYOUT_OPS = frozenset({
    _aten.view.default, _aten._unsafe_view.default, _aten.reshape.default, _aten.expand.default,
    _aten.transpose.int, _aten.t.default, _aten.permute.default, _aten.clone.default, _aten.unsqueeze.default,
    _aten.squeeze.dim, _aten.slice.Tensor, _aten.select.int, _aten.alias.default,
})

# Applying a dropout mask (x * mask): recomputed from the kept input and mask, so the dropped-out output is not
# kept besides them (autograd alone keeps only the mask).
_MASK_APPLICATIONS = frozenset({_aten.mul.Tensor})


def _is_sdpa(func) -> bool:
    return "scaled_dot_product" in func.name()


def _is_random(func) -> bool:
    return torch.Tag.nondeterministic_seeded in func.tags


def _storages(tree) -> dict:
    """The (local) storages of the tensors in ``tree``, by address."""
    out = {}
    for t in torch.utils._pytree.tree_leaves(tree):
        if isinstance(t, torch.Tensor):
            storage = getattr(t, "_local_tensor", t).untyped_storage()
            out[storage._cdata] = storage
    return out


class _StorageSet:
    """Storages by address, held weakly: a freed storage's address may be reused by a new one, which must not
    count as a member (every rank must decide alike, and allocation addresses differ between ranks)."""

    def __init__(self):
        self.refs: dict[int, int] = {}

    def add(self, storages: dict) -> None:
        for key, storage in storages.items():
            self.discard(key)
            self.refs[key] = storage._weak_ref()

    def discard(self, key: int) -> None:
        ref = self.refs.pop(key, None)
        if ref is not None:
            torch.UntypedStorage._free_weak_ref(ref)

    def meets(self, storages: dict) -> bool:
        found = False
        for key in storages:
            ref = self.refs.get(key)
            if ref is not None:
                if torch.UntypedStorage._expired(ref):
                    self.discard(key)
                else:
                    found = True
        return found

    def __del__(self):
        for ref in self.refs.values():
            torch.UntypedStorage._free_weak_ref(ref)


def _mutates_first_argument(func) -> bool:
    arguments = func._schema.arguments
    return bool(arguments) and arguments[0].alias_info is not None and arguments[0].alias_info.is_write


def attention_core_policy():
    """A fresh policy for one region (``create_selective_checkpoint_contexts(attention_core_policy(), True)``):
    it remembers which storages hold the core's tensors, by data flow (module docstring), and which new storages
    it recomputes, so an in-place op follows the tensor it writes: recomputed with it, or kept with it (the cache
    then holds the tensor as the in-place ops left it, so none runs twice; hence ``allow_cache_entry_mutation``)."""
    # drawn: random tensors (dropout masks), kept; applying one (x * mask) is recomputed, as a view is
    core, recomputed, drawn = _StorageSet(), _StorageSet(), _StorageSet()

    def decide(func, first, inputs, outputs):
        if _is_sdpa(func):
            return CheckpointPolicy.MUST_RECOMPUTE
        if func in _BATCHED_MATMULS:
            if not core.meets(inputs):  # Q K^T: its output starts the core
                core.add(outputs)
            return CheckpointPolicy.MUST_RECOMPUTE  # with a core input: P V, recomputed, its output not core
        if core.meets(inputs):
            core.add(outputs)
            return CheckpointPolicy.MUST_RECOMPUTE
        if _is_random(func):
            drawn.add(outputs)
            return CheckpointPolicy.PREFER_SAVE
        if _mutates_first_argument(func):
            written = _storages(first)
            return CheckpointPolicy.MUST_RECOMPUTE if recomputed.meets(written) else CheckpointPolicy.PREFER_SAVE
        if func in _LAYOUT_OPS or (func in _MASK_APPLICATIONS and drawn.meets(inputs)):
            return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.PREFER_SAVE

    def policy(ctx, func, *args, **kwargs):
        inputs, outputs = _storages((args, kwargs)), _storages(ctx.op_output)
        decision = decide(func, args[0] if args else None, inputs, outputs)
        if decision in (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE):
            # new storages only: a view of a kept tensor stays kept
            recomputed.add({k: v for k, v in outputs.items() if k not in inputs})
        return decision

    return policy


def keep_attention_policy():
    """The "keep_attention" policy for one region (``create_selective_checkpoint_contexts``): every SDPA op's
    outputs kept, every other op recomputed (module docstring). No cached output may be written in place after
    (torch's checkpoint then raises): the recomputation would read the written tensor."""

    def policy(ctx, func, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if _is_sdpa(func) else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


class _RngTape:
    """The random state before every random op of a region's forward, to set again before the same op in its
    recomputation (module docstring)."""

    def __init__(self):
        self.states: list = []
        self.position = 0

    def forward_mode(self):
        return _RecordRandom(self)

    def recompute_mode(self):
        return _ReplayRandom(self)


def _random_state():
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda, DISPATCHER.rng_counter


def _set_random_state(state) -> None:
    cpu, cuda, counter = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
    DISPATCHER.rng_counter = counter


class _RecordRandom(TorchDispatchMode):
    def __init__(self, tape):
        super().__init__()
        self.tape = tape

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _is_random(func):
            self.tape.states.append(_random_state())
        return func(*args, **(kwargs or {}))


class _ReplayRandom(TorchDispatchMode):
    def __init__(self, tape):
        super().__init__()
        self.tape = tape

    def __enter__(self):
        self.tape.position, self.counter_after_forward = 0, DISPATCHER.rng_counter
        return super().__enter__()

    def __exit__(self, *exc):
        DISPATCHER.rng_counter = self.counter_after_forward  # torch's generator: restored by checkpoint's fork_rng
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _is_random(func):
            if self.tape.position >= len(self.tape.states):
                raise RuntimeError(f"recomputation drew more random numbers than forward did ({func}): the "
                                   f"checkpointed module's forward must run the same ops each time")
            _set_random_state(self.tape.states[self.tape.position])
            self.tape.position += 1
        return func(*args, **(kwargs or {}))


class _Both:
    """Two context managers as one, entered in order (the second one innermost)."""

    def __init__(self, outer, inner):
        self.outer, self.inner = outer, inner

    def __enter__(self):
        self.outer.__enter__()
        try:
            self.inner.__enter__()
        except BaseException:
            self.outer.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.inner.__exit__(*exc)
        finally:
            self.outer.__exit__(*exc)
        return False


# policy -> (a fresh selective-checkpoint policy for one region, whether a cached output may be written in place)
_SELECTIVE = {"selective": (attention_core_policy, True), "keep_attention": (keep_attention_policy, False)}


def _contexts(policy: str):
    """``context_fn`` for one region: the random tape (innermost: it sees each op before it runs, whatever the
    selective cache does), under the policy's caching modes for "selective" and "keep_attention"."""
    tape = _RngTape()
    if policy == "full":
        return tape.forward_mode(), tape.recompute_mode()
    make_policy, mutation = _SELECTIVE[policy]
    caching, cached = create_selective_checkpoint_contexts(make_policy(), allow_cache_entry_mutation=mutation)
    return _Both(caching, tape.forward_mode()), _Both(cached, tape.recompute_mode())


def _traced_contexts(policy: str):
    """``context_fn`` under torch.compile: the policy's caching modes alone (torch's checkpoint takes exactly two
    modes there, and turns the policy into tags on the traced graph's nodes, which AOTAutograd's partitioner
    follows). No random tape: the partitioner keeps a random op's output rather than draw it again."""
    make_policy, mutation = _SELECTIVE[policy]
    return create_selective_checkpoint_contexts(make_policy(), allow_cache_entry_mutation=mutation)


def _checkpointed_forward(forward, policy: str, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    if torch.compiler.is_compiling():  # Dynamo reading this: "full" is torch's plain checkpoint
        context_fn = {"full": {}}.get(policy, {"context_fn": functools.partial(_traced_contexts, policy)})
        return checkpoint(forward, *args, use_reentrant=False, **context_fn, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=functools.partial(_contexts, policy),
                      **kwargs)


def checkpoint_modules(model: torch.nn.Module, pattern: str = "blocks.*", policy: str = "full") -> torch.nn.Module:
    """Recompute the activations of every submodule of ``model`` whose name matches ``pattern`` (an fnmatch
    glob over ``named_modules()`` names, as ``parallelize_module``'s plans use) in backward instead of keeping
    them. Returns ``model`` (changed in place).

    Args:
        pattern: e.g. "blocks.*" (each GPT block) for "full"; the attention modules ("blocks.*.attn",
            "model.layers.*.self_attn") for "selective", whose other ops' outputs the region keeps anyway.
            fnmatch's "*" crosses dots ("blocks.*" also matches "blocks.0.attn"): only the outermost matching
            modules are checkpointed.
        policy: "full" (keep only each module's inputs), "selective" (recompute only the attention core) or
            "keep_attention" (recompute all but the SDPA / context-parallel attention, whose outputs are kept).

    Call it before or after placing the model (``parallelize_module``, ``replicate``, ``fully_shard``): the
    module's ``forward`` is wrapped, its hooks stay outside the region.
    """
    if policy not in POLICIES:
        raise ValueError(f"checkpoint_modules(policy={policy!r}): policy must be one of {POLICIES}")
    if not isinstance(pattern, str):
        raise TypeError(f"checkpoint_modules(pattern=...) takes an fnmatch glob string, got {pattern!r}")
    matched = []
    for name, module in model.named_modules():  # parents before children
        # outermost matches only: fnmatch's "*" crosses dots, and a region inside a region is recomputed twice
        if fnmatch.fnmatchcase(name, pattern) and not any(name.startswith(f"{outer}.") for outer, _ in matched):
            matched.append((name, module))
    if not matched:
        names = [name for name, _ in model.named_modules()][:8]
        raise ValueError(f"checkpoint_modules: no submodule matches {pattern!r}; names look like {names}")
    for name, module in matched:
        if getattr(module.forward, "_recompute_policy", None) is not None:
            raise ValueError(f"checkpoint_modules: {name!r} is checkpointed already "
                             f"(policy {module.forward._recompute_policy!r}); call it once per module")
        wrapped = functools.partial(_checkpointed_forward, module.forward, policy)
        wrapped._recompute_policy = policy
        module.forward = wrapped
    return model
