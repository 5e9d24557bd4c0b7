"""SUMMA (van de Geijn & Watts; Optimus, Xu et al. 2021): ``mm`` and ``addmm`` of block-sharded matrices on a
q x q square of two mesh dims, "row" and "col", installed by ``layouts.tensor_parallel_2d()`` (never globally).

Every matrix is cut into q x q blocks: rank (i, j) holds block (i, j) of the output ``C (m, n)``, laid out
[Shard(0) on row, Shard(1) on col]. The three products a linear layer's forward and backward take, each with
its operands as they come (no input moves):

    form  A (m, k)             B (k, n)             step p (p = 0..q-1) on rank (i, j)
    NN    m: row, k: col       k: row, n: col       A(i, p) broadcast along col from (i, p), B(p, j) along row
                                                    from (p, j); C(i, j) += A(i, p) B(p, j)
    NT    m: row, k: col       k: col, n: row       B(j, p) broadcast along row from (p, j); the partial
                                                    A(i, j) B(j, p) of C(i, p) reduced along col onto (i, p)
    TN    m: col, k: row       k: row, n: col       A(p, i) broadcast along col from (i, p); the partial
                                                    A(p, i) B(i, j) of C(p, j) reduced along row onto (p, j)

(Blocks named by their (row, col) block coordinates; "k: col" means the contraction dim is Shard on col.) For
``y = x W^T`` (``addmm``) with x and the weight W (out, in) both [Shard(0) on row, Shard(1) on col], ``W^T``
is [Shard(1), Shard(0)]: the forward is NT, ``grad_x = grad_y W`` is NN and the weight's gradient, which
autograd computes as ``(grad_y^T x)^T`` for a transposed ``W^T``, is TN. Panels are streamed: a rank holds
one received block at a time, never a whole block row or column. The collectives are declared
(``Broadcast``, ``Reduce`` of dtensor_plus/declared.py, q each per call) and run through the ``comm`` the
executor hands the local op, so ``comm_mode`` counts them against ``aten.mm`` / ``aten.addmm``. Per call and
rank, bytes sent (a broadcast counts its root's block, a reduce every non-root's):

    NN   |A block| + |B block|          NT   |B block| + (q-1) |C block|          TN   |A block| + (q-1) |C block|

Other mesh dims (2.5-D's depth, Tesseract, Wang et al. 2021) keep the einsum rule's treatment where it leaves
the streamed dims whole: a batch split of m (A Shard(0), B Replicate -> C Shard(0)), a split contraction
outside the stream (A Shard(1), B Shard(0) -> C Partial: the weight gradient summed over depth), n split where
it is not streamed; anything else, a non-square pair, or a call whose operands are not in one of the three
forms takes the default rule (ops/matrix.py). Sizes the mesh does not divide are exact: blocks are torch.chunk
pieces, every panel's shape is global metadata, and an empty panel is skipped alike by its whole group.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import MappingProxyType

import torch

from dtensor_plus.declared import Broadcast, Reduce
from dtensor_plus.placements import Partial, Replicate, Shard, chunk_bounds
from dtensor_plus.rules import OpSchema, Sharding
from dtensor_plus.traced_collectives import is_traced

from .common import aten
from .matrix import einsum_rule

__all__ = ["summa_rules", "SUMMA_FORMS"]

_S0, _S1, _R = Shard(0), Shard(1), Replicate()
# (A on row, A on col, B on row, B on col) -> form
SUMMA_FORMS = MappingProxyType({(_S0, _S1, _S0, _S1): "NN", (_S0, _S1, _S1, _S0): "NT", (_S1, _S0, _S0, _S1): "TN"})
# Per form, what another mesh dim may hold, (A, B) -> C: nothing that splits a streamed or reduced dim.
_OTHER_MESH_DIMS = MappingProxyType({
    "NN": MappingProxyType({(_S0, _R): _S0, (_R, _R): _R, (_R, _S1): _S1}),
    "NT": MappingProxyType({(_S0, _R): _S0, (_R, _R): _R, (_S1, _S0): Partial()}),
    "TN": MappingProxyType({(_R, _R): _R, (_S1, _S0): Partial(), (_R, _S1): _S1}),
})
_DEFAULT_MM = einsum_rule("mk,kn->mn", ("self", "mat2"))
_DEFAULT_ADDMM = einsum_rule("mk,kn->mn", ("mat1", "mat2"), "self")


def summa_rules(row_mesh_dim: int | str, col_mesh_dim: int | str) -> dict:
    """{aten op: rule} for ``rules.override_rule``: SUMMA on the square of ``row_mesh_dim`` x ``col_mesh_dim``."""
    dims = dict(row_mesh_dim=row_mesh_dim, col_mesh_dim=col_mesh_dim)
    return {aten.mm.default: functools.partial(_mm_rule, **dims),
            aten.addmm.default: functools.partial(_addmm_rule, **dims)}


@dataclass(frozen=True)
class SummaGeometry:
    """What a local op needs beyond its blocks: the mesh, the two mesh dims, q and the streamed dim's global
    size (k for NN, n for NT, m for TN). The rank's own coordinate is read at run time."""

    mesh: object
    row: int
    col: int
    q: int
    streamed_size: int

    def panel(self, p: int) -> int:
        return chunk_bounds(self.streamed_size, self.q, p)[1]


