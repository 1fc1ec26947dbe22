#!/usr/bin/env bash
# The whole continual-learning job on the embedded default, in minutes on a laptop CPU:
#
#   scripted demonstrations of three Continual World tasks (Meta-World, state only)
#   -> their stats -> the built-in tiny policy trained task by task, once with sequential
#   fine-tuning (seq) and once with experience replay (er) -> every checkpoint rolled out on
#   every task -> continual-learning metrics of both runs side by side, with heatmaps.
#
#   examples/quickstart.sh [RUN_DIR]          (default: runs/quickstart; make quickstart runs it)
#
# Every step writes one artifact under RUN_DIR and is skipped when it exists, so a rerun after an
# interruption continues where it stopped (delete RUN_DIR to start over). Settings can be changed
# through the environment: TASKS, EPISODES, STEPS, TRIALS.
set -euo pipefail

run=${1:-runs/quickstart}
tasks=${TASKS:-faucet-close-v3,window-close-v3,handle-press-side-v3}
episodes=${EPISODES:-20}
steps=${STEPS:-150}
trials=${TRIALS:-10}
count=$(awk -F, '{print NF}' <<<"$tasks")

done_() { [ -f "$1/vlacl_manifest.json" ]; }

mkdir -p "$run"
done_ "$run/data" || vlacl collect-demos --stream "$tasks" --episodes-per-task "$episodes" --out "$run/data"
done_ "$run/stats" || vlacl -q ds-stats "$run/data" --out "$run/stats" >"$run/stats.txt"

# Train every task of the stream with one CL algorithm, each task continuing from the previous
# task's checkpoint, then roll out every checkpoint on every task. The tiny policy learns fastest
# with LoRA on every linear layer (its state projection included) at a learning rate of 1e-3.
chain() {
    local cl=$1 prev=() out k
    shift
    for ((k = 0; k < count; k++)); do
        out="$run/$cl/task$k"
        done_ "$out" || vlacl -q train-task --dataset "$run/data" --stats "$run/stats" --task "#$k" "${prev[@]}" \
            --cl "$cl" "$@" --steps "$steps" --lr 1e-3 --lora-targets vision --out "$out" >/dev/null
        echo "$cl: task $k trained: $out"
        prev=(--prev "$out")
    done
    vlacl -q eval-suite "$run/$cl" --trials "$trials" --out "$run/$cl-eval" >"$run/$cl-eval.txt"
    echo "$cl: evaluated: $run/$cl-eval"
}

# The two runs share only the data, so they train side by side, one thread each.
export OMP_NUM_THREADS=1
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
chain seq &
seq_job=$!
chain er --cl-opt replay_fraction=0.33 &  # er: one replayed sample in every three
er_job=$!
wait "$seq_job"
wait "$er_job"

cat "$run/seq-eval.txt" "$run/er-eval.txt"
vlacl cl-metrics seq="$run/seq-eval" er="$run/er-eval" --out "$run/metrics" --overwrite
echo "heatmaps: $run/metrics/matrix.png"
