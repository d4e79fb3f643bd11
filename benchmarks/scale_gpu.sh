#!/usr/bin/env bash
# On a GPU machine, one step after another so no step shares the machine with another:
#   1. the whole 8B-shaped model (32 layers, GPTQ int4 g128, 128 x 2048 tokens, export + check);
#   2. GPTQ per block with the same calibration data (16 x 256 tokens, 2 layers, head kept
#      float) on the GPU, then on the host's CPU cores;
#   3. the GPU tests.
# Writes everything to $LOG (run it in the background and follow the log: it takes over 10 min).
set -u
export PYTHONUNBUFFERED=1
ROOT=${ROOT:-/tmp/presso-scale}
LOG=${LOG:-/tmp/scale-gpu.log}
{
    echo "== 8B-shaped model, 32 layers, GPTQ on cuda"
    python3 -m benchmarks.scale --shape 8b --method gptq --calibration 128 --seq-len 2048 --device cuda \
        --root "$ROOT" 2>&1 | grep -v "it/s\|s/it" | tail -6
    for device in cuda cpu; do
        echo "== GPTQ per block, 2 layers, 16 x 256 tokens, $device"
        python3 -m benchmarks.scale --shape 8b --layers 2 --method gptq --calibration 16 --seq-len 256 \
            --device "$device" --skip lm_head --no-export --root "$ROOT" 2>&1 | grep -v "it/s\|s/it" | tail -3
    done
    echo "== GPU tests"
    timeout 300 python3 -m pytest -p no:cacheprovider -n 0 -q -p no:logging --tb=line \
        tests/gpu/test_device_calibration.py 2>&1 | tail -15
    echo "== done"
} > "$LOG" 2>&1
