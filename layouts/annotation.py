"""Readable layout annotations: placements written per tensor dim, einops style.

This file owns the string form of a layout: ``parse_layout`` (string -> placements), ``format_layout``
(placements -> string, used by reprs and error messages) and ``layout_of`` (a DTensor's layout string).

Grammar (whitespace separates tokens; ``|`` starts the optional partial markers)::

    layout   := dim* [ "|" marker+ ]
    dim      := NAME [ "(" MESH_DIM+ ")" ]          # a tensor dim, and the mesh dims that shard it
    marker   := REDUCE "(" MESH_DIM+ ")"            # REDUCE: sum avg max min, or "partial" (= sum)

- One ``dim`` per tensor dim, in order: their count is the tensor's rank. NAME is a Python identifier
  (as in einops) and names are distinct.
- ``rows(dp tp)``: several mesh dims on one tensor dim nest in mesh-dim order: the earlier mesh dim splits
  first (dp takes contiguous blocks, tp splits each block). Placements can only express that order, so a
  list against the mesh order (``rows(tp dp)`` on a ``(dp, tp)`` mesh) is an error, never a silent reorder.
- ``| sum(tp) max(dp)``: the tensor is Partial on those mesh dims, with that reduction.
- Mesh dims named nowhere are Replicate. A mesh without ``mesh_dim_names`` is written by index (``rows(0)``).

Example, on a ``(dp, tp)`` mesh::

    parse_layout("batch(dp) seq hidden(tp)", mesh)    # (Shard(dim=0), Shard(dim=2))
    parse_layout("rows(dp tp) cols", mesh)            # (Shard(dim=0), Shard(dim=0))
    parse_layout("rows cols | partial(tp)", mesh)     # (Replicate(), Partial())
    format_layout((Replicate(), Shard(1)), mesh)      # "d0 d1(tp)"
"""

from __future__ import annotations

import re
from typing import Sequence

from dtensor_plus.placements import REDUCE_OPS, Partial, Placement, Replicate, Shard

