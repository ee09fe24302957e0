#!/usr/bin/env bash
# The learning question of issue 13 on a lent GPU, in one call of about 9 minutes: does the default
# diffusion recipe at K = 4 reach the AR greedy BLEU of the same size at equal training steps on
# elb2web (German -> English), once the step count is not bounded by a 2-core CPU (where 2000 steps
# cost 25 minutes and the default sits at 2.2 BLEU against 16.3)?
#
# Four learning-curve runs share the one GPU (the tiny preset leaves it mostly idle): the default
# recipe on the distilled training set and the AR model of the same size, seeds 0 and 1, each scored
# at every checkpoint (benchmarks/learning_curve.py, which writes its run file after every point, so
# a run cut short by the time limit keeps the points it reached). Then --merge gathers them into
# learning-curve-gpu-<preset>.json and its plot. What comes back under $OUT:
#   <run>.log, <run>.json   each run's log and result file; preflight.log (a 3-step run with the kernels first)
#   learning-curve-gpu-<preset>.json / .png, merge.log, nvidia-smi.txt
#   pretrained/elb2web-<preset>[-ar]/  seed 0 of both kinds packaged as shipped models (make_shipped_model:
#                           fp16 safetensors, config, tokenizer, provenance with the whole-valid BLEU)
#
# The distilled training set is git-ignored (`fastdiss distill` writes it; its command is in
# benchmarks/results/learning-curve-commands.md): carry it with the device tool, e.g.
#   run(command="FASTDISS_GIT_COMMIT=<sha> bash benchmarks/gpu_learning.sh",
#       carry=["runs/elb2web.distilled.tsv"], timeout_s=560)
# Knobs (environment): PRESET (tiny), CHECKPOINTS ("1000 2000 4000 8000 16000"), SEEDS ("0 1"),
#   FINAL_STEPS (the last checkpoint's sweep, "1 2 4 8 16 1000"), TRAIN_TSV (runs/elb2web.distilled.tsv),
#   LEARN_BUDGET_S (450: the runs' limit; merge and packaging come after), SHIP (1; 0 skips the packaging;
#   a run stopped between checkpoints is not packaged, ship.log says so), DEVICE (cuda; cpu lets the
#   script itself be tried on a machine without a GPU), PYTHON (python3).
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
PRESET=${PRESET:-tiny}
CHECKPOINTS=${CHECKPOINTS:-"1000 2000 4000 8000 16000"}
SEEDS=${SEEDS:-"0 1"}
FINAL_STEPS=${FINAL_STEPS:-"1 2 4 8 16 1000"}
TSV=${TRAIN_TSV:-runs/elb2web.distilled.tsv}
BUDGET=${LEARN_BUDGET_S:-450}
DEVICE=${DEVICE:-cuda}
SHIP=${SHIP:-1}
RUN_DIR=runs/gpu_learning
TAG=gpu-$PRESET
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1

if [[ ! -f $TSV ]]; then
  echo "gpu_learning: the distilled training set $TSV is missing: carry it (device tool: carry=[\"$TSV\"]) or set TRAIN_TSV" >&2
  exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

# Preflight: the Triton kernels have not all run on a GPU yet (rounding cross-entropy, bf16 training). A 3-step
# run with them; if it fails, the real runs use the PyTorch reference ops (FASTDISS_BACKEND=torch, recorded in
# every run header as fastdiss_backend) instead of losing the GPU call.
START=$SECONDS
rm -rf "$RUN_DIR-preflight"   # a leftover run would resume instead of exercising the kernels
if ! timeout -s INT -k 10 240 $PY -m benchmarks.learning_curve --task elb2web --variant default --seed 0 \
     --preset "$PRESET" --checkpoints 3 --final-steps --device "$DEVICE" --threads 1 --run-dir "$RUN_DIR-preflight" \
     --name preflight --train-tsv "$TSV" > "$OUT/preflight.log" 2>&1; then
  echo "gpu_learning: the 3-step preflight failed (preflight.log); training with FASTDISS_BACKEND=torch" | tee -a "$OUT/preflight.log"
  export FASTDISS_BACKEND=torch
fi
BUDGET=$(( BUDGET - (SECONDS - START) ))

pids=()
for seed in $SEEDS; do
  for variant in default ar; do
    name=elb2web-$variant-$PRESET-s$seed
    extra=()
    [[ $variant == default ]] && extra=(--train-tsv "$TSV")
    # shellcheck disable=SC2086
    timeout -s INT -k 20 "$BUDGET" $PY -m benchmarks.learning_curve --task elb2web --variant "$variant" \
      --seed "$seed" --preset "$PRESET" --checkpoints $CHECKPOINTS --final-steps $FINAL_STEPS --device "$DEVICE" --threads 1 \
      --run-dir "$RUN_DIR" --name "$name" "${extra[@]}" > "$OUT/$name.log" 2>&1 &
    pids+=($!)
  done
done
for pid in "${pids[@]}"; do wait "$pid"; done

for f in "$RUN_DIR"/*/result.json; do
  [[ -f $f ]] && cp "$f" "$OUT/$(basename "$(dirname "$f")").json"
done
$PY -m benchmarks.learning_curve --merge --tag "$TAG" --run-dir "$RUN_DIR" --out-dir "$OUT" > "$OUT/merge.log" 2>&1
tail -n 40 "$OUT/merge.log"

if [[ $SHIP == 1 ]]; then
  seed0=${SEEDS%% *}
  for pair in "default:elb2web-$PRESET" "ar:elb2web-$PRESET-ar"; do
    run=$RUN_DIR/elb2web-${pair%%:*}-$PRESET-s$seed0
    [[ -f $run/last.pt ]] || continue
    $PY -m benchmarks.make_shipped_model --run "$run" --name "${pair#*:}" --out "$OUT/pretrained/${pair#*:}" \
      --threads 4 --note "trained by benchmarks/gpu_learning.sh on $DEVICE" >> "$OUT/ship.log" 2>&1
  done
  tail -n 4 "$OUT/ship.log"
fi
