"""Sharding rules, one file per op family; importing this package registers them all.

Every module here is imported, in name order, so adding an op family is one new file and no other edit (no list
to extend, no dispatcher change). Modules that only help others (``common``, ``view_algebra``) or hold rules that
layouts install for a while (``ring_attention``, ``ulysses_attention``) are imported too: they register nothing
at import. A family needing another loaded first imports it itself, so the order here never matters.
"""

import importlib
import pkgutil

FAMILIES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg))

for _name in FAMILIES:
    importlib.import_module(f"{__name__}.{_name}")
