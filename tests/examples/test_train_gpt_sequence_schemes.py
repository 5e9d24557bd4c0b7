"""Issue 21: examples/gpt.py's GPT trains under every sequence-parallel scheme equal to one device.

The schemes are examples/gpt_layouts.py's ``Layout(cp=..., cp_kind=..., cp_balance=...)``: the ring balanced
"striped" (token t on rank t mod cp) or "distflash" (plain Shard, the idle ranks take far causal blocks),
"usp" (Ulysses inside the ring, cp split 2 x 2), "double_ring" (inner ring inside an outer one, 2 x 2) and
"loongtrain" (Ulysses inside the double ring, 2 x 2 x 2). Each trains a few AdamW steps (dropout on) through
train_gpt.compare_with_single: every step's loss and every final parameter within 1e-5 of one process, no op
falls back, and the scheme's own collectives ran (so a scheme that silently gathered the sequence instead
would fail). Two sequences a step under every scheme: a sequence split over several mesh dims folds through
nn.Linear's (B, T) -> (B*T) with no all-gather (only strict mode's one-device dropout draws and the checks
outside ops gather). tests/examples/test_train_gpt_layouts.py covers ring, zigzag and Ulysses over 20 steps.
"""

import sys
from pathlib import Path

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import DTensor
from dtensor_plus.testing import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import train_gpt  # noqa: E402
from gpt import PRESETS  # noqa: E402
from gpt_layouts import CP_MESH_DIMS, Layout, cp_shape, make_mesh, place_batch  # noqa: E402

STEPS, BATCH, SEED, LR, TOL = 3, 2, 0, 1e-3, 1e-5
CONFIG = PRESETS["debug"].replace(dropout=0.1, attention="sdpa")  # T=8, 4 heads
# 6 tokens on 2 x 2 (ring blocks of 3, split 2 + 1 by Ulysses) and 3 heads on 2 Ulysses ranks: nothing divides
UNEVEN = CONFIG.replace(block_size=6, num_heads=3, dim=12)

DOUBLE_RING = {("ring_shift", "inner"), ("ring_shift", "outer")}
# name: (layout, config, {(collective, mesh dim) that must have run})
SCHEMES = {
    "cp4-striped": (Layout(cp=4, cp_balance="striped"), CONFIG, {("ring_shift", "cp")}),
    "cp4-usp-uneven": (Layout(cp=4, cp_kind="usp"), UNEVEN, {("ring_shift", "ring"), ("all_to_all", "ulysses")}),
    "cp4-distflash": (Layout(cp=4, cp_balance="distflash"), CONFIG, {("ring_shift", "cp")}),
    "cp4-double-ring": (Layout(cp=4, cp_kind="double_ring"), CONFIG, DOUBLE_RING),
    "cp4-double-ring-uneven": (Layout(cp=4, cp_kind="double_ring"), UNEVEN.replace(block_size=7), DOUBLE_RING),
    "tp2-cp2-striped": (Layout(tp=2, cp=2, cp_balance="striped"), CONFIG, {("ring_shift", "cp")}),
    "tp2-cp2-distflash": (Layout(tp=2, cp=2, cp_balance="distflash"), CONFIG, {("ring_shift", "cp")}),
    # T = 7 = block_size: zigzag pieces of 1 and 0 tokens, the position table sliced whole (the slice keeps the zigzag)
    "cp4-zigzag-uneven": (Layout(cp=4, cp_balance="zigzag"), UNEVEN.replace(block_size=7), {("ring_shift", "cp")}),
}
DEFAULT = ("cp4-striped", "cp4-usp-uneven")  # the rest are slow: each one costs a 4-rank GPT run
LOONGTRAIN = (Layout(cp=8, cp_kind="loongtrain"), CONFIG, DOUBLE_RING | {("all_to_all", "ulysses")})


def _batches(config):
    """BATCH sequences a step."""
    data = torch.randint(0, config.vocab_size, (4096,), generator=torch.Generator().manual_seed(SEED))
    return list(train_gpt.batches(data, STEPS, BATCH, config.block_size, SEED))


# What may all-gather: strict mode's dropout (drawn whole, as one device would) and code outside any op
# (the comparison's full_tensor calls). A view, linear or attention op that gathered the sequence would not.
MAY_GATHER = {"None", "aten.bernoulli_.float"}


def _train(names, schemes):
    """Each named scheme trained on this group: (name, losses apart, parameters apart, fallbacks, collectives)."""
    out = []
    for name in names:
        layout, config, _ = schemes[name]
        with dtp.comm_mode() as comm:
            result = train_gpt.compare_with_single(config, layout, _batches(config), lr=LR, seed=SEED)
        loss_diff = max(abs(a - b) for a, b in zip(result.mesh_losses, result.single_losses))
        ran = {(kind, dim) for kind, dim in schemes[name][2] if comm.count(kind, dim) > 0}
        gathered = {str(op) for op, kind, _ in comm.by_op if kind == "all_gather"}
        out.append((name, len(result.mesh_losses), loss_diff, result.max_param_diff, dict(comm.fallbacks), ran,
                    gathered))
    return out


