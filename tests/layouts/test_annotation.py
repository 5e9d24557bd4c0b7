"""Layout annotations: parse/format round trips and errors (no ranks), and einops on DTensors (2 and 4 ranks):
equal to one device in outputs and gradients, with the output layout and the collectives the theory gives."""

import re

import einops
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.layouts.annotation import format_layout, layout_of, parse_layout
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks

DP_TP = ("dp", "tp")

# -- parsing and formatting, no ranks -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, mesh, expected",
    [
        ("batch(dp) seq(sp) hidden", ("dp", "sp"), (Shard(0), Shard(1))),
        ("vocab(tp) hidden", DP_TP, (Replicate(), Shard(0))),
        ("rows(dp tp) cols", DP_TP, (Shard(0), Shard(0))),
        ("rows cols(dp tp)", DP_TP, (Shard(1), Shard(1))),
        ("rows cols | partial(tp)", DP_TP, (Replicate(), Partial())),
        ("x | sum(tp) max(dp)", DP_TP, (Partial("max"), Partial("sum"))),
        ("  a(tp)  b |avg(dp)", DP_TP, (Partial("avg"), Shard(0))),
        ("", DP_TP, (Replicate(), Replicate())),
        ("| min(dp tp)", DP_TP, (Partial("min"), Partial("min"))),
        ("rows(0) cols(1)", ("0", "1"), (Shard(0), Shard(1))),
    ],
)
def test_parse_examples(text, mesh, expected):
    assert parse_layout(text, mesh) == expected


def test_format_examples():
    assert format_layout((Shard(0), Shard(0)), DP_TP, ["rows", "cols"]) == "rows(dp tp) cols"
    assert format_layout((Replicate(), Shard(1)), DP_TP) == "d0 d1(tp)"
    assert format_layout((Replicate(), Shard(-1)), DP_TP, ndim=3) == "d0 d1 d2(tp)"
    assert format_layout((Partial(), Shard(0)), DP_TP, ["v", "h"]) == "v(tp) h | sum(dp)"
    assert format_layout((Replicate(), Replicate()), DP_TP, ndim=0) == ""


@pytest.mark.parametrize(
    "text, ndim, match",
    [
        ("rows(tp dp) cols", None, r"nest in mesh-dim order.*'rows\(dp tp\)'.*'tp' before 'dp'"),
        ("rows(dp) cols(dp)", None, "'dp' is named twice"),
        ("rows(dp) | sum(dp)", None, "'dp' is named twice"),
        ("rows(pp)", None, r"unknown mesh dim 'pp'; this mesh has dims \('dp', 'tp'\)"),
        ("x | sum(ep)", None, "unknown mesh dim 'ep'"),
        ("rows cols", 3, "names 2 tensor dims.*expected 3"),
        ("a a", None, "repeat"),
        ("1a", None, "identifiers"),
        ("rows(", None, "closing"),
        ("rows() cols", None, "one or more mesh dims"),
        ("(dp) cols", None, "unexpected '\\('"),
        ("rows(dp)) cols", None, "unexpected '\\)'"),
        ("rows | sum", None, "partial marker 'sum'"),
        ("rows | scatter(tp)", None, "partial marker 'scatter'"),
        ("rows |", None, "must be followed by markers"),
        ("a | sum(dp) | max(tp)", None, "2 '\\|'"),
    ],
)
def test_parse_errors(text, ndim, match):
    with pytest.raises(ValueError, match=match):
        parse_layout(text, DP_TP, ndim=ndim)


def test_format_errors():
    with pytest.raises(ValueError, match="1 placements"):
        format_layout((Shard(0),), DP_TP)
    with pytest.raises(ValueError, match="negative Shard dim; pass ndim"):
        format_layout((Shard(-1), Replicate()), DP_TP)
    with pytest.raises(ValueError, match="out of range"):
        format_layout((Shard(2), Replicate()), DP_TP, ["a", "b"])
    with pytest.raises(TypeError, match="DeviceMesh or a sequence"):
        parse_layout("a", 3)


_IDENT = st.from_regex(r"[a-z_][a-z0-9_]{0,5}", fullmatch=True)


@st.composite
def _annotated(draw):
    """(mesh dim names, tensor dim names, placements): 1-3 named mesh dims, placements nested in mesh order."""
    mesh = draw(st.lists(_IDENT, min_size=1, max_size=3, unique=True))
    dim_names = draw(st.lists(_IDENT, min_size=0, max_size=4, unique=True))
    options = [st.just(Replicate()), st.sampled_from(["sum", "avg", "max", "min"]).map(Partial)]
    if dim_names:
        options.append(st.integers(0, len(dim_names) - 1).map(Shard))
    placements = draw(st.tuples(*[st.one_of(options)] * len(mesh)))
    return tuple(mesh), dim_names, placements


