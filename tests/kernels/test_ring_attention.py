"""Ring attention (ops/ring_attention.py) with its per-block flash kernel on Triton (interpreter): on 2 gloo
ranks, causal and not, GQA, a sequence of 9 (blocks of 5 and 4), equal to one device forward and backward.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from dtensor_plus import Shard, distribute_tensor, init_device_mesh, manual_seed
from dtensor_plus.kernels import kernel_counts, reset_kernel_counts, use_kernels
from dtensor_plus.layouts import context_parallel
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks


def _ring_rank(causal: bool):
    os.environ["TRITON_INTERPRET"] = "1"  # before this rank's first kernel call (see conftest.py)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
    manual_seed(0)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 9, 8, generator=g) for h in (4, 2, 2))  # (B, H, T, D), 2 kv heads: GQA
    q, k, v = (distribute_tensor(t, mesh, [Shard(2)]).requires_grad_() for t in (q, k, v))
    reset_kernel_counts()
    with use_kernels(True), context_parallel("cp", kind="ring"):
        assert_spmd_equal(lambda *qkv: F.scaled_dot_product_attention(*qkv, is_causal=causal, enable_gqa=True), q, k, v)
    # block pairs, forward and backward alike: 2 per rank; causal: rank 0 skips (q block 0, kv block 1)
    pairs = 1 if causal and mesh.get_local_rank("cp") == 0 else 2
    assert kernel_counts()["flash_attention"] == 2 * pairs, kernel_counts()


@pytest.mark.parametrize("causal", [False, True])
def test_ring_attention_on_the_flash_kernel_equals_one_device(causal):
    run_on_ranks(2, _ring_rank, causal)
