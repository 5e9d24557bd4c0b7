"""Matrix product rules (ops/matrix.py): the rule's choices as pure metadata, then forward and backward against
one device on real gloo ranks (mm, bmm, the add* forms, dot, mv, matmul of 1-D..4-D operands, F.linear,
einsum), the collective counts of the classic layouts, and the issue's dp x tp example end to end."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard, comm_mode
from dtensor_plus.rules import rule_for
from dtensor_plus.testing.rules import decide
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for

aten = torch.ops.aten
R = Replicate()

# ---------------------------------------------------------------- the rule as a pure function


def _decide(func, *args, **kwargs):
    inputs, outputs = decide(func, *args, **kwargs)
    return inputs, outputs[0]


def test_rule_keeps_the_classic_layouts():
    assert _decide(aten.mm.default, ((8, 16), (Shard(0),)), ((16, 32), (R,))) == ([(Shard(0),), (R,)], (Shard(0),))
    assert _decide(aten.mm.default, ((8, 16), (R,)), ((16, 32), (Shard(1),))) == ([(R,), (Shard(1),)], (Shard(1),))
    assert _decide(aten.mm.default, ((8, 16), (Shard(1),)), ((16, 32), (Shard(0),))) == (
        [(Shard(1),), (Shard(0),)], (Partial(),))
    assert _decide(aten.mm.default, ((8, 16), (R,)), ((16, 32), (R,))) == ([(R,), (R,)], (R,))
    # 2-D mesh, chosen jointly: dp on rows, tp on the contraction
    ins, out = _decide(aten.mm.default, ((8, 16), (Shard(0), Shard(1))), ((16, 32), (R, Shard(0))), mesh_shape=(2, 2))
    assert ins == [(Shard(0), Shard(1)), (R, Shard(0))] and out == (Shard(0), Partial())
    ins, out = _decide(aten.bmm.default, ((4, 8, 16), (Shard(0), R)), ((4, 16, 8), (Shard(0), Shard(2))), mesh_shape=(2, 2))
    assert ins == [(Shard(0), R), (Shard(0), Shard(2))] and out == (Shard(0), Shard(2))


def test_rule_partial_inputs():
    # Partial(avg) (linear) times Replicate stays Partial(avg); max/min are reduced; two Partials: at most one stays
    assert _decide(aten.mm.default, ((8, 16), (Partial("avg"),)), ((16, 32), (R,))) == (
        [(Partial("avg"),), (R,)], (Partial("avg"),))
    for op in ("max", "min"):
        ins, out = _decide(aten.mm.default, ((8, 16), (Partial(op),)), ((16, 32), (R,)))
        assert not ins[0][0].is_partial() and not out[0] == Partial(op)
    ins, out = _decide(aten.mm.default, ((8, 16), (Partial(),)), ((16, 32), (Partial(),)))
    assert sum(p[0].is_partial() for p in ins) <= 1
    assert _decide(aten.dot.default, ((16,), (Shard(0),)), ((16,), (Shard(0),))) == (
        [(Shard(0),), (Shard(0),)], (Partial(),))


def test_rule_bias_of_add_forms():
    # Partial output: a Replicate bias is partitioned (free), a Partial(sum) bias stays
    ins, out = _decide(aten.addmm.default, ((32,), (R,)), ((8, 16), (Shard(1),)), ((16, 32), (Shard(0),)))
    assert out == (Partial(),) and ins[0] == (Partial(),)
    # Shard output: the bias shards along, or stays Replicate where it broadcasts
    ins, out = _decide(aten.addmm.default, ((32,), (R,)), ((8, 16), (R,)), ((16, 32), (Shard(1),)))
    assert out == (Shard(1),) and ins[0] == (Shard(0),)
    ins, out = _decide(aten.addmm.default, ((1, 32), (R,)), ((8, 16), (Shard(0),)), ((16, 32), (R,)))
    assert out == (Shard(0),) and ins[0] == (R,)
    # A plain 0-d bias is added on every rank: no Partial output then
    ins, out = _decide(aten.addmm.default, torch.tensor(1.0), ((8, 16), (Shard(1),)), ((16, 32), (Shard(0),)))
    assert not out[0].is_partial()
    # in place: self's layout is kept when that is cheap
    ins, out = _decide(aten.addmm_.default, ((8, 32), (Shard(0),)), ((8, 16), (Shard(0),)), ((16, 32), (R,)))
    assert ins[0] == out == (Shard(0),)


# ---------------------------------------------------------------- on ranks: the ops themselves

PRODUCTS = {  # name: einsum equation of the product, whether it adds a bias
    "mm": ("mk,kn->mn", False), "bmm": ("bmk,bkn->bmn", False), "dot": ("k,k->", False),
    "vdot": ("k,k->", False), "mv": ("mk,k->m", False), "addmm": ("mk,kn->mn", True),
    "baddbmm": ("bmk,bkn->bmn", True), "addbmm": ("bmk,bkn->mn", True), "addmv": ("mk,k->m", True),
    "addr": ("m,n->mn", True),
}


def _whole(shape, seed, index):
    generator = torch.Generator().manual_seed(seed * 16 + index)
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def _dtensors(mesh_shape, shapes, layouts, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    return [make_dtensor(_whole(s, seed, i), mesh, p, requires_grad=True) for i, (s, p) in enumerate(zip(shapes, layouts))]


def check_product(mesh_shape, name, shapes, layouts, seed, beta, alpha, inplace):
    tensors = _dtensors(mesh_shape, shapes, layouts, seed)
    fn = getattr(torch, name)
    if PRODUCTS[name][1]:
        def call(bias, a, b):
            if inplace:
                return getattr(bias.clone(), name + "_")(a, b, beta=beta, alpha=alpha)
            return fn(bias, a, b, beta=beta, alpha=alpha)
    else:
        call = fn
    with comm_mode() as comm:
        call(*[t.detach() for t in tensors])
    assert not comm.fallbacks, comm
    # torch's own addmv backward fails for an empty matrix and a broadcast bias (the output takes its shape)
    quirk = name == "addmv" and 0 in shapes[1] and shapes[0] != shapes[1][:1]
    assert_spmd_equal(call, *tensors, backward=not quirk)


@st.composite
def products(draw, world_size):
    name = draw(st.sampled_from(sorted(PRODUCTS)))
    equation, has_bias = PRODUCTS[name]
    (lhs, out) = equation.split("->")
    sizes = {letter: draw(st.integers(0, 6)) for letter in "bmkn"}
    shapes = [tuple(sizes[c] for c in term) for term in lhs.split(",")]
    out_shape = tuple(sizes[c] for c in out)
    inplace = has_bias and draw(st.booleans())
    if has_bias:
        bias_shape = out_shape
        if not inplace:  # a broadcasting bias: fewer leading dims, some dims of size 1
            bias_shape = bias_shape[draw(st.integers(0, len(out_shape))):]
            bias_shape = tuple(1 if draw(st.booleans()) else s for s in bias_shape)
        shapes.insert(0, bias_shape)
    mesh_shape = draw(mesh_shapes(world_size))
    layouts = [draw(placements_for(len(s), len(mesh_shape), partial=True)) for s in shapes]
    beta, alpha = draw(st.sampled_from([(1, 1), (0.5, 2.0), (0, 1)]))
    return mesh_shape, name, shapes, layouts, draw(st.integers(0, 2**16)), beta, alpha, inplace


@pytest.mark.parametrize("world_size", [2, 3, 4])
@settings(max_examples=35)
@given(data=st.data())
def test_products(world_size, data):
    run_on_ranks(world_size, check_product, *data.draw(products(world_size)))


# ---------------------------------------------------------------- composites: matmul, linear, einsum


def check_composite(mesh_shape, kind, shapes, layouts, seed, extra):
    tensors = _dtensors(mesh_shape, shapes, layouts, seed)
    if kind == "matmul":
        fn = torch.matmul
    elif kind == "linear":
        fn = F.linear
    else:
        def fn(*operands):
            return torch.einsum(extra, *operands)
    assert_spmd_equal(fn, *tensors)


@st.composite
def matmuls(draw, world_size):
    m, k, n = (draw(st.integers(0, 5)) for _ in range(3))
    batch = [draw(st.integers(0, 3)) for _ in range(2)]
    a_ndim, b_ndim = draw(st.integers(1, 4)), draw(st.integers(1, 4))

    def batch_of(ndim):  # broadcastable batch dims: trailing part of ``batch``, some dims 1
        dims = batch[len(batch) - max(ndim - 2, 0):]
        return tuple(1 if draw(st.booleans()) else d for d in dims)

    a = (k,) if a_ndim == 1 else batch_of(a_ndim) + (m, k)
    b = (k,) if b_ndim == 1 else batch_of(b_ndim) + (k, n)
    return a, b


@st.composite
def composites(draw, world_size):
    kind = draw(st.sampled_from(["matmul", "linear", "einsum"]))
    extra = None
    if kind == "matmul":
        shapes = list(draw(matmuls(world_size)))
    elif kind == "linear":
        i, o = draw(st.integers(0, 5)), draw(st.integers(0, 5))
        lead = tuple(draw(st.lists(st.integers(0, 4), max_size=2)))
        shapes = [lead + (i,), (o, i)] + ([(o,)] if draw(st.booleans()) else [])
    else:
        extra = draw(st.sampled_from(["bij,bjk->bik", "ij,jk->ik", "bhqd,bhkd->bhqk"]))
        sizes = {c: draw(st.integers(0, 4)) for c in "bijkhqd"}
        shapes = [tuple(sizes[c] for c in term) for term in extra.split("->")[0].split(",")]
    mesh_shape = draw(mesh_shapes(world_size))
    layouts = [draw(placements_for(len(s), len(mesh_shape), partial=True)) for s in shapes]
    return mesh_shape, kind, shapes, layouts, draw(st.integers(0, 2**16)), extra


@pytest.mark.parametrize("world_size", [2, 3, 4])
@settings(max_examples=15)
@given(data=st.data())
def test_composites(world_size, data):
    run_on_ranks(world_size, check_composite, *data.draw(composites(world_size)))


# ---------------------------------------------------------------- collective counts


def classic_layouts():
    mesh = dtp.init_device_mesh("cpu", (2,))
    x, w = _whole((8, 16), 0, 0), _whole((16, 32), 0, 1)
    cases = [  # (x placements, w placements, output placements): all without a collective
        (Shard(0), R, Shard(0)), (R, Shard(1), Shard(1)), (Shard(1), Shard(0), Partial()),
    ]
    for px, pw, want in cases:
        dx, dw = dtp.distribute_tensor(x, mesh, [px]), dtp.distribute_tensor(w, mesh, [pw])
        with comm_mode() as comm:
            y = dx @ dw
        assert y.placements == (want,), (px, pw, y.placements)
        assert comm.count() == 0 and not comm.fallbacks, (px, pw, comm)
        torch.testing.assert_close(y.full_tensor(), x @ w)
    # one DTensor as both operands: each occurrence moves on its own
    q = _whole((5, 5), 0, 3)
    dq = dtp.distribute_tensor(q, mesh, [Shard(0)])
    torch.testing.assert_close((dq @ dq).full_tensor(), q @ q)
    # linear's addmm, colwise (weight rows sharded) and rowwise (weight columns sharded), with a bias
    b = _whole((32,), 0, 2)
    for px, pw, pb, want in [(R, Shard(1), Shard(0), Shard(1)), (Shard(1), Shard(0), R, Partial())]:
        dx, dw, db = (dtp.distribute_tensor(t, mesh, [p]) for t, p in [(x, px), (w, pw), (b, pb)])
        with comm_mode() as comm:
            y = torch.addmm(db, dx, dw)
        assert y.placements == (want,) and comm.count() == 0, (y.placements, comm)
        torch.testing.assert_close(y.full_tensor(), torch.addmm(b, x, w))
        # F.linear transposes the weight first (aten.t: a view rule, ops/views.py)
        if rule_for(aten.t.default) is not None:
            dwt = dtp.distribute_tensor(w.t().contiguous(), mesh, [Shard(1 - pw.dim)])
            with comm_mode() as comm:
                y = F.linear(dx, dwt, db)
            assert y.placements == (want,) and comm.count() == 0, (y.placements, comm)
    # complex vdot conjugates its first operand
    a = torch.randn(7, dtype=torch.complex128, generator=torch.Generator().manual_seed(3))
    c = torch.randn(7, dtype=torch.complex128, generator=torch.Generator().manual_seed(4))
    da, dc = dtp.distribute_tensor(a, mesh, [Shard(0)]), dtp.distribute_tensor(c, mesh, [Shard(0)])
    torch.testing.assert_close(torch.vdot(da, dc).full_tensor(), torch.vdot(a, c))


def test_classic_layouts_move_nothing():
    run_on_ranks(2, classic_layouts)


def issue_example():
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    x_whole, w_whole = _whole((8, 16), 1, 0).float(), _whole((16, 32), 1, 1).float()
    x = dtp.distribute_tensor(x_whole, mesh, [Shard(0), Replicate()])
    w = dtp.distribute_tensor(w_whole.clone().requires_grad_(True), mesh, [Replicate(), Shard(1)])
    with comm_mode() as comm:
        y = x @ w
    assert y.placements == (Shard(0), Shard(1)) and comm.count() == 0, (y.placements, comm)
    loss = (x @ w).relu().mean()
    loss.backward()
    w_single = w_whole.clone().requires_grad_(True)
    loss_single = (x_whole @ w_single).relu().mean()
    loss_single.backward()
    torch.testing.assert_close(loss.full_tensor(), loss_single)
    torch.testing.assert_close(w.grad.full_tensor(), w_single.grad)
    return dict(comm.fallbacks)


def test_issue_example_dp_tp():
    run_on_ranks(4, issue_example)
