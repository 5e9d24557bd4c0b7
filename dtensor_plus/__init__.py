"""dtensor_plus: SPMD distributed tensors for PyTorch.

Place tensors on a device mesh, write single-device torch code, and the op rules insert the collectives::

    import torch, dtensor_plus as dtp
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    x = dtp.distribute_tensor(torch.randn(8, 16), mesh, [dtp.Shard(0), dtp.Replicate()])
    w = dtp.distribute_tensor(torch.randn(16, 32, requires_grad=True), mesh, [dtp.Replicate(), dtp.Shard(1)])
    loss = (x @ w).relu().mean()
    loss.backward()
"""

import os as _os
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("dtensor_plus")
except _metadata.PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"

# In a source checkout layouts/, ops/ and kernels/ sit beside this package and install as dtensor_plus.*
# (pyproject's package-dir). When this package is imported from the checkout itself (`python -m pytest` from
# the repository root), let the package path reach them too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "ops", "__init__.py")) and not _os.path.isdir(_os.path.join(__path__[0], "ops")):
    __path__.append(_root)

from .api import distribute_module, distribute_tensor  # noqa: E402
from .collectives import CommCounter, comm_mode  # noqa: E402
from .debug import check_divergence  # noqa: E402
from .explicit import ImplicitCommunicationError, explicit_communication  # noqa: E402
from .plain_tensors import implicit_replication  # noqa: E402
from .dtensor import DTensor  # noqa: E402
from . import dispatch  # noqa: E402,F401  (installs the executor DTensor.__torch_dispatch__ calls)
from .factories import empty, full, ones, rand, randn, zeros  # noqa: E402
from .mesh import DeviceMesh, init_device_mesh  # noqa: E402
from .placements import Partial, Placement, Replicate, Shard  # noqa: E402
from .random import manual_seed  # noqa: E402
from .rules import OpSchema, Sharding, override_rule, register_rule  # noqa: E402
from .spec import DTensorSpec, TensorMeta  # noqa: E402
from .visualize import visualize_sharding  # noqa: E402

from . import ops  # noqa: E402,F401  (registers the sharding rules)

# torch.optim and clip_grad_norm_ pick their multi-tensor path by default only for tensor types listed here (on
# devices that have one, CUDA): the extension point torch's own DTensor registers itself in. Our foreach and
# fused rules (ops/foreach_pointwise.py) run each list op as one local multi-tensor kernel.
from torch.optim.optimizer import _foreach_supported_types as _optim_multi_tensor_types  # noqa: E402
from torch.utils._foreach_utils import _foreach_supported_types as _util_multi_tensor_types  # noqa: E402

for _types in (_optim_multi_tensor_types, _util_multi_tensor_types):
    if DTensor not in _types:
        _types.append(DTensor)

__all__ = [
    "DTensor", "DTensorSpec", "TensorMeta", "DeviceMesh", "init_device_mesh",
    "Placement", "Shard", "Replicate", "Partial",
    "distribute_tensor", "distribute_module", "zeros", "ones", "empty", "full", "rand", "randn",
    "comm_mode", "CommCounter", "manual_seed", "register_rule", "override_rule", "OpSchema", "Sharding",
    "implicit_replication", "check_divergence", "__version__", "visualize_sharding",
    "explicit_communication", "ImplicitCommunicationError",
]
