"""Hugging Face's tensor-parallel plans, as written in ``transformers`` (``model.tp_plan``, a config's
``base_model_tp_plan``): a dict from module (or parameter) name patterns to style *strings*, translated here to
dtensor_plus styles, so ``parallelize_module(model, mesh["tp"], model.tp_plan)`` works on any causal LM::

    parallelize_module(model, mesh["tp"], model.tp_plan)
    with dtp.implicit_replication():            # the position ids, rotary tables and masks HF builds inside
        logits = model(input_ids).logits        # a DTensor: Replicate on tp, equal to one device

Why the activations stay DTensors (every style here keeps ``use_local_output=False``) where transformers hands
the model code local blocks: HF's own styles make each rank see its heads as a smaller tensor, which only
works when the head counts divide by the tp size (``get_kv_heads_per_rank`` gives up otherwise) and only on a
1-D mesh. A DTensor keeps the global shape: HF's attention reads ``num_heads`` and ``head_dim`` from the config
and views with ``-1`` heads, so nothing needs localising; heads the mesh does not divide (4 heads on 3 ranks)
are sharded as torch.chunk cuts them and the view rules move what must move; and the same plan composes with
``replicate`` (dp x tp) and ``fully_shard`` (ZeRO-3), which lift the parameters onto the whole mesh.

Each string, and what it becomes (transformers' meaning in brackets):

    colwise, unit_colwise        ColwiseParallel: weight/bias Shard(0), output Shard(-1)    [heads split]
    rowwise, unit_rowwise        RowwiseParallel: weight Shard(1), output Replicate (all-reduce)
    colwise_gather_output, colwise_rep
                                 ColwiseParallel(output_layouts=Replicate()): columns gathered [lm_head]
    rowwise_split_input, rowwise_rep
                                 RowwiseParallel(input_layouts=Replicate()): a replicated input is cut
    embedding_rowwise            RowwiseParallel on nn.Embedding: vocabulary shards, Partial -> Replicate
    embedding_colwise            ColwiseParallel on nn.Embedding: feature shards gathered to Replicate
    sequence_parallel            SequenceParallel
    packed_colwise               ColwiseParallel(packed=2): the [gate | up] halves split alike
    packed_rowwise               weight StridedShard(last dim, 2) (transformers uses it on expert weights)
    replicated_with_grad_allreduce, local_params, mla_kv_a_proj, moe_tp_experts, all_reduce, replicate,
    ep_dispatch_experts, grouped_gemm
                                 ReplicateParameters: the module's own parameters Replicate on tp. These
                                 strings exist in transformers to repair local tensors (sum a gradient only
                                 some ranks saw, add a bias once, mask experts); on DTensors the rules do that.
                                 Experts go on an ep mesh dim with ``expert_parallel`` instead.

A module-level string on transformers' ``Conv1D`` (GPT-2's projections, weight stored (in, out)) gets
``weight_output_dim=1``: its class says how it stores the weight, the shape is never read for that.

A key naming a parameter rather than a module (``layers.*.mlp.experts.down_proj``: "colwise") places that
parameter alone: colwise Shard(ndim - 2), rowwise Shard(ndim - 1) (a bias Replicate), packed as above.

HF's plans list entries for layer kinds a given config may not build (the dense MLP of a model whose every
layer is a mixture of experts); like transformers, an entry of a string plan that matches nothing is skipped,
but a plan none of whose entries match raises. Every parameter no entry placed ends Replicate on the mesh, so
the model's gradients all come out as the parameters' layouts say. An unknown string raises, naming it and
the known ones.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from dtensor_plus.dtensor import DTensor
from dtensor_plus.placements import Placement, Replicate, Shard, StridedShard

from .tensor import ColwiseParallel, ParallelStyle, RowwiseParallel, SequenceParallel, _distribute_parameter

__all__ = ["ReplicateParameters", "HF_STYLE_NAMES", "is_string_plan", "translate_hf_plan"]


class ReplicateParameters(ParallelStyle):
    """Place a module's own parameters (not its children's) Replicate on the 1-D mesh; no hooks.

    Their gradients may come out Partial (a per-head norm that saw only this rank's heads); they are reduced
    to Replicate when accumulated, so the optimizer sees the single-device gradient."""

    def __init__(self, *, recurse: bool = False):
        self.recurse = recurse

    def __repr__(self) -> str:
        return f"ReplicateParameters(recurse={self.recurse})"

    def apply(self, module: nn.Module, device_mesh) -> nn.Module:
        owners = module.modules() if self.recurse else [module]
        for owner in owners:
            for name, _ in list(owner.named_parameters(recurse=False)):
                _distribute_parameter(owner, name, device_mesh, Replicate())
        return module


class _PlaceParameters(ParallelStyle):
    """Place named parameters of a module (plan keys naming parameters), each by its style string."""

    def __init__(self, style_by_param: dict[str, str]):
        self.style_by_param = dict(style_by_param)

    def __repr__(self) -> str:
        return f"_PlaceParameters({self.style_by_param!r})"

    def apply(self, module: nn.Module, device_mesh) -> nn.Module:
        for name, style_name in self.style_by_param.items():
            param = module._parameters.get(name)
            if param is not None and not isinstance(param, DTensor):
                placement = _parameter_placement(style_name, name, param.ndim)
                _distribute_parameter(module, name, device_mesh, placement)
        return module


def _parameter_placement(style_name: str, param_name: str, ndim: int) -> Placement:
    # transformers' shard_param: colwise splits the output features (dim ndim - 2 of a (..., out, in) weight,
    # the only dim of a bias), rowwise the input features; a packed weight holds [gate | up] on that dim, so
    # each half is split alike (StridedShard with 2 outer groups) and every rank keeps matching gate/up rows.
    if style_name in ("colwise", "unit_colwise", "colwise_gather_output", "colwise_rep"):
        return Shard(max(ndim - 2, 0))
    if style_name in ("rowwise", "unit_rowwise", "rowwise_split_input", "rowwise_rep"):
        return Replicate() if ndim == 1 or param_name.endswith("bias") else Shard(ndim - 1)
    if style_name == "packed_colwise":
        return StridedShard(max(ndim - 2, 0), 2)
    if style_name == "packed_rowwise":
        return Replicate() if ndim == 1 else StridedShard(ndim - 1, 2)
    return Replicate()


def _dtensors(**kwargs) -> dict:
    return dict(use_local_output=False, **kwargs)


# Module-level meaning of each string; the Colwise/Rowwise ones take the style's keywords (``weight_output_dim=1``
# for transformers' Conv1D). Styles are built per use (they hold no state but are cheap).
_MODULE_STYLES = {
    "colwise": lambda **kw: ColwiseParallel(**_dtensors(**kw)),
    "unit_colwise": lambda **kw: ColwiseParallel(**_dtensors(**kw)),
    "rowwise": lambda **kw: RowwiseParallel(**_dtensors(**kw)),
    "unit_rowwise": lambda **kw: RowwiseParallel(**_dtensors(**kw)),
    "colwise_gather_output": lambda **kw: ColwiseParallel(**_dtensors(output_layouts=Replicate(), **kw)),
    "colwise_rep": lambda **kw: ColwiseParallel(**_dtensors(output_layouts=Replicate(), **kw)),
    "rowwise_split_input": lambda **kw: RowwiseParallel(**_dtensors(input_layouts=Replicate(), **kw)),
    "rowwise_rep": lambda **kw: RowwiseParallel(**_dtensors(input_layouts=Replicate(), **kw)),
    "embedding_rowwise": lambda **kw: RowwiseParallel(**_dtensors(**kw)),
    "embedding_colwise": lambda **kw: ColwiseParallel(**_dtensors(output_layouts=Replicate(), **kw)),
    "packed_colwise": lambda **kw: ColwiseParallel(**_dtensors(packed=2, **kw)),  # [gate | up]: each half split alike
    "sequence_parallel": lambda: SequenceParallel(),
    "replicated_with_grad_allreduce": ReplicateParameters,
    "local_params": ReplicateParameters,
    "mla_kv_a_proj": ReplicateParameters,
    "moe_tp_experts": ReplicateParameters,
    "all_reduce": ReplicateParameters,
    "replicate": ReplicateParameters,
    "ep_dispatch_experts": ReplicateParameters,
    "grouped_gemm": ReplicateParameters,
}
HF_STYLE_NAMES = tuple(sorted([*_MODULE_STYLES, "packed_rowwise"]))


def is_string_plan(plan) -> bool:
    """A plan dict whose values are all transformers' style strings (``model.tp_plan``)."""
    return isinstance(plan, dict) and bool(plan) and all(isinstance(v, str) for v in plan.values())


def translate_hf_plan(module: nn.Module, plan: dict[str, str]) -> dict[str, ParallelStyle]:
    """The dtensor_plus plan for transformers' string ``plan`` on ``module``: {pattern: style}, in order, then
    ``"": ReplicateParameters(recurse=True)`` for every parameter no entry placed.

    Raises:
        ValueError: a string is not one of transformers' styles (the message lists them), a module-level string
            names a module it cannot lay out, or no entry matches any module or parameter.
    """
    unknown = sorted({v for v in plan.values() if v not in HF_STYLE_NAMES})
    if unknown:
        raise ValueError(
            f"unknown tensor-parallel style string(s) {unknown} in the plan; the known ones are {list(HF_STYLE_NAMES)}"
        )
    modules = dict(module.named_modules())
    params = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    # One key per module pattern: a module's own string and its parameters' strings apply together, in order.
    by_pattern: dict[str, list[ParallelStyle]] = {}
    for pattern, style_name in plan.items():
        entry = _module_entry(pattern, style_name, modules) or _parameter_entry(pattern, style_name, params)
        if entry:
            by_pattern.setdefault(entry[0], []).append(entry[1])
    if not by_pattern:
        raise ValueError(
            f"none of the tensor-parallel plan's patterns {list(plan)} matches a module or parameter of "
            f"{type(module).__name__}; a plan from another model? (module names start {sorted(modules)[1:6]})"
        )
    translated = {pattern: styles[0] if len(styles) == 1 else _InOrder(styles) for pattern, styles in by_pattern.items()}
    translated[""] = ReplicateParameters(recurse=True)
    return translated


def _module_entry(pattern: str, style_name: str, modules: dict[str, nn.Module]) -> tuple | None:
    names = [name for name in modules if fnmatch.fnmatchcase(name, pattern)]
    if not names:
        return None
    if style_name == "packed_rowwise":  # transformers puts it on 3-D expert weights only: place, no hooks
        return pattern, _PlaceParameters({"weight": style_name, "bias": style_name})
    style = _MODULE_STYLES[style_name]()
    if isinstance(style, (ColwiseParallel, RowwiseParallel)):
        conv1d = [_is_hf_conv1d(modules[name]) for name in names]
        for name, is_conv1d in zip(names, conv1d):
            if not is_conv1d and not isinstance(modules[name], (nn.Linear, nn.Embedding)):
                raise ValueError(
                    f"plan entry {pattern!r}: {style_name!r} lays out nn.Linear or nn.Embedding (or transformers' "
                    f"Conv1D), but {name!r} is a {type(modules[name]).__name__}; give its parameters their own entries "
                    f"instead"
                )
        if any(conv1d):
            if not all(conv1d):
                raise ValueError(f"plan entry {pattern!r} matches both Conv1D and other modules "
                                 f"({[n for n, c in zip(names, conv1d) if not c]}); give each kind its own entry")
            style = _MODULE_STYLES[style_name](weight_output_dim=1)  # the class says how it stores the weight
    return pattern, style


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2's projections): a linear layer whose weight is stored (in, out)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def _parameter_entry(pattern: str, style_name: str, params: set[str]) -> tuple | None:
    if not any(fnmatch.fnmatchcase(name, pattern) for name in params):
        return None
    owner_pattern, _, param_name = pattern.rpartition(".")
    return owner_pattern, _PlaceParameters({param_name: style_name})


class _InOrder(ParallelStyle):
    """Several styles on one module pattern, applied in the plan's order."""

    def __init__(self, styles: list[ParallelStyle]):
        self.styles = styles

    def __repr__(self) -> str:
        return f"_InOrder({self.styles!r})"

    def apply(self, module: nn.Module, device_mesh) -> nn.Module:
        for style in self.styles:
            style.apply(module, device_mesh)
        return module
