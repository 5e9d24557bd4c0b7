"""``_grouped_mm`` (one matmul per group of rows, the expert compute of Hugging Face's MoE blocks) and ``histc``
(the tokens per expert those blocks count before it).

_grouped_mm's four forms, as einsum with the letters that may not be split (torch's ``offs`` holds global
offsets into the grouped letter, so a block of it would not know its groups; ``e`` indexes the groups):

    a      b       offs groups   einsum          never split    (2d x 3d is the MoE forward; the others its backward)
    2-D    3-D     rows of a     sk,ekn->sn      s, e
    3-D    2-D     cols of b     emk,kn->mn      e, n
    2-D    2-D     k             mk,kn->(e)mn    k              (the output gains a leading group dim)
    3-D    3-D     none          emk,ekn->emn    -              (a batched matmul)

Per mesh dim a free letter splits to Shard of the output, a summed one (k) to Partial(sum); the joint choice
is the one the planner reaches for the fewest bytes. ``offs`` and a bias stay Replicate.

torch's meta kernel takes bf16 only, so the output's metadata comes from ``grouped_mm_meta`` here. The local
op: torch's CPU kernel asks every non-unit stride to be a multiple of 16 bytes, which a block (11 of
43 columns) or a gathered copy need not be; such operands run through ``grouped_mm_reference``, the loop of
matmuls that defines the op (and that the tests hold the kernel to).

histc: each rank counts its own block, so a sharded input gives a Partial(sum) histogram; a Partial input is
reduced first (counting is not linear). With ``min == max`` torch takes the range from the data, which no block
knows: gathered then.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from dtensor_plus.placements import Partial, Replicate, Shard
from dtensor_plus.redistribute import redistribute_cost
from dtensor_plus.rules import OpSchema, Sharding, register_meta, register_rule
from dtensor_plus.spec import DTensorSpec

from .common import aten, replicate_all, replicated, without_partial

__all__ = ["grouped_mm_reference"]

# (a.ndim, b.ndim) -> (a letters, b letters, output letters, letters never split); "e" in the output of 2d x 2d
# is the group dim the op adds.
_FORMS = {
    (2, 3): ("sk", "ekn", "sn", "se"),
    (3, 2): ("emk", "kn", "mn", "en"),
    (2, 2): ("mk", "kn", "emn", "k"),
    (3, 3): ("emk", "ekn", "emn", ""),
}


@register_meta(aten._grouped_mm.default)
def grouped_mm_meta(a, b, offs=None, bias=None, out_dtype=None) -> torch.Tensor:
    """The output's metadata. torch's meta kernel takes bf16 only (the CUDA kernel's types), the CPU kernel more."""
    num_groups = 0 if offs is None else offs.shape[0]
    shape = {
        (2, 3): (a.shape[0], b.shape[-1]),
        (3, 2): (a.shape[1], b.shape[-1]),
        (2, 2): (num_groups, a.shape[0], b.shape[-1]),
        (3, 3): (a.shape[0], a.shape[1], b.shape[-1]),
    }[(a.ndim, b.ndim)]
    return torch.empty(shape, dtype=out_dtype or a.dtype, device="meta")


def _candidates(a: str, b: str, out: str, fixed: str):
    """(a placement, b placement, output placement) options on one mesh dim, free letters first."""
    options = []
    for letter in dict.fromkeys(out + a + b):
        if letter in fixed or (letter not in a and letter not in b):
            continue
        ins = tuple(Shard(term.index(letter)) if letter in term else Replicate() for term in (a, b))
        options.append((*ins, Shard(out.index(letter)) if letter in out else Partial("sum")))
    options.append((Replicate(), Replicate(), Replicate()))
    return options


def _cost(spec: DTensorSpec, dst, mesh_shape) -> float:
    return redistribute_cost(spec.placements, dst, mesh_shape, spec.shape.numel(), spec.dtype.itemsize)


@register_rule(aten._grouped_mm.default)
def grouped_mm_rule(op: OpSchema) -> Sharding:
    a, b = op.spec("self"), op.spec("mat2")
    if a is None or b is None or op.spec("bias") is not None:
        return _replicated(op)
    a_letters, b_letters, out_letters, fixed = _FORMS[(a.ndim, b.ndim)]
    per_mesh_dim = [_candidates(a_letters, b_letters, out_letters, fixed) for _ in op.mesh_shape]
    best = None
    for index, combo in enumerate(itertools.product(*per_mesh_dim)):
        a_dst, b_dst, out = (tuple(c[i] for c in combo) for i in range(3))
        cost = _cost(a, a_dst, op.mesh_shape) + _cost(b, b_dst, op.mesh_shape)
        key = (cost, (a_dst != a.placements) + (b_dst != b.placements), index)
        if best is None or key < best[0]:
            best = (key, a_dst, b_dst, out)
    _, a_dst, b_dst, out = best
    inputs = {"self": a_dst, "mat2": b_dst}
    if op.spec("offs") is not None:  # a DTensor when computed from one
        inputs["offs"] = replicated(len(op.mesh_shape))
    return Sharding(inputs=inputs, outputs=(out,), local_op=_grouped_mm_local)


def _replicated(op: OpSchema) -> Sharding:
    return dataclasses.replace(replicate_all(op), local_op=_grouped_mm_local)


def _aligned(t: torch.Tensor) -> bool:
    # torch's CPU kernel: one of the two matrix dims has stride 1 and the other a stride of a multiple of 16
    # bytes (even where its size is 1: a size-1 dim with stride 1 fails), batch strides too, a 16-byte start
    size = t.element_size()
    row, col = t.stride()[-2:]
    matrix_ok = (col == 1 and row * size % 16 == 0) or (row == 1 and col * size % 16 == 0)
    batch_ok = all(s * size % 16 == 0 for s in t.stride()[:-2])
    return matrix_ok and batch_ok and t.data_ptr() % 16 == 0 and t.numel() > 0


def _grouped_mm_local(a, b, offs=None, bias=None, out_dtype=None):
    if a.device.type == "cpu" and not (_aligned(a) and _aligned(b)):
        return grouped_mm_reference(a, b, offs, bias, out_dtype)
    return aten._grouped_mm.default(a, b, offs, bias, out_dtype)


def grouped_mm_reference(a, b, offs=None, bias=None, out_dtype=None) -> torch.Tensor:
    """``_grouped_mm`` as the loop of matmuls it stands for (torch's semantics: ``offs`` are the ends of the
    groups along the grouped dim; rows past the last end are left zero)."""
    ends = [] if offs is None else offs.tolist()  # NOTE: device-to-host sync (the reference path only)
    starts = [0] + ends[:-1]
    if a.ndim == 2 and b.ndim == 3:
        out = a.new_zeros(a.shape[0], b.shape[-1])
        for g, (lo, hi) in enumerate(zip(starts, ends)):
            out[lo:hi] = a[lo:hi] @ b[g] + (0 if bias is None else bias[g])
    elif a.ndim == 3 and b.ndim == 2:
        out = a.new_zeros(a.shape[1], b.shape[-1])
        for g, (lo, hi) in enumerate(zip(starts, ends)):
            out[:, lo:hi] = a[g] @ b[:, lo:hi] + (0 if bias is None else bias[g, lo:hi] if bias.ndim == 1 else bias[g])
    elif a.ndim == 2 and b.ndim == 2:
        out = torch.stack([a[:, lo:hi] @ b[lo:hi] for lo, hi in zip(starts, ends)])
        out = out if bias is None else out + bias[:, None, :]
    else:
        out = torch.bmm(a, b) if bias is None else torch.bmm(a, b) + bias[:, None, :]
    return out.to(out_dtype) if out_dtype is not None else out


@register_rule(aten.histc.default, strided="as_shard")
def histc_rule(op: OpSchema) -> Sharding:
    spec = op.spec("self")
    low, high = op.arg("min", 0), op.arg("max", 0)
    if low == high:  # the range comes from the data: only the whole tensor knows it
        return replicate_all(op)
    inputs = without_partial(spec.placements)
    outputs = tuple(Partial("sum") if p.is_shard() or p.is_strided_shard() else Replicate() for p in inputs)
    return Sharding(inputs=(inputs,), outputs=(outputs,))
