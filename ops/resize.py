"""resize_ / resize (and resize_as_ / resize_as: the template's shape): a new global shape over the same
storage, done on a replicated copy.

On one device ``x.resize_(size)`` keeps x's storage: the new tensor (contiguous, or in ``memory_format``)
reads the storage from its start, so its first elements are the old ones *in storage order* (a transposed
x gives them column by column), and elements past the old storage are uninitialised. A sharded storage has
no such order across ranks, so the rule gathers x and every rank rebuilds the storage of the global tensor
from the global strides in its spec, then lays the new shape over it. New elements are zeros: any value is
valid for uninitialised memory, and zeros keep the ranks' replicas equal.

    input                 output
    any placement         Replicate (input gathered; Partial reduced)
    same size, no memory_format: the input's placements, no traffic (torch changes nothing then)

resize_ itself goes through ``mutation.InplaceViewPlan``: it runs the functional ``resize`` under this rule,
then the DTensor takes the result's block, spec and sizes in place.
"""

from __future__ import annotations

import torch

from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten, replicated


def _storage_of(x: torch.Tensor, stride) -> torch.Tensor:
    """The 1-d storage a single device would hold under ``x`` laid out with ``stride`` (offset 0): positions no
    element covers (a non-dense layout's gaps) are zeros; elements aliased by a 0 stride are written alike."""
    span = 1 + sum((n - 1) * s for n, s in zip(x.shape, stride)) if x.numel() else 0
    storage = x.new_zeros((span,))
    if span:
        storage.as_strided(x.shape, stride).copy_(x)
    return storage


@register_rule(aten.resize.default, aten.resize_.default)
def resize_rule(op: OpSchema) -> Sharding:
    return _resize(op.spec("self"), tuple(op.arg("size")), op.arg("memory_format"))


@register_rule(aten.resize_as.default, aten.resize_as_.default)
def resize_as_rule(op: OpSchema) -> Sharding:
    """resize_ to the template's global shape; the template itself is only read for its shape: it stays put."""
    return _resize(op.spec("self"), tuple(op.arg("the_template").shape), op.arg("memory_format"))


def _resize(spec, size: tuple, memory_format) -> Sharding:
    """self's layout (a template, resize_as's, is left where it is: only its global shape is read)."""
    replicate = replicated(spec.mesh.ndim)
    shape, stride = tuple(spec.shape), tuple(spec.tensor_meta.stride)
    if size == shape and memory_format is None:
        # torch leaves the tensor (values and strides) alone: so does every rank, in any layout
        return Sharding(inputs={}, outputs=(spec.placements,), local_op=lambda x, *_, **__: x.clone())

    def local_resize(x, *_, memory_format=None):  # the size argument (a list, or the template) is global: use size
        old = _storage_of(x, stride)
        new_stride = torch.empty(size, device="meta", memory_format=memory_format or torch.contiguous_format).stride()
        flat = x.new_zeros((torch.Size(size).numel(),))
        kept = min(flat.numel(), old.numel())
        flat[:kept] = old[:kept]
        return flat.as_strided(size, new_stride)

    return Sharding(inputs={"self": replicate}, outputs=(replicate,), local_op=local_resize)
