"""How benchmarks/compile_step.py places the GPT on the layouts PyTorch's stack has no counterpart for: 2-D tensor
parallelism (SUMMA), context parallelism with striped load balance and USP, HSDP and ring cp with keep_attention
recomputation. dtensor_plus only; a ``Placed`` as benchmarks/layout_setups.py makes, whose ``loss_ctx`` enters
the layout's rules around the step (tensor_parallel_2d / context_parallel, and loss_parallel), outside the
compiled model, as the layouts ask under torch.compile.

Layouts (n = world size): "2d" (row x col, n = q^2), "cp striped" (cp=n), "cp usp" (ring=2 x ulysses=n/2),
"hsdp" (replicate=2 x shard=n/2), "cp keep_attention" (ring cp=n, each block recomputed but its attention).
"""

from __future__ import annotations

import contextlib
import math

import dtensor_plus as dtp
from dtensor_plus import Shard, distribute_tensor
from dtensor_plus.layouts import context_parallel, fully_shard, loss_parallel, parallelize_module, replicate
from dtensor_plus.layouts.context_parallel import striped_placement
from dtensor_plus.layouts.recompute import checkpoint_modules
from dtensor_plus.layouts.tensor_2d import Grid2D, tensor_parallel_2d
from gpt_tensor_nd import plan_2d
from layout_setups import Placed, _adamw

ND_LAYOUTS = ("2d", "cp striped", "cp usp", "hsdp", "cp keep_attention")


def nd_mesh_shape(layout: str, world: int) -> dict:
    if layout == "2d":
        q = math.isqrt(world)
        if q * q != world:
            raise ValueError(f"the 2-D layout needs a square world size, got {world}")
        return {"row": q, "col": q}
    if layout == "cp usp":
        return {"ring": 2, "ulysses": world // 2}
    if layout == "hsdp":
        return {"replicate": 2, "shard": world // 2}
    return {"cp": world}


def _both(*contexts):
    @contextlib.contextmanager
    def entered():
        with contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context())
            yield
    return entered


def place_ours_nd(layout: str, model, world: int) -> Placed:
    shape = nd_mesh_shape(layout, world)
    mesh = dtp.init_device_mesh("cpu", tuple(shape.values()), mesh_dim_names=tuple(shape))
    if layout == "2d":
        grid = Grid2D()
        parallelize_module(model, mesh, plan_2d(grid))
        dtp.distribute_module(model, mesh)  # the causal-mask buffer
        targets = lambda y: distribute_tensor(y, mesh, grid.tokens(mesh), src_data_rank=None)  # noqa: E731
        return Placed(model, _adamw(model.parameters()), lambda x, y: (x, targets(y)),
                      _both(lambda: tensor_parallel_2d(grid), loss_parallel), mesh_shape=shape)
    if layout == "hsdp":
        dims = ("replicate", "shard")
        dtp.distribute_module(model, mesh)
        for block in model.blocks:
            fully_shard(block, mesh, mesh_dim=dims)
        fully_shard(model, mesh, mesh_dim=dims)
        place = lambda t: distribute_tensor(t, mesh, [Shard(0), Shard(0)], src_data_rank=None)  # noqa: E731
        return Placed(model, _adamw(model.parameters()), lambda x, y: (place(x), place(y)), mesh_shape=shape)
    # context parallel: the sequence sharded, every gradient reduced over the (outer) cp mesh dim like dp's
    replicate(model, mesh, dp_mesh_dim=tuple(shape)[0])
    if layout == "cp keep_attention":
        checkpoint_modules(model, "blocks.*", "keep_attention")
    if layout == "cp striped":
        scope = lambda: context_parallel("cp", load_balance="striped")  # noqa: E731
        seq = lambda t: [striped_placement(1, t.shape[1], world)]  # noqa: E731
    elif layout == "cp usp":
        scope = lambda: context_parallel(("ring", "ulysses"), kind="usp")  # noqa: E731
        seq = lambda t: [Shard(1), Shard(1)]  # noqa: E731
    else:
        scope = lambda: context_parallel("cp")  # noqa: E731
        seq = lambda t: [Shard(1)]  # noqa: E731
    place = lambda t: distribute_tensor(t, mesh, seq(t), src_data_rank=None)  # noqa: E731
    return Placed(model, _adamw(model.parameters()), lambda x, y: (place(x), place(y)), _both(scope, loss_parallel),
                  mesh_shape=shape)


def config_for(layout: str, config):
    """The preset as the layout runs it: SDPA attention where context parallelism reads SDPA."""
    return config.replace(attention="sdpa") if layout.startswith("cp") else config
