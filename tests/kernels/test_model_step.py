"""A tensor- and sequence-parallel model step takes the kernel path when asked: on 2 gloo ranks, with
``use_kernels(True)`` (Triton interpreter), its LayerNorms run the fused norm kernel through the op rules
(ops/normalization.py) and its loss the fused cross-entropy kernel through loss_parallel's fused path
(layouts/loss.py); loss and every gradient equal one device.

Legend: B batch, T sequence (5: split 3 + 2), D model width, V vocabulary (37, over 2 ranks: 19 + 18).
"""

import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import dtensor_plus as dtp
from dtensor_plus import Shard
from dtensor_plus.kernels import kernel_counts, reset_kernel_counts, use_kernels
from dtensor_plus.layouts import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module
from dtensor_plus.layouts.loss import parallel_cross_entropy
from dtensor_plus.testing import run_on_ranks

B, T, D, V = 2, 5, 12, 37


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.norm_f = nn.LayerNorm(D), nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, 20), nn.Linear(20, D)
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, x_BTD):
        h_BTD = x_BTD + self.fc2(F.gelu(self.fc1(self.norm(x_BTD))))
        return self.head(self.norm_f(h_BTD))


_PLAN = {
    "norm": SequenceParallel(), "norm_f": SequenceParallel(),
    "fc1": ColwiseParallel(input_layouts=Shard(1)),
    "fc2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
    "head": ColwiseParallel(input_layouts=Shard(1), use_local_output=False),  # logits stay Shard(2): the vocab
}


def _step_rank():
    os.environ["TRITON_INTERPRET"] = "1"  # before this rank's first kernel call (see conftest.py)
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    reference = TinyLM()
    with torch.no_grad():  # move the norms off (1, 0) so their gradients are checked honestly
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x_BTD, target_BT = torch.randn(B, T, D, generator=g), torch.randint(0, V, (B, T), generator=g)

    want = F.cross_entropy(reference(x_BTD).flatten(0, 1), target_BT.flatten())
    want.backward()

    parallel = copy.deepcopy(reference)
    parallel.zero_grad()
    parallelize_module(parallel, mesh, _PLAN)
    reset_kernel_counts()
    with use_kernels(True):
        logits = parallel(dtp.distribute_tensor(x_BTD, mesh, [Shard(1)]))
        assert logits.placements == (Shard(2),), logits.placements
        loss = parallel_cross_entropy(logits.flatten(0, 1), target_BT.flatten())
        loss.backward()
    counts = kernel_counts()
    assert counts["cross_entropy"] == 1 and counts["layer_norm"] == 4, counts  # 2 norms, forward and backward
    torch.testing.assert_close(loss.full_tensor(), want)
    for (name, p), (_, p_ref) in zip(parallel.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), p_ref.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_tensor_parallel_step_takes_the_kernels():
    run_on_ranks(2, _step_rank)
