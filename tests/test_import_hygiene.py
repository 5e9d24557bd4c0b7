"""The repository's top-level folders neither hide installed packages nor are hidden by them.

``kernels``, ``ops``, ``layouts``, ``examples``, ``benchmarks`` and ``tests`` are generic names: Hugging Face ships
a ``kernels`` package that today's transformers imports, and wheels that install a top-level ``tests`` exist. Ours
are only reachable as ``dtensor_plus.kernels`` (and friends) or, for tests and examples, by file path, under any
way of starting pytest (``python -m pytest`` puts the working directory on ``sys.path``; ``tests/conftest.py``
takes it off).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL_NAMES = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name.isidentifier() and p.name != "dtensor_plus")
TEST_DIRS = {str(p) for p in (ROOT / "tests").rglob("*") if p.is_dir()} | {str(ROOT / "tests")}


def _inside_repository(spec) -> bool:
    """A regular module or package from one of our top-level folders. (A namespace portion, such as tests/examples
    while tests/ is on the path, has no origin and loses to any installed package of the name, so it hides nothing.)"""
    if spec.origin is None:
        return False
    origin = Path(spec.origin).resolve()
    return origin.parent == ROOT or any(origin.is_relative_to(ROOT / name) for name in TOP_LEVEL_NAMES)


def test_repository_root_is_not_on_sys_path():
    on_path = [e for e in sys.path if Path(e or os.getcwd()).resolve() == ROOT]
    assert not on_path, f"the repository root is on sys.path as {on_path}: our top-level folders would hide packages"


def test_no_top_level_folder_is_importable_by_its_bare_name():
    assert {"kernels", "ops", "layouts", "examples", "benchmarks", "tests"} <= set(TOP_LEVEL_NAMES)
    for name in TOP_LEVEL_NAMES:
        spec = importlib.util.find_spec(name)
        assert spec is None or not _inside_repository(spec), f"`import {name}` finds the repository's folder {spec}"


def test_installed_kernels_package_is_the_one_imported():
    spec = importlib.util.find_spec("kernels")
    if spec is not None:  # transformers' optional dependency, present with today's releases
        assert not _inside_repository(spec), spec


def test_test_modules_are_not_hidden_by_installed_modules():
    """pytest imports our test modules by basename: no installed module may carry one of those names."""
    outside = [e for e in sys.path if e not in TEST_DIRS]
    names = {p.stem for p in (ROOT / "tests").rglob("*.py") if p.stem != "conftest"}
    saved = sys.path[:]
    try:
        sys.path[:] = outside
        clashes = {n: importlib.util.find_spec(n).origin for n in names
                   if n not in sys.modules and importlib.util.find_spec(n) is not None}
    finally:
        sys.path[:] = saved
    assert not clashes, f"installed modules share a test module's name: {clashes}"


def test_python_dash_m_pytest_from_the_root_is_clean():
    """The README's own command, as CI runs it: the checks above hold in a `python -m pytest` started at the root."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_import_hygiene.py",
         "-k", "not dash_m"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
