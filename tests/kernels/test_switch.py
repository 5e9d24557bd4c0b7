"""The kernel switch (kernels/switch.py): modes, availability, errors, and the library without triton."""

import subprocess
import sys

import pytest
import torch

from dtensor_plus.kernels import available, kernel_counts, switch, use_kernels
from dtensor_plus.kernels.norms import rms_norm


def test_auto_takes_the_reference_on_cpu_even_under_the_interpreter():
    assert available("cpu")  # conftest set TRITON_INTERPRET=1
    rms_norm(torch.randn(3, 8), torch.ones(8))
    assert kernel_counts()["rms_norm"] == 0


def test_true_takes_the_kernel_and_the_context_restores_the_mode():
    with use_kernels(True):
        assert switch.mode() is True
        rms_norm(torch.randn(3, 8), torch.ones(8))
        with use_kernels(False):
            rms_norm(torch.randn(3, 8), torch.ones(8))
    assert switch.mode() == "auto" and kernel_counts()["rms_norm"] == 1


def test_setter_form():
    use_kernels(False)
    assert switch.mode() is False  # the autouse fixture puts "auto" back


def test_forced_without_the_interpreter_names_the_fix(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not available("cpu") and not available("meta")
    with use_kernels(True), pytest.raises(ValueError, match="set TRITON_INTERPRET=1"):
        rms_norm(torch.randn(3, 8), torch.ones(8))


def test_bad_mode():
    with pytest.raises(ValueError, match="mode must be 'auto', True or False"):
        use_kernels("yes")


_WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError
import torch, dtensor_plus, dtensor_plus.layouts
from dtensor_plus.kernels import available, use_kernels
from dtensor_plus.kernels.cross_entropy import cross_entropy
from dtensor_plus.kernels.flash_attention import flash_attention
from dtensor_plus.kernels.grouped_gemm import grouped_mm
from dtensor_plus.kernels.norms import layer_norm, rms_norm
assert not available("cpu")
x = torch.randn(4, 8)
rms_norm(x, torch.ones(8)); layer_norm(x, torch.ones(8))
cross_entropy(x, torch.tensor([0, 1, 2, 3]))
flash_attention(x.view(1, 1, 4, 8), x.view(1, 1, 4, 8), x.view(1, 1, 4, 8), causal=True)
grouped_mm(x, torch.randn(2, 8, 3), [1, 3])
with use_kernels(True):
    try:
        rms_norm(x, torch.ones(8))
    except ValueError as e:
        assert "triton importable: False" in str(e), e
    else:
        raise AssertionError("use_kernels(True) without triton did not raise")
print("ok")
"""


def test_library_runs_without_triton():
    done = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, timeout=120,
                          env={"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


class _Subclass(torch.Tensor):
    pass


def test_tensor_subclasses_take_the_reference():
    """A kernel reads raw pointers; a DTensor reaches the kernels through the op rules' local ops instead."""
    x = torch.randn(3, 8).as_subclass(_Subclass)
    with use_kernels(True):
        rms_norm(x, torch.ones(8))
    assert kernel_counts()["rms_norm"] == 0


def test_float64_takes_the_reference():
    with use_kernels(True):
        rms_norm(torch.randn(3, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64))
    assert kernel_counts()["rms_norm"] == 0
