"""Run one function on its kernel path and its reference path and compare outputs and gradients.

Tolerances are per dtype: both paths compute in fp32 and round once to the output dtype, so they differ by
about one rounding of that dtype (fp32 1e-5 leaves room for summation order; bf16 has 8 mantissa bits, fp16 11).
"""

from __future__ import annotations

import torch

from dtensor_plus.kernels import switch

TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
LOW_PRECISION = [torch.bfloat16, torch.float16]  # both run in Triton 3.9's interpreter (bf16 computed in fp32)


def _run(fn, inputs, mode, seed_grads):
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    with switch.use_kernels(mode):
        outputs = fn(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        leaves = [t for t in inputs if t.requires_grad]
        loss = sum((o.float() * g).sum() for o, g in zip(outputs, seed_grads(outputs)) if o.is_floating_point())
        grads = torch.autograd.grad(loss, leaves) if leaves else ()
    return outputs, grads


def assert_kernel_matches(fn, inputs, *, kernel: str, dtype: torch.dtype, scale: float = 1.0) -> None:
    """fn(*inputs) on the Triton kernel (interpreter) equals the reference, forward and backward.

    ``scale`` widens the tolerance for results whose magnitude grows with the problem (sums of many terms).
    """
    grads_seed = {}

    def seed_grads(outputs):  # the same random upstream gradients for both runs
        if not grads_seed:
            g = torch.Generator().manual_seed(0)
            grads_seed["g"] = [torch.randn(o.shape, generator=g) for o in outputs]
        return grads_seed["g"]

    ref_out, ref_grads = _run(fn, inputs, False, seed_grads)
    before = switch.kernel_counts()[kernel]
    out, grads = _run(fn, inputs, True, seed_grads)
    assert switch.kernel_counts()[kernel] > before, f"the {kernel} kernel did not run"
    tol = {k: v * scale for k, v in TOLERANCES[dtype].items()}
    for name, got, want in [*zip(["out"] * len(out), out, ref_out), *zip(["grad"] * len(grads), grads, ref_grads)]:
        assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype, got.shape, want.shape)
        torch.testing.assert_close(got.float(), want.float(), **tol, equal_nan=True, msg=lambda m: f"{name}: {m}")
