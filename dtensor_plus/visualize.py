"""``visualize_sharding``: which ranks hold which block of a DTensor, for any number of tensor and mesh dims.

Pure geometry, no communication: every rank can draw any DTensor's layout from its spec. Each tensor dim is
cut into runs of indices held by the same set of ranks (a ``torch.chunk`` block, the pieces of a
``StridedShard``, a whole Replicate dim); a block of the tensor is one run per dim, and the ranks holding it
are those that hold every one of its runs. The last two dims form a grid; leading dims, when there are any,
give one grid per run of theirs (JAX's ``visualize_array_sharding`` stops at 2-D, torch's at fewer than 3)::

    >>> visualize_sharding(dtensor)            # x: (5, 8) on a (dp=2, tp=2) mesh, [Shard(0), Shard(1)]
    DTensor (5, 8) torch.float32 on mesh (dp=2, tp=2), placements (Shard(dim=0), Shard(dim=1))
                 [0:4]      [4:8]
      [0:3]      rank 0     rank 1
      [3:5]      rank 2     rank 3

Partial placements are named in the header: the ranks of a block then hold addends of it, not copies.
``path="layout.png"`` also draws the grids as a picture (needs matplotlib).
"""

from __future__ import annotations

import itertools

import torch

from .placements import Shard, StridedShard

__all__ = ["visualize_sharding", "sharding_blocks"]

_MAX_PICTURE_GRIDS = 16  # leading-dim blocks drawn in one picture; the text shows them all


def visualize_sharding(dtensor, *, path: str | None = None, show: bool = True, rank: int | None = 0) -> str:
    """The layout of ``dtensor`` as text (returned; printed when ``show``), and as a PNG when ``path`` is given.

    Args:
        dtensor: any DTensor, of any number of dims, on a mesh of any number of dims.
        path: where to write a picture of the layout (matplotlib); written by ``rank`` only.
        show: print the text.
        rank: the global rank that prints and draws (every rank computes the same text); None: every rank.
    """
    import torch.distributed as dist

    text = _text(dtensor)
    speaks = rank is None or not dist.is_initialized() or dist.get_rank() == rank
    if show and speaks:
        print(text)
    if path is not None and speaks:
        _picture(dtensor, path)
    return text


def sharding_blocks(dtensor) -> list[tuple[tuple[tuple[int, int], ...], tuple[int, ...]]]:
    """Every block of ``dtensor`` as ((start, stop) per tensor dim, global ranks holding it), in row-major order.

    A dim's runs are maximal ranges of indices held by the same ranks, so a StridedShard dim gives one run
    per piece, and every element lies in exactly one block."""
    runs = _runs_per_dim(dtensor)
    blocks = []
    for cell in itertools.product(*runs):
        holders = set(cell[0][1]) if cell else set(_all_ranks(dtensor))
        for _, ranks in cell[1:]:
            holders &= ranks
        blocks.append((tuple(bounds for bounds, _ in cell), tuple(sorted(holders))))
    return blocks


# -- geometry -------------------------------------------------------------------------------------------


def _all_ranks(dtensor) -> list[int]:
    return dtensor.device_mesh.mesh.flatten().tolist()


def _owned_indices(size: int, placements, mesh_shape, coordinate, dim: int) -> torch.Tensor:
    """The global indices of tensor dim ``dim`` that the rank at ``coordinate`` holds (nested in mesh-dim order)."""
    indices = torch.arange(size)
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Shard) and placement.dim == dim:
            indices = Shard(0).chunk(indices, mesh_shape[mesh_dim], coordinate[mesh_dim])
        elif isinstance(placement, StridedShard) and placement.dim == dim:
            indices = placement.with_dim(0).chunk(indices, mesh_shape[mesh_dim], coordinate[mesh_dim])
    return indices


def _runs_per_dim(dtensor) -> list[list[tuple[tuple[int, int], frozenset[int]]]]:
    mesh = dtensor.device_mesh
    coordinates = {rank: mesh.coordinate_of(rank) for rank in _all_ranks(dtensor)}
    runs = []
    for dim, size in enumerate(dtensor.shape):
        holders: list[set[int]] = [set() for _ in range(size)]
        for rank, coordinate in coordinates.items():
            for index in _owned_indices(size, dtensor.placements, mesh.shape, coordinate, dim).tolist():
                holders[index].add(rank)
        dim_runs, start = [], 0
        for index in range(1, size + 1):
            if index == size or holders[index] != holders[start]:
                dim_runs.append(((start, index), frozenset(holders[start])))
                start = index
        runs.append(dim_runs or [((0, 0), frozenset(coordinates))])  # an empty dim: one empty block
    return runs