@given(_annotated())
def test_round_trip(case):
    mesh, dim_names, placements = case
    text = format_layout(placements, mesh, dim_names)
    assert parse_layout(text, mesh, ndim=len(dim_names)) == placements
    assert format_layout(parse_layout(text, mesh), mesh, dim_names) == text
    default = format_layout(placements, mesh, ndim=len(dim_names))
    assert parse_layout(default, mesh) == placements


@given(st.permutations(["dp", "tp", "sp"]))
def test_nesting_must_follow_mesh_order(order):
    text = f"rows({' '.join(order)}) cols"
    if list(order) == ["dp", "tp", "sp"]:
        assert parse_layout(text, ("dp", "tp", "sp")) == (Shard(0),) * 3
    else:
        with pytest.raises(ValueError, match="nest in mesh-dim order"):
            parse_layout(text, ("dp", "tp", "sp"))


# -- einops on DTensors ---------------------------------------------------------------------------------

# (einops function, pattern, keyword args, output layout; None where the theory requires a collective).
TP_CASES = [  # x: "b t d(tp)", shape (2, 3, 8) on a 2-rank mesh
    ("rearrange", "b t (h k) -> b t h k", {"h": 2}, "b t h(tp) k"),
    ("rearrange", "b t (h k) -> b h t k", {"h": 2}, "b h(tp) t k"),
    ("rearrange", "b t d -> (b t) d", {}, "bt d(tp)"),
    ("reduce", "b t d -> b t", {"reduction": "sum"}, "b t | sum(tp)"),
    ("reduce", "b t d -> b d", {"reduction": "mean"}, "b d(tp)"),
    ("repeat", "b t d -> b r t d", {"r": 3}, "b r t d(tp)"),
    ("rearrange", "b t (h k) -> b t h k", {"h": 3, "k": 2}, None),  # d=6: 3 columns a rank, heads of 2: gather
]
DP_TP_CASES = [  # x: "b(dp) t d(tp)", shape (4, 3, 8) on a 2 x 2 mesh
    ("rearrange", "b t (h k) -> b h t k", {"h": 2}, "b(dp) h(tp) t k"),
    ("rearrange", "b t d -> (b t) d", {}, "bt(dp) d(tp)"),
    ("reduce", "b t d -> b", {"reduction": "sum"}, "b(dp) | sum(tp)"),
    ("reduce", "b t d -> b d", {"reduction": "mean"}, "b(dp) d(tp)"),
    ("repeat", "b t d -> b t d r", {"r": 2}, "b(dp) t d(tp) r"),
    ("repeat", "b t d -> b (t r) d", {"r": 2}, "b(dp) tr d(tp)"),
]
NESTED_CASES = [  # x: "b t d(dp tp)", shape (2, 3, 8): each rank holds one head of 2 columns
    ("rearrange", "b t (h k) -> b h t k", {"h": 4}, "b h(dp tp) t k"),
    ("reduce", "b t d -> t d", {"reduction": "mean"}, "t d(dp tp)"),
    ("reduce", "b t d -> b t", {"reduction": "max"}, "b t | max(dp tp)"),
]


def _check_einops(mesh_shape, layout, shape, cases):
    mesh = dtp.init_device_mesh("cpu", mesh_shape, mesh_dim_names=DP_TP[-len(mesh_shape):])
    whole = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    x = dtp.distribute_tensor(whole, mesh, parse_layout(layout, mesh, ndim=len(shape)))
    assert layout_of(x, ["b", "t", "d"]) == layout
    for kind, pattern, kwargs, expected in cases:
        fn = lambda t: getattr(einops, kind)(t, pattern, **kwargs)  # noqa: E731
        with dtp.comm_mode() as comm:
            y = fn(x)
        assert not comm.fallbacks, f"{kind} {pattern!r} fell back: {comm}"
        if expected is not None:
            names = re.sub(r"\(.*?\)", "", expected.split("|")[0]).split()
            assert layout_of(y, names) == expected, f"{kind} {pattern!r}: {layout_of(y, names)}"
            assert comm.count() == 0, f"{kind} {pattern!r} ran collectives: {comm}"
        assert_spmd_equal(fn, x)


def test_einops_tp_2_ranks():
    run_on_ranks(2, _check_einops, (2,), "b t d(tp)", (2, 3, 8), TP_CASES[:-1])
    run_on_ranks(2, _check_einops, (2,), "b t d(tp)", (2, 3, 6), TP_CASES[-1:])


def test_einops_sharded_time_2_ranks():
    # t=3 on 2 ranks is uneven: the mean over it must divide by 3, not average per-rank means
    cases = [("reduce", "b t d -> b d", {"reduction": "mean"}, None), ("rearrange", "b t d -> b d t", {}, "b d t(tp)")]
    run_on_ranks(2, _check_einops, (2,), "b t(tp) d", (2, 3, 4), cases)


def test_einops_dp_tp_4_ranks():
    run_on_ranks(4, _check_einops, (2, 2), "b(dp) t d(tp)", (4, 3, 8), DP_TP_CASES)
    run_on_ranks(4, _check_einops, (2, 2), "b t d(dp tp)", (2, 3, 8), NESTED_CASES)
