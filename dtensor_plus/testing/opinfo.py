"""The OpInfo sweep: PyTorch's ``op_db`` run through DTensors on real ranks and checked against one device.

For every op (or the ones asked for), a few of its float32 sample inputs, and every layout of the tensor
inputs (each dim sharded, Replicate, Partial for linear ops) on a mesh, a case runs the op on DTensors,
compares the outputs and the gradients of a random-weighted sum of them with the single-device run, and
records one status:

- ``sharded``: right, and no op took the gather-everything fallback (``comm_mode().fallbacks`` empty);
- ``fallback``: right through the fallback;
- ``grad layout``: right values, but the gradient of an input is not laid out as a user expects: a Shard(d)
  input's gradient Shard(d), a Replicate input's Replicate (or Partial: a reduction deferred to the optimizer
  or data parallelism), a Partial input's Replicate;
- ``wrong``: a value, shape, dtype or gradient differs from one device;
- ``error``: an exception (the detail is its first line);
- ``hang`` / ``crash``: a rank stopped answering or died (the pool is restarted and the sweep goes on);
- ``skipped: reason``: not checkable (the single-device run raises, a random op: only shape and dtype).

Usage (users can sweep their own op names too)::

    from dtensor_plus.testing.opinfo import plan_cases, run_cases
    cases = plan_cases(["add", "sum", "mm"], mesh_shapes=[(2,), (2, 2)])
    results = run_cases(cases)           # one rank pool per world size, cases batched per call
    [r for r in results if r.status == "wrong"]

Full sweep and table: ``python -m dtensor_plus.testing.opinfo_table --full --out docs/op_coverage.md``.
Every decision a rank takes comes from the case (global metadata) or from values every rank computes
alike; after each case the ranks compare statuses through the rendezvous store, so a rank stuck in a
collective is reported as a hang after a short wait instead of stalling the sweep.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import math
import os
import shutil
import tempfile
import uuid
import warnings

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .opinfo_compare import compare, compare_meta, same

__all__ = ["Case", "Result", "plan_cases", "run_cases", "op_names", "LINEAR_OPS"]

MAX_NUMEL = 4096  # small samples only: the sweep is about layouts, not sizes
SYNC_TIMEOUT_S = 20.0  # how long ranks wait for each other after a case before calling it a hang

# Ops linear in their first input: they get a Partial layout too (an approximation of "linear").
LINEAR_OPS = frozenset("""
neg positive add sub sum mean nansum cumsum clone contiguous view view_as reshape reshape_as flatten unflatten
unsqueeze squeeze t T mT H mH transpose permute movedim moveaxis swapaxes swapdims narrow select index_select
diagonal diag diag_embed tril triu flip fliplr flipud roll rot90 expand expand_as repeat tile cat stack
hstack vstack dstack split chunk unbind tensor_split trace mm matmul bmm mv einsum real conj
nn.functional.linear nn.functional.pad sum_to_size take_along_dim gather masked_fill true_divide div mul
""".split())

# Ops that commute with max and min (monotone non-decreasing, or selections): they get Partial(max) and
# Partial(min) layouts, which the dispatcher may keep; every other op must reduce them first, and the
# linear ops get Partial(avg) as well. Tokens: P (sum), Pavg, Pmax, Pmin.
MONOTONE_OPS = frozenset("""
amax amin max min maximum minimum fmax fmin clamp clamp_min clamp_max relu nn.functional.relu nn.functional.relu6
nn.functional.hardtanh sort msort topk cummax cummin kthvalue median exp log sigmoid tanh floor ceil round trunc
""".split()) | LINEAR_OPS


@dataclasses.dataclass(frozen=True)
class Case:
    """One op, one of its samples, one layout, one mesh. ``layout`` has one token per mesh dim: R, S<dim>, or
    P, Pavg, Pmax, Pmin (Partial with that reduction)."""

    op: str
    sample: int
    layout: tuple[str, ...]
    mesh_shape: tuple[int, ...]
    signature: str  # the sample's shapes as the planner saw them: ranks check they rebuilt the same sample


@dataclasses.dataclass(frozen=True)
class Result:
    case: Case
    status: str
    detail: str = ""


# ---------------------------------------------------------------- op_db and samples (same on every process)


_OPS: dict = {}
_SAMPLES: dict = {}


def _op_db() -> dict:
    if not _OPS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.testing._internal.common_methods_invocations import op_db
        for op in op_db:
            if torch.float32 in op.supported_dtypes("cpu"):
                _OPS[_op_key(op)] = op
    return _OPS


def _op_key(op) -> str:
    return f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name


def op_names() -> list[str]:
    """Every op_db entry that supports float32 on CPU, as ``name`` or ``name.variant``."""
    return sorted(_op_db())


def _samples(key: str) -> list:
    """The op's float32 samples, built under a fixed seed so every process builds the same ones."""
    if key not in _SAMPLES:
        op = _op_db()[key]
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                _SAMPLES[key] = list(op.sample_inputs("cpu", torch.float32, requires_grad=op.supports_autograd))
            except Exception as exc:  # noqa: BLE001  (a broken sample generator is the op's problem)
                _SAMPLES[key] = exc
        while len(_SAMPLES) > 4:
            del _SAMPLES[next(iter(_SAMPLES))]
    return _SAMPLES[key]


