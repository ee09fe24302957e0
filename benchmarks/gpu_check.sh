#!/usr/bin/env bash
# One call on a lent GPU machine (H100/H200, torch 2.11 + triton 3.6, no network), about 9 minutes:
# versions, install with the CUDA extension for sm_90, the whole test suite, then the benchmarks.
# Every stage runs under its own time limit, and a stage that fails or times out never stops the
# next. What comes back under $OUT (8 files at most):
#   stages.tsv        one line per stage: rc (124 or 137 = timed out), seconds, limit
#   gpu_check.log     every stage's output, one after the other
#   gpu_tests.log     the test-suite log alone
#   summary.txt       the kernel benchmark table
#   kernels-<gpu>.json, ceilings-<gpu>.json
#   gpu_check.tar.gz  every results file this run wrote under benchmarks/results (JSON, PNG)
# Cut short, the run still leaves stages.tsv and the two logs (written as it goes).
#
# Run from the repository root (the GPU machine's copy has no .git, so pass the commit):
#   FASTDISS_GIT_COMMIT=$(git rev-parse HEAD) FASTDISS_GIT_DIRTY=0 bash benchmarks/gpu_check.sh
# Knobs (environment): GPU_CHECK_BUDGET_S (total, default 530), GPU_CHECK_STAGES (default
#   "info install tests ceilings kernels sampler latency"), <STAGE>_LIMIT_S caps (INSTALL 240,
#   TESTS 240, CEILINGS 60, KERNELS 200, SAMPLER 90, LATENCY 90), KERNELS_ARGS (default --gpu),
#   CEILINGS_ARGS, SAMPLER_ARGS, LATENCY_ARGS, PYTHON (default python3).
set -x
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: > "$LOG"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-530}
STAGES=${GPU_CHECK_STAGES:-"info install tests ceilings kernels sampler latency"}
RESERVE=20                                  # seconds kept for bundling the results at the end
START=$(date +%s)
STAMP=$(mktemp); touch "$STAMP"             # results files newer than this were written by this run
export FASTDISS_GIT_COMMIT=${FASTDISS_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
printf 'stage\trc\tseconds\tlimit_s\n' > "$OUT/stages.tsv"

wanted() { [[ " $STAGES " == *" $1 "* ]]; }

# limit_for CAP: the stage's time limit, never past the total budget (minus the reserve)
limit_for() {
  local left=$(( BUDGET - ($(date +%s) - START) - RESERVE ))
  (( left < $1 )) && echo "$left" || echo "$1"
}

# stage NAME LIMIT CMD...: run CMD with a time limit, append its output to $LOG (and to
# $STAGE_LOG when set), record rc and time in stages.tsv
stage() {
  local name=$1 lim=$2; shift 2
  echo "==================== stage $name (limit ${lim}s) ====================" >> "$LOG"
  if (( lim < 15 )); then
    printf '%s\tskipped (budget)\t0\t%s\n' "$name" "$lim" >> "$OUT/stages.tsv"
    return 0
  fi
  local t0=$(date +%s)
  timeout -s INT -k 20 "$lim" "$@" 2>&1 | tee -a "$LOG" ${STAGE_LOG:+"$STAGE_LOG"}
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$lim" >> "$OUT/stages.tsv"
  return 0
}

if wanted info; then
  stage info "$(limit_for 30)" bash -c "nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv; nvcc --version | tail -2; $PY -c '
import sys, torch, triton
print(\"python\", sys.version.split()[0], sys.executable)
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version())
print(\"triton\", triton.__version__)
p = torch.cuda.get_device_properties(0)
print(\"gpu\", p.name, \"sm_%d%d\" % (p.major, p.minor), p.multi_processor_count, \"SMs\", p.total_memory >> 20, \"MiB\")
'"
fi

if wanted install; then
  stage install "$(limit_for ${INSTALL_LIMIT_S:-240})" \
    env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -e .
  if ! $PY -c "import fastdiss.kernels" 2>/dev/null; then   # no build: at least the pure-Python package
    stage install_noext "$(limit_for 60)" \
      env FASTDISS_NO_EXT=1 $PY -m pip install --no-build-isolation --no-deps -e .
  fi
  stage import_check "$(limit_for 60)" $PY -c "import fastdiss, fastdiss.kernels, fastdiss._ext as e; print('fastdiss._C:', e.build_info())"
fi

if wanted tests; then
  STAGE_LOG=$OUT/gpu_tests.log stage tests "$(limit_for ${TESTS_LIMIT_S:-240})" $PY -m pytest -q -ra tests
fi

if wanted ceilings; then
  stage ceilings "$(limit_for ${CEILINGS_LIMIT_S:-60})" $PY -m benchmarks.bench_ceilings ${CEILINGS_ARGS:-}
fi

if wanted kernels; then
  lim=$(limit_for ${KERNELS_LIMIT_S:-200})
  # stop starting new cases 45 s before the limit, so the last case, the plots and the JSON finish
  stage kernels "$lim" $PY -m benchmarks.bench_kernels ${KERNELS_ARGS:---gpu} --budget-s $(( lim > 75 ? lim - 45 : 30 ))
fi

# Other benchmarks, when present (their options are theirs: pass --gpu only if they know it).
for name in sampler latency; do
  if [ "$name" = sampler ]; then mod=bench_sampler; cap=${SAMPLER_LIMIT_S:-90}; args=${SAMPLER_ARGS-__auto__}
  else mod=latency; cap=${LATENCY_LIMIT_S:-90}; args=${LATENCY_ARGS-__auto__}; fi
  if wanted "$name" && [ -f "benchmarks/$mod.py" ]; then
    if [ "$args" = __auto__ ]; then grep -q -- '"--gpu"' "benchmarks/$mod.py" && args=--gpu || args=; fi
    stage "$name" "$(limit_for "$cap")" $PY -m "benchmarks.$mod" $args
  fi
done

# Bundle: every results file this run wrote in one tar; the key files beside it.
set +x
BUNDLE=$(mktemp -d)
mkdir -p "$BUNDLE/results"
find benchmarks/results -type f -newer "$STAMP" -exec cp {} "$BUNDLE/results/" \; 2>/dev/null
tar -czf "$OUT/gpu_check.tar.gz" -C "$BUNDLE" results
for f in "$BUNDLE"/results/kernels-*.json "$BUNDLE"/results/ceilings-*.json; do
  [ -f "$f" ] && cp "$f" "$OUT/"
done
KJSON=$(ls -t "$BUNDLE"/results/kernels-*.json 2>/dev/null | head -1)
if [ -n "$KJSON" ]; then
  $PY -m benchmarks.bench_kernels --summarize "$KJSON" > "$OUT/summary.txt" 2>&1
fi

echo "================================ gpu_check summary ================================"
for f in "$BUNDLE"/results/ceilings-*.json; do
  [ -f "$f" ] && $PY -c "import json,sys; s=json.load(open(sys.argv[1]))['summary']; print('ceilings:', s)" "$f"
done
[ -f "$OUT/summary.txt" ] && cat "$OUT/summary.txt"
grep -E "passed|failed|error" "$OUT/gpu_tests.log" 2>/dev/null | tail -3
column -t -s $'\t' "$OUT/stages.tsv" 2>/dev/null || cat "$OUT/stages.tsv"
echo "total $(( $(date +%s) - START )) s; files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$BUNDLE" "$STAMP"
