#!/usr/bin/env bash
# Submit the tasks of a stream as jobs that run in order: task k starts when task k-1 succeeded
# (afterok), each on one node through single-node.sbatch. A preempted task requeues itself, and
# the next task waits for it.
#
#   examples/slurm/stream-chain.sh data/libero_10 runs/libero10 10
#
# (stream-array.sbatch does the same as one job array whose elements run one at a time; this
# chain also stops the stream at a failed task, since a job whose dependency failed never starts.)
set -euo pipefail

dataset=$1
run=$2
tasks=$3
here=$(dirname "$0")
mkdir -p "$run"

stats=$(sbatch --parsable --job-name=vlacl-stats --time=01:00:00 --cpus-per-task=16 \
    --wrap "vlacl ds-stats $dataset --out $run/stats")
dep=$stats
for ((k = 0; k < tasks; k++)); do
    dep=$(sbatch --parsable --dependency=afterok:"$dep" --job-name="vlacl-task$k" \
        --export=ALL,DATASET="$dataset",RUN="$run",TASK="$k" "$here/single-node.sbatch")
    echo "task $k: job $dep"
done