__all__ = ["parse_layout", "format_layout", "layout_of"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TOKEN = re.compile(r"\s*(?:([()|])|([^\s()|]+))")
_REDUCE_ALIASES = {"partial": "sum", **{op: op for op in REDUCE_OPS}}


def parse_layout(text: str, mesh, *, ndim: int | None = None) -> tuple[Placement, ...]:
    """Placements, one per mesh dim, from an annotation such as ``"batch(dp) seq(sp) hidden"``.

    Args:
        text: the annotation (grammar in the module docstring).
        mesh: a DeviceMesh, or a sequence of mesh dim names (e.g. ``("dp", "tp")``).
        ndim: when given, the number of tensor dims the annotation must name.

    Example::

        parse_layout("vocab(tp) hidden", mesh)  # on a (dp, tp) mesh: (Replicate(), Shard(dim=0))
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_layout needs a layout string, got {type(text).__name__} {text!r}")
    names = _mesh_names(mesh)
    dims, markers = _parse(text)
    if ndim is not None and len(dims) != ndim:
        raise ValueError(f"layout {text!r} names {len(dims)} tensor dims {[d for d, _ in dims]}, expected {ndim}")
    placements: list[Placement | None] = [None] * len(names)

    def claim(mesh_dim_name: str, placement: Placement) -> int:
        if mesh_dim_name not in names:
            raise ValueError(f"layout {text!r}: unknown mesh dim {mesh_dim_name!r}; this mesh has dims {names}")
        index = names.index(mesh_dim_name)
        if placements[index] is not None:
            raise ValueError(f"layout {text!r}: mesh dim {mesh_dim_name!r} is named twice; a mesh dim places a tensor once")
        placements[index] = placement
        return index

    for dim, (dim_name, mesh_dims) in enumerate(dims):
        indices = [claim(m, Shard(dim)) for m in mesh_dims]
        if indices != sorted(indices):
            _raise_nesting_order(text, dim_name, mesh_dims, names)
    for reduce_op, mesh_dims in markers:
        for m in mesh_dims:
            claim(m, Partial(reduce_op))
    return tuple(p if p is not None else Replicate() for p in placements)


def format_layout(
    placements: Sequence[Placement], mesh, dim_names: Sequence[str] | None = None, *, ndim: int | None = None
) -> str:
    """The annotation for ``placements``; ``parse_layout`` of the result gives them back.

    Args:
        placements: one per mesh dim.
        mesh: a DeviceMesh, or a sequence of mesh dim names.
        dim_names: tensor dim names; default ``d0 d1 ...``.
        ndim: the tensor's rank, when ``dim_names`` is not given (default: just enough for the
            highest sharded dim).

    Example::

        format_layout((Shard(0), Shard(0)), mesh, ["rows", "cols"])  # "rows(dp tp) cols"
    """
    names = _mesh_names(mesh)
    if len(placements) != len(names):
        raise ValueError(f"{len(placements)} placements {list(placements)} for a mesh with {len(names)} dims {names}")
    ndim = _format_ndim(placements, dim_names, ndim)
    dim_names = _check_dim_names(dim_names if dim_names is not None else [f"d{i}" for i in range(ndim)], ndim)
    sharding: list[list[str]] = [[] for _ in range(ndim)]
    strided: dict[int, str] = {}  # tensor dim -> outer factor of a StridedShard on it (and "zigzag")
    reductions: dict[str, list[str]] = {}  # reduce op -> mesh dims, in the order first met
    for name, p in zip(names, placements):
        if p.is_shard():
            sharding[p.normalized(ndim).dim].append(name)
        elif p.is_strided_shard():  # "(4 d0(tp))": d0 read as 4 groups, the rows inside each split by tp
            sharding[p.dim].append(name)
            strided[p.dim] = _strided_prefix(p)
        elif p.is_partial():
            reductions.setdefault(p.reduce_op, []).append(name)
        elif not p.is_replicate():
            raise TypeError(f"format_layout got {p!r}; expected Shard, Replicate or Partial")
    words = [f"{d}({' '.join(m)})" if m else d for d, m in zip(dim_names, sharding)]
    words = [f"({strided[i]} {w})" if i in strided else w for i, w in enumerate(words)]
    if reductions:
        words += ["|"] + [f"{op}({' '.join(m)})" for op, m in reductions.items()]
    return " ".join(words)


def _strided_prefix(p) -> str:
    """"4" for StridedShard(d, 4); "4 zigzag" for its zigzag form, "zigzag" alone when outer is 1."""
    if not p.zigzag:
        return str(p.outer)
    return "zigzag" if p.outer == 1 else f"{p.outer} zigzag"


def layout_of(dtensor, dim_names: Sequence[str] | None = None) -> str:
    """The annotation of a DTensor's layout, e.g. ``"d0(dp) d1 d2(tp)"`` or with ``dim_names``."""
    return format_layout(dtensor.placements, dtensor.device_mesh, dim_names, ndim=dtensor.ndim)


# -- helpers ------------------------------------------------------------------------------------------


def _mesh_names(mesh) -> tuple[str, ...]:
    """Mesh dim names of a DeviceMesh (indices as strings when it has none) or of a sequence of names."""
    if hasattr(mesh, "mesh_dim_names"):
        return tuple(mesh.mesh_dim_names) if mesh.mesh_dim_names else tuple(str(i) for i in range(mesh.ndim))
    if isinstance(mesh, (list, tuple)) and all(isinstance(n, str) for n in mesh):
        if len(set(mesh)) != len(mesh):
            raise ValueError(f"mesh dim names {tuple(mesh)} must be distinct")
        return tuple(mesh)
    raise TypeError(f"expected a DeviceMesh or a sequence of mesh dim names, got {mesh!r}")


