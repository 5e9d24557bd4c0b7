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
rows and heads (num_heads must divide by q).
"""

from __future__ import annotations

from dtensor_plus.layouts.tensor_2d import Embedding2D, Grid2D, HiddenParameter2D, LayerNorm2D, Linear2D

__all__ = ["plan_2d"]

LINEARS = ("blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.v", "blocks.*.attn.proj", "blocks.*.mlp.fc",
           "blocks.*.mlp.out", "head")


def plan_2d(grid: Grid2D = Grid2D()) -> dict:
    """The 2-D (or, with ``grid.depth_mesh_dim``, 2.5-D) plan for ``parallelize_module(model, mesh, plan)``."""
    plan = {"": HiddenParameter2D("pos_emb", grid=grid), "tok_emb": Embedding2D(grid)}
    plan.update({name: Linear2D(grid) for name in LINEARS})
    plan.update({"blocks.*.ln*": LayerNorm2D(grid), "ln_f": LayerNorm2D(grid)})
    return plan
