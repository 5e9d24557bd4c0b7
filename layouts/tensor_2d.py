"""2-D (Optimus, Xu et al. 2021) and 2.5-D (Tesseract, Wang et al. 2021) tensor parallelism as layouts.

A q x q square of two mesh dims, ``row`` and ``col`` (2.5-D: and a ``depth`` mesh dim of d ranks), holds every
activation and weight as q x q blocks:

    tensor                          row          col          depth (2.5-D)   per rank
    activation (B, ..., D)          Shard(0)     Shard(-1)    Shard(0)        1/(q^2 d)
    tokens, targets (B, T)          Shard(0)     Replicate    Shard(0)
    Linear weight (out, in)         Shard(0)     Shard(1)     Replicate       1/q^2
    Linear bias, LayerNorm weight   Replicate    Shard(0)     Replicate       1/q
      and bias, position table      (its hidden dim on col)
    Embedding weight (V, D)         Shard(0)     Shard(1)     Replicate       1/q^2; gathered on row for the
                                                                              lookup (all-gather, its backward
                                                                              a reduce-scatter)

Where the communication comes from: the matmuls of ``Linear2D`` (forward ``addmm``, backward two ``mm``) are
decided by SUMMA (ops/summa.py: panel broadcasts along row and col, streamed one block at a time, and reduces
for the transposed forms), layer norm over the col-sharded hidden dim by ops/sharded_norm.py (all-reduces of
per-row statistics), both installed as scoped rules by ``tensor_parallel_2d()``. Attention needs nothing:
batch rows on row (and depth), heads on col (the hidden dim's split, when num_heads divides by q), every
product local. The weight gradients the batch split leaves Partial (on row for the 1/q parameters, on depth
for all: Tesseract's all-reduce over depth) are reduced by ``layouts.data.reduce_grad_in_backward``.

Why scoped rules and not a style's own forward: the backward's matmuls are aten ops autograd issues outside
any module hook, and a rule decides them exactly like the forward's; the styles only place parameters and
lay out inputs, and the SUMMA rule fires only for operands in its three block forms (everything else keeps
the default rules). So the training step runs inside the block, as ``context_parallel()`` does::

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("row", "col"))     # 2.5-D: ("depth", "row", "col")
    grid = Grid2D()                                                           # Grid2D(depth_mesh_dim="depth")
    parallelize_module(model, mesh, {"tok_emb": Embedding2D(grid), "blocks.*.attn.q": Linear2D(grid), ...})
    with tensor_parallel_2d(grid), loss_parallel():
        loss = F.cross_entropy(model(tokens).flatten(0, 1), grid.place_tokens(targets, mesh).flatten(0, 1))
        loss.backward()

Divisibility: the hidden, MLP and vocabulary widths may be any size (blocks are torch.chunk pieces); the
batch must divide by q (x d), since a linear layer views (B, T, D) as (B T, D) with the rows still split
(``Linear2D`` checks it and says so). A head count q does not divide stays exact, but the heads view cannot
keep the hidden dim's split: attention gathers it on col (exact: tests/layouts/test_tensor_parallel_nd.py's
"2d-3-heads" case; measured, 8 more all-gathers on col per step for the 2-layer debug GPT on q=2).

Under torch.compile (tests/compile/test_compile_tensor_nd.py): enter ``tensor_parallel_2d`` around the compiled
call; one graph, no break. Whole inputs are placed by the front doors the compiler records (``place_whole``),
and ``Linear2D``'s check that the SUMMA rules are in force runs when the forward is traced, not at every call
(tracing.constant_when_traced).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dtensor_plus import rules
from dtensor_plus.api import distribute_tensor
from dtensor_plus.dtensor import DTensor
from dtensor_plus.ops import summa
from dtensor_plus.ops.common import aten
from dtensor_plus.ops.sharded_norm import sharded_norm_rules
from dtensor_plus.placements import Placement, Replicate, Shard
from dtensor_plus.tracing import constant_when_traced

from .data import reduce_grad_in_backward
from .tensor import SRC_DATA_RANK, ParallelStyle

__all__ = ["Grid2D", "tensor_parallel_2d", "Linear2D", "LayerNorm2D", "Embedding2D", "HiddenParameter2D",
           "place_whole"]


@dataclass(frozen=True)
class Grid2D:
    """The mesh dims of a 2-D (or, with ``depth_mesh_dim``, 2.5-D) tensor-parallel square, by name."""

    row_mesh_dim: str = "row"
    col_mesh_dim: str = "col"
    depth_mesh_dim: str | None = None

    def placements(self, mesh, row: Placement, col: Placement, depth: Placement) -> tuple[Placement, ...]:
        """One placement per mesh dim of ``mesh``: the given ones on the grid's dims, Replicate elsewhere."""
        roles = {self.row_mesh_dim: row, self.col_mesh_dim: col}
        if self.depth_mesh_dim is not None:
            roles[self.depth_mesh_dim] = depth
        names = mesh.mesh_dim_names or ()
        missing = [name for name in roles if name not in names]
        if missing:
            raise ValueError(f"the 2-D tensor-parallel mesh needs mesh dims {sorted(roles)}, but {mesh} has "
                             f"{names}; name them with init_device_mesh(..., mesh_dim_names=...) or pass Grid2D("
                             f"row_mesh_dim=..., col_mesh_dim=..., depth_mesh_dim=...)")
        q_row, q_col = mesh.size(names.index(self.row_mesh_dim)), mesh.size(names.index(self.col_mesh_dim))
        if q_row != q_col:
            raise ValueError(f"SUMMA needs a square: mesh dims {self.row_mesh_dim!r} ({q_row} ranks) and "
                             f"{self.col_mesh_dim!r} ({q_col} ranks) must have the same size")
        return tuple(roles.get(name, Replicate()) for name in names)

    def activation(self, mesh, ndim: int) -> tuple[Placement, ...]:
        return self.placements(mesh, Shard(0), Shard(ndim - 1), Shard(0))

    def tokens(self, mesh) -> tuple[Placement, ...]:
        return self.placements(mesh, Shard(0), Replicate(), Shard(0))

    def place_tokens(self, tokens: torch.Tensor, mesh) -> DTensor:
        """A whole (B, T) batch, the same on every rank, as the grid's rows (no communication)."""
        return place_whole(tokens, mesh, self.tokens(mesh))

    def batch_ranks(self, mesh) -> int:
        """How many ways the batch is split: q, or q d."""
        dims = [self.row_mesh_dim] + ([self.depth_mesh_dim] if self.depth_mesh_dim else [])
        # a list, not a generator: Dynamo cannot pass a generator to math.prod (a graph break)
        return math.prod([mesh.size(mesh.mesh_dim_names.index(d)) for d in dims])