# -- text -----------------------------------------------------------------------------------------------


def _header(dtensor) -> str:
    mesh = dtensor.device_mesh
    names = mesh.mesh_dim_names or tuple(f"mesh_dim{k}" for k in range(mesh.ndim))
    mesh_text = ", ".join(f"{name}={n}" for name, n in zip(names, mesh.shape))
    header = f"DTensor {tuple(dtensor.shape)} {dtensor.dtype} on mesh ({mesh_text}), placements {tuple(dtensor.placements)}"
    partial = [names[k] for k, p in enumerate(dtensor.placements) if p.is_partial()]
    empty = sorted(set(_all_ranks(dtensor)) - {r for _, ranks in sharding_blocks(dtensor) if ranks for r in ranks}) \
        if dtensor.numel() else []
    if empty:
        header += f"\n  ranks {','.join(map(str, empty))} hold empty blocks (the mesh splits a dim into more pieces than it has rows)"
    if partial:
        header += f"\n  Partial on {', '.join(partial)}: the ranks of a block hold addends of it, summed they give its values"
    return header


def _label(ranks) -> str:
    if not ranks:
        return "-"
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))


def _span(bounds) -> str:
    return f"[{bounds[0]}:{bounds[1]}]" if bounds is not None else ""


def _grid_lines(rows, cols, holders_of) -> list[str]:
    table = [[""] + [_span(c) for c, _ in cols]] if any(c is not None for c, _ in cols) else []
    for row_bounds, row_ranks in rows:
        table.append([_span(row_bounds)] + [_label(holders_of(row_ranks, col_ranks)) for _, col_ranks in cols])
    widths = [max(len(line[k]) for line in table) + 3 for k in range(len(table[-1]))]
    return ["  " + "".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]


def _grids(dtensor):
    """(title of the leading-dim block or "", rows, cols, holders_of) for each 2-D grid of the layout."""
    runs = _runs_per_dim(dtensor)
    everyone = frozenset(_all_ranks(dtensor))
    # A 0-d tensor is one cell, a 1-D one a single row: their missing dims get no index label.
    rows = runs[-2] if len(runs) >= 2 else [(None, everyone)]
    cols = runs[-1] if runs else [(None, everyone)]
    for leading in itertools.product(*runs[:-2]):
        holders = set(everyone)
        for _, ranks in leading:
            holders &= ranks
        title = ", ".join(f"dim {d} {_span(b)}" for d, (b, _) in enumerate(leading))
        yield title, rows, cols, lambda r, c, held=frozenset(holders): sorted(held & r & c)


def _text(dtensor) -> str:
    lines = [_header(dtensor)]
    for title, rows, cols, holders_of in _grids(dtensor):
        if title:
            lines.append(f" {title}:")
        lines.extend(_grid_lines(rows, cols, holders_of))
    return "\n".join(lines)


# -- picture --------------------------------------------------------------------------------------------


def _picture(dtensor, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("visualize_sharding(path=...) draws with matplotlib: pip install matplotlib") from error
    grids = list(_grids(dtensor))[:_MAX_PICTURE_GRIDS]
    columns = min(len(grids), 4)
    figure_rows = -(-len(grids) // columns)
    figure, axes = plt.subplots(figure_rows, columns, figsize=(4 * columns, 3 * figure_rows), squeeze=False)
    colors = plt.get_cmap("tab20")
    for ax, (title, rows, cols, holders_of) in zip(axes.flat, grids):
        for row_bounds, row_ranks in rows:
            r0, r1 = row_bounds or (0, 1)
            for col_bounds, col_ranks in cols:
                c0, c1 = col_bounds or (0, 1)
                ranks = holders_of(row_ranks, col_ranks)
                ax.add_patch(plt.Rectangle((c0, r0), max(c1 - c0, 0.5), max(r1 - r0, 0.5), edgecolor="black",
                                           facecolor=colors(ranks[0] % 20) if ranks else "white"))
                ax.text((c0 + c1) / 2, (r0 + r1) / 2, _label(ranks), ha="center", va="center", fontsize=8)
        ax.set_xlim(0, max((cols[-1][0] or (0, 1))[1], 1))
        ax.set_ylim(max((rows[-1][0] or (0, 1))[1], 1), 0)
        ax.set_title(title or "", fontsize=9)
        ax.set_xlabel(f"dim {max(dtensor.ndim - 1, 0)}")
        ax.set_ylabel(f"dim {max(dtensor.ndim - 2, 0)}" if dtensor.ndim >= 2 else "")
    for ax in list(axes.flat)[len(grids):]:
        ax.axis("off")
    figure.suptitle(_header(dtensor), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
