#!/usr/bin/env bash
# On a GPU machine: the GPU tests, GPTQ per block on the GPU (Triton column loop, then the torch
# loop) and on the host's CPU cores with the same calibration data (8B-shaped blocks, 2 layers),
# then the whole 8B-shaped model (GPTQ int4 g128, 128 x 2048 tokens, export) in the background.
set -u
export PYTHONUNBUFFERED=1
ROOT=${ROOT:-/tmp/presso-scale}
LOG=${LOG:-/tmp/scale-8b.log}
timeout 240 python3 -m pytest -p no:cacheprovider -n 0 -q -p no:logging --tb=line \
    tests/gpu/test_gptq_kernel.py tests/gpu/test_device_calibration.py 2>&1 | tail -30
for cfg in "cuda 1" "cuda 0" "cpu 1"; do
    set -- $cfg
    echo "== GPTQ per block: device $1, Triton column loop $2"
    PRESSO_GPTQ_KERNEL=$2 timeout 330 python3 -m benchmarks.scale --shape 8b --layers 2 --method gptq \
        --calibration 16 --seq-len 256 --device "$1" --no-export --root "$ROOT" 2>&1 | grep -v "it/s\|s/it" | tail -3
done
setsid nohup python3 -m benchmarks.scale --shape 8b --method gptq --calibration 128 --seq-len 2048 \
    --device cuda --root "$ROOT" > "$LOG" 2>&1 < /dev/null &
echo "8B run started: $LOG"