@contextlib.contextmanager
def tensor_parallel_2d(grid: Grid2D = Grid2D()):
    """Decide matmuls of block-sharded operands by SUMMA and layer norms over the col-sharded hidden dim by
    all-reduced statistics, inside the block (forward and backward)."""
    table = {**summa.summa_rules(grid.row_mesh_dim, grid.col_mesh_dim), **sharded_norm_rules()}
    with rules.override_rule(table, asked_for=True):  # the user entered the layout by name
        yield


@constant_when_traced  # under torch.compile: checked when the forward is traced (the registry is not traceable)
def _summa_in_force(grid: Grid2D) -> bool:
    rule = rules.rule_for(aten.mm.default)
    return isinstance(rule, functools.partial) and rule.keywords.get("row_mesh_dim") == grid.row_mesh_dim


def place_whole(tensor: torch.Tensor, mesh, placements) -> DTensor:
    """A whole tensor, the same on every rank, as a DTensor in ``placements`` with no communication: the
    replicated DTensor on its local block, then each rank's block cut out. Not ``distribute_tensor``: these
    front doors (``from_local``, ``redistribute``) are what torch.compile records without a graph break inside
    a compiled forward (tracing.py). Like ``distribute_tensor``, no gradient flows back into ``tensor``."""
    replicated = DTensor.from_local(tensor.detach(), mesh, [Replicate()] * mesh.ndim)
    placed = replicated.redistribute(mesh, placements)
    return placed.requires_grad_() if tensor.requires_grad else placed


def place_parameter(module: nn.Module, name: str, mesh, placements) -> None:
    """``module.<name>`` as a DTensor Parameter in ``placements`` (mesh index 0's values, or each rank's own
    with ``parallelize_module(..., src_data_rank=None)``), its gradient reduced to them once accumulated."""
    param = getattr(module, name, None)
    if param is None or isinstance(param, DTensor):
        return
    placed = nn.Parameter(distribute_tensor(param.detach(), mesh, placements, src_data_rank=SRC_DATA_RANK.get()),
                          requires_grad=param.requires_grad)
    module.register_parameter(name, placed)
    if placed.requires_grad:  # gradients Partial where the batch is split
        reduce_grad_in_backward(placed)


def _check_module(module: nn.Module, kind: type, style) -> None:
    if not isinstance(module, kind):
        raise TypeError(f"{type(style).__name__} places an nn.{kind.__name__}, got {type(module).__name__}")


