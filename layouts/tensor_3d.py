"""3-D tensor parallelism (Bian et al. 2021, "Maximizing Parallelism in Distributed Training for Huge Neural
Networks") as layouts: a q x q x q cube of three mesh dims, every weight and activation 1/q^3 per rank.

Bian's 3-D matmul ``C = A B`` on rank (i, j, l) computes ``A(i, l) B(l, j)``: A's block all-gathered along j, B's
along i, the product reduce-scattered along l. Here that is three redistributions around one local matmul, the
planner's own all-gather and reduce-scatter (no new rule): the layouts are chosen so that each gather removes
the innermost split of its tensor dim and each reduce-scatter adds one. With the cube's mesh dims ``seq`` (j),
``batch`` (i) and ``hidden`` (l) in that mesh order (nesting follows mesh order), a transformer's residual
stream and its two kinds of linear layer are:

    tensor                                        seq        batch      hidden     gathered for the product
    residual stream x (B, T, D)                   T          B          D          T along seq
    "in" linear weight (out, in): q, k, v, fc,    out        out        in         along batch: [out: seq,
      classifier                                  (outer)    (inner)                 in: hidden]
    its output h (B, T, out), attention's input   out        B (outer)  B (inner)  B along hidden (by the
                                                                                     next "out" linear)
    "out" linear weight (out, in): proj, mlp.out  in         in         out        along batch
    its output: the residual stream again (the partial product reduce-scattered along seq onto T)

An "in" linear: x gathered along seq (T whole), its weight along batch, ``x W^T`` is Partial on hidden,
reduce-scattered along hidden onto the batch dim. An "out" linear: h gathered along hidden, its weight along
batch, the product Partial on seq, reduce-scattered along seq onto T. The backward of each gather is a
reduce-scatter and of each reduce-scatter a gather (the autograd of ``redistribute``), so forward and backward
each move, per rank, ``(q-1)/q^3 (|x| + |W| + |y|)`` elements per linear layer: the paper's count. Attention
runs on each rank's batch rows and heads (heads on seq). Biases (out,) and norms' parameters (D,) split their
one dim (1/q); layer norm over the hidden-sharded D all-reduces row statistics (ops/sharded_norm.py),
installed by ``tensor_parallel_3d()``. The token embedding (V, D) is split [V: seq, batch; D: hidden] and
gathered along seq and batch for the lookup.

Divisibility: widths, vocabulary and sequence may be any size; the batch must divide by q^2 (a linear layer
views (B, T, D) as (B T, D) with B's split kept; ``Linear3D`` checks it). Attention: with
``F.scaled_dot_product_attention`` (GPTConfig(attention="sdpa")) batch and heads stay split; examples/gpt.py's
written-out matmul attention flattens (B, H), and H's split (on seq, the first mesh dim) cannot nest outside
B's, so there the heads are gathered on seq (exact, more bytes).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dtensor_plus import rules
from dtensor_plus.dtensor import DTensor
from dtensor_plus.ops.sharded_norm import sharded_norm_rules
from dtensor_plus.placements import Placement, Replicate, Shard

from .tensor import ParallelStyle
from .tensor_2d import place_parameter, place_whole

__all__ = ["Cube3D", "tensor_parallel_3d", "Linear3D", "LayerNorm3D", "Embedding3D", "HiddenParameter3D"]


@dataclass(frozen=True)
class Cube3D:
    """The mesh dims of a 3-D tensor-parallel cube, by name; the mesh must order them seq, batch, hidden."""

    seq_mesh_dim: str = "seq"
    batch_mesh_dim: str = "batch"
    hidden_mesh_dim: str = "hidden"

    def placements(self, mesh, seq=None, batch=None, hidden=None) -> tuple[Placement, ...]:
        """One placement per mesh dim of ``mesh``: the given ones on the cube's dims (None: Replicate)."""
        roles = {self.seq_mesh_dim: seq, self.batch_mesh_dim: batch, self.hidden_mesh_dim: hidden}
        names = tuple(mesh.mesh_dim_names or ())
        order = [names.index(n) for n in roles if n in names]
        if len(order) != 3 or order != sorted(order):
            raise ValueError(f"3-D tensor parallelism needs mesh dims {list(roles)} in this order (nesting follows "
                             f"mesh order; each gather must remove an innermost split), got {names}; build the mesh "
                             f"with init_device_mesh(..., mesh_dim_names=({', '.join(map(repr, roles))}))")
        sizes = {mesh.size(names.index(n)) for n in roles}
        if len(sizes) != 1:
            raise ValueError(f"3-D tensor parallelism needs a cube: mesh dims {list(roles)} of one size, got {mesh}")
        return tuple(roles.get(name) or Replicate() for name in names)

    def q(self, mesh) -> int:
        return mesh.size(mesh.mesh_dim_names.index(self.hidden_mesh_dim))

    def residual(self, mesh) -> tuple[Placement, ...]:
        """The residual stream (B, T, D)."""
        return self.placements(mesh, seq=Shard(1), batch=Shard(0), hidden=Shard(2))

    def inner(self, mesh, ndim: int = 3) -> tuple[Placement, ...]:
        """An "in" linear's output (B, ..., out): attention's input, and the classifier's logits."""
        return self.placements(mesh, seq=Shard(ndim - 1), batch=Shard(0), hidden=Shard(0))

    def tokens(self, mesh) -> tuple[Placement, ...]:
        return self.placements(mesh, seq=Shard(1), batch=Shard(0))

    def targets(self, mesh) -> tuple[Placement, ...]:
        """Targets (B, T) beside the classifier's logits."""
        return self.placements(mesh, batch=Shard(0), hidden=Shard(0))

    def place(self, tensor: torch.Tensor, mesh, placements) -> DTensor:
        """A whole tensor, the same on every rank, in ``placements`` (no communication)."""
        return place_whole(tensor, mesh, placements)


