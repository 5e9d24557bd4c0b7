"""dtensor_plus's Triton kernels against torch eager and torch.compile on one NVIDIA GPU.

    .venv/bin/python benchmarks/kernels.py                          # every kernel, bf16, forward + backward
    .venv/bin/python benchmarks/kernels.py --kernel attention --dtype fp16 --mode fwd
    .venv/bin/python benchmarks/kernels.py --quick                  # one shape per kernel: a smoke run

For each kernel and shape, in the style of ``triton.testing.perf_report`` (one Benchmark per kernel, the
providers as lines): the median time (``triton.testing.do_bench``), the achieved memory bandwidth (norms,
cross-entropy: bytes that must move, counted once) or TFLOP/s (attention, grouped GEMM: the matmul FLOPs,
halved for causal attention; backward = 2.5x forward for attention, 2x for grouped GEMM) and its fraction of
the device's peak (``PEAKS``, dense, no sparsity; else triton's estimate). Providers:

    triton    dtensor_plus.kernels under use_kernels(True)
    eager     torch: F.rms_norm / F.layer_norm, F.cross_entropy, F.scaled_dot_product_attention (GQA), and a
              loop of one matmul per expert for the grouped GEMM (torch has no public grouped GEMM)
    compile   torch.compile of the same eager function

Before timing a shape, the kernel's forward is checked against torch's (loose, bf16-level tolerance).
Prints one table per kernel and a markdown summary; ``--save DIR`` also writes triton's CSV and plots there.
Without a CUDA device it exits with a message and status 2 (the kernels' tests run on CPU in Triton's
interpreter instead: ``pytest tests/kernels``).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

PEAKS = {  # device-name substring -> (HBM GB/s, dense bf16/fp16 tensor TFLOP/s), from the vendors' data sheets
    "H200": (4800.0, 989.0),
    "H100 SXM": (3350.0, 989.0), "H100 80GB HBM3": (3350.0, 989.0),
    "H100 PCIe": (2000.0, 756.0), "H100 NVL": (3900.0, 835.0),
    "A100-SXM4-80GB": (2039.0, 312.0), "A100-SXM4-40GB": (1555.0, 312.0), "A100 80GB PCIe": (1935.0, 312.0),
    "L40S": (864.0, 362.0), "L4": (300.0, 121.0), "A10": (600.0, 125.0), "RTX 4090": (1008.0, 165.0),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHAPES = {  # (full sweep, --quick)
    "rms_norm": ([(4096, 1024), (4096, 2048), (4096, 4096), (4096, 8192), (16384, 8192)], [(4096, 4096)]),
    "layer_norm": ([(4096, 1024), (4096, 2048), (4096, 4096), (4096, 8192), (16384, 8192)], [(4096, 4096)]),
    "cross_entropy": ([(4096, 32000), (4096, 50304), (4096, 128256), (8192, 128256)], [(4096, 50304)]),
    "attention": ([(8, 32, 8, 1024, 128, True), (2, 32, 8, 4096, 128, True), (1, 32, 8, 8192, 128, True),
                   (2, 32, 8, 4096, 128, False), (4, 16, 16, 2048, 64, True)], [(2, 32, 8, 2048, 128, True)]),
    "grouped_gemm": ([(8, 8192, 2048, 5632), (16, 16384, 2048, 1408), (64, 32768, 2048, 1408)],
                     [(8, 8192, 2048, 5632)]),
}
X_NAMES = {"rms_norm": ["N", "D"], "layer_norm": ["N", "D"], "cross_entropy": ["N", "V"],
           "attention": ["B", "H", "HKV", "T", "D", "causal"], "grouped_gemm": ["E", "N", "K", "M"]}
ROWS: list[dict] = []


def peaks(device: torch.device, dtype: torch.dtype) -> tuple[float | None, float | None]:
    """(GB/s, TFLOP/s) peaks of the device; fp32 matmuls run as TF32 on tensor cores at half the bf16 rate."""
    name = torch.cuda.get_device_name(device)
    gbps, tflops = next((v for k, v in PEAKS.items() if k in name), (None, None))
    if gbps is None:
        import triton.testing
        try:  # triton's estimates from the driver's clocks (nvidia-smi)
            gbps, tflops = triton.testing.get_dram_gbps(), triton.testing.get_max_tensorcore_tflops(torch.bfloat16)
        except Exception:  # noqa: BLE001 - an estimate we can do without
            return None, None
    return gbps, (tflops / 2 if dtype == torch.float32 else tflops)


# -- the cases: inputs and the three providers' forward functions ------------------------------------------


def _leaf(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, device=device) * scale).to(dtype).requires_grad_()


def make_case(kernel: str, shape: tuple, dtype: torch.dtype, device: torch.device):
    """(inputs, {provider: forward fn}, amount moved or computed by forward, by forward + backward)."""
    from dtensor_plus.kernels import cross_entropy, flash_attention, grouped_gemm, norms

    es = torch.tensor([], dtype=dtype).element_size()
    if kernel in ("rms_norm", "layer_norm"):
        n, d = shape
        x, w = _leaf((n, d), dtype, device), _leaf((d,), dtype, device)
        if kernel == "rms_norm":
            fns = {"triton": lambda x, w: norms.rms_norm(x, w, 1e-6), "eager": lambda x, w: F.rms_norm(x, (d,), w, 1e-6)}
        else:
            fns = {"triton": lambda x, w: norms.layer_norm(x, w, None), "eager": lambda x, w: F.layer_norm(x, (d,), w)}
        return [x, w], fns, 2 * n * d * es, 5 * n * d * es  # fwd: x in, y out; bwd: x, dy in, dx out
    if kernel == "cross_entropy":
        n, v = shape
        logits, target = _leaf((n, v), dtype, device), torch.randint(0, v, (n,), device=device)
        fns = {"triton": lambda x: cross_entropy.cross_entropy(x, target), "eager": lambda x: F.cross_entropy(x, target)}
        return [logits], fns, n * v * es, 3 * n * v * es  # fwd: logits in; bwd: logits in, grad out
    if kernel == "attention":
        b, h, hkv, t, d, causal = shape
        q, k, v = _leaf((b, h, t, d), dtype, device), _leaf((b, hkv, t, d), dtype, device), _leaf((b, hkv, t, d), dtype, device)
        fns = {"triton": lambda q, k, v: flash_attention.flash_attention(q, k, v, causal)[0],
               "eager": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)}
        flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
        return [q, k, v], fns, flops, 3.5 * flops
    if kernel == "grouped_gemm":
        num_experts, n, k, m = shape
        gen = torch.Generator().manual_seed(0)
        counts = torch.multinomial(torch.ones(num_experts), n, replacement=True, generator=gen).bincount(
            minlength=num_experts).tolist()  # a random, uneven routing of n tokens
        x, w = _leaf((n, k), dtype, device), _leaf((num_experts, k, m), dtype, device, scale=k ** -0.5)
        counts_t = torch.tensor(counts, device=device, dtype=torch.int32)
        fns = {"triton": lambda x, w: grouped_gemm.grouped_mm(x, w, counts_t),
               "eager": lambda x, w: grouped_gemm.grouped_mm_reference(x, w, counts)}
        return [x, w], fns, 2 * n * k * m, 6 * n * k * m
    raise ValueError(f"unknown kernel {kernel!r}; pick one of {sorted(SHAPES)}")


def timed(forward, inputs, mode: str):
    """A closure running forward (and backward against a fixed gradient) once."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                forward(*inputs)
        return run
    grad = torch.randn_like(forward(*inputs).float()).to(inputs[0].dtype)

    def run():
        for t in inputs:
            t.grad = None
        forward(*inputs).backward(grad)
    return run


