#!/usr/bin/env bash
# Everything that needs a GPU, in one call under 8 minutes, writing one Markdown report.
#
#   bash benchmarks/gpu/run.sh [REPORT]     # REPORT defaults to $OUT/gpu_report.md, else benchmarks/gpu/report.md
#
# On the device machine (python3 there holds a CUDA torch and triton; nothing is installed): the GPU tests
# (compiled Triton kernels against torch, DTensor over NCCL; pytest -m gpu), the kernel benchmark against eager
# and torch.compile (benchmarks/kernels.py --quick: time, GB/s or TFLOP/s, fraction of peak), the per-op
# dispatch overhead on a CUDA mesh, and the GPT train step under every layout on all the GPUs present, ours
# beside torch's stack (benchmarks/train_step.py --device cuda; TRAIN_STEP_CONFIG picks the GPT, default small).
# Each part has its own time limit and its status in the report, so one failing part leaves the others'
# figures; the limits are also cut to what is left of BUDGET seconds, so the whole stays under 8 minutes.
# Record the figures with the card's name in benchmarks/RESULTS.md.
set -u
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
REPORT=${1:-${OUT:+$OUT/gpu_report.md}}
REPORT=${REPORT:-benchmarks/gpu/report.md}
BUDGET=${GPU_RUN_BUDGET:-440}  # seconds for all parts; each may take 5 more to die after its limit's SIGTERM: under 480 in all
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
LOG=$(mktemp -d)

part() {  # part NAME SECONDS COMMAND...: run with a limit, keep its output and status for the report
  local name=$1 limit=$2; shift 2
  local start=$SECONDS left=$((BUDGET - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    echo "not run: the script's $BUDGET s budget was spent by the parts before" >"$LOG/$name.txt"
    echo "- 0 0" >"$LOG/$name.status"
    return
  fi
  timeout -k 5 "$limit" "$@" >"$LOG/$name.txt" 2>&1
  echo "$? $((SECONDS - start)) $limit" >"$LOG/$name.status"
}

part device 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $PY -c 'import torch; print(\"torch\", torch.__version__, \"| cuda\", torch.version.cuda, \"| GPUs\", torch.cuda.device_count())'; $PY -c 'import triton; print(\"triton\", triton.__version__)'"
GPUS=$(grep -o 'GPUs [0-9]*' "$LOG/device.txt" | grep -o '[0-9]*$')  # as torch counts them (CUDA_VISIBLE_DEVICES)
part tests 150 "$PY" -m pytest tests/gpu -m gpu -q -p no:cacheprovider -o addopts="" -rs
part kernels 150 "$PY" benchmarks/kernels.py --quick
part dispatch 50 env REPEATS=300 DEVICE=cuda "$PY" benchmarks/dispatch_overhead.py
if [ "${GPUS:-0}" -ge 1 ]; then
  part train_step 120 env TRAIN_STEP_OUT="$LOG/train_step.md" "$PY" -m torch.distributed.run --standalone \
    --nproc-per-node "$GPUS" benchmarks/train_step.py --device cuda --config "${TRAIN_STEP_CONFIG:-small}" \
    --warmup 3 --steps 10
elif [ "${GPUS:-}" = 0 ]; then  # torch sees no GPU: the script's own message says why
  part train_step 60 "$PY" benchmarks/train_step.py --device cuda
else
  part train_step 10 bash -c "echo 'not run: no GPU count (the device part failed: see its output above)'; exit 1"
fi

{
  echo "# GPU run, $(date -u +%Y-%m-%d)"
  echo
  echo '```'; cat "$LOG/device.txt"; echo '```'
  for name in tests kernels dispatch train_step; do
    read -r rc seconds limit <"$LOG/$name.status"
    echo
    if [ "$rc" = - ]; then
      echo "## $name (not run)"
    else
      echo "## $name (exit $rc, ${seconds} s of its ${limit} s limit; exit 124 or 137: cut at the limit)"
    fi
    echo
    echo '```'
    if [ -s "$LOG/$name.md" ]; then  # the part wrote its own table: the table, then the log's end on failure
      cat "$LOG/$name.md"
      [ "$rc" = 0 ] || { echo; tail -n 30 "$LOG/$name.txt"; }
    else
      tail -n 60 "$LOG/$name.txt"
    fi
    echo '```'
  done
} >"$REPORT"
echo "report: $REPORT"
cat "$REPORT"
