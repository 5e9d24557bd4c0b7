"""The core keeps no module-level mutable state outside the dispatcher object (issue 17).

Everything dtensor_plus remembers between calls (the rule set in force, plan caches, modes entered with
``with`` blocks, communication counters, process groups, pending async saves...) is an attribute of
``dtensor_plus.dispatcher.DISPATCHER``. Module-level tables are constants: tuples, frozensets, read-only
mappings (``types.MappingProxyType``). This test reads every core module's final module-level bindings and fails
on a mutable container or an instance of a module's own class. The test kit (``dtensor_plus.testing``) is
exempt: its caches serve test processes, not programs.
"""

import ast
import pathlib
import types

import dtensor_plus
from dtensor_plus.dispatcher import DISPATCHER

CORE = pathlib.Path(dtensor_plus.__file__).parent
MUTABLE_DISPLAYS = (ast.Dict, ast.List, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)
MUTABLE_CALLS = {"dict", "list", "set", "bytearray", "Counter", "defaultdict", "deque", "OrderedDict",
                 "WeakValueDictionary", "WeakKeyDictionary", "WeakSet", "count"}
# The one state holder, and a stateless facade over its process groups (mesh.py).
ALLOWED = {("dispatcher.py", "DISPATCHER"), ("mesh.py", "PROCESS_GROUPS")}


def _final_bindings(tree: ast.Module) -> dict:
    bindings = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    bindings[target.id] = node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None and isinstance(node.target, ast.Name):
            bindings[node.target.id] = node.value
    return bindings


def _called_name(call: ast.Call) -> str:
    return call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")


def _mutable_state(path: pathlib.Path) -> list[str]:
    """'file:line name' of each module-level name whose final binding is mutable state."""
    tree = ast.parse(path.read_text())
    own_classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    found = []
    for name, value in _final_bindings(tree).items():
        if name == "__all__" or (path.name, name) in ALLOWED:
            continue
        if isinstance(value, MUTABLE_DISPLAYS) or (
            isinstance(value, ast.Call) and (_called_name(value) in MUTABLE_CALLS or _called_name(value) in own_classes)
        ):
            found.append(f"{path.name}:{value.lineno} {name}")
    return found


def test_no_module_level_mutable_state_outside_the_dispatcher():
    paths = [p for p in sorted(CORE.rglob("*.py")) if "testing" not in p.relative_to(CORE).parts]
    found = [entry for path in paths for entry in _mutable_state(path)]
    assert not found, ("module-level mutable state outside dtensor_plus.dispatcher.DISPATCHER (make it an attribute "
                       "there, or a constant: tuple, frozenset, types.MappingProxyType): " + ", ".join(found))


def test_the_check_can_fail(tmp_path):
    module = tmp_path / "stateful.py"
    module.write_text("_SEEN = set()\nTABLE = {1: 2}\nclass _S: pass\n_STATE = _S()\nOK = (1, 2)\n")
    assert [entry.split()[-1] for entry in _mutable_state(module)] == ["_SEEN", "TABLE", "_STATE"]


def test_constant_tables_are_read_only():
    from dtensor_plus import collectives, views

    assert isinstance(collectives._C10D_OPS, types.MappingProxyType)
    assert isinstance(views._INVERSES, types.MappingProxyType)
    assert DISPATCHER.rule_set is DISPATCHER.registered  # outside any override scope
