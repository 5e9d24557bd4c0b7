"""2-D (Optimus/SUMMA), 2.5-D (Tesseract) and 3-D (Bian et al.) tensor parallelism equal to one device.

- SUMMA's three forms (ops/summa.py) on a 2x2 square, sizes the mesh does not divide and an empty block: values
  equal ``torch.mm``, and the bytes each rank sends equal the algorithm's count from its blocks (a broadcast's
  root sends its block once, a reduce's every non-root its partial product).
- A linear + layer norm on the grid: outputs, parameter gradients and the input's gradient equal one device;
  layer norm all-reduces row statistics, never gathers; the errors (a batch the grid does not divide, a layer
  run outside ``tensor_parallel_2d()``, a non-square grid) say what to change.
- examples/gpt.py's GPT (examples/gpt_tensor_nd.py's plans) two AdamW steps: losses, first-step gradients
  and final parameters equal one device, on 2-D q=2 (4 ranks, default), 2-D with 3 heads (q does not divide
  them), 2.5-D q=2 d=2 and 3-D q=2 (8 ranks) (``-m slow``); the 3-D run also checks one linear layer's bytes
  against (q-1)/q^3 (|x| + |W| + |y|) and that a batch q^2 does not divide is refused, naming the fix.
"""

import copy
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, distribute_tensor
from dtensor_plus.collectives import comm_mode
from dtensor_plus.layouts import loss_parallel, parallelize_module
from dtensor_plus.layouts.tensor_2d import Grid2D, LayerNorm2D, Linear2D, tensor_parallel_2d
from dtensor_plus.layouts.tensor_3d import Cube3D, Linear3D, tensor_parallel_3d
from dtensor_plus.mesh import init_device_mesh
from dtensor_plus.placements import Shard, chunk_bounds
from dtensor_plus.testing import run_on_ranks

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

from gpt import GPT, PRESETS  # noqa: E402
from gpt_tensor_nd import plan_2d, plan_3d  # noqa: E402

TOL = 1e-5
S0, S1 = Shard(0), Shard(1)
FORMS = {"NN": ((S0, S1), (S0, S1)), "NT": ((S0, S1), (S1, S0)), "TN": ((S1, S0), (S0, S1))}


def _blocks(size: int, q: int = 2) -> list[int]:
    return [chunk_bounds(size, q, p)[1] for p in range(q)]


def _expected_bytes(form: str, m: int, k: int, n: int, i: int, j: int) -> int:
    """What rank (i, j) sends in one SUMMA call, from the blocks: float32."""
    rows, cols, inner = _blocks(m), _blocks(n), _blocks(k)
    if form == "NN":  # A(i, j) and B(i, j) once each as root
        return 4 * (rows[i] * inner[j] + inner[i] * cols[j])
    if form == "NT":  # B (k: col, n: row) block (j, i) as root; C(i, p) partials for every p != j
        return 4 * (inner[j] * cols[i] + sum(rows[i] * cols[p] for p in range(2) if p != j))
    return 4 * (rows[j] * inner[i] + sum(rows[p] * cols[j] for p in range(2) if p != i))  # TN