def _decide(op: OpSchema, a_name: str, b_name: str, row_mesh_dim, col_mesh_dim):
    """(form, C's placements, geometry), or None where SUMMA does not apply."""
    mesh = op.mesh
    names = mesh.mesh_dim_names or ()
    if any(isinstance(d, str) and d not in names for d in (row_mesh_dim, col_mesh_dim)):
        return None  # another mesh (a 1-D tp mesh inside the same block): the default rule
    row, col = mesh.mesh_dim_index(row_mesh_dim), mesh.mesh_dim_index(col_mesh_dim)
    a, b = op.spec(a_name), op.spec(b_name)
    if a is None or b is None or a.ndim != 2 or b.ndim != 2 or mesh.size(row) != mesh.size(col):
        return None
    form = SUMMA_FORMS.get((a.placements[row], a.placements[col], b.placements[row], b.placements[col]))
    if form is None:
        return None
    out = []
    for k in range(mesh.ndim):
        if k in (row, col):
            out.append(_S0 if k == row else _S1)
            continue
        c = _OTHER_MESH_DIMS[form].get((a.placements[k], b.placements[k]))
        if c is None:
            return None
        out.append(c)
    streamed = {"NN": a.shape[1], "NT": b.shape[1], "TN": a.shape[0]}[form]
    return form, tuple(out), SummaGeometry(mesh, row, col, mesh.size(row), streamed)


def _communication(form: str, geometry: SummaGeometry) -> tuple:
    row, col, q = geometry.row, geometry.col, geometry.q
    if form == "NN":
        return (Broadcast(col, q), Broadcast(row, q))
    if form == "NT":
        return (Broadcast(row, q), Reduce(col, q))
    return (Broadcast(col, q), Reduce(row, q))


def _mm_rule(op: OpSchema, *, row_mesh_dim, col_mesh_dim) -> Sharding:
    decided = _decide(op, "self", "mat2", row_mesh_dim, col_mesh_dim)
    if decided is None:
        return _DEFAULT_MM(op)
    form, out, geometry = decided
    return Sharding(inputs={"self": op.spec("self").placements, "mat2": op.spec("mat2").placements},
                    outputs=(out,), local_op=functools.partial(_LOCAL_MM[form], geometry=geometry),
                    communication=_communication(form, geometry))


