"""Shared test settings.

1. The repository root never stays on ``sys.path``. ``python -m pytest`` puts the working directory first on
   it, and then our top-level folders (``kernels/``, ``ops/``, ``layouts/``, ``examples/``, ``benchmarks/``,
   ``tests/``) would hide installed packages of the same name: today's transformers imports Hugging Face's
   ``kernels`` package, and found ours. The library itself is imported as ``dtensor_plus`` (its editable
   install maps ``dtensor_plus.kernels`` and friends to those folders), so nothing needs the root on the path.
   This runs before any test module is imported; ``tests/test_import_hygiene.py`` proves it held.
2. One hypothesis profile (no deadline: rank round trips vary; derandomized in CI).
3. Without CUDA, Triton's interpreter is chosen before anything imports triton: triton decorates its own
   ``triton.language`` functions when it is imported (torch._dynamo imports it, so any compile test collected before
   tests/kernels/ does), and interpreted kernels cannot call functions decorated for compiling ("Cannot call
   @triton.jit'd outside of the scope of a kernel"). With CUDA the kernels stay compiled (tests/gpu checks them).
"""

import os
import sys
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


def _is_repository_root(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == REPOSITORY_ROOT
    except OSError:
        return False


sys.path[:] = [entry for entry in sys.path if not _is_repository_root(entry)]

import torch  # noqa: E402  (after the path is clean)
from hypothesis import HealthCheck, settings  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "dtensor_plus",
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("dtensor_plus")
