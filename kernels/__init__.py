"""Triton kernels for the hot paths of sharded training, each beside its plain-torch reference.

Every public function here (``rms_norm``, ``layer_norm``, ``cross_entropy_stats``, ``flash_attention``,
``grouped_mm``) runs its Triton kernel where it can (see ``switch.py``: CUDA with triton importable, or
forced on CPU under Triton's interpreter) and its reference everywhere else. Nothing requires triton: the
``*_triton.py`` modules holding the ``@triton.jit`` kernels are imported only on a kernel's first use.
"""

from dtensor_plus.kernels.switch import available, kernel_counts, reset_kernel_counts, use_kernels

__all__ = ["available", "kernel_counts", "reset_kernel_counts", "use_kernels"]