@contextlib.contextmanager
def tensor_parallel_3d():
    """Layer norm over the hidden-sharded dim by all-reduced row statistics, inside the block (forward and
    backward); the linear layers need no rule (their styles redistribute)."""
    with rules.override_rule(sharded_norm_rules(), asked_for=True):  # the user entered the layout by name
        yield


def _to(x: torch.Tensor, mesh, placements) -> DTensor:
    if not isinstance(x, DTensor):
        return place_whole(x, mesh, placements)
    return x if tuple(x.placements) == tuple(placements) else x.redistribute(mesh, placements)


class Linear3D(ParallelStyle):
    """nn.Linear on the cube, ``kind="in"`` (reads the residual stream: q, k, v, fc, the classifier) or
    ``kind="out"`` (writes it: proj, mlp.out). Its forward gathers the input and the weight, multiplies, and
    reduce-scatters the product (see the module docstring); the bias is added to the scattered block."""

    def __init__(self, kind: str, cube: Cube3D = Cube3D()):
        if kind not in ("in", "out"):
            raise ValueError(f"Linear3D(kind={kind!r}): 'in' for a layer reading the residual stream (q, k, v, fc, "
                             f"head), 'out' for one writing it (proj, mlp.out)")
        self.kind, self.cube = kind, cube

    def apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"Linear3D places an nn.Linear, got {type(module).__name__}")
        c, S0, S1 = self.cube, Shard(0), Shard(1)
        if self.kind == "in":
            weight, bias = c.placements(device_mesh, seq=S0, batch=S0, hidden=S1), c.placements(device_mesh, seq=S0)
        else:
            weight, bias = c.placements(device_mesh, seq=S1, batch=S1, hidden=S0), c.placements(device_mesh, hidden=S0)
        place_parameter(module, "weight", device_mesh, weight)
        place_parameter(module, "bias", device_mesh, bias)
        module.forward = functools.partial(_linear_forward, module, kind=self.kind, cube=self.cube, mesh=device_mesh)
        return module


