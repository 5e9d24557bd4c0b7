"""ZeRO-1/2's flat master buffer: every master's local block is a view of ONE flat buffer per dtype, laid out
exactly as the bucketed reduce-scatter delivers gradient shards and as the all-gather sends them.

Why: with one master per parameter the inner optimizer's step is ~10 small ops per parameter, and packing
and unpacking the collectives' flat buffers a few more each; torch's ZeroRedundancyOptimizer steps whole
parameters, 1/n of them per rank, so on 4 or 8 ranks it makes n times fewer calls than a per-parameter
sharded step. Here the inner optimizer steps one tensor per (parameter group, dtype) instead
(layouts/zero_flat_state.py), the reduce-scatter's output IS the flat gradient, and the all-gather's input IS
the flat master buffer: no per-parameter copy on either side of the step but the one into each parameter.

Layout of the buffer of one dtype: first every master that dp shards (``Shard(d)`` on dp: "packed"), group by
group in parameter order, each as its torch.chunk piece of tensor dim ``d`` padded to ``ceil(size / n)``
rows with ``d`` moved first (the piece ``collectives.all_gather_flat`` and ``reduce_scatter_flat`` pack, so the
bytes are theirs); then every other master (``Replicate`` on dp: a 0-d parameter, a 1-D bias tp shards), group
by group, as its whole local block. So a group's masters of one dtype are at most two contiguous segments,
and the packed prefix is the collectives' buffer. The padding rows are zeros and stay zeros under an
element-wise step (its gradient is zero); they are never gathered into a parameter.

    flat = FlatMasters(params, masters, groups, moves, mesh, mesh_dim)   # masters now view flat.buffers
    flat.reduce_scatter([(i, grad_whole, after), ...])                  # into flat.grads, accumulated
    flat.all_gather_into(params)                                        # the packed masters into parameters
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dtensor_plus import collectives
from dtensor_plus.buckets import all_reduce_flat
from dtensor_plus.dtensor import DTensor
from dtensor_plus.placements import chunk_bounds
from dtensor_plus.spec import DTensorSpec, TensorMeta

__all__ = ["FlatMasters"]


@dataclass(frozen=True)
class Member:
    """Where one master lives in its dtype's buffer: ``numel`` entries from ``offset``. Packed (``dim`` is not
    None): ``chunk`` rows of tensor dim ``dim`` (padded), each shaped ``rest``, this rank's first ``length``
    real; the whole on dp has ``size`` rows. Otherwise the master's local block, shaped ``shape``."""

    index: int
    group: int
    dtype: torch.dtype
    offset: int
    numel: int
    shape: tuple  # the master's local block
    dim: int | None = None
    size: int = 0
    chunk: int = 0
    rest: tuple = ()
    length: int = 0

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This master's block in ``flat`` (a buffer of its dtype's layout, or a tensor as long as it)."""
        return self.block(self.piece(flat))

    def piece(self, flat: torch.Tensor) -> torch.Tensor:
        """The padded piece, flat: the unit the collectives move."""
        return flat[self.offset : self.offset + self.numel]

    def block(self, piece: torch.Tensor) -> torch.Tensor:
        """The master's local block in its (padded, flat) piece: a view."""
        if self.dim is None:
            return piece.view(self.shape)
        return piece.view((self.chunk,) + self.rest)[: self.length].movedim(0, self.dim)


@dataclass
class Segment:
    """What the inner optimizer steps for one group and dtype: ``tensor``, entries [start, stop) of the dtype's
    buffer (a view made once: the step's state is keyed by it), holding ``members``."""

    dtype: torch.dtype
    start: int
    stop: int
    members: list
    tensor: torch.Tensor | None = None

    def block(self, m: Member, flat: torch.Tensor) -> torch.Tensor:
        """Member ``m``'s local block in ``flat``, a tensor as long as this segment (its state, say)."""
        return m.block(flat[m.offset - self.start : m.offset - self.start + m.numel])


