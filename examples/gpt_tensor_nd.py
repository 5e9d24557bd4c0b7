"""examples/gpt.py's GPT laid out for 2-D (Optimus), 2.5-D (Tesseract) and 3-D (Bian et al.) tensor parallelism:
the ``parallelize_module`` plans, one per scheme (layouts/tensor_2d.py, layouts/tensor_3d.py)::

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("row", "col"))
    grid = Grid2D()
    parallelize_module(model, mesh, plan_2d(grid))
    with tensor_parallel_2d(grid), loss_parallel():
        loss = F.cross_entropy(model(tokens).flatten(0, 1), grid.place_tokens(targets, mesh).flatten(0, 1))
        loss.backward()

Every linear layer is a 2-D one (q, k, v, proj, fc, out and the classifier), every norm a sharded-hidden one,
the token embedding gathered on row, the position table hidden-sharded; attention runs on each rank's batch
rows and heads (num_heads dividing by q keeps them split; see layouts/tensor_2d.py). ``distribute_module(model, mesh)`` afterwards replicates the
causal-mask buffer. The 3-D plan (``plan_3d``, mesh dims ("seq", "batch", "hidden") in that order)::

    cube = Cube3D()
    parallelize_module(model, mesh, plan_3d(cube))
    with tensor_parallel_3d(), loss_parallel():
        logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), cube.place(targets, mesh, cube.targets(mesh)).flatten(0, 1))
"""

from __future__ import annotations

from dtensor_plus.layouts.tensor_2d import Embedding2D, Grid2D, HiddenParameter2D, LayerNorm2D, Linear2D
from dtensor_plus.layouts.tensor_3d import Cube3D, Embedding3D, HiddenParameter3D, LayerNorm3D, Linear3D

__all__ = ["plan_2d", "plan_3d"]

LINEARS = ("blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.v", "blocks.*.attn.proj", "blocks.*.mlp.fc",
           "blocks.*.mlp.out", "head")


def plan_2d(grid: Grid2D = Grid2D()) -> dict:
    """The 2-D (or, with ``grid.depth_mesh_dim``, 2.5-D) plan for ``parallelize_module(model, mesh, plan)``."""
    plan = {"": HiddenParameter2D("pos_emb", grid=grid), "tok_emb": Embedding2D(grid)}
    plan.update({name: Linear2D(grid) for name in LINEARS})
    plan.update({"blocks.*.ln*": LayerNorm2D(grid), "ln_f": LayerNorm2D(grid)})
    return plan


def plan_3d(cube: Cube3D = Cube3D()) -> dict:
    """The 3-D plan: q, k, v, fc and the classifier read the residual stream ("in"), proj and mlp.out write it."""
    plan = {"": HiddenParameter3D("pos_emb", cube=cube), "tok_emb": Embedding3D(cube)}
    plan.update({name: Linear3D("out" if name.endswith(("proj", "out")) else "in", cube) for name in LINEARS})
    plan.update({"blocks.*.ln*": LayerNorm3D(cube), "ln_f": LayerNorm3D(cube)})
    return plan
