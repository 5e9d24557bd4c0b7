"""Megatron tensor parallelism as layouts: parallel styles that place a module's parameters on a 1-D mesh and
hook its inputs and outputs.

This file owns the styles (names follow ``torch.distributed.tensor.parallel``):

    ColwiseParallel      nn.Linear weight Shard(0), bias Shard(0); nn.Embedding weight Shard(1).
                         input Replicate -> output Shard(-1). packed=3 for a fused [q|k|v]: each rank holds
                         its rows of every part (StridedShard), so splitting the output needs no data
    RowwiseParallel      nn.Linear weight Shard(1), bias Replicate; nn.Embedding weight Shard(0) (vocab).
                         input Shard(-1) (Linear) or Replicate (Embedding) -> output Partial, reduced to
                         Replicate (all-reduce) or Shard(1) (reduce-scatter, sequence parallel) by the planner
    SequenceParallel     norm / dropout modules: parameters Replicate, input and output Shard(1) (B, T, D)
    PrepareModuleInput   redistribute a module's positional inputs
    PrepareModuleOutput  redistribute a module's outputs

A linear layer that stores its weight (in_features, out_features), like transformers' Conv1D (GPT-2), takes
``weight_output_dim=1`` in Colwise/Rowwise (weight Shard(1) / Shard(0)); it is never guessed from the shape.

Styles move no data themselves: they declare layouts and ``DTensor.redistribute`` lets the planner pick the
collectives. Plain-tensor inputs are taken to be this rank's block in the declared input layout
(``DTensor.from_local``), as torch does. A DTensor input may also live on the mesh the style's 1-D mesh was
sliced from (a (dp, tp) mesh, after ``layouts.data.replicate`` lifted the parameters onto it): the style then
lays out only its own mesh dim and the others (the batch's Shard(0) on dp) pass through; keep
``use_local_output=False`` there, since a local block could only be re-wrapped on the 1-D mesh. Apply styles
with ``dtensor_plus.layouts.plan.parallelize_module``::

    parallelize_module(mlp, mesh["tp"], {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    y = mlp(x)   # plain x in, plain (replicated) y out; one all-reduce in forward
"""

from __future__ import annotations

import contextvars
from typing import Any, Sequence

import torch
from torch import nn

from dtensor_plus.api import distribute_tensor
from dtensor_plus.dtensor import DTensor
from dtensor_plus.placements import Placement, Replicate, Shard, StridedShard, chunk_bounds
from dtensor_plus.torch_interop import placement_from_torch

from .data import reduce_grad_in_backward

__all__ = [
    "ParallelStyle", "ColwiseParallel", "RowwiseParallel", "SequenceParallel",
    "PrepareModuleInput", "PrepareModuleOutput",
]


class ParallelStyle:
    """How one module is laid out on a 1-D mesh. ``apply(module, device_mesh)`` (torch's ``_apply``) places it and
    returns it."""

    def apply(self, module: nn.Module, device_mesh) -> nn.Module:
        raise NotImplementedError


# -- helpers --------------------------------------------------------------------------------------------


def _check_mesh(device_mesh, style: ParallelStyle):
    if device_mesh.ndim != 1:
        raise ValueError(
            f"{type(style).__name__} needs a 1-D mesh, got {device_mesh}; pass the tensor-parallel sub-mesh, "
            f"e.g. mesh['tp']"
        )


def _check_placement(value, what: str) -> Placement | None:
    value = placement_from_torch(value) or value  # torch.distributed.tensor's placements mean the same
    if value is not None and not isinstance(value, Placement):
        raise TypeError(f"{what} must be a Placement such as Shard(-1) or Replicate(), got {value!r}")
    return value


