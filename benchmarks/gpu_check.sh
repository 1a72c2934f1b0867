#!/usr/bin/env bash
# Everything that needs the accelerator machine, in one command (see shared/gpu/README.md):
# the GPU tests, W7 for daskinfer and the GPU-only loop, and optionally gpu_diag.py.
# Logs and results go to $OUT.
#   here:   bash ../shared/gpu/fetch-wheels.sh
#   device: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"])
# STEPS picks and orders the steps (default "tests w7"; also "diag", "probe" (host_probe.py:
# what the CPU stages cost per item on this host's cores), and "noprefetch": one
# daskinfer run of W7 with its predictors' prefetch_batch off, for comparison); W7_ARGS, W7_REPS and
# the *_TIMEOUT variables override sizes, repetitions and time limits (seconds).
set -uo pipefail
OUT=${OUT:-/tmp/daskinfer-gpu-check}
mkdir -p "$OUT"
source .whl/install-wheels.sh || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, numpy, os; print('torch', torch.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__, 'cores', os.cpu_count())" | tee -a "$OUT/gpu.txt"

for step in ${STEPS:-tests w7}; do
  case $step in
    tests)
      # -W default: the machine's library versions differ from CI's; their deprecation
      # warnings are reported, not turned into failures as CI does
      timeout "${TESTS_TIMEOUT:-150}" python3 -m pytest -m gpu --rungpu tests/gpu -q -W default -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
      echo "gpu tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu-tests.log" ;;
    diag)
      timeout "${DIAG_TIMEOUT:-120}" python3 benchmarks/gpu_diag.py 2>&1 | grep -v "Loading weights" | tee "$OUT/diag.jsonl"
      echo "diag exit: ${PIPESTATUS[0]}" ;;
    w7)
      W7_ARGS=${W7_ARGS:---images 32768 --texts 500000 --batch-size 128 --text-batch-size 512 --workers 13}
      timeout "${W7_TIMEOUT:-330}" python3 benchmarks/run.py --workloads W7 --engines daskinfer,loop --reps "${W7_REPS:-3}" \
        --args "W7=$W7_ARGS" --out "$OUT/w7.md" --jsonl "$OUT/w7.jsonl" 2>&1 | tee "$OUT/w7.log"
      echo "w7 exit: ${PIPESTATUS[0]}"
      sed -n '/### Targets/,/### Machine/p' "$OUT/w7.md" 2>/dev/null ;;
    probe)
      # the CPU stages' cost per item on this host, 1 to 13 processes at once
      timeout "${PROBE_TIMEOUT:-150}" python3 benchmarks/host_probe.py 2>&1 | grep '^{' | tee "$OUT/host-probe.jsonl"
      echo "probe exit: ${PIPESTATUS[0]}" ;;
    noprefetch)
      W7_ARGS=${W7_ARGS:---images 32768 --texts 500000 --batch-size 128 --text-batch-size 512 --workers 13}
      # shellcheck disable=SC2086  # W7_ARGS is a list of arguments
      timeout "${W7_TIMEOUT:-330}" python3 benchmarks/w7_gpu.py --engine daskinfer $W7_ARGS --no-prefetch 2>&1 \
        | grep '^{' | tee "$OUT/w7-no-prefetch.jsonl" | cut -c1-600
      echo "noprefetch exit: ${PIPESTATUS[0]}" ;;
  esac
done
