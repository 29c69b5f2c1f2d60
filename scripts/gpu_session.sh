#!/usr/bin/env bash
# One sitting on the GPU machine (device tool), from the repo root, after
# `. .whl/activate.sh`. Steps are named on the command line, e.g.
#   bash scripts/gpu_session.sh tests bench
# Each step is time-boxed so a slow one cannot eat the others; logs and
# results land in $OUT. MLX's JIT cache is kept in .ptxcache (carried in and
# brought back as ptxcache.tgz) so later sittings skip the compiles.
set -u
export MLX_PTX_CACHE_DIR="$PWD/.ptxcache"
mkdir -p "$MLX_PTX_CACHE_DIR" "$OUT"
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case "$step" in
    tests) timeout "${TEST_TIMEOUT:-240}" python -m pytest -q -m gpu ${TEST_PATHS:-tests/} --durations=8 -p no:cacheprovider \
             2>&1 | tee "$OUT/gpu_tests.txt" | tail -25 ;;
    bench) timeout "${BENCH_TIMEOUT:-300}" python scripts/bench_kernels.py --out "$OUT" --tune ${BENCH_ARGS:-} \
             2>&1 | tee "$OUT/bench.log" | tail -${BENCH_TAIL:-40} ;;
    profile) timeout "${PROFILE_TIMEOUT:-200}" ncu --clock-control none --section SpeedOfLight --section Occupancy \
               --section LaunchStats --section WarpStateStats --csv --log-file "$OUT/ncu.csv" \
               python scripts/profile_kernel.py 2>&1 | tail -30
             python scripts/profile_kernel.py --summarize "$OUT/ncu.csv" 2>&1 | tail -${PROFILE_TAIL:-80} ;;
    moe) timeout "${MOE_TIMEOUT:-300}" python scripts/bench_moe.py --out "$OUT" --tune ${MOE_ARGS:-} \
           2>&1 | tee "$OUT/bench_moe.log" | tail -${MOE_TAIL:-70} ;;
    *) echo "unknown step $step" ;;
  esac
done
tar czf "$OUT/ptxcache.tgz" -C "$MLX_PTX_CACHE_DIR" . && ls -la "$OUT"