def _summa_forms(sizes):
    """Rank function: per (form, sizes), (max |error|, bytes sent, expected bytes, collectives seen)."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("row", "col"))
    i, j = mesh.get_coordinate()
    out = []
    for m, k, n in sizes:
        torch.manual_seed(m * k * n)
        a, b = torch.randn(m, k), torch.randn(k, n)
        for form, (a_at, b_at) in FORMS.items():
            da, db = distribute_tensor(a, mesh, a_at), distribute_tensor(b, mesh, b_at)
            with tensor_parallel_2d(), comm_mode() as comm:
                c = torch.mm(da, db)
            assert tuple(c.placements) == (S0, S1), (form, c.placements)
            error = (c.full_tensor() - a @ b).abs().max().item()
            out.append((form, error, comm.bytes(), _expected_bytes(form, m, k, n, i, j), sorted(comm.counts)))
    return out


def _check_summa(sizes):
    for rank_result in run_on_ranks(4, _summa_forms, sizes):
        for form, error, sent, expected, seen in rank_result:
            assert error <= TOL, (form, error)
            assert sent == expected, (form, sent, expected)
            assert {name for name, _ in seen} <= {"broadcast", "reduce"}, (form, seen)


def test_summa_forms_equal_mm_and_send_the_algorithms_bytes():
    _check_summa([(5, 7, 3), (4, 1, 6)])  # uneven blocks; k = 1 leaves an empty panel


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(st.lists(st.tuples(*[st.integers(1, 9)] * 3), min_size=1, max_size=4))
def test_summa_forms_on_any_sizes(sizes):
    _check_summa(sizes)


class _LinearNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.ln = nn.Linear(6, 10), nn.LayerNorm(10)

    def forward(self, x):
        return self.ln(F.gelu(self.fc(x)))


def _linear_norm_and_errors():
    """Rank function: (output, parameter-gradient and input-gradient errors, collectives, error messages)."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("row", "col"))
    torch.manual_seed(0)
    model, x = _LinearNorm(), torch.randn(4, 3, 6)
    reference = copy.deepcopy(model)
    parallelize_module(model, mesh, {"fc": Linear2D(), "ln": LayerNorm2D()})
    grid = Grid2D()
    dx = distribute_tensor(x, mesh, grid.activation(mesh, 3)).requires_grad_()
    with tensor_parallel_2d(), comm_mode() as comm:
        y = model(dx)
        (y * y).sum().backward()
    x_ref = x.clone().requires_grad_()
    y_ref = reference(x_ref)
    (y_ref * y_ref).sum().backward()
    ref_grads = dict(reference.named_parameters())
    errors = {"out": (y.full_tensor() - y_ref).abs().max().item(),
              "x.grad": (dx.grad.full_tensor() - x_ref.grad).abs().max().item()}
    errors.update({n: (p.grad.full_tensor() - ref_grads[n].grad).abs().max().item()
                   for n, p in model.named_parameters()})
    odd_batch = distribute_tensor(torch.randn(3, 3, 6), mesh, grid.activation(mesh, 3))
    narrow = init_device_mesh("cpu", (1, 4), mesh_dim_names=("row", "col"))
    messages = [_message(lambda: _in_2d(model, odd_batch)), _message(lambda: model(dx)),  # outside the block
                _message(lambda: grid.placements(narrow, S0, S1, S0))]
    return errors, sorted({name for name, _ in comm.counts}), messages


def _in_2d(model, x):
    with tensor_parallel_2d():
        return model(x)


def _message(fn) -> str | None:
    try:
        fn()
    except (ValueError, RuntimeError) as error:
        return str(error)
    return None


def test_linear_and_norm_on_the_grid_equal_one_device_and_errors_name_the_fix():
    errors, collectives, messages = run_on_ranks(4, _linear_norm_and_errors)[0]
    assert max(errors.values()) <= TOL, errors
    assert set(errors) == {"out", "x.grad", "fc.weight", "fc.bias", "ln.weight", "ln.bias"}
    assert "all_gather" not in collectives, collectives  # layer norm all-reduces statistics, never gathers
    assert None not in messages, messages
    assert "batch (3) must divide by the 2 ranks" in messages[0]
    assert "outside `with tensor_parallel_2d(" in messages[1]
    assert "SUMMA needs a square" in messages[2]


# -- a GPT, a few training steps ----------------------------------------------------------------------------

CONFIG = PRESETS["debug"].replace(dim=12, num_heads=2, vocab_size=13)  # vocab 13: uneven blocks on every grid
STEPS, BATCH, LR = 2, 4, 1e-3
SCHEMES = {  # name: (world, mesh shape, mesh dim names)
    "2d": (4, (2, 2), ("row", "col")),
    "2d-3-heads": (4, (2, 2), ("row", "col")),  # a head count q does not divide: exact, heads gathered
    "2.5d": (8, (2, 2, 2), ("depth", "row", "col")),
    "3d": (8, (2, 2, 2), ("seq", "batch", "hidden")),
}


