#!/usr/bin/env bash
# The one command to run on a CUDA machine, from anywhere:   bash benchmarks/gpu.sh
#
# Runs the CUDA tests, the per-layer kernel benchmark (benchmarks/kernels_gpu.py) and benchmarks/gpu.py,
# each whatever the one before did, each under a time limit so that the whole stays under about 9.5 minutes
# (a step that hits its limit gets SIGINT, then SIGKILL 15 s later). Logs and results go to $OUT
# (default ./gpu_results): pytest.log, kernels_gpu.log and .json, gpu.log and .json, e2e/gpu.log and .json
# (seven files: the device tool brings back at most eight).
# Offline: benchmarks/gpu.py's end-to-end part reads .gpu_data/alpaca/train.jsonl (copy ../shared/data/alpaca
# there first). Packages a machine without internet lacks come as wheels in .whl, installed into /tmp/site
# (lorafit train needs datasets; e.g. pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl
# datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19). The exit status is 1 if any step failed.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
export HF_HUB_OFFLINE=1 PYTHONPATH=src PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=src:/tmp/site
fi
OUT=${OUT:-./gpu_results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv || true

timeout -s INT -k 15 140 python3 -m pytest -q -rfE -m cuda tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
tests=$?

timeout -s INT -k 15 80 python3 -m benchmarks.kernels_gpu --out "$OUT" 2>&1 | tee "$OUT/kernels_gpu.log"
kernels=$?

# the end-to-end runs last and apart (their own folder), so that the step, inference and mixed tables come
# back even when the time runs out during them
timeout -s INT -k 15 150 python3 -m benchmarks.gpu --only step,infer,mixed --out "$OUT" 2>&1 | tee "$OUT/gpu.log"
bench=$?
mkdir -p "$OUT/e2e"
timeout -s INT -k 15 180 python3 -m benchmarks.gpu --only e2e --out "$OUT/e2e" 2>&1 | tee "$OUT/e2e/gpu.log"
[ $? -eq 0 ] || bench=1

echo "gpu.sh exit statuses: pytest $tests, kernels_gpu $kernels, benchmarks.gpu $bench (124: hit its time limit)"
[ "$tests" -eq 0 ] || exit 1
[ "$kernels" -eq 0 ] || exit 1
exit "$bench"
