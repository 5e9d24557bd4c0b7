"""The kernels compile for an H100 (sm_90) on this CPU-only machine: triton's compiler, not the interpreter,
checks the compiled language's typing. The attention kernels are left to ``compile_for_gpu.py`` run by hand
(about 30 s to compile the six variants); see that file.
"""

import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).with_name("compile_for_gpu.py")


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # kernels decorated for compiling
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "bf16", "--no-flash"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 8 and all("sm_90 cubin" in line for line in lines), done.stdout