def _batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, CONFIG.vocab_size, (BATCH, 8), generator=g) for _ in range(STEPS)]


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _train(model, batches, step):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=True)
    losses, first_grads = [], None
    for window in batches:
        loss = step(model, window[:, :-1], window[:, 1:])
        if first_grads is None:
            first_grads = {n: _full(p.grad) for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(_full(loss).item())
    return losses, first_grads


def _one_device_step(model, tokens, targets):
    loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(0, 1))
    loss.backward()
    return loss


def _run_gpt(scheme: str):
    """Rank function: (max loss diff, max first-step gradient diff, max final parameter diff, 3-D bytes check)."""
    _, shape, names = SCHEMES[scheme]
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    config = CONFIG.replace(attention="sdpa") if scheme == "3d" else CONFIG  # see layouts/tensor_3d.py
    config = config.replace(num_heads=3) if scheme == "2d-3-heads" else config
    torch.manual_seed(0)
    model = GPT(config)
    reference = copy.deepcopy(model)
    if scheme == "3d":
        cube = Cube3D()
        parallelize_module(model, mesh, plan_3d(cube))
        scope, targets_at = tensor_parallel_3d, cube.targets(mesh)
    else:
        grid = Grid2D(depth_mesh_dim="depth" if scheme == "2.5d" else None)
        parallelize_module(model, mesh, plan_2d(grid))
        scope, targets_at = (lambda: tensor_parallel_2d(grid)), grid.tokens(mesh)
    dtp.distribute_module(model, mesh)  # the causal mask buffer, replicated

    def step(model, tokens, targets):
        with scope(), loss_parallel():
            logits = model(tokens)
            targets = distribute_tensor(targets, mesh, targets_at, src_data_rank=None)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(0, 1))
            loss.backward()
        return loss

    losses, grads = _train(model, _batches(), step)
    ref_losses, ref_grads = _train(reference, _batches(), _one_device_step)
    ref_params = dict(reference.named_parameters())
    return (max(abs(a - b) for a, b in zip(losses, ref_losses)),
            max((grads[n] - ref_grads[n]).abs().max().item() for n in grads),
            max((_full(p) - ref_params[n]).abs().max().item() for n, p in model.named_parameters()),
            _linear_3d_bytes(mesh) if scheme == "3d" else None)


def _linear_3d_bytes(mesh):
    """(bytes one "in" Linear3D sends in forward, in backward, and (q-1)/q^3 (|x| + |W| + |y|) in bytes)."""
    B, T, D, F_ = 4, 6, 8, 12
    layer = nn.Linear(D, F_, bias=False)
    cube = Cube3D()
    parallelize_module(layer, mesh, Linear3D("in", cube))
    x = distribute_tensor(torch.randn(B, T, D), mesh, cube.residual(mesh)).requires_grad_()
    with comm_mode() as forward:
        y = layer(x)
    grad = distribute_tensor(torch.randn(B, T, F_), mesh, y.placements)
    with comm_mode() as backward:
        y.backward(grad)
    q = 2
    message = _message(lambda: layer(distribute_tensor(torch.randn(2, T, D), mesh, cube.residual(mesh))))
    assert message is not None and "must divide by q^2 = 4" in message, message
    return forward.bytes(), backward.bytes(), 4 * (q - 1) * (B * T * D + F_ * D + B * T * F_) // q**3


GPT_CASES = [pytest.param(name, id=name, marks=() if name == "2d" else pytest.mark.slow) for name in SCHEMES]


@pytest.mark.parametrize("scheme", GPT_CASES)
def test_gpt_trains_like_one_device(scheme):
    world = SCHEMES[scheme][0]
    for loss_diff, grad_diff, param_diff, bytes_3d in run_on_ranks(world, _run_gpt, scheme, timeout=300.0):
        assert loss_diff <= TOL and grad_diff <= TOL and param_diff <= TOL, (loss_diff, grad_diff, param_diff)
        if bytes_3d is not None:
            forward, backward, formula = bytes_3d
            assert forward == formula and backward == formula, bytes_3d
