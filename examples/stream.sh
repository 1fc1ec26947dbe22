#!/usr/bin/env bash
# Train every task of a stream in order, each continuing from the previous task's checkpoint.
#
#   examples/stream.sh data/libero_10 runs/libero10 10
#
# Arguments: the dataset, the run directory, the number of tasks. Extra train-task flags go in
# TRAIN_FLAGS, e.g. TRAIN_FLAGS="--adapter-mode stack --steps 2000". A task whose checkpoint exists
# is skipped, so the script can be rerun after a failure; an interrupted task (exit code 75, after
# SIGTERM) continues from its resume state on the next run.
set -euo pipefail

dataset=$1
run=$2
tasks=$3
flags=${TRAIN_FLAGS:-}

mkdir -p "$run"
if [ ! -d "$run/stats" ]; then
    vlacl ds-stats "$dataset" --out "$run/stats"
fi

prev=()
for ((k = 0; k < tasks; k++)); do
    out="$run/task$k"
    if [ ! -f "$out/vlacl_manifest.json" ]; then
        # shellcheck disable=SC2086  # TRAIN_FLAGS is a list of flags
        vlacl train-task --dataset "$dataset" --stats "$run/stats" --task "#$k" "${prev[@]}" \
            --out "$out" --resume auto $flags
    fi
    prev=(--prev "$out")
done
