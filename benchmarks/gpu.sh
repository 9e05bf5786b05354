#!/usr/bin/env bash
# The one command to run on a CUDA machine, from anywhere:   bash benchmarks/gpu.sh
#
# Runs the CUDA tests, the kernel benchmark (benchmarks/kernels_gpu.py, if it exists) and benchmarks/gpu.py,
# each whatever the one before did, each under a time limit so that the whole stays under about 7 minutes
# (a step that hits its limit gets SIGINT, then SIGKILL 15 s later). Logs and results go to $OUT
# (default ./gpu_results): pytest.log, kernels_gpu.log (+ what kernels_gpu writes), gpu.log, gpu.json.
# Offline: benchmarks/gpu.py's end-to-end part reads .gpu_data/alpaca/train.jsonl (copy ../shared/data/alpaca
# there first). The exit status is 1 if any step failed.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
export HF_HUB_OFFLINE=1 PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-./gpu_results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv || true

timeout -s INT -k 15 110 python3 -m pytest -q -rfE -m cuda tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
tests=$?  # 5: no test is marked cuda yet

kernels=skipped
if [ -f benchmarks/kernels_gpu.py ]; then
    timeout -s INT -k 15 90 python3 -m benchmarks.kernels_gpu --out "$OUT" 2>&1 | tee "$OUT/kernels_gpu.log"
    kernels=$?
fi

timeout -s INT -k 15 330 python3 -m benchmarks.gpu --out "$OUT" 2>&1 | tee "$OUT/gpu.log"
bench=$?

echo "gpu.sh exit statuses: pytest $tests, kernels_gpu $kernels, benchmarks.gpu $bench (124: hit its time limit)"
[ "$tests" -eq 0 ] || [ "$tests" -eq 5 ] || exit 1
[ "$kernels" = skipped ] || [ "$kernels" -eq 0 ] || exit 1
exit "$bench"