def _tokens(text: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:  # only trailing whitespace is left
            break
        tokens.append(match.group(1) or match.group(2))
        pos = match.end()
    return tokens


def _parse(text: str) -> tuple[list[tuple[str, list[str]]], list[tuple[str, list[str]]]]:
    """(tensor dims as (name, mesh dims), partial markers as (reduce op, mesh dims)), syntax checked."""
    tokens = _tokens(text)
    if tokens.count("|") > 1:
        raise ValueError(f"layout {text!r} has {tokens.count('|')} '|'; write one, before all partial markers")
    split = tokens.index("|") if "|" in tokens else len(tokens)
    dims = _groups(text, tokens[:split])
    markers = _groups(text, tokens[split + 1 :])
    if split < len(tokens) and not markers:
        raise ValueError(f"layout {text!r}: '|' must be followed by markers such as 'sum(tp)'")
    for name, mesh_dims in markers:
        if name not in _REDUCE_ALIASES or not mesh_dims:
            raise ValueError(
                f"layout {text!r}: partial marker {name!r} must be one of {sorted(_REDUCE_ALIASES)} with "
                f"mesh dims in parentheses, e.g. 'sum(tp)'"
            )
    _check_dim_names([name for name, _ in dims], len(dims), text)
    return dims, [(_REDUCE_ALIASES[name], mesh_dims) for name, mesh_dims in markers]


def _groups(text: str, tokens: list[str]) -> list[tuple[str, list[str]]]:
    """``name [( mesh dims )]`` groups from a token list."""
    groups, i = [], 0
    while i < len(tokens):
        name = tokens[i]
        if name in "()":
            raise ValueError(f"layout {text!r}: unexpected {name!r}; parentheses follow a dim name, as in 'rows(dp)'")
        mesh_dims, i = [], i + 1
        if i < len(tokens) and tokens[i] == "(":
            close = tokens.index(")", i) if ")" in tokens[i:] else -1
            mesh_dims = tokens[i + 1 : close]
            if close < 0 or not mesh_dims or "(" in mesh_dims:
                raise ValueError(f"layout {text!r}: '{name}(' needs one or more mesh dims and a closing ')'")
            i = close + 1
        groups.append((name, mesh_dims))
    return groups


def _check_dim_names(dim_names: Sequence[str], ndim: int, text: str | None = None) -> list[str]:
    where = f"layout {text!r}: " if text is not None else ""
    dim_names = list(dim_names)
    if len(dim_names) != ndim:
        raise ValueError(f"{where}{len(dim_names)} dim names {dim_names} for a tensor with {ndim} dims")
    bad = [d for d in dim_names if not isinstance(d, str) or not _NAME.match(d)]
    if bad:
        raise ValueError(f"{where}tensor dim names must be identifiers (as in einops); got {bad}")
    if len(set(dim_names)) != len(dim_names):
        raise ValueError(f"{where}tensor dim names {dim_names} repeat; give each tensor dim its own name")
    return dim_names


def _format_ndim(placements, dim_names, ndim) -> int:
    if dim_names is not None:
        if ndim is not None and len(dim_names) != ndim:
            raise ValueError(f"{len(dim_names)} dim names {list(dim_names)} for ndim={ndim}")
        return len(dim_names)
    if ndim is not None:
        return ndim
    dims = [p.dim for p in placements if p.is_shard() or p.is_strided_shard()]
    if any(d < 0 for d in dims):
        raise ValueError(f"placements {list(placements)} have a negative Shard dim; pass ndim= or dim_names=")
    return max(dims, default=-1) + 1


def _raise_nesting_order(text: str, dim_name: str, mesh_dims: list[str], names: tuple[str, ...]):
    in_order = sorted(mesh_dims, key=names.index)
    raise ValueError(
        f"layout {text!r}: '{dim_name}({' '.join(mesh_dims)})' asks {mesh_dims[0]!r} to split first, but mesh dims "
        f"on one tensor dim nest in mesh-dim order {names} (the earlier mesh dim splits first). Write "
        f"'{dim_name}({' '.join(in_order)})' for that nesting, or, to split by {mesh_dims[0]!r} first, build the "
        f"mesh with mesh_dim_names listing {' before '.join(repr(m) for m in mesh_dims)}"
    )
