"""The model the planner lays out: the user's own code (build, place, step), at any depth.

``Workload`` holds three callables the planner runs inside a simulated world (``dtensor_plus.simulate``): ``build``
makes the single-device model with a given number of layers, ``place`` lays it out on a mesh (dims named "dp",
"tp", "cp") and returns its optimizer, ``step`` runs forward and backward of one microbatch. ``gpt_workload``
makes one for ``examples/gpt.py``'s GPT placed by ``examples/gpt_layouts.py``; any other model gives its own
three functions to ``Workload(...)``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

import dtensor_plus

from .layout import ParallelLayout

__all__ = ["Workload", "gpt_workload", "GPT_PRESETS"]


@dataclass(frozen=True)
class Workload:
    """The user's model as the planner runs it: its own code, at any depth.

    build(num_layers) -> the single-device model (called inside a simulated world, so tensors are meta);
    place(model, mesh, layout) -> its optimizer, after laying the model out on ``mesh`` (dims "dp", "tp", "cp";
    sizes from ``layout``); step(model, mesh, layout, micro_batch_size): forward + backward of one microbatch of
    (micro_batch_size, seq_len) tokens. The shape fields (layers, sequence, width, heads, vocabulary) feed the
    model-FLOPs formula of MFU and the search's divisibility rules.
    """

    name: str
    num_layers: int
    seq_len: int
    hidden: int
    num_heads: int
    vocab_size: int
    build: Callable[[int], nn.Module]
    place: Callable[..., torch.optim.Optimizer]
    step: Callable[..., None]
    experts: int = 0

    def model_flops(self, tokens: int) -> float:
        """Model FLOPs of forward + backward over ``tokens`` tokens (no recomputation; Narayanan et al. 2021,
        DESIGN.md "Reference figures"): 72 tokens l h^2 (1 + s/(6h) + V/(12 l h))."""
        l, h, s, v = self.num_layers, self.hidden, self.seq_len, self.vocab_size
        return 72.0 * tokens * l * h * h * (1 + s / (6 * h) + v / (12 * l * h))

    def published_flops(self, tokens: int) -> float:
        """The same with full activation recomputation (one more forward): 96 tokens l h^2 (1 + s/(6h) +
        V/(16 l h)), the figure Narayanan et al. 2021 report TFLOP/s with."""
        l, h, s, v = self.num_layers, self.hidden, self.seq_len, self.vocab_size
        return 96.0 * tokens * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))


def _preset(layers, hidden, heads, seq=2048, vocab=51200, dtype="bfloat16"):
    return MappingProxyType(dict(num_layers=layers, dim=hidden, num_heads=heads, block_size=seq, vocab_size=vocab,
                                 dtype=dtype))


# GPT shapes (GPTConfig fields, and the dtype the model is built in: large models train in bf16 mixed precision,
# which the profile counts as 16-bit activations and collectives with fp32 master weights and Adam moments). gpt3-175b: Brown et al. 2020. "megatron-*": Narayanan et al. 2021, Table 1
# (seq 2048, vocabulary 51200). mt-nlg-530b: Smith et al. 2022 (105 layers, 20480 wide, 128 heads).
GPT_PRESETS: Mapping[str, Mapping] = MappingProxyType({
    "tiny": _preset(2, 64, 4, seq=32, vocab=256, dtype="float32"),
    "gpt3-175b": _preset(96, 12288, 96),
    "megatron-1.7b": _preset(24, 2304, 24),
    "megatron-3.6b": _preset(30, 3072, 32),
    "megatron-7.5b": _preset(36, 4096, 32),
    "megatron-18b": _preset(40, 6144, 48),
    "megatron-39b": _preset(48, 8192, 64),
    "megatron-76b": _preset(60, 10240, 80),
    "megatron-145b": _preset(80, 12288, 96),
    "megatron-310b": _preset(96, 16384, 128),
    "megatron-530b": _preset(105, 20480, 128),
    "megatron-1t": _preset(128, 25600, 160),
    "mt-nlg-530b": _preset(105, 20480, 128, vocab=50272),  # GPT-2's 50257 tokens padded to 50272
})


@functools.lru_cache(maxsize=1)
def _examples():
    """examples/gpt.py and examples/gpt_layouts.py, loaded from the repository beside the package."""
    folder = Path(dtensor_plus.__file__).resolve().parents[1] / "examples"
    if not (folder / "gpt.py").is_file() or not (folder / "gpt_layouts.py").is_file():
        raise FileNotFoundError(
            f"gpt_workload needs examples/gpt.py and examples/gpt_layouts.py beside the package (looked in "
            f"{folder}); for another model (or an installed package without examples) build a "
            f"Workload(name, num_layers, seq_len, hidden, num_heads, vocab_size, build, place, step) yourself")
    loaded = {}
    for name in ("gpt", "gpt_layouts"):  # gpt_layouts imports `gpt` by name: register it first
        module = sys.modules.get(name)
        if module is None or Path(getattr(module, "__file__", "")).resolve().parent != folder:
            spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        loaded[name] = module
    return loaded["gpt"], loaded["gpt_layouts"]


def gpt_workload(preset: str | Mapping) -> Workload:
    """examples/gpt.py's GPT as a Workload (see ``_gpt_workload``); a preset name gives the same Workload object
    every time, so the profiles simulated for it are cached across calls."""
    if isinstance(preset, str):
        return _named_gpt_workload(preset)
    return _gpt_workload(preset)


@functools.lru_cache(maxsize=None)
def _named_gpt_workload(name: str) -> Workload:
    return _gpt_workload(name)


def _gpt_workload(preset: str | Mapping) -> Workload:
    """examples/gpt.py's GPT as a Workload: ``preset`` names a ``GPT_PRESETS`` entry or gives GPTConfig fields
    (num_layers, dim, num_heads, block_size, vocab_size, ...; "dtype": the model's dtype name, default float32;
    "attention": "sdpa" by default, flash attention as large runs use it). Placed by examples/gpt_layouts.py (tp with or
    without sp, cp ring attention, dp / ZeRO), one microbatch's loss under ``loss_parallel`` (and
    ``context_parallel`` with cp > 1)."""
    if isinstance(preset, str):
        if preset not in GPT_PRESETS:
            raise ValueError(f"unknown GPT preset {preset!r}; known: {sorted(GPT_PRESETS)} (or pass GPTConfig "
                             "fields as a dict)")
        name, fields = preset, dict(GPT_PRESETS[preset])
    else:
        fields = dict(preset)
        name = fields.pop("name", "gpt")
    gpt, _ = _examples()
    dtype = getattr(torch, fields.pop("dtype", "float32"))
    if fields.get("num_layers") is None:
        raise ValueError("gpt_workload needs num_layers among the GPTConfig fields")
    base = gpt.GPTConfig(**{**fields, "num_layers": 1, "attention": fields.get("attention", "sdpa")})
    return Workload(
        name=name, num_layers=fields["num_layers"], seq_len=base.block_size, hidden=base.dim,
        num_heads=base.num_heads, vocab_size=base.vocab_size,
        build=functools.partial(_build_gpt, base, dtype), place=_place_gpt, step=_step_gpt, experts=base.moe_experts,
    )


def _build_gpt(config, dtype, num_layers: int) -> nn.Module:
    gpt, _ = _examples()
    return gpt.GPT(config.replace(num_layers=num_layers)).to(dtype)


def _gpt_layout(layout: ParallelLayout):
    _, gpt_layouts = _examples()
    return gpt_layouts.Layout(dp=layout.dp, tp=layout.tp, sp=layout.sequence_parallel, zero=layout.zero,
                              cp=layout.cp)


def _place_gpt(model, mesh, layout: ParallelLayout):
    _, gpt_layouts = _examples()
    spec = _gpt_layout(layout)
    gpt_layouts.place_model(model, mesh, spec)
    return gpt_layouts.make_optimizer(model, mesh, spec, 1e-4)


def _step_gpt(model, mesh, layout: ParallelLayout, micro_batch_size: int) -> None:
    from dtensor_plus.layouts import context_parallel, loss_parallel

    _, gpt_layouts = _examples()
    T, V = model.config.block_size, model.config.vocab_size
    tokens = torch.zeros(micro_batch_size * layout.dp, T, dtype=torch.long)
    scope = context_parallel("cp", "ring") if layout.cp > 1 else contextlib.nullcontext()
    with scope, loss_parallel():
        loss = model.loss(gpt_layouts.place_batch(tokens, mesh), gpt_layouts.place_batch(tokens.remainder(V), mesh))
        loss.backward()
