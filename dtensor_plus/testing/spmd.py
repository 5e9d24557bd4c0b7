"""``assert_spmd_equal``: the single-device oracle, outputs and gradients, run inside each rank."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ..dtensor import DTensor
from ..placements import Replicate
from ..spec import DTensorSpec, TensorMeta

__all__ = ["assert_spmd_equal", "full"]


def full(value):
    """Whole tensors for every DTensor in a (nested) value; other values unchanged."""
    return tree_map(lambda v: v.full_tensor() if isinstance(v, DTensor) else v, value)


def assert_spmd_equal(fn: Callable, *args, atol: float = 1e-5, rtol: float = 1e-5, backward: bool = True, **kwargs):
    """Check that ``fn`` on DTensor arguments equals ``fn`` on their whole tensors: outputs and gradients.

    Call it inside every rank (e.g. in a function given to ``run_on_ranks``). DTensor arguments that require
    grad get gradients from a loss that weighs every floating output by fixed pseudo-random weights, so
    every output element matters. Returns the distributed outputs.

    Example::

        x = distribute_tensor(torch.randn(8, 4, requires_grad=True), mesh, [Shard(0)])
        assert_spmd_equal(lambda t: t.softmax(-1), x)
    """
    dist_args = tree_map(_fresh_leaf, args)
    single_args = tree_map(lambda v: _fresh_leaf(v.full_tensor()) if isinstance(v, DTensor) else v, args)
    dist_kwargs = tree_map(_fresh_leaf, kwargs)
    single_kwargs = tree_map(lambda v: _fresh_leaf(v.full_tensor()) if isinstance(v, DTensor) else v, kwargs)
    dist_out = fn(*dist_args, **dist_kwargs)
    single_out = fn(*single_args, **single_kwargs)
    dist_flat, _ = tree_flatten(dist_out)
    single_flat, _ = tree_flatten(single_out)
    assert len(dist_flat) == len(single_flat), f"{len(dist_flat)} outputs distributed vs {len(single_flat)} on one device"
    for i, (d, s) in enumerate(zip(dist_flat, single_flat)):
        got = d.full_tensor() if isinstance(d, DTensor) else d
        if isinstance(s, torch.Tensor):
            assert isinstance(d, DTensor), f"output {i} is a {type(d).__name__}, expected a DTensor"
            torch.testing.assert_close(got, s, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"output {i}: {m}")
        else:
            assert got == s, f"output {i}: {got!r} != {s!r}"
    if backward:
        _check_gradients(dist_flat, single_flat, dist_args + tuple(dist_kwargs.values()),
                         single_args + tuple(single_kwargs.values()), atol, rtol)
    return dist_out


def _fresh_leaf(value):
    if isinstance(value, torch.Tensor) and value.requires_grad:
        return value.detach().requires_grad_(True)
    return value


def _loss_weights(shape, dtype, index):
    generator = torch.Generator().manual_seed(1234 + index)
    return torch.rand(shape, generator=generator, dtype=torch.float64).to(dtype) + 0.5


def _check_gradients(dist_flat, single_flat, dist_inputs, single_inputs, atol, rtol):
    dist_leaves = [v for v in tree_flatten(dist_inputs)[0] if isinstance(v, torch.Tensor) and v.requires_grad]
    if not dist_leaves:
        return
    single_leaves = [v for v in tree_flatten(single_inputs)[0] if isinstance(v, torch.Tensor) and v.requires_grad]
    dist_loss, single_loss = 0, 0
    for i, (d, s) in enumerate(zip(dist_flat, single_flat)):
        if isinstance(s, torch.Tensor) and s.requires_grad and (s.is_floating_point() or s.is_complex()):
            weights = _loss_weights(s.shape, s.dtype, i)
            spec = d._spec
            replicated = DTensorSpec(spec.mesh, (Replicate(),) * spec.mesh.ndim, TensorMeta.of(weights))
            dist_loss = dist_loss + (d * DTensor(weights, replicated)).sum()
            single_loss = single_loss + (s * weights).sum()
    if isinstance(single_loss, int):
        return
    dist_loss.backward()
    single_loss.backward()
    for i, (d, s) in enumerate(zip(dist_leaves, single_leaves)):
        if s.grad is None:
            assert d.grad is None, f"input {i}: a gradient on the mesh but none on one device"
            continue
        assert isinstance(d.grad, DTensor), f"input {i}: gradient is {type(d.grad).__name__}, expected a DTensor"
        torch.testing.assert_close(d.grad.full_tensor(), s.grad, atol=atol, rtol=rtol, msg=lambda m: f"grad of input {i}: {m}")
