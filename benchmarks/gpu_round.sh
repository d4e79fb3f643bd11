#!/usr/bin/env bash
# One device call's worth of Triton measurements, each step under its own time limit so that a
# slow one cannot take the others' time (a fresh machine compiles every kernel cold):
#   tests    the GPU tests (8 processes; those matching $TESTS, a pytest -k expression, if set);
#   kernels  the kernel table with the pinned configurations, as shipped (rows $BATCHES if set: 1,16,64);
#   autotune the kernel table with pins off (PRESSO_PINS=0): the autotuners' own choice;
#   decode   8B- and SmolLM2-shaped decoders;
#   sweep    a configuration sweep (plans $SWEEP_PLANS, $PER_PLAN candidates each) that writes its
#            winners and pins into runtime/triton/tuned.json, which the steps after it then use.
# Usage: benchmarks/gpu_round.sh [STEP...] (default: tests kernels decode); files land in $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
LIMIT=${LIMIT:-200}  # seconds a step
SWEEP_PLANS=${SWEEP_PLANS:-gemv,gemm,int8,decode,decode16}
PER_PLAN=${PER_PLAN:-100}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || echo "pip install failed"
nvidia-smi --query-gpu=name --format=csv,noheader

step() {
    case $1 in
        tests) timeout "$LIMIT" python3 -m pytest tests/gpu -n 8 -q -p no:cacheprovider ${TESTS:+-k "$TESTS"} \
                   > "$OUT/tests.log" 2>&1 ;;
        kernels) timeout "$LIMIT" python3 -m benchmarks.gpu --part kernels --out "$OUT/kernels.md" ${BATCHES:+--batches "$BATCHES"} \
                     > "$OUT/kernels.log" 2>&1 ;;
        autotune) PRESSO_PINS=0 timeout "$LIMIT" python3 -m benchmarks.gpu --part kernels \
                      --out "$OUT/kernels-autotuned.md" > "$OUT/kernels-autotuned.log" 2>&1 ;;
        decode) timeout "$LIMIT" python3 -m benchmarks.gpu --part decode --models 8b,smollm2 \
                    --out "$OUT/decode.md" > "$OUT/decode.log" 2>&1 ;;
        sweep) timeout "$LIMIT" python3 -m benchmarks.gpu_sweep --plans "$SWEEP_PLANS" --per-plan "$PER_PLAN" --write runtime/triton/tuned.json \
                   --out "$OUT/sweep.txt" > "$OUT/sweep.log" 2>&1
               local rc=$?; cp runtime/triton/tuned.json "$OUT/"; return $rc ;;
        *) echo "unknown step $1 (tests, kernels, autotune, decode, sweep)"; return 2 ;;
    esac
}

for s in ${*:-tests kernels decode}; do
    start=$SECONDS
    step "$s"
    echo "== $s: exit $? after $((SECONDS - start)) s"
done
grep -hE "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" 2>/dev/null | tail -8
tail -n 8 "$OUT/kernels.md" "$OUT/kernels-autotuned.md" 2>/dev/null
grep -h "^|" "$OUT/decode.md" 2>/dev/null | tail -n 18
