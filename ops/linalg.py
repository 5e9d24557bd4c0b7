"""Batched linear algebra: solves, factorizations, decompositions, inverses and determinants, which work on
the trailing one or two *core* dims of each tensor and treat the leading dims as an independent batch.

Each tensor argument and output has a number of core dims (a matrix 2, pivots or singular values 1, a
determinant or an info code 0); the batch dims before them broadcast against each other, right-aligned, to
the op's batch shape. Per mesh dim:

    some input Shard(d), d a batch dim       every tensor (inputs and outputs) holding that batch axis at
      holding the full batch size there        full size: Shard of it; tensors without it, or of size 1
                                               there (broadcast): Replicate. Each rank solves its matrices.
    Partial(sum | avg) right-hand side,      that input stays Partial; outputs linear in it Partial,
      every other input Replicate              the others (a factorization of A) Replicate
      (solve_triangular, lu_solve, ldl_solve, cholesky_solve, triangular_solve, _linalg_solve_ex)
    anything else (a core dim sharded)       Replicate

An op asked to raise on bad input itself (``check_errors=True``) is gathered, so that every rank raises the
same error. ``_linalg_check_errors`` (what ``torch.linalg.inv`` and friends call on the info codes) takes
its codes gathered (a few ints per matrix), for the same reason and so that the error names the right batch
element. Ops that fail on NaN inputs (eigh, svd, eig) raise on the ranks that hold the bad matrix only.
Outputs that an argument turns off (``compute_uv=False``: U and Vh have shape (0,)) are Replicate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dtensor_plus.placements import Partial, Placement, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule
from dtensor_plus.spec import DTensorSpec

from .common import aten, meta_outputs, replicate_all

_LINEAR = ("sum", "avg")


@dataclass(frozen=True)
class _Op:
    """One op's core dims: ``args`` {argument name: core} for its tensor arguments, ``outs`` the core of each
    output, ``linear`` the argument a Partial may stay on and ``linear_outs`` the outputs linear in it."""

    args: dict
    outs: tuple[int, ...]
    linear: str | None = None
    linear_outs: tuple[int, ...] = ()


_A, _SELF = {"A": 2}, {"self": 2}

_OPS: dict = {
    aten.linalg_solve_triangular.default: _Op({"self": 2, "B": 2}, (2,), "B", (0,)),
    aten.triangular_solve.default: _Op({"self": 2, "A": 2}, (2, 2), "self", (0,)),
    aten.linalg_lu_solve.default: _Op({"LU": 2, "pivots": 1, "B": 2}, (2,), "B", (0,)),
    aten.cholesky_solve.default: _Op({"self": 2, "input2": 2}, (2,), "self", (0,)),
    aten.lu_unpack.default: _Op({"LU_data": 2, "LU_pivots": 1}, (2, 2, 2)),
    aten._linalg_svd.default: _Op(_A, (2, 1, 2)),
    aten.linalg_pinv.atol_rtol_tensor: _Op({"self": 2, "atol": 0, "rtol": 0}, (2,)),
    aten.linalg_lu_factor_ex.default: _Op(_A, (2, 1, 0)),
    aten.linalg_lu.default: _Op(_A, (2, 2, 2)),
    aten.linalg_cholesky_ex.default: _Op(_SELF, (2, 0)),
    aten.cholesky.default: _Op(_SELF, (2,)),
    aten.cholesky_inverse.default: _Op(_SELF, (2,)),
    aten.linalg_inv_ex.default: _Op(_A, (2, 0)),
    aten.linalg_qr.default: _Op(_A, (2, 2)),
    aten.linalg_householder_product.default: _Op({"input": 2, "tau": 1}, (2,)),
    aten._linalg_eigh.default: _Op(_A, (1, 2)),
    aten.linalg_eig.default: _Op(_SELF, (1, 2)),
    aten._linalg_det.default: _Op(_A, (0, 2, 1)),
    aten._linalg_slogdet.default: _Op(_A, (0, 0, 2, 1)),
    aten.linalg_matrix_exp.default: _Op(_SELF, (2,)),
    aten.linalg_ldl_factor_ex.default: _Op(_SELF, (2, 1, 0)),
    aten.linalg_ldl_solve.default: _Op({"LD": 2, "pivots": 1, "B": 2}, (2,), "B", (0,)),
}


def _solve_ex(op: OpSchema) -> _Op:
    """_linalg_solve_ex(A, B): B is a batch of vectors (core 1) when torch reads it so, else of matrices."""
    a, b = op.arg("A"), op.arg("B")
    vector = b.ndim == 1 or (b.ndim == a.ndim - 1 and tuple(b.shape) == tuple(a.shape[:-1]))
    core = 1 if vector else 2
    return _Op({"A": 2, "B": core}, (core, 2, 1, 0), "B", (0,))


def _tensors(op: OpSchema, cores: dict) -> list[tuple[str, int, DTensorSpec]]:
    """(name, core, spec) of each DTensor argument."""
    return [(name, cores[name], spec) for name, spec in zip(op.names, op.specs)]


def _batch_shape(shapes_and_cores) -> tuple[int, ...]:
    return tuple(torch.broadcast_shapes(*[tuple(shape[: len(shape) - core]) for shape, core in shapes_and_cores]))


def _axis_dim(shape, core: int, batch, axis: int) -> int | None:
    """The dim of a tensor holding broadcast batch ``axis`` at full size, or None (absent, or broadcast)."""
    num_batch = len(shape) - core
    d = axis - (len(batch) - num_batch)
    return d if 0 <= d < num_batch and shape[d] == batch[axis] else None


def _batch_rule(op: OpSchema, info: _Op) -> Sharding:
    tensors = _tensors(op, info.args)
    out_shapes = [tuple(t.shape) for t in meta_outputs(op)]
    batch = _batch_shape([(spec.shape, core) for _, core, spec in tensors])
    targets: list[list[Placement]] = [[] for _ in tensors]
    outputs: list[list[Placement]] = [[] for _ in out_shapes]
    for mesh_dim in range(len(op.mesh_shape)):
        axis = _chosen_axis(tensors, batch, mesh_dim)
        partial = None if axis is not None else _linear_partial(tensors, info, mesh_dim)
        for target, (key, core, spec) in zip(targets, tensors):
            d = None if axis is None else _axis_dim(spec.shape, core, batch, axis)
            target.append(Shard(d) if d is not None else partial if key == info.linear and partial else Replicate())
        for i, (placements, shape, core) in enumerate(zip(outputs, out_shapes, info.outs)):
            d = None if axis is None or len(shape) - core < 0 else _axis_dim(shape, core, batch, axis)
            linear_out = partial is not None and i in info.linear_outs
            placements.append(Shard(d) if d is not None else partial if linear_out else Replicate())
    return Sharding(inputs={name: tuple(t) for (name, _, _), t in zip(tensors, targets)},
                    outputs=tuple(tuple(o) for o in outputs))


def _chosen_axis(tensors, batch, mesh_dim: int) -> int | None:
    """The broadcast batch axis the first input sharded along a full-size batch dim splits on this mesh dim."""
    for _, core, spec in tensors:
        p = spec.placements[mesh_dim]
        num_batch = spec.ndim - core
        if isinstance(p, Shard) and p.dim < num_batch:
            axis = p.dim + len(batch) - num_batch
            if spec.shape[p.dim] == batch[axis]:
                return axis
    return None


def _linear_partial(tensors, info: _Op, mesh_dim: int) -> Partial | None:
    """Partial(sum | avg) kept on the op's linear argument when every other input is Replicate here."""
    if info.linear is None:
        return None
    placement = None
    for key, _, spec in tensors:
        p = spec.placements[mesh_dim]
        if key == info.linear:
            placement = p
        elif not p.is_replicate():
            return None
    if placement is not None and placement.is_partial() and placement.reduce_op in _LINEAR:
        return placement
    return None