class Linear2D(ParallelStyle):
    """nn.Linear on the grid: weight (out, in) [Shard(0) on row, Shard(1) on col], bias Shard(0) on col. The
    input is laid out as a grid activation (a DTensor elsewhere is redistributed; a plain tensor is taken as
    the whole, the same on every rank); the output stays one, (B, ..., out) [Shard(0), Shard(-1)]. Use it for
    the classifier too: its logits stay vocabulary-sharded on col for ``loss_parallel()``."""

    def __init__(self, grid: Grid2D = Grid2D()):
        self.grid = grid

    def apply(self, module: nn.Module, device_mesh) -> nn.Module:
        _check_module(module, nn.Linear, self)
        grid, mesh = self.grid, device_mesh
        place_parameter(module, "weight", mesh, grid.placements(mesh, Shard(0), Shard(1), Replicate()))
        place_parameter(module, "bias", mesh, grid.placements(mesh, Replicate(), Shard(0), Replicate()))
        module.register_forward_pre_hook(functools.partial(_linear_input, grid=self.grid, mesh=device_mesh))
        return module


def _as_activation(x: torch.Tensor, grid: Grid2D, mesh) -> DTensor:
    target = grid.activation(mesh, x.ndim)
    if not isinstance(x, DTensor):
        return place_whole(x, mesh, target)
    return x if tuple(x.placements) == target else x.redistribute(mesh, target)


def _linear_input(module, inputs, *, grid: Grid2D, mesh):
    x = inputs[0]
    if not _summa_in_force(grid):
        raise RuntimeError(f"a Linear2D layer ran outside `with tensor_parallel_2d({grid}):`, where its matmuls "
                           "would gather their blocks; run the forward and the backward inside that block")
    ways = grid.batch_ranks(mesh)
    if x.ndim > 2 and x.shape[0] % ways:
        raise ValueError(f"Linear2D: the batch ({x.shape[0]}) must divide by the {ways} ranks splitting it "
                         f"(rows stay split when (B, T, D) is viewed as (B T, D)); use a batch of a multiple of {ways}")
    return (_as_activation(x, grid, mesh), *inputs[1:])


class HiddenParameter2D(ParallelStyle):
    """Parameters whose last dim is the hidden dim (a position table (T, D), a norm's (D,)): Shard(-1) on col,
    Replicate elsewhere, so they meet grid activations without moving."""

    def __init__(self, *names: str, grid: Grid2D = Grid2D()):
        if not names:
            raise ValueError("HiddenParameter2D needs the names of the parameters to place, e.g. 'pos_emb'")
        self.names, self.grid = names, grid

    def apply(self, module: nn.Module, device_mesh) -> nn.Module:
        _place_hidden(module, self.names, device_mesh, self.grid)
        return module


def _place_hidden(module: nn.Module, names, mesh, grid: Grid2D) -> None:
    for name in names:
        param = getattr(module, name, None)
        if not isinstance(param, torch.Tensor):
            raise ValueError(f"HiddenParameter2D: {type(module).__name__} has no parameter {name!r}")
        last = Shard(param.ndim - 1)
        place_parameter(module, name, mesh, grid.placements(mesh, Replicate(), last, Replicate()))


class LayerNorm2D(ParallelStyle):
    """nn.LayerNorm over the col-sharded hidden dim: weight and bias Shard(0) on col; inside
    ``tensor_parallel_2d()`` each row's mean and variance are all-reduced on col (ops/sharded_norm.py)."""

    def __init__(self, grid: Grid2D = Grid2D()):
        self.grid = grid

    def apply(self, module: nn.Module, device_mesh) -> nn.Module:
        _check_module(module, nn.LayerNorm, self)
        names = tuple(n for n in ("weight", "bias") if getattr(module, n, None) is not None)
        _place_hidden(module, names, device_mesh, self.grid)
        return module


class Embedding2D(ParallelStyle):
    """nn.Embedding on the grid: weight (V, D) [Shard(0) on row, Shard(1) on col] (1/q^2 per rank), gathered on
    row for the lookup (its gradient reduce-scattered back); tokens (B, T) laid out as the grid's rows
    (plain tokens are taken whole), the output a grid activation (B, T, D)."""

    def __init__(self, grid: Grid2D = Grid2D()):
        self.grid = grid

    def apply(self, module: nn.Module, device_mesh) -> nn.Module:
        _check_module(module, nn.Embedding, self)
        placements = self.grid.placements(device_mesh, Shard(0), Shard(1), Replicate())
        place_parameter(module, "weight", device_mesh, placements)
        module.forward = functools.partial(_embedding_forward, module, grid=self.grid, mesh=device_mesh)
        return module


def _embedding_forward(module: nn.Embedding, tokens: torch.Tensor, *, grid: Grid2D, mesh) -> DTensor:
    target = grid.tokens(mesh)
    if not isinstance(tokens, DTensor):
        tokens = place_whole(tokens, mesh, target)
    elif tuple(tokens.placements) != target:
        tokens = tokens.redistribute(mesh, target)
    weight = module.weight.redistribute(mesh, grid.placements(mesh, Replicate(), Shard(1), Replicate()))
    return F.embedding(tokens, weight, module.padding_idx, module.max_norm, module.norm_type,
                       module.scale_grad_by_freq, module.sparse)
