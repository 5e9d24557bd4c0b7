"""Which module is running: torch's ``ModuleTracker``, adjusted so a module's own forward hooks count as its own.

torch's tracker leaves a module in its global forward hook, which runs before the module's local hooks; a
parallel style redistributes a module's output in a local hook (RowwiseParallel's all-reduce), so that
collective would be charged to the parent. Here a module with local forward hooks is left only after they
ran (one extra always-called hook of ours, added behind them and removed on exit). Used by
``comm_mode(per_module=True)`` and ``explicit_communication()``.
"""

from __future__ import annotations

import weakref

from torch.utils.module_tracker import ModuleTracker as _TorchModuleTracker

__all__ = ["ModuleTracker"]


class ModuleTracker(_TorchModuleTracker):
    def __init__(self) -> None:
        super().__init__()
        self._late_exit: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> its exit hook handle

    def _fw_pre_hook(self, mod, input) -> None:
        super()._fw_pre_hook(mod, input)
        if mod._forward_hooks and mod not in self._late_exit:
            self._late_exit[mod] = mod.register_forward_hook(self._late_post_hook, always_call=True)

    def _fw_post_hook(self, mod, input, output) -> None:
        if mod not in self._late_exit:
            super()._fw_post_hook(mod, input, output)

    def _late_post_hook(self, mod, input, output) -> None:
        super()._fw_post_hook(mod, input, output)

    def __exit__(self, *args):
        for handle in list(self._late_exit.values()):
            handle.remove()
        self._late_exit = weakref.WeakKeyDictionary()
        return super().__exit__(*args)

    def current(self) -> tuple[str, str]:
        """(innermost module's path, "forward" or "backward"); names nest, so the longest is the innermost."""
        names = [n for n in self.parents if n != "Global"]
        return (max(names, key=len) if names else "(no module)"), ("backward" if self.is_bw else "forward")
