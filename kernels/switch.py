"""The one switch between Triton kernels and their plain-torch references, and the count of kernel launches.

``use_kernels(mode)`` sets the process-wide choice (also a context manager that restores the previous one):

    "auto"  (default)  the kernel on CUDA tensors when triton imports; the reference everywhere else
    True               the kernel wherever it can run: CUDA, or CPU under Triton's interpreter
                       (``TRITON_INTERPRET=1`` set before the first kernel call); raises where it cannot
    False              always the reference

Nothing here imports triton: the ``*_triton`` modules that hold the ``@triton.jit`` kernels are imported by
``load()`` on a kernel's first use, so that (a) the library runs without triton and (b) ``TRITON_INTERPRET``
is read when the kernels are decorated, which is when triton decides between compiling and interpreting.

``kernel_counts()`` counts the kernel-path calls by name (a Counter), so a test can assert that a model step
went through a kernel rather than through its reference.
"""

from __future__ import annotations

import collections
import functools
import importlib
import os

import torch

__all__ = ["available", "interpreting", "kernel_counts", "launch_options", "load", "mode", "reset_kernel_counts",
           "use_kernels", "want_kernel"]

_MODES = ("auto", True, False)
_mode: str | bool = "auto"
_counts: collections.Counter = collections.Counter()
_PLAIN = (torch.Tensor, torch.nn.Parameter)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class use_kernels:
    """Choose the kernel path: ``"auto"``, ``True`` or ``False`` (see the module docstring).

    Call it to set the mode for the process, or use it as a context manager to set it for a block::

        with dtensor_plus.kernels.use_kernels(True):
            loss = model(x)          # norms, cross-entropy, attention, grouped GEMM through Triton
    """

    def __init__(self, mode: str | bool = True):
        global _mode
        if not any(mode is m or (isinstance(mode, str) and mode == m) for m in _MODES):
            raise ValueError(f"use_kernels(mode={mode!r}): mode must be 'auto', True or False")
        self.previous, _mode = _mode, mode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _mode
        _mode = self.previous
        return False


def mode() -> str | bool:
    """The mode in force: "auto", True or False."""
    return _mode


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether triton will interpret kernels on the CPU (TRITON_INTERPRET read as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``: CUDA with triton, or CPU under the interpreter."""
    device = torch.device(device)
    if not _triton_importable():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpreting()


def want_kernel(name: str, *tensors: torch.Tensor) -> bool:
    """Decide the path for one call of kernel ``name`` on ``tensors`` (all on one device); counts a kernel call.

    Tensor subclasses (DTensor) and float dtypes other than fp32/bf16/fp16 take the reference in every mode.
    """
    if _mode is False or (_mode == "auto" and not tensors[0].is_cuda):
        return False  # every op's local path asks: the common answer first, before any other look at the tensors
    device = tensors[0].device
    if any(type(t) not in _PLAIN for t in tensors):
        # a kernel reads raw pointers: a DTensor (or any tensor subclass) takes the reference, whose ops go
        # through the subclass's own dispatch (there, the op rules' local ops may call the kernel on shards)
        return False
    if any(t.is_floating_point() and t.dtype not in KERNEL_DTYPES for t in tensors):
        return False  # the kernels compute in fp32: float64 keeps its precision on the reference
    if _mode == "auto":
        use = device.type == "cuda" and available(device)
    elif available(device):
        use = True
    else:
        raise ValueError(
            f"use_kernels(True) but the {name} kernel cannot run on device {device} (triton importable: "
            f"{_triton_importable()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}); use 'auto' to fall back "
            f"to the reference, or on CPU set TRITON_INTERPRET=1 before the first kernel call")
    if use:
        _counts[name] += 1
    return use


def kernel_counts() -> collections.Counter:
    """Kernel-path calls so far, by kernel name (a copy)."""
    return collections.Counter(_counts)


def reset_kernel_counts() -> None:
    _counts.clear()


def load(module: str, device: torch.device):
    """Import ``dtensor_plus.kernels.<module>`` (the @triton.jit kernels) on first use and check its mode fits."""
    mod = importlib.import_module(f"dtensor_plus.kernels.{module}")
    if device.type == "cpu" and not mod.INTERPRETED:
        raise ValueError(
            f"dtensor_plus.kernels.{module} was imported with TRITON_INTERPRET unset, so its kernels are compiled "
            f"for a GPU and cannot run on CPU tensors; set TRITON_INTERPRET=1 before the first kernel call")
    return mod


def launch_options(device: torch.device, block: int) -> dict:
    """num_warps for a kernel whose programs each reduce ``block`` elements: about 512 per warp on a GPU, 4 to 16
    warps (a guess to tune with benchmarks/kernels.py); nothing under the interpreter, which has no warps."""
    if device.type != "cuda":
        return {}
    return {"num_warps": min(16, max(4, block // 512))}
