"""Keyword arguments renamed in a release: the old name keeps working for one release, with a warning.

Naming rule: what mirrors a torch API keeps torch's parameter names exactly, so code moves by an import change
(``parallelize_module(module, device_mesh, ...)``, ``ParallelStyle.apply(module, device_mesh)``,
``fully_shard(module, *, mesh=...)``, ``n_microbatches``); our own APIs take ``mesh``; a mesh dim (name or index)
is ``mesh_dim``, or ``<role>_mesh_dim`` taken by role (``tp_mesh_dim``, ``ep_mesh_dim``, ``pp_mesh_dim``, ...);
``dim`` and ``*_dim`` (``seq_dim``, ``sequence_dim``) are always tensor dims.

    @renamed_keywords(dp_dim="dp_mesh_dim")
    def replicate(module, device_mesh, dp_mesh_dim="dp"): ...

    replicate(m, mesh, dp_dim="dp")   # works, warns: "replicate(dp_dim=...) is now dp_mesh_dim=..."

Passing both names is an error (which one was meant is unknowable).
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

__all__ = ["renamed_keywords"]


def renamed_keywords(**old_to_new: str) -> Callable:
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{fn.__qualname__}: pass {new}= only ({old}= is its old name)")
                warnings.warn(f"{fn.__qualname__}({old}=...) is now {new}=...; the old name goes in the next release",
                              DeprecationWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper

    return decorate