def _linear_forward(module: nn.Linear, x: torch.Tensor, *, kind: str, cube: Cube3D, mesh) -> DTensor:
    q, ndim = cube.q(mesh), x.ndim
    if ndim > 2 and x.shape[0] % (q * q):
        raise ValueError(f"Linear3D: the batch ({x.shape[0]}) must divide by q^2 = {q * q} (its rows stay split "
                         f"when (B, T, D) is viewed as (B T, D)); use a batch of a multiple of {q * q}")
    last = Shard(ndim - 1)
    if kind == "in":  # x [T: seq, B: batch, D: hidden] -> T whole; product Partial on hidden, scattered onto B
        x_in, x_all = cube.residual(mesh) if ndim == 3 else None, cube.placements(mesh, batch=Shard(0), hidden=last)
        w_all = cube.placements(mesh, seq=Shard(0), hidden=Shard(1))
        y_out = cube.inner(mesh, ndim)
    else:  # x [out: seq, B: batch, hidden] -> B's hidden split gathered; product Partial on seq, scattered onto T
        x_in, x_all = cube.inner(mesh, ndim), cube.placements(mesh, seq=last, batch=Shard(0))
        w_all = cube.placements(mesh, seq=Shard(1), hidden=Shard(0))
        y_out = cube.residual(mesh)
    if x_in is not None:
        x = _to(x, mesh, x_in)
    y = F.linear(_to(x, mesh, x_all), module.weight.redistribute(mesh, w_all))
    y = y.redistribute(mesh, y_out)
    return y if module.bias is None else y + module.bias


class HiddenParameter3D(ParallelStyle):
    """Parameters whose last dim is the residual stream's hidden dim (a position table (T, D), a norm's
    (D,)): Shard(-1) on hidden, Replicate elsewhere."""

    def __init__(self, *names: str, cube: Cube3D = Cube3D()):
        if not names:
            raise ValueError("HiddenParameter3D needs the names of the parameters to place, e.g. 'pos_emb'")
        self.names, self.cube = names, cube

    def apply(self, module: nn.Module, device_mesh) -> nn.Module:
        for name in self.names:
            param = getattr(module, name, None)
            if not isinstance(param, torch.Tensor):
                raise ValueError(f"HiddenParameter3D: {type(module).__name__} has no parameter {name!r}")
            place_parameter(module, name, device_mesh, self.cube.placements(device_mesh, hidden=Shard(param.ndim - 1)))
        return module


class LayerNorm3D(HiddenParameter3D):
    """nn.LayerNorm over the hidden-sharded D: weight and bias Shard(0) on hidden; inside
    ``tensor_parallel_3d()`` each row's mean and variance are all-reduced on hidden."""

    def __init__(self, cube: Cube3D = Cube3D()):
        super().__init__("weight", "bias", cube=cube)

    def apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not isinstance(module, nn.LayerNorm):
            raise TypeError(f"LayerNorm3D places an nn.LayerNorm, got {type(module).__name__}")
        return HiddenParameter3D(*(n for n in self.names if getattr(module, n, None) is not None),
                                 cube=self.cube).apply(module, device_mesh)


class Embedding3D(ParallelStyle):
    """nn.Embedding on the cube: weight (V, D) [V: seq and batch, D: hidden] (1/q^3), gathered along seq and
    batch for the lookup (its gradient reduce-scattered back); tokens (B, T) as [T: seq, B: batch] (plain
    tokens are taken whole); the output is the residual stream."""

    def __init__(self, cube: Cube3D = Cube3D()):
        self.cube = cube

    def apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"Embedding3D places an nn.Embedding, got {type(module).__name__}")
        placements = self.cube.placements(device_mesh, seq=Shard(0), batch=Shard(0), hidden=Shard(1))
        place_parameter(module, "weight", device_mesh, placements)
        module.forward = functools.partial(_embedding_forward, module, cube=self.cube, mesh=device_mesh)
        return module


def _embedding_forward(module: nn.Embedding, tokens: torch.Tensor, *, cube: Cube3D, mesh) -> DTensor:
    tokens = _to(tokens, mesh, cube.tokens(mesh))
    weight = module.weight.redistribute(mesh, cube.placements(mesh, hidden=Shard(1)))
    return F.embedding(tokens, weight, module.padding_idx, module.max_norm, module.norm_type,
                       module.scale_grad_by_freq, module.sparse)
