"""What only a GPU can check: the Triton kernels compiled for the device (not interpreted) against their torch
references, and DTensor collectives over NCCL. Marked ``gpu``; skipped where CUDA is absent (this project's CI
machine), run by ``benchmarks/gpu/run.sh`` whenever a GPU machine is at hand."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.kernels import kernel_counts, reset_kernel_counts, use_kernels
from dtensor_plus.kernels.cross_entropy import cross_entropy
from dtensor_plus.kernels.flash_attention import flash_attention, flash_attention_reference
from dtensor_plus.kernels.grouped_gemm import grouped_mm, grouped_mm_reference
from dtensor_plus.kernels.norms import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture(autouse=True)
def _compiled_kernels():
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "GPU tests check compiled kernels: unset TRITON_INTERPRET"
    reset_kernel_counts()
    yield


def _both(fn, *inputs):
    """fn on the kernel and on the reference path, forward and input gradients."""
    results = []
    for mode in (True, False):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        with use_kernels(mode):
            out = fn(*leaves)
            out = out[0] if isinstance(out, tuple) else out
            grads = torch.autograd.grad(out.float().square().sum(), [t for t in leaves if t.requires_grad])
        results.append((out, grads))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_kernels_compiled_match_torch(dtype):
    x = torch.randn(64, 1024, device="cuda", dtype=dtype)
    w = torch.randn(1024, device="cuda", dtype=dtype)
    (k_out, k_grads), (r_out, r_grads) = _both(lambda a, b: rms_norm(a, b), x, w)
    torch.testing.assert_close(k_out, rms_norm_reference(x, w), **TOL[dtype])
    for a, b in zip(k_grads, r_grads):
        torch.testing.assert_close(a, b, **TOL[dtype])
    (k_out, _), _ = _both(lambda a, b: layer_norm(a, b), x, w)
    torch.testing.assert_close(k_out, layer_norm_reference(x, w), **TOL[dtype])
    assert sum(kernel_counts().values()) > 0, "the Triton kernels never ran"


def test_cross_entropy_kernel_compiled_matches_torch():
    logits = torch.randn(256, 32000, device="cuda")
    target = torch.randint(0, 32000, (256,), device="cuda")
    with use_kernels(True):
        got = cross_entropy(logits, target)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(logits, target), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_compiled_matches_reference(causal):
    q, k, v = (torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with use_kernels(True):
        out = flash_attention(q, k, v, causal=causal)[0]
    ref = flash_attention_reference(q, k, v, causal=causal)
    torch.testing.assert_close(out.float(), (ref[0] if isinstance(ref, tuple) else ref).float(), rtol=2e-2, atol=2e-2)


def test_grouped_gemm_compiled_matches_reference():
    counts = torch.tensor([5, 0, 37, 86], device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16)
    with use_kernels(True):
        out = grouped_mm(x, w, counts)
    torch.testing.assert_close(out.float(), grouped_mm_reference(x, w, counts).float(), rtol=2e-2, atol=2e-1)


@pytest.fixture(scope="module")
def nccl_world():
    """A one-rank NCCL world in this process (the multi-GPU runs go through torchrun in run.sh)."""
    if dist.is_initialized():
        yield
        return
    path = tempfile.mktemp()
    dist.init_process_group("nccl", init_method=f"file://{path}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


def test_dtensor_over_nccl_matches_one_device(nccl_world):
    mesh = dtp.init_device_mesh("cuda", (1,))
    x_full, w_full = torch.randn(16, 32, device="cuda"), torch.randn(32, 8, device="cuda")
    x = dtp.distribute_tensor(x_full, mesh, [Shard(0)])
    w = dtp.distribute_tensor(w_full, mesh, [Replicate()])
    with dtp.comm_mode() as comm:
        y = (x @ w).relu().sum(0)
        total = dtp.DTensor.from_local(y.to_local(), mesh, [Partial()]).full_tensor()
    torch.testing.assert_close(y.full_tensor(), (x_full @ w_full).relu().sum(0))
    torch.testing.assert_close(total, (x_full @ w_full).relu().sum(0))
    assert comm.count() >= 0 and y.device.type == "cuda"