def check(fns, inputs) -> None:
    """The kernel's forward equals torch's on this shape before it is timed (a wrong kernel is not fast)."""
    from dtensor_plus.kernels import use_kernels

    with torch.no_grad():
        with use_kernels(True):
            got = fns["triton"](*inputs)
        want = fns["eager"](*inputs)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def benchmark(kernel: str, dtype: torch.dtype, mode: str, quick: bool, save: str | None) -> None:
    import triton
    import triton.testing

    from dtensor_plus.kernels import use_kernels

    device = torch.device("cuda", torch.cuda.current_device())
    gbps_peak, tflops_peak = peaks(device, dtype)
    metric = "GB/s" if kernel in ("rms_norm", "layer_norm", "cross_entropy") else "TFLOP/s"
    compiled = {}

    @triton.testing.perf_report(triton.testing.Benchmark(
        x_names=X_NAMES[kernel], x_vals=SHAPES[kernel][1 if quick else 0], line_arg="provider",
        line_vals=["triton", "eager", "compile"], line_names=["triton (dtensor_plus)", "torch eager", "torch.compile"],
        styles=[("blue", "-"), ("green", "-"), ("red", "--")], ylabel=metric,
        plot_name=f"{kernel}-{mode}-{[k for k, v in DTYPES.items() if v == dtype][0]}", args={}))
    def bench(provider, **shape_kw):
        shape = tuple(shape_kw[name] for name in X_NAMES[kernel])
        inputs, fns, amount_fwd, amount_both = make_case(kernel, shape, dtype, device)
        if provider == "triton":
            check(fns, inputs)
        if provider == "compile":
            fn = compiled.setdefault(shape, torch.compile(fns["eager"], dynamic=False))
        else:
            fn = fns[provider]
        with use_kernels(provider == "triton"):
            ms = triton.testing.do_bench(timed(fn, inputs, mode), warmup=25, rep=100)
        amount = amount_fwd if mode == "fwd" else amount_both
        rate = amount / ms / 1e6 if metric == "GB/s" else amount / ms / 1e9
        peak = gbps_peak if metric == "GB/s" else tflops_peak
        ROWS.append(dict(kernel=kernel, shape=shape, provider=provider, ms=ms, rate=rate, metric=metric,
                         peak=rate / peak if peak else None))
        return rate

    print(f"\n== {kernel} ({mode}, {dtype}) on {torch.cuda.get_device_name(device)}: {metric}")
    bench.run(print_data=True, show_plots=False, save_path=save or "")


def summary() -> str:
    lines = ["| kernel | shape | provider | ms | achieved | of peak |", "|---|---|---|---:|---:|---:|"]
    for r in ROWS:
        frac = f"{100 * r['peak']:.0f}%" if r["peak"] is not None else "n/a"
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['provider']} | {r['ms']:.3f} | "
                     f"{r['rate']:.1f} {r['metric']} | {frac} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--mode", choices=["fwd", "fwd+bwd", "both"], default="fwd+bwd")
    parser.add_argument("--quick", action="store_true", help="one shape per kernel")
    parser.add_argument("--save", default=None, help="a folder for triton's CSV files and plots")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs an NVIDIA GPU (torch.cuda.is_available() is False here); on CPU the "
              "kernels are tested in Triton's interpreter instead: TRITON_INTERPRET=1 pytest tests/kernels",
              file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/kernels.py needs triton: pip install -e '.[kernels]'", file=sys.stderr)
        return 2
    kernels = list(SHAPES) if args.kernel == "all" else [args.kernel]
    modes = ["fwd", "fwd+bwd"] if args.mode == "both" else [args.mode]
    for kernel in kernels:
        for mode in modes:
            benchmark(kernel, DTYPES[args.dtype], mode, args.quick, args.save)
    print("\n" + summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
