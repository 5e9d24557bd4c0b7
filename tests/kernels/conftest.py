"""Kernel tests run the Triton kernels in Triton's CPU interpreter.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel; dtensor_plus imports its ``*_triton``
modules only on a kernel's first use (kernels/switch.py), so setting the variable here, at collection, is in
time. It changes nothing for other tests: ``use_kernels("auto")`` (the default) never picks a kernel on CPU.
Rank processes of ``run_on_ranks`` set it themselves (``interpret_here``): their pool may predate this file.
"""

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"

from dtensor_plus.kernels import switch  # noqa: E402

triton = pytest.importorskip("triton", reason="the kernel tests need triton's interpreter (pip install triton)")


@pytest.fixture(autouse=True)
def _default_switch():
    """Each test starts and ends with the default mode and no counted kernel calls."""
    switch.reset_kernel_counts()
    with switch.use_kernels("auto"):
        yield
    switch.reset_kernel_counts()
