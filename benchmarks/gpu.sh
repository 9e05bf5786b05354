#!/usr/bin/env bash
# The one command to run on a CUDA machine, from anywhere:   bash benchmarks/gpu.sh [1|2]
#
# Stage 1 (about 7 minutes, at most 8.5): the CUDA tests, the per-layer kernel benchmark (benchmarks/kernels_gpu.py)
# and the step, step95m, inference, mixed and moe parts of benchmarks/gpu.py. Stage 2 (about 4 minutes): gpu.py's end-to-end
# part, `lorafit train` LoRA against full fine-tuning on a 94M Llama and at Llama-3.2-1B's shape, then on the
# 94M one LoRA with train.bf16 (float32 adapters) and with train.compile (last, so that a time limit cuts that
# run first). No argument runs both;
# a machine that allows 10 minutes a command takes them as two calls. Each step runs whatever the one before
# did, under a time limit (SIGINT, then SIGKILL 15 s later). Logs and results go to $OUT (default
# ./gpu_results): stage 1 pytest.log, kernels_gpu.log and .json, gpu.log and .json; stage 2 e2e/gpu.log and
# .json (the device tool brings back at most eight files a call).
# Offline: the end-to-end part reads .gpu_data/alpaca/train.jsonl, and packages a machine without internet
# lacks come as wheels in .whl, installed into /tmp/site (lorafit train needs datasets): `make gpu-prep`
# puts both there (ignored folders: name them in the device tool's carry). The exit status is 1 if any step
# failed.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
STAGE=${1:-all}
case "$STAGE" in 1|2|all) ;; *) echo "usage: bash benchmarks/gpu.sh [1|2]" >&2; exit 2 ;; esac
export HF_HUB_OFFLINE=1 PYTHONPATH=src PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=src:/tmp/site
fi
OUT=${OUT:-./gpu_results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv || true

tests=0 kernels=0 bench=0
if [ "$STAGE" = 1 ] || [ "$STAGE" = all ]; then
    # every file with CUDA tests, in order of what a time limit may cut last; --durations says where the time went
    timeout -s INT -k 15 180 python3 -m pytest -q -rfE -m cuda --durations=25 -p no:cacheprovider tests/test_cuda.py \
        tests/test_triton_kernels.py tests/test_merge_precision.py tests/test_batched.py tests/test_triton_warmup.py \
        2>&1 | tee "$OUT/pytest.log"
    tests=$?
    timeout -s INT -k 15 80 python3 -m benchmarks.kernels_gpu --out "$OUT" 2>&1 | tee "$OUT/kernels_gpu.log"
    kernels=$?
    timeout -s INT -k 15 230 python3 -m benchmarks.gpu --only step,step95m,infer,mixed,moe --out "$OUT" 2>&1 \
        | tee "$OUT/gpu.log"
    bench=$?
fi
if [ "$STAGE" = 2 ] || [ "$STAGE" = all ]; then
    # in a folder of its own, so that a stage-1 gpu.json in the same $OUT survives
    mkdir -p "$OUT/e2e"
    timeout -s INT -k 15 420 python3 -m benchmarks.gpu --only e2e --out "$OUT/e2e" 2>&1 | tee "$OUT/e2e/gpu.log"
    [ $? -eq 0 ] || bench=1
fi

echo "gpu.sh stage $STAGE exit statuses: pytest $tests, kernels_gpu $kernels, benchmarks.gpu $bench (124: hit its time limit)"
[ "$tests" -eq 0 ] || exit 1
[ "$kernels" -eq 0 ] || exit 1
exit "$bench"