def _leaves(sample):
    return tree_flatten((sample.input, sample.args, sample.kwargs))


def _tensor_leaves(sample) -> list:
    return [v for v in _leaves(sample)[0] if isinstance(v, torch.Tensor)]


def _signature(sample) -> str:
    return ";".join(f"{tuple(t.shape)}{str(t.dtype)[6:]}" for t in _tensor_leaves(sample))


# ---------------------------------------------------------------- planning (in the caller)


def plan_cases(ops=None, mesh_shapes=((2,), (3,), (4,), (2, 2)), num_samples: int = 2, all_dims: bool = True) -> list[Case]:
    """Cases for ``ops`` (names from ``op_names()``; default all) on each mesh shape.

    Args:
        num_samples: samples per op: the first small ones with a tensor input, preferring distinct shapes.
        all_dims: shard each dim of the first input; False shards only dim 0 and the last dim.
    """
    cases = []
    for key in ops if ops is not None else op_names():
        samples = _samples(key)
        if isinstance(samples, Exception):
            continue
        for index in _pick_samples(samples, num_samples):
            sample = samples[index]
            first = _tensor_leaves(sample)[0]
            for mesh_shape in mesh_shapes:
                for layout in _layouts(key, first.ndim, len(mesh_shape), all_dims):
                    cases.append(Case(key, index, layout, tuple(mesh_shape), _signature(sample)))
    return cases


def _pick_samples(samples, num: int) -> list[int]:
    chosen, shapes = [], set()
    usable = [i for i, s in enumerate(samples) if _usable(s)]
    for i in usable:  # distinct first-input shapes first, in op_db's order
        shape = tuple(_tensor_leaves(samples[i])[0].shape)
        if len(chosen) < num and shape not in shapes:
            chosen.append(i)
            shapes.add(shape)
    chosen += [i for i in usable if i not in chosen][: num - len(chosen)]
    return sorted(chosen)


def _usable(sample) -> bool:
    tensors = _tensor_leaves(sample)
    return (bool(tensors) and all(t.layout == torch.strided and not t.is_complex() for t in tensors)
            and sum(t.numel() for t in tensors) <= MAX_NUMEL)


def _layouts(key: str, ndim: int, mesh_ndim: int, all_dims: bool) -> list[tuple[str, ...]]:
    dims = list(range(ndim)) if all_dims else sorted({0, ndim - 1}) if ndim else []
    base = key.split(".")[0]
    linear = base in LINEAR_OPS or key in LINEAR_OPS
    monotone = base in MONOTONE_OPS or key in MONOTONE_OPS
    partials = (["P", "Pavg"] if linear else []) + (["Pmax", "Pmin"] if monotone else [])
    if mesh_ndim == 1:
        layouts = [("R",)] + [(f"S{d}",) for d in dims] + [(p,) for p in partials]
    else:
        rest = ("R",) * (mesh_ndim - 1)
        layouts = [("R",) * mesh_ndim] + [(f"S{d}",) * mesh_ndim for d in dims]
        if ndim >= 2:
            layouts.append(("S0", f"S{ndim - 1}") + rest[1:])
        if linear:
            layouts.append(("P", "S0") + rest[1:] if ndim else ("P",) + rest)
    return layouts


# ---------------------------------------------------------------- running (in the caller)


def run_cases(cases, backend: str = "dtensor_plus.testing.opinfo_backend:DTENSOR_PLUS", batch_size: int = 24,
              timeout: float = 60.0, progress=None) -> list[Result]:
    """Run ``cases`` on real gloo ranks (one pool per world size, ``batch_size`` cases per call).

    A batch that hangs or crashes costs at most ``timeout`` seconds: the cases the ranks finished are kept,
    the one they were in is recorded as ``hang``/``crash``, the pool is restarted and the rest go on.
    ``backend`` ("module:attribute") says how to distribute tensors; it must be importable on the ranks.
    """
    results: dict[Case, Result] = {}
    by_world: dict[int, list[Case]] = {}
    for case in cases:
        by_world.setdefault(math.prod(case.mesh_shape), []).append(case)
    progress_dir = tempfile.mkdtemp(prefix="opinfo_sweep_")
    try:
        _run_worlds(by_world, backend, batch_size, timeout, progress, progress_dir, results, len(cases))
    finally:
        shutil.rmtree(progress_dir, ignore_errors=True)
    return [results[c] for c in cases]