def _check(results, schemes):
    for name, steps, loss_diff, param_diff, fallbacks, ran, gathered in results:
        assert steps == STEPS, name
        assert not fallbacks, (name, fallbacks)
        assert gathered <= MAY_GATHER, (name, "gathered by", gathered - MAY_GATHER)
        assert ran == schemes[name][2], (name, "expected collectives missing", schemes[name][2] - ran)
        assert loss_diff <= TOL and param_diff <= TOL, (name, loss_diff, param_diff)


def _striped_tokens_land(world):
    """Striped places token t on cp rank t mod cp; zigzag pieces r and 2cp-1-r; distflash plain blocks."""
    tokens = torch.arange(2 * 8).reshape(2, 8)
    mesh = make_mesh(Layout(cp=world))
    rank = mesh.get_local_rank("cp")
    local = {balance: place_batch(tokens, mesh, balance).to_local()[0].tolist()
             for balance in ("striped", "zigzag", "distflash", True)}
    assert local["striped"] == list(range(rank, 8, world)), local
    assert local["zigzag"] == local[True] == [rank, 2 * world - 1 - rank], local
    assert local["distflash"] == [2 * rank, 2 * rank + 1], local
    usp = make_mesh(Layout(cp=world, cp_kind="usp"))
    assert usp.mesh_dim_names == ("ring", "ulysses") and tuple(usp.shape) == (2, 2), usp
    placed = place_batch(tokens, usp)
    assert isinstance(placed, DTensor) and placed.full_tensor().equal(tokens)


def _default_group():
    _striped_tokens_land(4)
    return _train(DEFAULT, SCHEMES)


def test_gpt_trains_like_one_device_striped_and_usp():
    _check(run_on_ranks(4, _default_group, timeout=180.0)[0], SCHEMES)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SCHEMES if n not in DEFAULT])
def test_gpt_trains_like_one_device_under_scheme(name):
    _check(run_on_ranks(SCHEMES[name][0].world, _train, [name], SCHEMES, timeout=180.0)[0], SCHEMES)


@pytest.mark.slow
def test_gpt_trains_like_one_device_loongtrain_on_8_ranks():
    schemes = {"cp8-loongtrain": LOONGTRAIN}
    _check(run_on_ranks(8, _train, ["cp8-loongtrain"], schemes, timeout=300.0)[0], schemes)


def test_layout_names_the_schemes_and_refuses_what_cannot_run(capsys):
    assert Layout(cp=4, cp_balance=True).cp_balance == "zigzag"  # the old bool
    assert Layout(cp=4, cp_balance=False).cp_balance == "none"
    assert set(CP_MESH_DIMS) == {"ring", "ulysses", "usp", "double_ring", "loongtrain"}
    assert cp_shape(4, "usp") == (2, 2) and cp_shape(8, "double_ring") == (2, 4)
    assert cp_shape(8, "loongtrain") == (2, 2, 2) and cp_shape(12, "loongtrain") == (2, 2, 3)
    assert str(Layout(cp=4, cp_kind="usp")).endswith("cp=4 (usp on 2 x 2)")
    with pytest.raises(ValueError, match="cp=3 has no such split; use cp=4"):
        Layout(cp=3, cp_kind="usp")
    with pytest.raises(ValueError, match="cp=4 has no such split; use cp=8"):
        Layout(cp=4, cp_kind="loongtrain")
    with pytest.raises(ValueError, match="balances ring attention's causal work"):
        Layout(cp=4, cp_kind="double_ring", cp_balance="striped")
    with pytest.raises(ValueError, match="cp_balance must be one of"):
        Layout(cp=4, cp_balance="ring")
    with pytest.raises(ValueError, match="cp_kind must be one of"):
        Layout(cp=4, cp_kind="tree")
    args = train_gpt.parse_args(["--cp", "1", "--cp-kind", "usp"])
    assert args.layout.cp_kind == "usp" and args.cp_balance == "none"
    with pytest.raises(SystemExit):  # the old flag form, alone, still means zigzag (which needs cp > 1)
        train_gpt.parse_args(["--cp-balance", "--cp", "1"])
    assert "cp_balance='zigzag' balances ring attention" in capsys.readouterr().err


@given(cp=st.integers(2, 200), kind=st.sampled_from(sorted(CP_MESH_DIMS)))
def test_cp_splits_over_the_kinds_mesh_dims(cp, kind):
    """cp_shape: as many factors as the kind has mesh dims, each > 1, outer ones no larger, multiplying to cp;
    or a ValueError only when no such split exists (checked by brute force)."""
    count = len(CP_MESH_DIMS[kind])

    def splits(size, parts):
        if parts == 1:
            return size > 1
        return any(size % d == 0 and splits(size // d, parts - 1) for d in range(2, size))

    if not splits(cp, count):
        with pytest.raises(ValueError, match=f"cp={cp} has no such split"):
            cp_shape(cp, kind)
        return
    shape = cp_shape(cp, kind)
    assert len(shape) == count and math.prod(shape) == cp and min(shape) > 1, shape
    assert list(shape) == sorted(shape), shape
