"""Rank 5 of a 1024-rank world (dp 128 x tp 8 + sp, ZeRO-3) of a GPT LAYERS deep and WIDTH wide, simulated:

    OMP_NUM_THREADS=1 .venv/bin/python tests/simulate/simulate_large_gpt.py 80 8192   # 65B parameters
"""
import sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import programs
from gpt import GPTConfig
L, D = int(sys.argv[1]), int(sys.argv[2])
cfg = GPTConfig(vocab_size=32768, block_size=2048, num_layers=L, num_heads=64, dim=D)
programs.LAYOUTS["big"] = (dict(dp=128, tp=8, sp=True, zero=3), {})
params = L * (12 * D * D + 13 * D) + 2 * 32768 * D + 2048 * D + 2 * D
t = time.perf_counter()
r = programs.simulated("big", 1024, 5, cfg, batch=128)
el = time.perf_counter() - t
print(f"GPT {L} layers x {D} wide = {params/1e9:.1f}B parameters, rank 5 of 1024 (dp128 x tp8+sp, ZeRO-3): simulated in {el:.1f} s")
print("memory GiB:", {k: round(v / 2**30, 3) for k, v in r.memory.items()})
print("collectives GiB:", {f"{c}[{d}]": round(v / 2**30, 3) for (c, d), v in sorted(r.bytes_by_collective().items())}, "calls", len(r.collectives))
print(f"TFLOP: {r.flops/1e12:.1f}", {k: round(v/1e12, 1) for k, v in r.flops_by_op.items()})
