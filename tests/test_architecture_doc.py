"""docs/architecture.md describes the code that is there, checked mechanically.

- every file the doc names in backticks exists, and every dotted name it gives of ours (``dispatch._decide``,
  ``DeviceMesh.row_ranks``, ``DISPATCHER.execute``) resolves;
- every module of ``dtensor_plus/`` and ``layouts/`` (and of their sub-packages) is named in it;
- the state section lists exactly the attributes of ``dtensor_plus.dispatcher.DISPATCHER``;
- the ``import-layers`` block is complete and every import in the code (module level or inside a function,
  read with ``ast``) points to a strictly lower layer: no cycle, no upward import;
- the worked rule example is correct: on a 2x2 mesh of real ranks, under ``override_rule``, it equals one device.
- the training step's trip communicates what the doc says (counted by ``comm_mode`` on a 2x2 mesh).

Rerun after moving an import or a module: ``.venv/bin/python -m pytest tests/test_architecture_doc.py -q``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dtensor_plus
from dtensor_plus.dispatcher import DISPATCHER
from dtensor_plus.testing import run_on_ranks

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
CORE = ROOT / "dtensor_plus"
PACKAGES = {"ops": ROOT / "ops", "layouts": ROOT / "layouts", "kernels": ROOT / "kernels",
            "checkpoint": CORE / "checkpoint", "testing": CORE / "testing",
            "simulate": CORE / "simulate", "plan": CORE / "plan"}  # units of the layer block
SUBPACKAGE_ROWS = ("layouts/pipeline/", "dtensor_plus/checkpoint/", "dtensor_plus/testing/", "dtensor_plus/simulate/", "dtensor_plus/plan/")
_FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```$", re.S | re.M)
_TICKED = re.compile(r"`([^`]+)`")
_LAYER = re.compile(r"^(\d+)\.\s+[^:]+:\s+(.+)$")


def _doc() -> str:
    return DOC.read_text()


def _prose() -> str:
    """The doc without its fenced blocks (the example's own file name is not a file of the repository)."""
    return _FENCE.sub("", _doc())


def _fenced(info: str) -> list[str]:
    return [body for head, body in _FENCE.findall(_doc()) if head.strip() == info]


def _core_modules() -> list[str]:
    return sorted(p.stem for p in CORE.glob("*.py") if p.stem != "__init__")


# -- files and names ----------------------------------------------------------------------------------------


def test_every_file_named_exists():
    basenames = {p.name for top in ("dtensor_plus", "ops", "layouts", "kernels", "benchmarks", "tests", "examples")
                 for p in (ROOT / top).rglob("*.py")}
    missing = []
    for token in _TICKED.findall(_prose()):
        if not re.fullmatch(r"[\w./*-]+(\.py|\.md|/)", token):
            continue
        if "/" in token.rstrip("/"):
            found = any(ROOT.glob(token.rstrip("/"))) if "*" in token else (ROOT / token).exists()
        else:
            found = bool([b for b in basenames if Path(b).match(token)]) or (ROOT / token).exists()
        if not found:
            missing.append(token)
    assert not missing, f"docs/architecture.md names files that do not exist: {sorted(set(missing))}"


def test_every_module_is_named():
    prose = _prose()
    ticked = set(_TICKED.findall(prose))
    top = [p for folder in (CORE, ROOT / "layouts") for p in sorted(folder.glob("*.py"))]
    unnamed = [str(p.relative_to(ROOT)) for p in top if str(p.relative_to(ROOT)) not in ticked]
    rows = {row: line for line in prose.splitlines() for row in SUBPACKAGE_ROWS if line.startswith(f"| `{row}`")}
    for row in SUBPACKAGE_ROWS:
        assert row in rows, f"the module table has no row for {row}"
        named = set(_TICKED.findall(rows[row]))
        for path in sorted((ROOT / row).glob("*.py")):
            if path.stem != "__init__" and not any(Path(path.name).match(n) for n in named):
                unnamed.append(str(path.relative_to(ROOT)))
    assert not unnamed, f"modules docs/architecture.md does not name (add a row saying their one job): {unnamed}"


def _resolve(dotted: str) -> bool | None:
    """Does ``dotted`` name something of ours? None when it is not ours to check (torch's, a variable...)."""
    parts = dotted.split(".")
    if parts[0] == "DISPATCHER":
        return len(parts) == 2 and hasattr(DISPATCHER, parts[1])
    if parts[0] == "dtensor_plus":
        parts = parts[1:]
    if parts and parts[0] in set(_core_modules()) | set(PACKAGES):
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module("dtensor_plus." + ".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            return _has_chain(obj, parts[cut:])
        return False
    owner = _classes().get(parts[0])
    return None if owner is None else _has_chain(owner, parts[1:])


def _has_chain(obj, names: list[str]) -> bool:
    for name in names:
        if hasattr(obj, name):
            obj = getattr(obj, name)
        elif inspect.isclass(obj) and re.search(rf"self\.{name}\b\s*[:=]", inspect.getsource(obj)):  # set in a method
            return True
        else:
            return False
    return True


def _classes() -> dict:
    """Our classes by name: the core's and the layouts'."""
    found = {}
    modules = [f"dtensor_plus.{m}" for m in _core_modules()]
    modules += [f"dtensor_plus.layouts.{p.stem}" for p in (ROOT / "layouts").glob("*.py") if p.stem != "__init__"]
    for name in modules:
        module = importlib.import_module(name)
        found.update({k: v for k, v in vars(module).items() if inspect.isclass(v) and v.__module__ == name})
    return found


def test_every_dotted_name_resolves():
    broken = []
    for token in _TICKED.findall(_prose()):
        dotted = token.split("(")[0].strip()
        if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", dotted) and not dotted.endswith((".py", ".md")):
            if _resolve(dotted) is False:
                broken.append(dotted)
    assert not broken, f"docs/architecture.md names what the code does not have: {sorted(set(broken))}"


def test_state_section_lists_every_dispatcher_attribute():
    section = _prose().split("holds, in groups:")[1].split("Outside the core")[0]
    listed = {t for t in _TICKED.findall(section) if re.fullmatch(r"[a-z_]+", t)}
    actual = set(vars(DISPATCHER))
    assert listed == actual, (f"the state section of docs/architecture.md lists {sorted(listed - actual)} that "
                              f"DISPATCHER lacks and lacks {sorted(actual - listed)}")


# -- import layers ------------------------------------------------------------------------------------------


def _layers() -> dict[str, int]:
    (block,) = _fenced("text import-layers")
    layer_of = {}
    for line in block.splitlines():
        match = _LAYER.match(line)
        assert match, f"a line of the import-layers block must read 'N. what: units', got {line!r}"
        for unit in match.group(2).split():
            assert unit not in layer_of, f"{unit} appears twice in the import-layers block"
            layer_of[unit.rstrip("/")] = int(match.group(1))
    return layer_of


def _unit_files() -> dict[str, list[Path]]:
    units = {m: [CORE / f"{m}.py"] for m in _core_modules()}
    units["__init__"] = [CORE / "__init__.py"]
    units.update({name: sorted(folder.rglob("*.py")) for name, folder in PACKAGES.items()})
    return units


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] != "dtensor_plus":
        parts.insert(0, "dtensor_plus")  # ops/, layouts/, kernels/ install as dtensor_plus.*
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The dtensor_plus modules (or packages) ``path`` imports, at any depth of its code."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from . import rules` imports a module; `from .rules import OpSchema` imports from one
            found |= {f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names}
    return {name for name in found if name == "dtensor_plus" or name.startswith("dtensor_plus.")}


def _is_module(name: str) -> bool:
    parts = name.split(".")
    if parts[0] != "dtensor_plus" or len(parts) < 2:
        return False
    folder = PACKAGES[parts[1]] if parts[1] in ("ops", "layouts", "kernels") else CORE / parts[1]
    path = folder.joinpath(*parts[2:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _unit_of(module: str) -> str | None:
    parts = module.split(".")
    if parts == ["dtensor_plus"]:
        return "__init__"
    if parts[1] in PACKAGES:
        return parts[1]
    return parts[1] if (CORE / f"{parts[1]}.py").exists() else None


def test_import_layers_name_every_unit_once():
    assert set(_layers()) == set(_unit_files()), (
        f"the import-layers block of docs/architecture.md lacks {sorted(set(_unit_files()) - set(_layers()))} "
        f"and names {sorted(set(_layers()) - set(_unit_files()))} that do not exist")


def test_every_import_points_to_a_lower_layer():
    layer_of = _layers()
    upward = []
    for unit, files in _unit_files().items():
        for path in files:
            for module in _imports(path):
                target = _unit_of(module)
                if target is None or target == unit or target not in layer_of:
                    continue
                if layer_of[target] >= layer_of[unit]:
                    upward.append(f"{path.relative_to(ROOT)} (layer {layer_of[unit]}) imports {module} "
                                  f"(layer {layer_of[target]})")
    assert not upward, "imports against the documented layers (move the import or the module, then the doc):\n" + \
        "\n".join(upward)


# PyTorch's own parallel stack: our peer, which benchmarks run side by side and tests may take as an oracle.
_PEER_STACK = ("torch.distributed.tensor", "torch.distributed.fsdp", "torch.distributed._composable",
               "torch.distributed.pipelining", "torch.distributed.optim", "torch.nn.parallel")


def _peer_imports(source: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        if isinstance(node, ast.ImportFrom) and node.module in ("torch.distributed", "torch.nn"):
            names += [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if any(n == peer or n.startswith(peer + ".") for peer in _PEER_STACK)}
    return found


def test_the_library_never_imports_the_peer_stack():
    """The library is ours alone: code moves over by an import change, and a user's torch stack never changes ours."""
    assert _peer_imports("from torch.nn.parallel import DistributedDataParallel\nfrom torch.distributed import fsdp\n")
    offending = {str(path.relative_to(ROOT)): sorted(found) for files in _unit_files().values() for path in files
                 if (found := _peer_imports(path.read_text()))}
    assert not offending, f"the library imports PyTorch's own parallel stack (tell it apart by class name): {offending}"


def test_the_layer_check_can_fail():
    """An import of dispatch from dtensor.py (the old circle) is caught."""
    layer_of = _layers()
    assert _unit_of("dtensor_plus.dispatch") == "dispatch" and layer_of["dispatch"] >= layer_of["dtensor"]
    assert _unit_of("dtensor_plus.ops.common") == "ops" and layer_of["ops"] > layer_of["rules"]


# -- the worked rule example --------------------------------------------------------------------------------


def _example_table() -> dict:
    """The example's register_rules table, captured instead of registered (so the op stays without a rule)."""
    (source,) = [body for body in _fenced("python") if body.startswith("# ops/multi_margin.py")]
    from dtensor_plus import rules

    captured, real = {}, rules.register_rules
    rules.register_rules = lambda table, **_: captured.update(table)
    try:
        exec(compile(source, "docs/architecture.md example", "exec"), {"__name__": "example"})
    finally:
        rules.register_rules = real
    return captured


def test_example_op_has_no_rule_yet():
    from dtensor_plus import rules

    table = _example_table()
    assert list(table) == [torch.ops.aten.multi_margin_loss.default]
    assert rules.rule_for(torch.ops.aten.multi_margin_loss.default) is None, (
        "multi_margin_loss has a rule now: pick another op for the worked example in docs/architecture.md")


def check_example(reduction: str, placements: tuple, num_classes: int, use_weight: bool):
    import warnings

    import dtensor_plus as dtp
    from dtensor_plus import rules

    table = _example_table()
    generator = torch.Generator().manual_seed(num_classes)
    x = torch.randn(5, num_classes, generator=generator, dtype=torch.float64)
    target = torch.randint(0, num_classes, (5,), generator=generator)
    weight = torch.rand(num_classes, generator=generator, dtype=torch.float64) if use_weight else None
    want = F.multi_margin_loss(x, target, p=2, margin=0.7, weight=weight, reduction=reduction)
    mesh = dtp.init_device_mesh("cpu", (2, 2))
    x_d = dtp.distribute_tensor(x, mesh, placements)
    target_d = dtp.distribute_tensor(target, mesh, [p if p == dtp.Shard(0) else dtp.Replicate() for p in placements])
    weight_d = dtp.distribute_tensor(weight, mesh, [dtp.Replicate()] * 2) if use_weight else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no gathering fallback
        with rules.override_rule(table), dtp.comm_mode() as comm:
            got = F.multi_margin_loss(x_d, target_d, p=2, margin=0.7, weight=weight_d, reduction=reduction)
    torch.testing.assert_close(got.full_tensor(), want)
    classes_sharded = sum(p == dtp.Shard(1) for p in placements)
    assert comm.count() == comm.count("all_reduce") == classes_sharded, comm  # exactly the declared all-reduces


@pytest.mark.parametrize("reduction, placements, num_classes, use_weight", [
    ("mean", ("S0", "S1"), 5, True),   # rows on one mesh dim, classes (uneven) on the other
    ("none", ("S1", "R"), 3, False),  # classes only
    ("sum", ("S0", "R"), 4, True),    # rows only: no communication
])
def test_worked_example_equals_one_device(reduction, placements, num_classes, use_weight):
    by_token = {"S0": dtensor_plus.Shard(0), "S1": dtensor_plus.Shard(1), "R": dtensor_plus.Replicate()}
    run_on_ranks(4, check_example, reduction, tuple(by_token[t] for t in placements), num_classes, use_weight)


# -- the training step's trip -------------------------------------------------------------------------------


def check_training_step() -> None:
    """The counts the doc gives for one tp + dp step of a two-layer MLP on a 2x2 (dp, tp) mesh."""
    import dtensor_plus as dtp
    from dtensor_plus.layouts import ColwiseParallel, RowwiseParallel, parallelize_module, replicate, shard_batch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 5))
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(use_local_output=False),
                                           "2": RowwiseParallel(use_local_output=False)})
    replicate(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    x, y = torch.randn(6, 8), torch.randint(0, 5, (6,))
    with dtp.comm_mode() as forward:
        loss = F.cross_entropy(model(shard_batch(x, mesh)), shard_batch(y, mesh))
    with dtp.comm_mode() as backward:
        loss.backward()
    with dtp.comm_mode() as step:
        opt.step()
    assert dict(forward.counts) == {("all_reduce", "tp"): 1}, forward  # the loss counts on shard_batch's whole
    assert dict(backward.counts) == {("all_reduce", "dp"): 1}, backward
    assert step.count() == 0 and not step.fallbacks, step
    assert all(p.grad.placements == p.placements for p in model.parameters())


def test_training_step_counts():
    run_on_ranks(4, check_training_step)
