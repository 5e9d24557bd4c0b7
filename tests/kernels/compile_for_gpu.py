"""Compile every Triton kernel ahead of time for an NVIDIA GPU target, on a machine without a GPU.

The interpreter runs the kernels' Python, not triton's compiler: typing rules of the compiled language (loop-
carried types, constexpr branches, dot operand dtypes, block shapes) are only checked by compiling. Triton
ships ptxas, so ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (H100) works on CPU. Run as a script in a
process without TRITON_INTERPRET (the kernels must be decorated for compiling):

    .venv/bin/python tests/kernels/compile_for_gpu.py bf16 fp16 fp32     # one line per kernel and variant
    .venv/bin/python tests/kernels/compile_for_gpu.py bf16 --no-flash    # what the test suite runs
"""

from __future__ import annotations

import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "compile_for_gpu.py needs TRITON_INTERPRET unset"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import torch  # noqa: E402

from dtensor_plus.kernels import cross_entropy_triton, flash_attention_triton, grouped_gemm_triton, norms_triton  # noqa: E402
from dtensor_plus.kernels.switch import launch_options  # noqa: E402


def _signature(fn, ptrs: dict, ints=(), floats=(), constexprs=()) -> dict:
    """Every argument of ``fn``: pointers typed as given, *stride_* i64, other ints i32, constexprs."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
        elif name.startswith("stride_"):
            sig[name] = "i64"
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def cases(dt: str, flash: bool = True):
    f32 = "*fp32"
    p = f"*{dt}"
    for is_rms in (True, False):
        yield ("norm_forward", norms_triton._norm_forward_kernel,
               {"x_ptr": p, "w_ptr": p, "b_ptr": p, "y_ptr": p, "mean_ptr": f32, "rstd_ptr": f32}, ("eps",),
               {"BLOCK_D": 4096, "IS_RMS": is_rms, "HAS_BIAS": not is_rms})
        yield ("norm_backward", norms_triton._norm_backward_kernel,
               {"x_ptr": p, "w_ptr": p, "dy_ptr": p, "dx_ptr": p, "mean_ptr": f32, "rstd_ptr": f32,
                "dw_part_ptr": f32, "db_part_ptr": f32}, (), {"BLOCK_D": 4096, "IS_RMS": is_rms, "HAS_BIAS": not is_rms})
    yield ("cross_entropy_stats", cross_entropy_triton._cross_entropy_stats_kernel,
           {"logits_ptr": p, "target_ptr": "*i64", "max_ptr": f32, "sumexp_ptr": f32, "target_logit_ptr": f32}, (),
           {"BLOCK_V": 4096})
    yield ("cross_entropy_backward", cross_entropy_triton._cross_entropy_backward_kernel,
           {"logits_ptr": p, "target_ptr": "*i64", "lse_ptr": f32, "grad_ptr": f32, "dlogits_ptr": p}, (),
           {"BLOCK_V": 4096})
    for causal in (True, False) if flash else ():
        attn = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 128, "CAUSAL": causal}
        yield ("flash_forward", flash_attention_triton._flash_forward_kernel,
               {"q_ptr": p, "k_ptr": p, "v_ptr": p, "o_ptr": p, "lse_ptr": f32}, ("sm_scale",), attn)
        yield ("flash_backward_dkdv", flash_attention_triton._flash_backward_dkdv_kernel,
               {"q_ptr": p, "k_ptr": p, "v_ptr": p, "do_ptr": p, "lse_ptr": f32, "delta_ptr": f32, "dk_ptr": p,
                "dv_ptr": p}, ("sm_scale",), attn)
        yield ("flash_backward_dq", flash_attention_triton._flash_backward_dq_kernel,
               {"q_ptr": p, "k_ptr": p, "v_ptr": p, "do_ptr": p, "lse_ptr": f32, "delta_ptr": f32, "dq_ptr": p},
               ("sm_scale",), attn)
    precision = "ieee" if dt == "fp32" else "tf32"
    gemm = {"BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_M": 64, "INPUT_PRECISION": precision}
    yield ("grouped_mm", grouped_gemm_triton._grouped_mm_kernel,
           {"x_ptr": p, "w_ptr": p, "y_ptr": p, "counts_ptr": "*i32"}, (), gemm)
    yield ("grouped_mm_weight_grad", grouped_gemm_triton._grouped_mm_weight_grad_kernel,
           {"x_ptr": p, "dy_ptr": p, "dw_ptr": p, "counts_ptr": "*i32"}, (), gemm)


def main(args) -> int:
    """Args: dtypes (bf16 fp16 fp32), and --no-flash to leave out the attention kernels (the slow ones)."""
    target = GPUTarget("cuda", 90, 32)
    for dt in [a for a in args if not a.startswith("--")] or ["bf16"]:
        for name, fn, ptrs, floats, constexprs in cases(dt, flash="--no-flash" not in args):
            start = time.perf_counter()
            src = ASTSource(fn=fn, signature=_signature(fn, ptrs, floats=floats, constexprs=constexprs),
                            constexprs=constexprs)
            block = constexprs.get("BLOCK_D", constexprs.get("BLOCK_V", 0)) if "BLOCK_M" not in constexprs else 0
            warps = launch_options(torch.device("cuda"), block).get("num_warps", 4)  # as the wrappers launch
            compiled = triton.compile(src, target=target, options={"num_warps": warps})
            assert compiled.asm.get("cubin"), f"{name} ({dt}): no cubin"
            flags = ",".join(f"{k}={v}" for k, v in constexprs.items() if k in ("IS_RMS", "CAUSAL"))
            print(f"{name:24s} {dt:5s} {flags:12s} warps={warps:2d} sm_90 cubin {len(compiled.asm['cubin']):7d} B  "
                  f"{time.perf_counter() - start:5.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