def _rows_copy(rows: torch.Tensor, whole: torch.Tensor, m: Member, to_whole: bool) -> None:
    """Copy between ``rows`` (n, numel: every rank's padded piece of ``m``, a column slice of a collective's
    buffer) and ``whole`` (dp's whole: the parameter's local block, or its gradient's), real rows only: the
    ranks with full pieces in one copy, the one with a partial piece in another."""
    if not m.chunk:
        return
    full, part = divmod(m.size, m.chunk)
    if m.dim == 0 and whole.is_contiguous():  # the common case: flat views, no reshaping
        flat = whole.view(-1)
        pairs = [(rows[:full], flat[: full * m.numel].view(full, m.numel))] if full else []
        if part:
            pairs.append((rows[full, : part * (m.numel // m.chunk)], flat[full * m.numel :]))
    else:  # the sharded dim first: views of (ranks, chunk, *rest)
        rows, moved = rows.unflatten(1, (m.chunk,) + m.rest), whole.movedim(m.dim, 0)
        pairs = [(rows[:full], moved[: full * m.chunk].unflatten(0, (full, m.chunk)))] if full else []
        if part:
            pairs.append((rows[full, :part], moved[full * m.chunk :]))
    for piece, block in pairs:
        (block.copy_(piece) if to_whole else piece.copy_(block))


class FlatMasters:
    """The masters of ``ZeroRedundancyOptimizer`` as views of one flat buffer per dtype, and their reduced
    gradients in buffers of the same layout.

    Args: the parameters and their masters (same order), ``groups`` (per inner parameter group, the indices of
    its members), ``moves`` (per parameter: (tensor dim, size) when its master is Shard on dp, else None),
    the mesh and the dp mesh dim index. The masters' values are copied in and each master's local tensor
    becomes its view."""

    def __init__(self, params, masters, groups, moves, mesh, mesh_dim: int):
        self.mesh, self.mesh_dim = mesh, mesh_dim
        self.n, rank = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
        self.members: list = [None] * len(masters)
        ends: dict = {}  # dtype -> entries laid out so far
        segments: dict = {}  # (group, dtype, packed) -> Segment
        for packed in (True, False):  # the packed prefix first: it is the collectives' buffer
            for g, indices in enumerate(groups):
                for i in indices:
                    master, move = masters[i], moves[i]
                    if (move is not None) != packed:
                        continue
                    dtype, shape = master.dtype, tuple(master._local_tensor.shape)
                    offset = ends.get(dtype, 0)
                    if packed:
                        d, size = move
                        whole = tuple(params[i]._local_tensor.shape)
                        rest = whole[:d] + whole[d + 1 :]
                        chunk = -(-size // self.n)
                        member = Member(i, g, dtype, offset, chunk * math.prod(rest), shape, d, size, chunk, rest,
                                        chunk_bounds(size, self.n, rank)[1])
                    else:
                        member = Member(i, g, dtype, offset, math.prod(shape), shape)
                    self.members[i] = member
                    ends[dtype] = offset + member.numel
                    segment = segments.setdefault((g, dtype, packed), Segment(dtype, offset, offset, []))
                    segment.stop = ends[dtype]
                    segment.members.append(member)
            if packed:
                self.packed_end = dict(ends)  # dtype -> end of its packed prefix
        device = masters[0].device if masters else torch.device("cpu")
        self.buffers = {dtype: torch.zeros(total, dtype=dtype, device=device) for dtype, total in ends.items()}
        for m in self.members:
            view = m.view(self.buffers[m.dtype])
            view.copy_(masters[m.index]._local_tensor)
            masters[m.index]._local_tensor = view
        self.segments = [[] for _ in groups]  # per group, what the inner optimizer steps
        for (g, dtype, _), segment in segments.items():
            segment.tensor = self.buffers[dtype][segment.start : segment.stop]
            self.segments[g].append(segment)
        self.packed = {dtype: [m for m in self.members if m.dim is not None and m.dtype == dtype] for dtype in ends}
        self.unpacked = [m.index for m in self.members if m.dim is None]
        self.grads: dict = {}  # dtype -> flat gradient buffer (None until a gradient arrives)
        self.received = [False] * len(masters)

    # -- gradients ---------------------------------------------------------------------------------------

    def clear_grads(self, set_to_none: bool = True) -> None:
        """No gradient held (or, ``set_to_none=False``, every gradient held zeroed, as torch.optim does)."""
        if set_to_none:
            self.grads = {}
            self.received = [False] * len(self.members)
        else:
            for buffer in self.grads.values():
                buffer.zero_()

    def _grad_buffer(self, dtype) -> torch.Tensor:
        buf = self.grads.get(dtype)
        if buf is None:
            buf = self.grads[dtype] = self.buffers[dtype].new_zeros(self.buffers[dtype].shape)
        return buf

    def _accumulate(self, m: Member, piece: torch.Tensor) -> None:
        """Add (or, the first time since ``clear_grads``, copy) a reduced padded piece into the gradient."""
        target = m.piece(self._grad_buffer(m.dtype))
        target.add_(piece) if self.received[m.index] else target.copy_(piece)
        self.received[m.index] = True

    def add_shard(self, index: int, shard: torch.Tensor) -> None:
        """Add a gradient already in the master's layout (moved by ``redistribute_together``): its local block."""
        m = self.members[index]
        target = m.view(self._grad_buffer(m.dtype))
        target.add_(shard) if self.received[index] else target.copy_(shard)
        self.received[index] = True

    def reduce_scatter(self, entries) -> None:
        """Reduce-scatter whole gradients Partial(sum) on dp into the gradient buffers: ``entries`` are
        (member index, the gradient's local block, the all-reduces on other mesh dims that follow), packed
        members only. One reduce-scatter per dtype, its input rank-major as ``reduce_scatter_flat``'s; when it
        carries exactly the dtype's packed prefix and no gradient is held yet, its output is the buffer."""
        by_dtype: dict = {}
        for entry in entries:
            by_dtype.setdefault(self.members[entry[0]].dtype, []).append(entry)
        for dtype, group in by_dtype.items():
            members = [self.members[i] for i, _, _ in group]
            total = sum(m.numel for m in members)
            if not total:  # only empty shards: sizes are global, every rank skips alike
                for m in members:
                    self._accumulate(m, m.piece(self.buffers[dtype]).new_zeros(0))
                continue
            send = group[0][1].new_zeros((self.n, total))
            start = 0
            for m, (_, grad, _) in zip(members, group):
                _rows_copy(send[:, start : start + m.numel], grad, m, to_whole=False)
                start += m.numel
            out = collectives.reduce_scatter(send, self.mesh, self.mesh_dim, 0, "sum").view(-1)
            pieces, start = [], 0
            for m in members:
                pieces.append(out[start : start + m.numel])
                start += m.numel
            if any(after for _, _, after in group):
                self._reduce_after(members, pieces, [after for _, _, after in group])
            packed = self.packed[dtype]
            whole_prefix = (dtype not in self.grads and out.dtype == dtype and len(members) == len(packed)
                            and all(a is b for a, b in zip(members, packed))
                            and self.packed_end[dtype] == self.buffers[dtype].numel())
            if whole_prefix:  # the common case: every gradient in one collective, no copy
                self.grads[dtype] = out
                for m in members:
                    self.received[m.index] = True
                continue
            for m, piece in zip(members, pieces):
                self._accumulate(m, piece)

    def _reduce_after(self, members, pieces, afters) -> None:
        """The all-reduces on other mesh dims (a norm's weight Partial on tp under sequence parallelism), on the
        reduced shards before they accumulate, bucketed by kind as ``redistribute_together`` does."""
        by_kind: dict = {}
        for m, piece, after in zip(members, pieces, afters):
            if after:
                by_kind.setdefault(after, []).append((m, piece))
        for after, kind in by_kind.items():
            views = [m.block(piece) for m, piece in kind]
            for view, reduced in zip(views, all_reduce_flat(views, self.mesh, after)):
                view.copy_(reduced)

    def grad_dtensor(self, index: int, spec: DTensorSpec) -> DTensor:
        """The reduced gradient of master ``index`` as a DTensor in its layout, a view of the buffer."""
        m = self.members[index]
        return DTensor(m.view(self.grads[m.dtype]), spec)

    # -- parameters ----------------------------------------------------------------------------------------

    def all_gather_into(self, params) -> None:
        """Gather every packed master back into its parameter's local block: one all-gather per dtype of the
        buffer's packed prefix, then one or two copies per parameter."""
        for dtype, members in self.packed.items():
            end = self.packed_end[dtype]
            if not end:
                continue
            rows = collectives.all_gather(self.buffers[dtype][:end].view(1, end), self.mesh, self.mesh_dim, 0, self.n)
            for m in members:
                _rows_copy(rows[:, m.offset : m.offset + m.numel], params[m.index]._local_tensor, m, to_whole=True)


def state_spec(spec: DTensorSpec, dtype: torch.dtype) -> DTensorSpec:
    """``spec`` with another dtype (a state tensor kept in another dtype than its parameter)."""
    if dtype == spec.dtype:
        return spec
    meta = spec.tensor_meta
    return DTensorSpec(spec.mesh, spec.placements, TensorMeta(meta.shape, meta.stride, dtype))