def _addmm_rule(op: OpSchema, *, row_mesh_dim, col_mesh_dim) -> Sharding:
    """addmm(bias, mat1, mat2, beta, alpha): the product by SUMMA, the bias (n,) laid out as C's columns
    (Shard(0) where C is Shard(1), else Replicate) and added to the block; where C would be Partial (the bias
    would be added more than once) or the bias is not (n,), the default rule."""
    decided = _decide(op, "mat1", "mat2", row_mesh_dim, col_mesh_dim)
    bias = op.spec("self")
    if decided is None or bias is None or bias.ndim != 1 or any(p.is_partial() for p in decided[1]):
        return _DEFAULT_ADDMM(op)
    form, out, geometry = decided
    bias_to = tuple(_S0 if p == _S1 else _R for p in out)
    return Sharding(inputs={"self": bias_to, "mat1": op.spec("mat1").placements, "mat2": op.spec("mat2").placements},
                    outputs=(out,), local_op=functools.partial(_addmm_local, form=form, geometry=geometry),
                    communication=_communication(form, geometry))


# -- local ops: this rank's blocks in, its block of C out ----------------------------------------------------


def _coordinate(geometry: SummaGeometry) -> tuple[int, int]:
    return geometry.mesh.get_local_rank(geometry.row), geometry.mesh.get_local_rank(geometry.col)


def _broadcast(comm, block: torch.Tensor, shape: tuple, mesh_dim: int, root: int, mine: bool) -> torch.Tensor:
    """The block of the rank at index ``root`` along ``mesh_dim`` (this rank's own when ``mine``); an empty
    panel (the same shape on every rank of the group: global metadata) moves nothing."""
    # Under torch.compile the root's panel must not be its block itself: a traced broadcast writes its result
    # into the buffer (traced_collectives), which on a graph input (the layer's input, a weight) is a mutation
    # of that input inside the graph (wrong values, or AOTAutograd's partitioner fails when it requires grad).
    if mine:
        panel = block.clone(memory_format=torch.contiguous_format) if is_traced(block) else block.contiguous()
    else:
        panel = block.new_empty(shape)
    if panel.numel():
        comm.broadcast(panel, mesh_dim, root)
    return panel


def _nn_local(a, b, *, geometry: SummaGeometry, comm):
    i, j = _coordinate(geometry)
    out = a.new_zeros((a.shape[0], b.shape[1]))
    for p in range(geometry.q):
        width = geometry.panel(p)
        a_panel = _broadcast(comm, a, (a.shape[0], width), geometry.col, p, j == p)
        b_panel = _broadcast(comm, b, (width, b.shape[1]), geometry.row, p, i == p)
        out.addmm_(a_panel, b_panel)
    return out


def _nt_local(a, b, *, geometry: SummaGeometry, comm):
    i, j = _coordinate(geometry)
    out = None
    for p in range(geometry.q):
        b_panel = _broadcast(comm, b, (b.shape[0], geometry.panel(p)), geometry.row, p, i == p)
        partial = a @ b_panel  # this rank's share (contraction block j) of C(i, p)
        reduced = comm.reduce(partial, geometry.col, p) if partial.numel() else partial
        out = reduced if j == p else out
    return out


def _tn_local(a, b, *, geometry: SummaGeometry, comm):
    i, j = _coordinate(geometry)
    out = None
    for p in range(geometry.q):
        a_panel = _broadcast(comm, a, (geometry.panel(p), a.shape[1]), geometry.col, p, j == p)
        partial = a_panel @ b  # this rank's share (contraction block i) of C(p, j)
        reduced = comm.reduce(partial, geometry.row, p) if partial.numel() else partial
        out = reduced if i == p else out
    return out


def _mm_local(form):
    def local_op(self, mat2, *, geometry: SummaGeometry, comm):
        return _FORMS[form](self, mat2, geometry=geometry, comm=comm)
    return local_op


def _addmm_local(bias, mat1, mat2, beta=1, alpha=1, *, form: str, geometry: SummaGeometry, comm):
    product = _FORMS[form](mat1, mat2, geometry=geometry, comm=comm)
    return torch.add(bias * beta if beta != 1 else bias, product, alpha=alpha)


_FORMS = MappingProxyType({"NN": _nn_local, "NT": _nt_local, "TN": _tn_local})
_LOCAL_MM = MappingProxyType({form: _mm_local(form) for form in _FORMS})
