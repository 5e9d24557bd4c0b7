"""``PrepareModuleInputOutput``: one style that lays out a module's inputs and its outputs (torch's name).

It is ``PrepareModuleInput`` and ``PrepareModuleOutput`` applied together, for a module whose both ends meet a
layout boundary (an attention block taking sequence shards in and handing them back)::

    parallelize_module(model, mesh["tp"], {"attn": PrepareModuleInputOutput(
        input_layouts=Shard(1), desired_input_layouts=Replicate(),
        output_layouts=Partial(), desired_output_layouts=Shard(1))})
"""

from __future__ import annotations

from torch import nn

from .tensor import ParallelStyle, PrepareModuleInput, PrepareModuleOutput

__all__ = ["PrepareModuleInputOutput"]


class PrepareModuleInputOutput(ParallelStyle):
    """Lay out a module's inputs as ``PrepareModuleInput`` does and its outputs as ``PrepareModuleOutput`` does.

    Args:
        input_layouts, desired_input_layouts, input_kwarg_layouts, desired_input_kwarg_layouts: as in
            PrepareModuleInput.
        use_local_input: hand the module local blocks instead of DTensors (default False).
        output_layouts, desired_output_layouts: as in PrepareModuleOutput (required).
        use_local_output: return local blocks instead of DTensors (default True).
    """

    def __init__(
        self,
        *,
        input_layouts=None,
        desired_input_layouts=None,
        input_kwarg_layouts: dict | None = None,
        desired_input_kwarg_layouts: dict | None = None,
        use_local_input: bool = False,
        output_layouts,
        desired_output_layouts,
        use_local_output: bool = True,
    ):
        self.prepare_module_input = PrepareModuleInput(
            input_layouts=input_layouts,
            desired_input_layouts=desired_input_layouts,
            input_kwarg_layouts=input_kwarg_layouts,
            desired_input_kwarg_layouts=desired_input_kwarg_layouts,
            use_local_output=use_local_input,
        )
        self.prepare_module_output = PrepareModuleOutput(
            output_layouts=output_layouts, desired_output_layouts=desired_output_layouts, use_local_output=use_local_output
        )

    def apply(self, module: nn.Module, device_mesh) -> nn.Module:
        self.prepare_module_input.apply(module, device_mesh)
        return self.prepare_module_output.apply(module, device_mesh)

    def __repr__(self) -> str:
        inputs, outputs = self.prepare_module_input, self.prepare_module_output
        return (
            f"PrepareModuleInputOutput(input_layouts={inputs.input_layouts}, "
            f"desired_input_layouts={inputs.desired_input_layouts}, input_kwarg_layouts={inputs.input_kwarg_layouts}, "
            f"desired_input_kwarg_layouts={inputs.desired_input_kwarg_layouts}, use_local_input={inputs.use_local_output}, "
            f"output_layouts={outputs.output_layouts}, desired_output_layouts={outputs.desired_output_layouts}, "
            f"use_local_output={outputs.use_local_output})"
        )
