"""Plans are data: ``parallelize_module`` applies a dict from module-name patterns to parallel styles.

Patterns are ``fnmatch`` globs over ``module.named_modules()`` names ("blocks.*.attn.q"); a style given
directly (not in a dict) applies to the root module. Every pattern must match some module, so a typo fails
loudly instead of silently leaving a layer replicated::

    parallelize_module(model, mesh["tp"], {
        "blocks.*.mlp.fc1": ColwiseParallel(),
        "blocks.*.mlp.fc2": RowwiseParallel(),
    })
"""

from __future__ import annotations

import difflib
import fnmatch
import warnings

from torch import nn

from dtensor_plus.mesh import mesh_or_current
from dtensor_plus.shared_parameters import SharedParameters

from . import local_step
from .hf_plan import is_string_plan, translate_hf_plan
from .tensor import SRC_DATA_RANK, ParallelStyle

__all__ = ["parallelize_module"]


def parallelize_module(
    module: nn.Module, device_mesh=None, parallelize_plan=None, *, src_data_rank: int | None = 0
) -> nn.Module:
    """Apply parallel styles to ``module``'s submodules on ``device_mesh`` (1-D, e.g. ``mesh["tp"]``).

    Args:
        module: the model; changed in place (parameters become DTensors, hooks are installed).
        device_mesh: the tensor-parallel mesh (default: the one entered with ``with mesh:``).
        parallelize_plan: a ParallelStyle for the root, or a dict ``{pattern: style}`` where pattern is an
            fnmatch glob over submodule names ("" is the root). Styles apply in the dict's order. A dict of
            transformers' style strings (``model.tp_plan``) is translated by ``hf_plan.translate_hf_plan``.
            None: nothing to apply (a warning, as in torch).
        src_data_rank: whose values the placed parameters take, as in ``distribute_tensor``: index 0 of the
            mesh (default; one scatter or broadcast per parameter), or None for every rank's own values (no
            communication: ranks that initialised alike, e.g. after ``dtp.manual_seed``). Parameters on the
            ``meta`` device move no data either way.

    Returns:
        ``module``.

    Raises:
        ValueError: a pattern matches no submodule (the message lists the nearest names).
        TypeError: the plan or one of its values is not a ParallelStyle.
    """
    device_mesh = mesh_or_current(device_mesh, "parallelize_module")
    if parallelize_plan is None:
        warnings.warn("parallelize_module got no parallelize_plan; the module is left as it is", stacklevel=2)
        return module
    local_step.install()  # an element-wise optimizer steps the placed parameters on their blocks
    token = SRC_DATA_RANK.set(src_data_rank)
    try:
        return _apply_plan(module, device_mesh, parallelize_plan)
    finally:
        SRC_DATA_RANK.reset(token)


def _apply_plan(module: nn.Module, device_mesh, parallelize_plan) -> nn.Module:
    if isinstance(parallelize_plan, ParallelStyle):
        parallelize_plan = {"": parallelize_plan}
    if is_string_plan(parallelize_plan):  # transformers' model.tp_plan: {pattern: "colwise", ...} (hf_plan.py)
        parallelize_plan = translate_hf_plan(module, parallelize_plan)
    if not isinstance(parallelize_plan, dict):
        raise TypeError(
            f"parallelize_plan must be a ParallelStyle or a dict {{pattern: style}}, got {type(parallelize_plan).__name__}"
        )
    # A Parameter shared by several modules (a tied embedding and head) is placed once and stays one Parameter;
    # each later style that meets it must place it alike.
    shared = SharedParameters(module, "parallelize_module", fix=_TIED_FIX)
    modules = dict(module.named_modules())
    for pattern, style in parallelize_plan.items():
        if not isinstance(style, ParallelStyle):
            raise TypeError(f"plan entry {pattern!r} must be a ParallelStyle (e.g. ColwiseParallel()), got {style!r}")
        for name in _matching(pattern, modules):
            style.apply(modules[name], device_mesh)
            shared.decided(modules[name], f"{type(style).__name__} on {name or 'the root'!r}")
    shared.finish()
    return module


_TIED_FIX = (
    "give every module holding it a style that places it the same way (a tied embedding and output head: "
    "RowwiseParallel() on the nn.Embedding and ColwiseParallel() on the nn.Linear head both shard the vocabulary "
    "dim, Shard(0)), leave it out of the plan in all but one of them, or untie the weights"
)


def _matching(pattern: str, modules: dict[str, nn.Module]) -> list[str]:
    names = [name for name in modules if fnmatch.fnmatchcase(name, pattern)]
    if not names:
        near = difflib.get_close_matches(pattern, [n for n in modules if n], n=5, cutoff=0.3)
        raise ValueError(
            f"plan pattern {pattern!r} matches no submodule; nearest names: {near or sorted(modules)[:10]}. "
            f"Patterns are fnmatch globs over named_modules() names, e.g. 'blocks.*.mlp.fc1'"
        )
    return names