def _style_mesh_dim(x: DTensor, device_mesh) -> int:
    """Which mesh dim of ``x``'s mesh is the style's 1-D mesh: 0 when ``x`` lives on it; the sub-mesh's dim
    when ``x`` lives on the mesh it was sliced from (``mesh["tp"]`` of a (dp, tp) mesh: data parallelism lifts
    parameters and inputs onto the parent mesh, and the style then lays out only its own mesh dim)."""
    if x.device_mesh == device_mesh:
        return 0
    root = device_mesh._root
    if device_mesh.ndim == 1 and x.device_mesh == root:
        return device_mesh._root_dims[0]
    raise ValueError(
        f"input DTensor lives on {x.device_mesh}, but the module is on {device_mesh}; inputs must live on the "
        f"style's mesh or on the mesh it was sliced from"
    )


def _to_dtensor(x: torch.Tensor, device_mesh, layout: Placement, last_dim_size: int | None = None) -> DTensor:
    """A DTensor for ``x``: a DTensor passes as is; a plain tensor is this rank's block in ``layout``.

    A block alone cannot tell its global shape (43 features on each of 3 ranks may be 127, 128 or 129), and
    guessing even blocks makes ranks disagree. So the sharded dim's global size is ``last_dim_size`` where
    the style knows it (a Rowwise linear's input features) and the block is on its last dim; else every
    rank's block size is gathered (one small counted all-gather, ``from_local(run_check=True)``, which raises
    on every rank when the blocks are not torch.chunk pieces of one tensor). Pass a DTensor to skip it."""
    if isinstance(x, DTensor):
        _style_mesh_dim(x, device_mesh)
        return x
    if not isinstance(layout, Shard):
        return DTensor.from_local(x, device_mesh, [layout])
    dim = layout.normalized(x.ndim).dim
    if last_dim_size is None or dim != x.ndim - 1:
        return DTensor.from_local(x, device_mesh, [layout], run_check=True)
    _, length = chunk_bounds(last_dim_size, device_mesh.size(0), device_mesh.get_local_rank(0))
    if x.shape[dim] != length:
        # NOTE: raised on this rank only; the others fail in their next collective, within its timeout.
        raise ValueError(
            f"the input's last dim has {x.shape[dim]} entries on rank {device_mesh.get_local_rank(0)} of "
            f"{device_mesh}, but the module's {last_dim_size} input features split as torch.chunk give it "
            f"{length}; feed each rank its torch.chunk block (or a DTensor)"
        )
    return DTensor.from_local(x, device_mesh, [layout], shape=(*x.shape[:-1], last_dim_size))


def _normal(placement: Placement, ndim: int) -> Placement:
    return placement.normalized(ndim) if isinstance(placement, Shard) else placement


def _redistribute(x: DTensor, layout: Placement, device_mesh, boundary: bool = False) -> DTensor:
    """``x`` with ``layout`` on the style's mesh dim; its other mesh dims (e.g. dp) keep their placements.

    ``boundary``: even when ``x`` already has the layout, pass it through a (free) redistribute, whose
    backward reduces a Partial gradient to that layout right here (Megatron's "f": the gradients of the
    norms before a tensor-parallel region come out whole instead of Partial)."""
    mesh_dim = _style_mesh_dim(x, device_mesh)
    # Shard(-1) and Shard(ndim-1) are the same layout; compare normalised so no redundant step is planned.
    target = _normal(layout, x.ndim)
    if _normal(x.placements[mesh_dim], x.ndim) == target and not boundary:
        return x
    placements = list(x.placements)
    placements[mesh_dim] = target
    return x.redistribute(placements=placements)


# parallelize_module(..., src_data_rank=) sets it while its styles apply (torch sets style.src_data_rank).
SRC_DATA_RANK = contextvars.ContextVar("src_data_rank", default=0)


def _distribute_parameter(module: nn.Module, name: str, device_mesh, placement: Placement) -> None:
    param = getattr(module, name, None)
    if param is None or isinstance(param, DTensor):
        return
    # Like torch, the mesh's first rank holds the truth (ranks may have initialised differently): index 0 on
    # every mesh dim, which is what src_data_rank names (None: every rank's own values, no communication).
    dt = distribute_tensor(param.detach(), device_mesh, [placement], src_data_rank=SRC_DATA_RANK.get())
    placed = nn.Parameter(dt, requires_grad=param.requires_grad)
    module.register_parameter(name, placed)
    if placed.requires_grad:  # e.g. a SequenceParallel norm weight: its gradient comes out Partial on tp
        reduce_grad_in_backward(placed)


