#!/usr/bin/env bash
# The GPU checks of issue 5, for the lent machine (device tool `run`, carry [".whl"]):
#
#   bash scripts/gpu_session.sh tests              # kernel and engine tests on the GPU:
#                                                  # compiled kernels, graphs, async launch
#   bash scripts/gpu_session.sh bench [FLAGS...]   # benchmarks/gpu_llama8b.py, within 560 s
#
# Logs and JSON go to $OUT (the folder that comes back). The machine's image lacks
# pydantic (and fastapi/uvicorn): run scripts/fetch_device_wheels.sh here first, so that
# .whl/ holds them, and carry .whl.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ferry-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if ! python3 -c "import pydantic" 2>/dev/null; then
  if ! ls .whl/pydantic-*.whl >/dev/null 2>&1; then
    echo "pydantic is missing here: run scripts/fetch_device_wheels.sh and carry .whl" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

mode=${1:-}
shift || true
case "$mode" in
  tests)
    # With a GPU visible, the kernel tests and the engine tests below run on it (the
    # engine's device is auto): compiled Triton kernels, real graph capture, async launch.
    timeout 450 python3 -m pytest -q -p no:cacheprovider -rs tests/kernels \
      tests/runner/test_decode_graphs.py tests/runner/test_draft_tokens.py tests/test_async_scheduling_e2e.py 2>&1 \
      | tee "$OUT/gpu_tests.log"
    ;;
  bench)
    python3 benchmarks/gpu_llama8b.py --deadline-s 560 --json "$OUT/gpu_llama8b.json" "$@" 2>&1 \
      | tee "$OUT/gpu_llama8b.log"
    ;;
  *)
    echo "usage: bash scripts/gpu_session.sh tests|bench [benchmark flags]" >&2
    exit 2
    ;;
esac