def _run_worlds(by_world, backend, batch_size, timeout, progress, progress_dir, results, num_cases) -> None:
    from .pool import RankError, run_on_ranks, shutdown_pools

    for world, pending in sorted(by_world.items()):
        while pending:
            batch, pending = pending[:batch_size], pending[batch_size:]
            token = uuid.uuid4().hex[:12]
            try:
                per_rank = run_on_ranks(world, _run_batch, batch, backend, progress_dir, token, timeout=timeout)
                done = [_merge([rank[i] for rank in per_rank]) for i in range(len(batch))]
            except RankError as error:
                shutdown_pools()  # ranks may be out of step on some group: start clean
                done = _recover(batch, world, progress_dir, token, str(error))
                pending = batch[len(done):] + pending
            for case, (status, detail) in zip(batch, done):
                results[case] = Result(case, status, detail)
            if progress is not None:
                progress(len(results), num_cases)


_RANK_ORDER = ("crash", "hang", "wrong", "error", "grad layout", "fallback", "sharded")


def _merge(per_rank: list) -> tuple[str, str]:
    """The worst status any rank saw (a wrong value on one rank is a wrong value)."""
    def badness(item):
        status = item[0]
        return _RANK_ORDER.index(status) if status in _RANK_ORDER else len(_RANK_ORDER)
    return min((tuple(r) for r in per_rank), key=badness)