def _prepare_first_input(
    inputs: tuple, device_mesh, layout: Placement, desired: Placement, last_dim_size: int | None = None,
) -> tuple:
    if not inputs or not isinstance(inputs[0], torch.Tensor):
        got = type(inputs[0]).__name__ if inputs else "no inputs"
        raise TypeError(f"the module's first positional input must be a tensor, got {got}; use PrepareModuleInput")
    x = _redistribute(_to_dtensor(inputs[0], device_mesh, layout, last_dim_size), desired, device_mesh)
    return (x, *inputs[1:])


def _finish_output(outputs: Any, device_mesh, layout: Placement | None, use_local_output: bool) -> Any:
    """``outputs`` moved to ``layout`` (None: left as the module made it) and unwrapped if asked."""
    if not isinstance(outputs, DTensor):
        raise TypeError(f"expected the module to return a DTensor, got {type(outputs).__name__}")
    if layout is not None:
        outputs = _redistribute(outputs, layout, device_mesh)
    return outputs.to_local() if use_local_output else outputs


class _LinearStyle(ParallelStyle):
    """Shared machinery of Colwise/Rowwise: validate layouts, place parameters, install the two hooks."""

    def __init__(
        self, *, input_layouts=None, output_layouts=None, use_local_output: bool = True,
        weight_output_dim: int | None = None,
    ):
        self.input_layouts = _check_placement(input_layouts, "input_layouts")
        self.output_layouts = _check_placement(output_layouts, "output_layouts")
        self.use_local_output = use_local_output
        if weight_output_dim not in (None, 0, 1):
            raise ValueError(
                f"weight_output_dim must be 0 (weight stored (out, in), as nn.Linear) or 1 (stored (in, out), as "
                f"transformers' Conv1D), got {weight_output_dim!r}"
            )
        self.weight_output_dim = weight_output_dim

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_layouts={self.input_layouts!r}, output_layouts={self.output_layouts!r}, "
            f"use_local_output={self.use_local_output}, weight_output_dim={self.weight_output_dim})"
        )

    def _linear_output_dim(self, module: nn.Module) -> int:
        """Which dim of a linear layer's 2-D weight holds the output features (the dim Colwise shards)."""
        if self.weight_output_dim is not None:
            return self.weight_output_dim
        if isinstance(module, nn.Linear):
            return 0
        # Not guessed from shapes: a square weight (GPT-2's c_proj) reads the same either way round.
        raise TypeError(
            f"{type(self).__name__} handles nn.Linear and nn.Embedding, got {type(module).__name__}; for a linear "
            f"layer with a 2-D weight pass weight_output_dim (1 when stored (in, out), as transformers' Conv1D), "
            f"and wrap other modules with PrepareModuleInput/PrepareModuleOutput"
        )

    def _layouts(self, module: nn.Module) -> tuple[Placement, Placement, Placement, dict[str, Placement]]:
        """(input layout, desired input layout, output layout, parameter placements) for this module."""
        raise NotImplementedError

    def apply(self, module: nn.Module, device_mesh) -> nn.Module:
        _check_mesh(device_mesh, self)
        if isinstance(module, nn.Embedding):
            if self.weight_output_dim not in (None, 1):
                raise ValueError("nn.Embedding stores its weight (num_embeddings, dim): weight_output_dim must be 1 or None")
        else:
            self._linear_output_dim(module)  # raises for a module that is not a known linear layer
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
                shape = None if weight is None else tuple(getattr(weight, "shape", ()))
                raise TypeError(f"{type(self).__name__} needs a 2-D weight, {type(module).__name__}.weight has shape {shape}")
        layout, desired, output, params = self._layouts(module)
        # A linear layer's input features: the global size of a plain input's last dim (no gather to learn it).
        in_features = None if isinstance(module, nn.Embedding) else module.weight.shape[1 - self._linear_output_dim(module)]
        for name, placement in params.items():
            _distribute_parameter(module, name, device_mesh, placement)
        module.register_forward_pre_hook(
            lambda _, inputs: _prepare_first_input(inputs, device_mesh, layout, desired, in_features)
        )
        module.register_forward_hook(lambda _, __, outputs: _finish_output(outputs, device_mesh, output, self.use_local_output))
        return module


