#!/usr/bin/env bash
# One sitting on the GPU machine (device tool), from the repo root, after
# `. .whl/activate.sh`:
#   bash scripts/gpu_session.sh [models] [tests] [bench] [moe] [e2e]
# Every step is time-boxed (seconds in the variables below) so that a slow one
# cannot eat the others. "models" writes the synthetic real-shape models in
# the background (CPU work) while the GPU steps run; "e2e" waits for them.
# "bench" and "moe" measure on this GPU and write its tuning table, which is
# installed into mtp_splitk/tuning/ before "e2e" so the patched runs use it.
# Logs and results land in $OUT/results.tgz (re-packed after every step, so
# a run cut short still returns what it measured) and $OUT/session.log.
set -u
OUT=${OUT:-/tmp/out}
RES=/tmp/results
MODELS=${MODELS_DIR:-/tmp/models}
mkdir -p "$RES" "$OUT"
start=$(date +%s)
log() { echo "=== $* ($(( $(date +%s) - start ))s)" | tee -a "$RES/session.log"; }
pack() { tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null; cp "$RES/session.log" "$OUT/" 2>/dev/null; }
device_key=$(python3 -c 'from mtp_splitk import plan; print(plan.tuning_key(plan.current_device().name))')
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee -a "$RES/session.log"

for step in "$@"; do
  log "$step"
  case "$step" in
    models)
      # One process per model: the writer is single-threaded numpy.
      for spec in "llama llama3-8b 0" "llama llama3.2-1b 0" "qwen3_moe qwen3-30b-a3b 0" \
                  "qwen3_moe_draft qwen3-0.6b 0" "deepseek_v3 small 1"; do
        set -- $spec
        family=$1; [ "$family" = qwen3_moe_draft ] && family=qwen3
        python3 -c "from mtp_splitk import bench_e2e as b; b.model_dir('$MODELS', '$family', '$2', mtp=bool($3))" \
          >>"$RES/models.log" 2>&1 &
      done
      ;;
    tests)
      # TEST_SELECT narrows the run (pytest arguments); -rA names every result.
      timeout "${TEST_TIMEOUT:-170}" python3 -m pytest -q -rA -m gpu -p no:cacheprovider \
        ${TEST_SELECT:-tests/test_kernels_gpu.py tests/test_moe_gpu.py tests/test_patch.py} 2>&1 \
        | tee "$RES/gpu_tests.txt" | grep -E "^(PASSED|FAILED|ERROR)|passed|failed" | tail -30 ;;
    bench)
      # Split, depth and row tiles as the H100 sweep chose them (no sweep: the
      # lease is short); the M ranges where the kernel wins are measured here.
      timeout "${BENCH_TIMEOUT:-110}" python3 scripts/bench_kernels.py --out "$RES/kernels" --tune --quick \
        --splits-from mtp_splitk/tuning/nvidia_h100_80gb_hbm3.json ${BENCH_ARGS:-} 2>&1 \
        | tee "$RES/bench_kernels.log" | tail -8 ;;
    moe)
      timeout "${MOE_TIMEOUT:-100}" python3 scripts/bench_moe.py --out "$RES/moe" --tune ${MOE_ARGS:-} 2>&1 \
        | tee "$RES/bench_moe.log" | tail -8 ;;
    e2e)
      # This GPU's table (dense M ranges + MoE pair ranges) for the planner.
      python3 - "$RES" "$device_key" <<'EOF'
import json, os, shutil, sys
res, key = sys.argv[1], sys.argv[2]
dense, moe = f"{res}/kernels/{key}.json", f"{res}/moe/{key}_moe.json"
if os.path.exists(dense):
    table = json.load(open(dense))
    if os.path.exists(moe):
        table["moe_p_range"] = json.load(open(moe))["moe_p_range"]
    json.dump(table, open(f"mtp_splitk/tuning/{key}.json", "w"), indent=1, sort_keys=True)
    shutil.copy(f"mtp_splitk/tuning/{key}.json", f"{res}/{key}.json")
    print("installed tuning table", key, table["m_range"], table.get("moe_p_range"))
else:
    print("no tuning table measured: the patched runs will fall back to MLX")
EOF
      log "waiting for the model writers"; wait; tail -3 "$RES/models.log"
      # Straight into $OUT: what it measured comes back even if the call is cut.
      left=$(( ${SESSION_SECONDS:-570} - ($(date +%s) - start) - 30 ))
      log "e2e with a ${left}s deadline"
      timeout $(( left + 25 )) python3 scripts/bench_e2e.py --out "$OUT/e2e" --model-dir "$MODELS" \
        --repeats "${E2E_REPEATS:-1}" --deadline "$left" 2>&1 | tee "$OUT/bench_e2e.log" | tail -4
      ;;
    *) echo "unknown step $step" ;;
  esac
  pack
done
log "end"; pack; ls -la "$OUT"
