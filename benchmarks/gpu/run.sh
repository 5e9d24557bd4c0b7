#!/usr/bin/env bash
# Everything that needs a GPU, in one call under 8 minutes, writing one Markdown report.
#
#   bash benchmarks/gpu/run.sh [REPORT]     # REPORT defaults to $OUT/gpu_report.md, else benchmarks/gpu/report.md
#
# On the device machine (python3 there holds a CUDA torch and triton; nothing is installed): the GPU tests
# (compiled Triton kernels against torch, DTensor over NCCL; pytest -m gpu), the kernel benchmark against eager
# and torch.compile (benchmarks/kernels.py --quick: time, GB/s or TFLOP/s, fraction of peak), and the per-op
# dispatch overhead on a CUDA mesh. Each part has its own time limit and its status in the report, so one
# failing part leaves the others' figures. Record the figures with the card's name in benchmarks/RESULTS.md.
set -u
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
REPORT=${1:-${OUT:+$OUT/gpu_report.md}}
REPORT=${REPORT:-benchmarks/gpu/report.md}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
LOG=$(mktemp -d)

part() {  # part NAME SECONDS COMMAND...: run with a limit, keep its output and status for the report
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$LOG/$name.txt" 2>&1
  echo "$? $((SECONDS - start))" >"$LOG/$name.status"
}

part device 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"| triton\", triton.__version__, \"| cuda\", torch.version.cuda)'"
part tests 180 "$PY" -m pytest tests/gpu -m gpu -q -p no:cacheprovider -o addopts="" -rs
part kernels 200 "$PY" benchmarks/kernels.py --quick
part dispatch 60 env REPEATS=300 DEVICE=cuda "$PY" benchmarks/dispatch_overhead.py

{
  echo "# GPU run, $(date -u +%Y-%m-%d)"
  echo
  echo '```'; cat "$LOG/device.txt"; echo '```'
  for name in tests kernels dispatch; do
    read -r rc seconds <"$LOG/$name.status"
    echo
    echo "## $name (exit $rc, ${seconds} s)"
    echo
    echo '```'
    tail -n 60 "$LOG/$name.txt"
    echo '```'
  done
} >"$REPORT"
echo "report: $REPORT"
cat "$REPORT"