class ColwiseParallel(_LinearStyle):
    """Split the output features: nn.Linear weight Shard(0) and bias Shard(0), nn.Embedding weight Shard(1).

    A fused projection packs equal parts into its output features: ``[q | k | v]`` (3 parts) or ``[gate | up]``
    (2). Plain Shard(0) would hand rank 0 all of q and some of k; ``packed=3`` instead gives each rank its
    torch.chunk rows of every part (weight and bias ``StridedShard(0, 3)``), so the output comes out as
    ``StridedShard(-1, 3)`` and ``qkv.split(D, -1)``, ``qkv.chunk(3, -1)`` or ``qkv.view(B, T, 3, D)`` give
    plain Shard(-1) pieces with no communication, forward and backward. An unmodified attention then runs on
    each rank's own heads where the head boundaries meet the blocks (e.g. 4 heads on 2 ranks); elsewhere (3
    heads on 2 ranks) the head view gathers, as for separate q, k and v projections.

    Args:
        input_layouts: layout of the input (default Replicate); e.g. Shard(1) after SequenceParallel, which
            all-gathers the sequence on entry.
        output_layouts: layout of the output (default Shard(-1), no communication).
        use_local_output: return this rank's block (a plain tensor) instead of a DTensor.
        weight_output_dim: the weight dim holding output features: 0 for nn.Linear (default), 1 for a linear
            layer storing its weight (in, out), e.g. transformers' Conv1D (weight Shard(1), bias Shard(0)).
        packed: how many equal parts the output features pack (default 1: none). With packed > 1 the output
            keeps its packed layout unless ``output_layouts`` is given.

    Example::

        parallelize_module(model, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        parallelize_module(block, mesh, {"attn.qkv": ColwiseParallel(packed=3, use_local_output=False),
                                         "attn.proj": RowwiseParallel()})
    """

    def __init__(self, *, packed: int = 1, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(packed, int) or isinstance(packed, bool) or packed < 1:
            raise ValueError(
                f"packed must be an int >= 1, the number of equal parts fused into the output features (3 for "
                f"[q|k|v], 2 for [gate|up]), got {packed!r}"
            )
        self.packed = packed

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, packed={self.packed})"

    def _part_layout(self, module: nn.Module, name: str, dim: int) -> Placement:
        """Shard(dim), or each rank's rows of every packed part: StridedShard(dim, packed)."""
        if self.packed == 1:
            return Shard(dim)
        size = getattr(module, name).shape[dim]
        if size % self.packed:
            raise ValueError(
                f"ColwiseParallel(packed={self.packed}): {type(module).__name__}.{name} has {size} output features, "
                f"not {self.packed} equal parts; pass the number of parts the features pack"
            )
        return StridedShard(dim, self.packed)

    def _layouts(self, module):
        if isinstance(module, nn.Embedding):
            if self.packed != 1:
                raise ValueError(f"ColwiseParallel(packed={self.packed}) packs a linear layer's outputs, not nn.Embedding's")
            params = {"weight": Shard(1)}
        else:
            params = {"weight": self._part_layout(module, "weight", self._linear_output_dim(module))}
            if getattr(module, "bias", None) is not None:
                params["bias"] = self._part_layout(module, "bias", 0)
        # None: the packed output keeps its StridedShard (a Shard(-1) would gather and re-split it)
        output = self.output_layouts or (Shard(-1) if self.packed == 1 else None)
        return self.input_layouts or Replicate(), Replicate(), output, params