@register_rule(*_OPS)
def linalg_batch_rule(op: OpSchema) -> Sharding:
    if op.arg("check_errors", False):  # the op raises itself: every rank must see every matrix
        return replicate_all(op, len(op.func._schema.returns))
    return _batch_rule(op, _OPS[op.func])


@register_rule(aten._linalg_solve_ex.default)
def linalg_solve_rule(op: OpSchema) -> Sharding:
    if op.arg("check_errors", False):
        return replicate_all(op, 4)
    return _batch_rule(op, _solve_ex(op))


@register_rule(aten._linalg_check_errors.default)
def check_errors_rule(op: OpSchema) -> Sharding:
    """The info codes, gathered: every rank raises the same error, naming the right batch element."""
    return Sharding(inputs={"info": tuple(Replicate() for _ in op.mesh_shape)}, outputs=())


@register_rule(aten.linalg_cross.default)
def cross_rule(op: OpSchema) -> Sharding:
    """linalg_cross(self, other, dim): same rank, size-1 dims broadcast; every line along ``dim`` (size 3) is its
    own product, so a Shard of another full-size dim stays (both inputs sliced alike, a broadcast one
    Replicate); a cross product is linear in each input, so one Partial(sum | avg) input with the other
    Replicate stays Partial."""
    specs = [op.arg("self"), op.arg("other")]
    out_shape = tuple(torch.broadcast_shapes(*[tuple(s.shape) for s in specs]))
    dim = op.arg("dim", -1) % len(out_shape)
    targets: list[list[Placement]] = [[], []]
    output: list[Placement] = []
    for k in range(len(op.mesh_shape)):
        axis = _chosen_axis([(None, 0, s) for s in specs], out_shape, k)
        axis = None if axis == dim else axis
        partial = _partial_of_one([s.placements[k] for s in specs]) if axis is None else None
        for target, spec in zip(targets, specs):
            d = None if axis is None else _axis_dim(spec.shape, 0, out_shape, axis)
            here = spec.placements[k]
            target.append(Shard(d) if d is not None else here if partial is not None else Replicate())
        output.append(Shard(axis) if axis is not None else partial or Replicate())
    return Sharding(inputs={"self": tuple(targets[0]), "other": tuple(targets[1])}, outputs=(tuple(output),))


def _partial_of_one(placements: list[Placement]) -> Partial | None:
    """One input Partial(sum | avg), the other Replicate: that Partial (a bilinear op is linear in each)."""
    partials = [p for p in placements if p.is_partial()]
    if len(partials) == 1 and partials[0].reduce_op in _LINEAR and sum(p.is_replicate() for p in placements) == 1:
        return partials[0]
    return None
