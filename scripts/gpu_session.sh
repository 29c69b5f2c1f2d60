#!/usr/bin/env bash
# One sitting on the GPU machine (device tool), from the repo root, after
# `. .whl/activate.sh`:
#   bash scripts/gpu_session.sh [models] [park] [demo-model] [tests] [bench] [moe] [e2e] [chain] [launch] [census] [profile-step] [attention] [serve] [tune]
#                               [train] [profile]
# Every step is time-boxed (seconds in the variables below) so that a slow one
# cannot eat the others. "models" writes the synthetic real-shape models in
# the background (CPU work) while the GPU steps run; "e2e" waits for them.
# "bench" and "moe" measure on this GPU (after the writers are done) and write
# its tuning table, which scripts/install_tuning.py installs into
# mtp_splitk/tuning/ before "e2e" so the patched runs use it. The scripts run
# as modules from the repo root (python3 -m scripts.NAME).
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
# MLX's CUDA backend keeps compiled kernels on disk by name (ours carry a
# digest of their text). PTX_CARRY, a ptx.tgz from an earlier sitting on the
# same MLX, skips compiling them again; this sitting's cache goes back in
# $OUT/ptx.tgz.
export MLX_PTX_CACHE_DIR=/tmp/ptx
# The demo model's cache (see demo-model); its GGUF's digest, as the pinned wheel holds it.
export MTP_SPLITK_CACHE=${MTP_SPLITK_CACHE:-/tmp/cache}
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$MLX_PTX_CACHE_DIR"
[ -n "${PTX_CARRY:-}" ] && [ -f "$PTX_CARRY" ] && tar xzf "$PTX_CARRY" -C "$MLX_PTX_CACHE_DIR"
device_key=$(python3 -c 'from mtp_splitk import plan; print(plan.tuning_key(plan.current_device().name))')
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee -a "$RES/session.log"

# The model directory of the census and profile steps: STEP_MODEL=family,size (default Llama-3-8B's).
step_model() {
  IFS=, read -r family size <<<"${STEP_MODEL:-llama,llama3-8b}"
  python3 -c "from mtp_splitk.bench import models as b; print(b.dir_path('$MODELS', '$family', '$size'))"
}