class RowwiseParallel(_LinearStyle):
    """Split the input features: nn.Linear weight Shard(1), bias Replicate; nn.Embedding weight Shard(0) (vocab).

    The local product is a partial sum (Partial); ``output_layouts`` says where it goes: Replicate (default,
    one all-reduce) or Shard(1) (one reduce-scatter of the same bytes, sequence parallel).

    Args:
        input_layouts: layout of the input (default Shard(-1) for Linear, Replicate for Embedding).
        output_layouts: layout of the output (default Replicate).
        use_local_output: return this rank's block (a plain tensor) instead of a DTensor.
        weight_output_dim: as for ColwiseParallel; the weight is sharded on its other (input-feature) dim.
    """

    def _layouts(self, module):
        if isinstance(module, nn.Embedding):
            layout, output = self.input_layouts or Replicate(), self.output_layouts or Replicate()
            return layout, Replicate(), output, {"weight": Shard(0)}
        params = {"weight": Shard(1 - self._linear_output_dim(module)), "bias": Replicate()}
        return self.input_layouts or Shard(-1), Shard(-1), self.output_layouts or Replicate(), params


class SequenceParallel(ParallelStyle):
    """Run a norm or dropout module on sequence shards: parameters Replicate, input and output Shard(sequence_dim).

    The module's math is per token, so it needs no communication; its parameter gradients come back Partial
    and are reduced where they meet the Replicate parameters.

    Args:
        sequence_dim: the sequence dim of the activations (default 1, for (B, T, D)).
        use_local_output: return this rank's block instead of a DTensor (default False: the next module,
            e.g. ColwiseParallel(input_layouts=Shard(1)), takes the DTensor).
    """

    def __init__(self, *, sequence_dim: int = 1, use_local_output: bool = False):
        if not isinstance(sequence_dim, int):
            raise TypeError(f"sequence_dim must be an int tensor dim, got {sequence_dim!r}")
        self.sequence_dim = sequence_dim
        self.use_local_output = use_local_output

    def __repr__(self) -> str:
        return f"SequenceParallel(sequence_dim={self.sequence_dim}, use_local_output={self.use_local_output})"

    def apply(self, module: nn.Module, device_mesh) -> nn.Module:
        _check_mesh(device_mesh, self)
        for name, _ in list(module.named_parameters(recurse=False)):
            _distribute_parameter(module, name, device_mesh, Replicate())
        layout = Shard(self.sequence_dim)
        module.register_forward_pre_hook(lambda _, inputs: _prepare_first_input(inputs, device_mesh, layout, layout))
        module.register_forward_hook(lambda _, __, outputs: _finish_output(outputs, device_mesh, layout, self.use_local_output))
        return module


def _layouts_tuple(value, what: str) -> tuple:
    values = (value,) if value is None or isinstance(value, Placement) else tuple(value)
    for v in values:
        _check_placement(v, what)
    return values


