# The body of slurm/pretrain_v2.sh and slurm/pretrain_v3.sh, sourced by them with RECIPE set (see their
# headers for the variables and arguments). Not a script of its own: it has no #SBATCH header.
#
# 1. python -m pretrain.preflight --claim: the config, the data sources, the checkpoints in
#    OUTPUT_DIR and the folder's owner are checked once, before any GPU process starts; a problem
#    fails the job at once with "error: ..." (exit code 2). The job then owns OUTPUT_DIR.
# 2. srun starts one pretrain.train per task. pretrain/distributed.py reads SLURM_PROCID,
#    SLURM_NTASKS and SLURM_LOCALID, and takes the first node of SLURM_NODELIST as the master, on
#    port 20000 + job id mod 20000.
# 3. On SIGUSR1 (the header's --signal, ahead of the time limit) the script forwards the signal to the
#    tasks (srun passes it on), which finish their step, checkpoint that iteration and exit with code 3
#    (pretrain/train.py); the job then requeues itself, at most MAX_REQUEUES times, restarts with the
#    same id and resumes from that checkpoint: no step is lost. The signal's lead time must cover one
#    step and one checkpoint write. A signal before training started requeues at once.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:?run this through sbatch, from the repository root}"
PYTHON=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-pretrain/configs/$RECIPE.yaml}
OUTPUT_DIR=${OUTPUT_DIR:-runs/pretrain/$RECIPE}
MAX_REQUEUES=${MAX_REQUEUES:-3}

overrides=("output_dir=$OUTPUT_DIR")
if [ -n "${MANIFEST:-}" ]; then overrides+=("data.manifest=$MANIFEST"); fi
if [ -n "${IMAGE_FOLDER:-}" ]; then overrides+=("data.image_folder=$IMAGE_FOLDER"); fi
overrides+=("$@")

STOPPED=3  # pretrain.train's exit code after checkpointing on SIGUSR1
training=""

requeue() {
  local restarts=${SLURM_RESTART_COUNT:-0}
  if [ "$restarts" -lt "$MAX_REQUEUES" ]; then
    echo "requeueing job $SLURM_JOB_ID ($((restarts + 1)) of $MAX_REQUEUES); it resumes from the newest checkpoint in $OUTPUT_DIR/checkpoints" >&2
    scontrol requeue "$SLURM_JOB_ID"
  else
    echo "not requeued: $restarts requeues done (MAX_REQUEUES=$MAX_REQUEUES); submit the same command again to continue" >&2
  fi
}

on_time_limit_signal() {
  if [ -z "$training" ]; then
    echo "time limit near before training started" >&2
    requeue
  else
    echo "time limit near: asking the tasks to checkpoint and stop" >&2
    kill -USR1 "$training" 2>/dev/null || true  # srun forwards it to every task
  fi
}
trap on_time_limit_signal USR1

echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NTASKS tasks on $SLURM_JOB_NODELIST; $CONFIG ${overrides[*]}" >&2
"$PYTHON" -m pretrain.preflight --claim --config "$CONFIG" "${overrides[@]}"
srun --label --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
  "$PYTHON" -m pretrain.train --config "$CONFIG" "${overrides[@]}" &
training=$!
# A trapped signal interrupts wait; wait again until srun has ended.
while true; do
  status=0
  wait "$training" || status=$?
  kill -0 "$training" 2>/dev/null || break
done
if [ "$status" -eq "$STOPPED" ]; then
  requeue
  exit 0
fi
exit "$status"