def _recover(batch, world, progress_dir, token, message) -> list[tuple[str, str]]:
    """Statuses of the cases every rank finished, then the case the batch broke in (hang or crash)."""
    per_rank = []
    for rank in range(world):
        lines = {}
        path = os.path.join(progress_dir, f"{token}.rank{rank}.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    item = json.loads(line)
                    lines[item["i"]] = (item["status"], item["detail"])
        per_rank.append(lines)
    done = []
    for i in range(len(batch)):
        if not all(i in lines for lines in per_rank):
            kind = "crash" if "rank process died" in message else "hang"
            seen = [lines[i] for lines in per_rank if i in lines]
            detail = f"ranks {[r for r, lines in enumerate(per_rank) if i not in lines]} did not finish"
            done.append((kind, detail + (f"; others: {seen[0][0]} {seen[0][1]}" if seen else "")))
            return done
        done.append(_merge([lines[i] for lines in per_rank]))
    done.append(("hang", _first_line(message)))  # all finished, yet the call failed: blame the last one
    return done[: len(batch)]


# ---------------------------------------------------------------- the rank side


def _run_batch(cases, backend_name, progress_dir, token) -> list[tuple[str, str]]:
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    backend = _resolve(backend_name)
    rank = dist.get_rank()
    store = dist.distributed_c10d._get_default_store()
    out = []
    path = os.path.join(progress_dir, f"{token}.rank{rank}.jsonl")
    for i, case in enumerate(cases):
        status, detail = run_case(case, backend)
        _wait_for_all(store, f"opinfo/{token}/{i}", rank, dist.get_world_size())
        with open(path, "a") as f:
            f.write(json.dumps({"i": i, "status": status, "detail": detail}) + "\n")
        out.append((status, detail))
    return out


def _wait_for_all(store, prefix: str, rank: int, world: int) -> None:
    store.set(f"{prefix}/{rank}", "1")
    store.wait([f"{prefix}/{r}" for r in range(world)], datetime.timedelta(seconds=SYNC_TIMEOUT_S))


def _resolve(name: str):
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def run_case(case: Case, backend) -> tuple[str, str]:
    """Run one case on this rank: (status, detail). Call it on every rank of the case's mesh."""
    samples = _samples(case.op)
    if isinstance(samples, Exception):
        return "skipped: samples raised", _first_line(repr(samples))
    sample = samples[case.sample]
    if _signature(sample) != case.signature:
        return "skipped: sample not reproducible", ""
    op = _op_db()[case.op]
    if op.has_nondeterministic_output:
        return "skipped: nondeterministic output", ""
    try:
        reference = _reference(case, op, sample)
    except Exception as exc:  # noqa: BLE001
        return "skipped: single-device run raises", _first_line(f"{type(exc).__name__}: {exc}")
    try:
        return _distributed(case, op, sample, reference, backend)
    except Exception as exc:  # noqa: BLE001  (every failure is a finding, recorded, never raised)
        return "error", _first_line(f"{type(exc).__name__}: {exc}")


def _first_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else ""


_REFERENCE: dict = {}


def _reference(case, op, sample):
    """Single-device outputs and gradients (cached per op and sample: every layout shares them)."""
    key = (case.op, case.sample)
    if key not in _REFERENCE:
        _REFERENCE.clear()
        leaves, spec = _leaves(sample)
        torch.manual_seed(1)
        outs, grads = _forward_backward(op, sample, [_fresh(v) for v in leaves], spec, lambda t: t)
        torch.manual_seed(2)
        again, _ = _forward_backward(op, sample, [_fresh(v) for v in leaves], spec, lambda t: t, backward=False)
        random = not same(outs, again) or _seeded(op)
        _REFERENCE[key] = (outs, grads, random)
    return _REFERENCE[key]


def _seeded(op) -> bool:
    """Random ops whose OpInfo fixes the seed on each call (wrapper_set_seed): deterministic on one device,
    but nothing obliges a sharded run to draw the same numbers."""
    code = getattr(op.op, "__code__", None)
    return code is not None and "wrapper_set_seed" in code.co_names


def _fresh(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    return value


def _forward_backward(op, sample, leaves, spec, wrap_weight, backward=True):
    """Outputs (flattened) and gradients of the tensor leaves that require grad, of a weighted output sum."""
    inp, args, kwargs = tree_unflatten(leaves, spec)
    out = sample.output_process_fn_grad(op(inp, *args, **kwargs))
    outs = tree_flatten(out)[0]
    wrt = [v for v in leaves if isinstance(v, torch.Tensor) and v.requires_grad]
    if not backward or not wrt:
        return outs, None
    loss = None
    for i, o in enumerate(outs):
        if isinstance(o, torch.Tensor) and o.requires_grad and (o.is_floating_point() or o.is_complex()):
            weights = torch.rand(o.shape, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
            term = (o * wrap_weight(weights.to(o.dtype))).sum()
            term = term.real if term.is_complex() else term
            loss = term if loss is None else loss + term
    if loss is None:
        return outs, None
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return outs, list(grads)


def _distributed(case, op, sample, reference, backend):
    ref_outs, ref_grads, random = reference
    mesh = backend.mesh(case.mesh_shape)
    leaves, spec = _leaves(sample)
    first = next(v for v in leaves if isinstance(v, torch.Tensor))
    dist_leaves = [backend.distribute(v, mesh, _placement_for(v, first, case.layout))
                   if isinstance(v, torch.Tensor) else v for v in leaves]
    with backend.counting() as fallbacks:
        torch.manual_seed(1)
        wrap = lambda w: backend.distribute(w, mesh, ("R",) * len(case.layout))  # noqa: E731
        outs, grads = _forward_backward(op, sample, dist_leaves, spec, wrap, backward=not random)
    plain = [i for i, (o, r) in enumerate(zip(outs, ref_outs))
             if isinstance(r, torch.Tensor) and isinstance(o, torch.Tensor) and not backend.is_distributed(o)]
    if plain:
        return "wrong", f"output {plain[0]} is a plain torch.Tensor, expected a DTensor"
    outs = [backend.full(o) for o in outs]
    problem = compare(outs, ref_outs, "output", backend)
    if random and problem:  # random draws may differ from one device's; shapes and dtypes may not
        problem = compare_meta(outs, ref_outs)
        return ("wrong", problem) if problem else ("skipped: random op (shape/dtype checked)", "")
    if problem is None and ref_grads is not None and grads is not None:
        problem = compare([backend.full(g) for g in grads], ref_grads, "grad of input", backend)
    elif problem is None and not random and (ref_grads is None) != (grads is None):
        problem = "gradients on one side only"
    if problem:
        return "wrong", problem
    if grads is not None:
        wrt = [v for v in dist_leaves if isinstance(v, torch.Tensor) and v.requires_grad]
        misplaced = _grad_layout_problem(wrt, grads, backend)
        if misplaced:
            return "grad layout", misplaced
    names = fallbacks()
    return ("fallback", ", ".join(sorted(names))[:200]) if names else ("sharded", "")


def _grad_layout_problem(inputs, grads, backend) -> str | None:
    """Which input's gradient is laid out other than a user expects (see the module docstring), if any."""
    for i, (x, g) in enumerate(zip(inputs, grads)):
        if g is None or not backend.is_distributed(g):
            continue
        have, want = backend.layout(g), backend.layout(x)
        ok = all(h == w if w.startswith("S") else h == "R" if w.startswith("P") else h in ("R", "P", "Pavg")
                 for h, w in zip(have, want))
        if not ok:
            return f"grad of input {i} is {','.join(have)}, the input {','.join(want)}"
    return None


def _placement_for(tensor, first, layout) -> tuple[str, ...]:
    """The layout for the first tensor input and any input of its shape; Replicate for the others."""
    if tensor is first:
        return layout
    if tensor.shape == first.shape and tensor.ndim > 0:
        return tuple("R" if token.startswith("P") else token for token in layout)
    return ("R",) * len(layout)
