"""Adding an op family is one new file in ops/: ``import dtensor_plus`` imports every module there (ops/__init__.py
walks the folder, in name order), and the rules each registers are found, with no list or dispatcher to edit."""

import importlib
import subprocess
import sys
from pathlib import Path

import dtensor_plus
from dtensor_plus.dispatcher import DISPATCHER

OPS = Path(dtensor_plus.ops.__file__).parent
FILES = sorted(p.stem for p in OPS.glob("*.py") if p.stem != "__init__")


def test_import_dtensor_plus_imports_every_ops_file():
    """In a fresh interpreter: nothing imported beforehand can hide a module the package walk missed."""
    code = ("import sys, dtensor_plus\n"
            f"missing = [n for n in {FILES!r} if 'dtensor_plus.ops.' + n not in sys.modules]\n"
            "print(missing)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]", f"ops files `import dtensor_plus` did not import: {result.stdout}"


def test_every_file_that_registers_rules_has_them_in_force():
    registering = {n for n in FILES if "register_rule" in (OPS / f"{n}.py").read_text()
                   and n not in ("ring_attention", "ulysses_attention")}  # these only mention override_rule
    modules_with_rules = set()
    for op in DISPATCHER.registered.ops():
        rule = DISPATCHER.registered.rule(op)
        module = getattr(getattr(rule, "func", rule), "__module__", "")
        if module.startswith("dtensor_plus.ops."):
            modules_with_rules.add(module.rsplit(".", 1)[1])
    assert registering <= modules_with_rules, f"files whose rules are not registered: {registering - modules_with_rules}"


def test_a_new_file_is_imported_with_no_other_edit(tmp_path, monkeypatch):
    """ops/__init__.py's walk, run over a package of two families dropped in out of name order."""
    package = tmp_path / "families_probe"
    package.mkdir()
    (package / "__init__.py").write_text((OPS / "__init__.py").read_text())
    for name in ("zeta", "alpha"):
        (package / f"{name}.py").write_text(f"import builtins\nbuiltins.__dict__.setdefault('_families_seen', []).append({name!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import builtins
    try:
        module = importlib.import_module("families_probe")
        assert module.FAMILIES == ("alpha", "zeta")
        assert builtins._families_seen == ["alpha", "zeta"]  # name order: deterministic on every rank
    finally:
        builtins.__dict__.pop("_families_seen", None)
        for name in ("families_probe", "families_probe.alpha", "families_probe.zeta"):
            sys.modules.pop(name, None)
