#!/usr/bin/env bash
# Measurements of issue 12 on the digits quickstart (CPU, 1 torch thread per process).
#   bash benchmarks/run_i12_measurements.sh fidelity [launch]   # the study, then 4 launches
#   bash benchmarks/run_i12_measurements.sh samplers
set -euo pipefail
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 PYTHONPATH=$PWD
OUT=${OUT:-runs/i12}
mkdir -p "$OUT"
BUDGET=(--set trial.epochs_per_stage=2 --set trial.mix_epochs=1 --set trial.lr_step=1)
case "$1" in
fidelity)
  # Every trial runs to completion (pruner none) so both pruners can be replayed on it offline.
  LAUNCH=(--set launch.epochs_per_stage=3 --set launch.mix_epochs=1 --set launch.lr_step=1
          --set certify_test.n_inputs=200 --set certify_test.timeout_per_input_s=2.0)
  [ "${2:-}" = launch ] || python -m pipeline.tune --storage "sqlite:///$OUT/fidelity.db" \
    --runs-dir "$OUT/runs" --n-trials 8 --set study.pruner=none "${BUDGET[@]}"
  for n in ${TRIALS:-0 1 2 3}; do
    python -m pipeline.tune --storage "sqlite:///$OUT/fidelity.db" --runs-dir "$OUT/runs" \
      --set study.pruner=none "${BUDGET[@]}" "${LAUNCH[@]}" --launch-best --trial "$n"
  done ;;
samplers)
  # SAMPLERS="tpe" / "gp" run one chain (two chains in parallel); TRAIN caps the training images.
  for seed in 0 1 2; do
    for sampler in ${SAMPLERS:-tpe gp}; do
      python -m pipeline.tune --storage "sqlite:///$OUT/${DB:-samplers}.db" --runs-dir "$OUT/runs_${DB:-samplers}" \
        --n-trials 6 --set study.name=qs_${sampler}_s${seed} --set study.seed=$seed \
        --set study.sampler=$sampler --set study.pruner=none --set study.sampler_startup_trials=2 \
        "${BUDGET[@]}" --set trial.data.max_train_images=${TRAIN:-500} --set certify_val.n_inputs=200
    done
  done ;;
esac