for step in "$@"; do
  log "$step"
  case "$step" in
    models)
      # One process per model directory: the writer is single-threaded numpy.
      # MODELS_DETACH=1: in their own session, so they outlive this call and a later call
      # on the warm machine finds them ($MODELS/.written when all are done).
      # MODELS_EXTRA: names of MTP models (bench.models.MTP_MODELS) to write as well.
      write_models() {
        for spec in $(python3 -c "from mtp_splitk.bench import models as b; print(*(f'{f},{s},{int(m)}' for f, s, m in b.model_specs()))"); do
          IFS=, read -r family size mtp <<<"$spec"
          python3 -c "from mtp_splitk.bench import models as b; b.model_dir('$MODELS', '$family', '$size', mtp=bool($mtp))" \
            >>"$MODELS.log" 2>&1 &
        done
        base=$(jobs -p)
        for name in ${MODELS_EXTRA:-}; do
          python3 -c "from mtp_splitk.bench import models as b; b.mtp_model_dir('$MODELS', '$name')" >>"$MODELS.log" 2>&1 &
        done
        wait $base; touch "$MODELS/.written"
        wait; touch "$MODELS/.extra-written"
      }
      mkdir -p "$MODELS"
      if [ -n "${MODELS_DETACH:-}" ]; then
        export -f write_models; export MODELS; setsid bash -c write_models </dev/null >/dev/null 2>&1 &
      else write_models & fi
      ;;
    tests)
      # NVRTC compiles (CPU) dominate: TEST_SHARDS pytest processes share the
      # GPU, each given every n-th test. TEST_SELECT narrows the run (pytest
      # arguments); -rA names every result.
      shards=${TEST_SHARDS:-1}
      rm -f "$RES"/shard*.txt "$RES"/gpu_tests_shard*.txt  # an earlier call's on this machine
      python3 -m pytest -q --collect-only -m gpu -p no:cacheprovider \
        ${TEST_SELECT:-tests/test_kernels_gpu.py tests/test_moe_gpu.py tests/test_fused_gpu.py tests/test_patch.py tests/test_pipelined_gpu.py tests/test_gated_delta_gpu.py} 2>/dev/null \
        | grep "::" >"$RES/gpu_test_ids.txt"
      pids=(); set -f  # test ids hold [ ]: no globbing
      for i in $(seq 0 $(( shards - 1 ))); do
        awk -v n="$shards" -v i="$i" 'NR % n == i' "$RES/gpu_test_ids.txt" >"$RES/shard$i.txt"
        [ -s "$RES/shard$i.txt" ] || continue
        # faulthandler dumps every thread's stack when one test runs past
        # TEST_DUMP_AFTER seconds: a test cut by the timeout still says where it was.
        timeout "${TEST_TIMEOUT:-170}" python3 -m pytest -q -rA -m gpu -p no:cacheprovider \
          -o faulthandler_timeout="${TEST_DUMP_AFTER:-100}" $(cat "$RES/shard$i.txt") >"$RES/gpu_tests_shard$i.txt" 2>&1 &
        pids+=($!)
      done
      set +f; wait "${pids[@]}"
      cat "$RES"/gpu_tests_shard*.txt >"$RES/gpu_tests.txt"
      grep -hoE "^(PASSED|FAILED|ERROR|SKIPPED)" "$RES/gpu_tests.txt" | sort | uniq -c
      grep -hE "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$RES/gpu_tests.txt" | tail -30 ;;
    bench)
      # Timings wait for the model writers: a busy host skews per-op times.
      wait
      # Split, depth and row tiles as the H100 sweep chose them (BENCH_SPLITS, a table;
      # empty: swept here in dependent chains, a few minutes); the M ranges where the kernel wins are measured here.
      splits=${BENCH_SPLITS-mtp_splitk/tuning/nvidia_h100_80gb_hbm3.json}
      timeout "${BENCH_TIMEOUT:-300}" python3 -m scripts.bench_kernels --out "$RES/kernels" --tune --quick \
        ${splits:+--splits-from "$splits"} ${BENCH_ARGS:-} 2>&1 \
        | tee "$RES/bench_kernels.log" | tail -8 ;;
    moe)
      wait
      timeout "${MOE_TIMEOUT:-240}" python3 -m scripts.bench_moe --out "$RES/moe" --tune ${MOE_ARGS:-} 2>&1 \
        | tee "$RES/bench_moe.log" | tail -8 ;;
    e2e)
      # This GPU's table (dense M ranges + MoE pair ranges) for the planner; TABLE_FROM=DIR: the
      # <device>.json and <device>_moe.json in DIR instead (a candidate kept in the repo).
      python3 -m scripts.install_tuning "$device_key" "${TABLE_FROM:-$RES/kernels}" "${TABLE_FROM:-$RES/moe}" \
        | tee -a "$RES/session.log"
      log "waiting for the model writers"; wait
      until [ -e "$MODELS/.written" ]; do sleep 2; done; tail -3 "$MODELS.log"
      # E2E_WAIT_EXTRA=1: also for the MODELS_EXTRA ones (runs of --mtp-model would write them again).
      until [ -z "${E2E_WAIT_EXTRA:-}" ] || [ -e "$MODELS/.extra-written" ]; do sleep 2; done
      # E2E_RUNS: ';'-separated bench_e2e argument lists (e.g. "--models=, ;
      # --models qwen3-30b-a3b --no-draft"), one run each into $OUT/e2e<i>,
      # straight into $OUT so what it measured comes back even if the call is
      # cut. Each run's deadline is what is left unless its arguments set one.
      IFS=';' read -ra runs <<<"${E2E_RUNS:-}"
      [ ${#runs[@]} -gt 0 ] || runs=("")
      i=0
      for extra in "${runs[@]}"; do
        left=$(( ${SESSION_SECONDS:-570} - ($(date +%s) - start) - 30 ))
        log "e2e run $i ($extra) within ${left}s"
        # A run spec beginning "tuned:" reads the table the tune step wrote; one beginning
        # "env:A=1,B=2 " runs with those variables (e.g. MLX's MLX_MAX_OPS_PER_BUFFER).
        cache=$MTP_SPLITK_CACHE; [ "${extra#tuned:}" != "$extra" ] && extra=${extra#tuned:} && cache=/tmp/tune-cache
        vars=""; if [ "${extra#env:}" != "$extra" ]; then vars=${extra#env:}; vars=${vars%% *}; extra=${extra#env:$vars}; vars=${vars//,/ }; fi
        env $vars MTP_SPLITK_CACHE=$cache timeout $(( left + 25 )) python3 -m scripts.bench_e2e --out "$OUT/e2e$i" --model-dir "$MODELS" \
          --repeats "${E2E_REPEATS:-1}" --deadline "$left" $extra 2>&1 | tee "$RES/bench_e2e$i.log" | tail -4
        i=$(( i + 1 ))
      done
      ;;
    chain)
      # Dependent chains of Llama's MLP shapes, ours vs MLX (what a forward does; see the script).
      wait
      timeout "${CHAIN_TIMEOUT:-120}" python3 -m scripts.bench_chain --out "$RES/chain" 2>&1 \
        | tee "$RES/bench_chain.log" | tail -6 ;;
    census)
      # Ops and device time of a decode step, a verify pass and an overlapped step on the
      # Llama-3-8B shape (STEP_MODEL=family,size: another), unpatched and patched
      # (scripts/count_ops.py, scripts/bench_step.py).
      llama=$(step_model)
      until [ -e "$llama/config.json" ]; do sleep 2; done
      # CENSUS_SCRIPTS, CENSUS_STATES: which of the two scripts, and "unpatched patched" or one of them.
      for state in ${CENSUS_STATES:-unpatched patched}; do
        flag=$([ "$state" = patched ] && echo --patched)
        for script in ${CENSUS_SCRIPTS:-count_ops bench_step}; do
          timeout "${CENSUS_TIMEOUT:-90}" python3 -m "scripts.$script" --model "$llama" $flag --out "$RES/$script/$state" 2>&1 \
            | tee -a "$RES/$script.log" | tail -7
        done
      done ;;
    profile-step)
      # Every kernel of a decode step, a synchronous verify pass and an overlapped step (patched,
      # Llama-3-8B shape or STEP_MODEL's) under ncu, GPU time by kernel (scripts/profile_step.py).
      llama=$(step_model)
      until [ -e "$llama/config.json" ]; do sleep 2; done
      # PROFILE_STATES: "patched" (default), "unpatched", or both.
      for state in ${PROFILE_STATES:-patched}; do
        flag=$([ "$state" = patched ] && echo --patched); tag=$([ "$state" = patched ] || echo "_$state")
        for what in ${PROFILE_STEPS:-decode verify step}; do
          timeout "${PROFILE_TIMEOUT:-150}" ncu --profile-from-start off --clock-control none --cache-control none \
            --metrics gpu__time_duration.sum --csv --log-file "$RES/ncu_$what$tag.csv" \
            python3 -m scripts.profile_step --model "$llama" --what "$what" $flag >"$RES/profile_$what$tag.log" 2>&1
          python3 -m scripts.profile_step --summarize "$RES/ncu_$what$tag.csv" 2>&1 | tee "$RES/profile_$what$tag.txt" | head -12
        done
      done ;;
    attention)
      # One layer's attention as the synchronous verify runs it and as the overlapped step does.
      timeout "${ATTENTION_TIMEOUT:-60}" python3 -m scripts.bench_attention --out "$RES/attention" 2>&1 \
        | tee "$RES/bench_attention.log" | tail -14 ;;
    launch)
      # Per-op overhead of custom kernels against MLX's ops (see the script).
      timeout "${LAUNCH_TIMEOUT:-90}" python3 -m scripts.bench_launch --out "$RES/launch" 2>&1 \
        | tee "$RES/bench_launch.log" | tail -10 ;;
    serve)
      # mlx_lm.server under 8 concurrent greedy requests, unpatched vs MTP_SPLITK=1
      # (SERVE_MODEL: a model directory; default the synthetic Llama-3-8B shape).
      wait
      timeout "${SERVE_TIMEOUT:-300}" python3 -m scripts.bench_serve --out "$RES/serve" \
        ${SERVE_MODEL:+--model "$SERVE_MODEL"} 2>&1 | tee "$RES/bench_serve.log" | tail -4 ;;
    tune)
      # mtp-splitk tune --quick into a scratch cache: the user's path on this GPU.
      # TUNE_MODELS: family,size pairs of the synthetic models, or mtp:NAME for a model of
      # bench.models.MTP_MODELS (e.g. the 5-bit mtp:qwen3-next-80b-a3b-12l), each tuned into the one table.
      until [ -z "${TUNE_MODELS:-}" ] || [ -e "$MODELS/.written" ]; do sleep 2; done
      # an mtp: model is one of MODELS_EXTRA, written after the base ones
      specs=${TUNE_MODELS:-}
      until [ "${specs#*mtp:}" = "$specs" ] || [ -e "$MODELS/.extra-written" ]; do sleep 2; done
      for spec in ${TUNE_MODELS:-default}; do
        IFS=, read -r family size <<<"$spec"
        if [ "${spec#mtp:}" != "$spec" ]; then
          model=$(python3 -c "from mtp_splitk.bench import models as b; print(b.mtp_model_dir('$MODELS', '${spec#mtp:}'))")
        else
          model=$([ "$spec" = default ] || python3 -c "from mtp_splitk.bench import models as b; print(b.model_dir('$MODELS', '$family', '$size'))")
        fi
        MTP_SPLITK_CACHE=/tmp/tune-cache timeout "${TUNE_TIMEOUT:-300}" python3 -m mtp_splitk.cli \
          tune --quick ${model:+--model "$model"} 2>&1 | tee -a "$RES/tune.log" | tail -12
      done
      cp -r /tmp/tune-cache/tuning "$RES/tune" 2>/dev/null ;;
    profile)
      # Hardware counters of the dense kernel (Firecracker machines; leave the clocks alone);
      # PROFILE_ARGS=--moe: the grouped MoE kernel's instead.
      # Only the matmul kernels: the random-weight set-up kernels took most of the
      # first profile's time limit.
      timeout "${PROFILE_TIMEOUT:-200}" ncu --clock-control none -k "regex:mtp_splitk|qmv|qmm|gather" \
        --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --csv --log-file "$RES/ncu.csv" \
        python3 -m scripts.profile_kernel ${PROFILE_ARGS:-} 2>&1 | tee "$RES/profile_run.log" | tail -5
      python3 -m scripts.profile_kernel --summarize "$RES/ncu.csv" 2>&1 | tee "$RES/profile.txt" | tail -40 ;;
    demo-model)
      # The demo model's GGUF cannot be fetched there (no index) nor carried in one call
      # (94 MiB): .gg/p1, p2, ... are the parts of its xz stream, one carried by each call
      # on the warm machine, parked in /tmp/gg (a call carrying .gg/p2 alone removes p1).
      mkdir -p "$MTP_SPLITK_CACHE/gguf"
      cat /tmp/gg/p* | python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), open(sys.argv[1], 'wb'), 1 << 20)" \
        "$MTP_SPLITK_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
      if (cd "$MTP_SPLITK_CACHE/gguf" && echo "$GGUF_SHA256  SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c); then
        touch "$MTP_SPLITK_CACHE/gguf/.complete"; log "demo model's GGUF in place"
      else log "demo model's GGUF corrupt"; fi ;;
    park)
      mkdir -p /tmp/gg && cp .gg/p* /tmp/gg/ && ls -l /tmp/gg | tee -a "$RES/session.log" ;;
    train)
      # mtp-splitk train-mtp on the demo model (q4, float16 on the GPU) within TRAIN_MINUTES;
      # the head and its record come back, then the real-model benchmark with it.
      # TRAIN_FROM_SHIPPED=1: continue from the head the package ships (--init-from).
      demo=$(python3 -c "from mtp_splitk import demo_model as d; print(d.demo_model('q4'))")
      shipped=$([ -n "${TRAIN_FROM_SHIPPED:-}" ] && python3 -c "from mtp_splitk import demo_model as d; print(d.demo_mtp('q4'))")
      timeout $(( ${TRAIN_MINUTES:-5} * 60 + 120 )) python3 -m mtp_splitk.cli train-mtp --model "$demo" \
        --out /tmp/smol-mtp --minutes "${TRAIN_MINUTES:-5}" ${shipped:+--init-from "$shipped"} ${TRAIN_ARGS:-} 2>&1 \
        | tee "$RES/train.log" | tail -6
      mkdir -p "$OUT/head"; cp /tmp/smol-mtp/mtp.safetensors /tmp/smol-mtp/train_state/state.json "$OUT/head/"
      # One k: run 11's grid of three ran out of time before the head's own rows.
      timeout "${REAL_TIMEOUT:-200}" python3 -m scripts.bench_e2e --out "$OUT/e2e-smollm2" --model-path /tmp/smol-mtp \
        --mtp-path /tmp/smol-mtp --no-draft --repeats 3 --num-draft-tokens 2 --mtp-draft-tokens 2 \
        --acceptance 0.8 --loops overlap,sync ${REAL_ARGS:-} --deadline "$(( ${REAL_TIMEOUT:-200} - 20 ))" 2>&1 \
        | tee "$RES/bench_smollm2.log" | tail -6 ;;
    *) echo "unknown step $step" ;;
  esac
  pack
done
log "end"; pack; tar czf "$OUT/ptx.tgz" -C "$MLX_PTX_CACHE_DIR" .; ls -la "$OUT"