def _check_same_length(a: tuple, b: tuple, names: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{names} need one entry per tensor (None to skip one), got {len(a)} and {len(b)} entries")


def _convert_each(values: Sequence, layouts: tuple, desired: tuple, device_mesh, use_local: bool, what: str) -> list:
    if len(values) != len(layouts):
        raise ValueError(
            f"the module has {len(values)} {what}, but {len(layouts)} layouts were declared; "
            f"declare one each (None to skip one)"
        )
    converted = []
    for x, layout, want in zip(values, layouts, desired):
        if layout is not None and isinstance(x, torch.Tensor):
            x = _redistribute(_to_dtensor(x, device_mesh, layout), want, device_mesh, boundary=True)
            x = x.to_local() if use_local else x
        converted.append(x)
    return converted


class PrepareModuleInput(ParallelStyle):
    """Lay out a module's inputs: each positional input is taken to be in ``input_layouts`` and moved to
    ``desired_input_layouts`` (None entries leave that input alone); keyword inputs likewise, by name, with
    ``input_kwarg_layouts`` and ``desired_input_kwarg_layouts``.

    Example::

        PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None))
        PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                           desired_input_kwarg_layouts={"hidden_states": Replicate()})
    """

    def __init__(
        self,
        *,
        input_layouts=None,
        desired_input_layouts=None,
        input_kwarg_layouts: dict | None = None,
        desired_input_kwarg_layouts: dict | None = None,
        use_local_output: bool = False,
    ):
        positional = input_layouts is not None or desired_input_layouts is not None
        self.input_layouts = _layouts_tuple(input_layouts, "input_layouts") if positional else ()
        self.desired_input_layouts = _layouts_tuple(desired_input_layouts, "desired_input_layouts") if positional else ()
        _check_same_length(self.input_layouts, self.desired_input_layouts, "input_layouts and desired_input_layouts")
        self.input_kwarg_layouts = dict(input_kwarg_layouts or {})
        self.desired_input_kwarg_layouts = dict(desired_input_kwarg_layouts or {})
        if set(self.input_kwarg_layouts) != set(self.desired_input_kwarg_layouts):
            raise ValueError(
                f"input_kwarg_layouts names {sorted(self.input_kwarg_layouts)} but desired_input_kwarg_layouts names "
                f"{sorted(self.desired_input_kwarg_layouts)}; give both a layout for the same keyword inputs"
            )
        for name in self.input_kwarg_layouts:
            _check_placement(self.input_kwarg_layouts[name], f"input_kwarg_layouts[{name!r}]")
            _check_placement(self.desired_input_kwarg_layouts[name], f"desired_input_kwarg_layouts[{name!r}]")
        self.use_local_output = use_local_output

    def apply(self, module: nn.Module, device_mesh) -> nn.Module:
        _check_mesh(device_mesh, self)

        def hook(_, args, kwargs):
            if self.input_layouts:
                layouts, desired = self.input_layouts, self.desired_input_layouts
                args = tuple(_convert_each(args, layouts, desired, device_mesh, self.use_local_output, "positional inputs"))
            if self.input_kwarg_layouts:
                kwargs = dict(kwargs)
                for name, layout in self.input_kwarg_layouts.items():
                    if name not in kwargs:
                        raise ValueError(f"the module was called without the keyword input {name!r} that the plan lays out")
                    want = self.desired_input_kwarg_layouts[name]
                    (kwargs[name],) = _convert_each((kwargs[name],), (layout,), (want,), device_mesh, self.use_local_output, "keyword input")
            return args, kwargs

        module.register_forward_pre_hook(hook, with_kwargs=True)
        return module


class PrepareModuleOutput(ParallelStyle):
    """Lay out a module's outputs (one tensor or a tuple): each is taken to be in ``output_layouts`` and moved
    to ``desired_output_layouts``; returned as local blocks when ``use_local_output`` (default True)."""

    def __init__(self, *, output_layouts, desired_output_layouts, use_local_output: bool = True):
        self.output_layouts = _layouts_tuple(output_layouts, "output_layouts")
        self.desired_output_layouts = _layouts_tuple(desired_output_layouts, "desired_output_layouts")
        _check_same_length(self.output_layouts, self.desired_output_layouts, "output and desired_output layouts")
        self.use_local_output = use_local_output

    def apply(self, module: nn.Module, device_mesh) -> nn.Module:
        _check_mesh(device_mesh, self)

        def hook(_, __, outputs):
            single = not isinstance(outputs, (tuple, list))
            values = [outputs] if single else list(outputs)
            layouts, desired = self.output_layouts, self.desired_output_layouts
            converted = _convert_each(values, layouts, desired, device_mesh, self.use_local_output, "outputs")
            return converted[0] if single else type(outputs)(converted)

        module.register_forward_hook(hook)
        return module
