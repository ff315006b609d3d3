# What the packaged SLURM batch scripts do alike, sourced by both after they set PROCESSES (the node's
# training processes): the output folder, the port, the CPUs' share, which checkpoint an attempt needs,
# and the requeue at the time limit's warning. Start the training with `start_training srun …`.

say() { echo "lenet-dist (SLURM job $SLURM_JOB_ID): $*" >&2; }
export OUTPUT_DIR=${OUTPUT_DIR:-runs/$SLURM_JOB_NAME-$SLURM_JOB_ID}
export MAIN_PORT=${MAIN_PORT:-$(( 15000 + SLURM_JOB_ID % 10000 ))}  # two jobs sharing a node differ
cpus=${SLURM_CPUS_PER_TASK:-1}
if (( PROCESSES > cpus )); then
  say "$PROCESSES processes per node but $cpus CPU(s) asked per node; raise --cpus-per-task or lower the processes"
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / PROCESSES ))}  # each process its share
# torch's C++ warnings off in the job log (c10d's "hostname of the client socket cannot be retrieved" for each
# rank, where compute nodes have no reverse DNS); its errors stay
export TORCH_CPP_LOG_LEVEL=${TORCH_CPP_LOG_LEVEL:-ERROR}
restarts=${SLURM_RESTART_COUNT:-0}
resume=auto  # a requeued attempt needs the checkpoint: without it, it would start over without a word
(( restarts > 0 )) && [ "${ALLOW_FRESH_START:-0}" != 1 ] && resume=latest
newest_checkpoint() { ls -d "$OUTPUT_DIR"/checkpoints/step-* 2>/dev/null | tail -n 1; }
started_from=$(newest_checkpoint)

# The ranks save and stop (138), then the job requeues itself, unless that cannot help (no new checkpoint in
# this attempt, MAX_REQUEUES reached) or SLURM refuses: then the job ends FAILED, saying why in one line.
requeue() {
  kill -USR1 "$child" 2>/dev/null
  wait "$child"
  local status=$? saved again refused
  (( status == 138 )) || exit "$status"
  saved=$(newest_checkpoint)
  again="resume with OUTPUT_DIR=$OUTPUT_DIR (newest checkpoint: ${saved:-none on $(hostname)})"
  if [ "$saved" = "$started_from" ]; then
    say "not requeued: this attempt saved no new checkpoint; $again"; exit 1
  elif (( restarts >= ${MAX_REQUEUES:-20} )); then
    say "not requeued: requeued $restarts times already (MAX_REQUEUES=${MAX_REQUEUES:-20}); $again"; exit 1
  elif ! refused=$(scontrol requeue "$SLURM_JOB_ID" 2>&1); then
    say "SLURM refused to requeue it (${refused//$'\n'/ }); $again"; exit 1
  fi
  exit 0
}

start_training() {
  trap requeue USR1
  "$@" &
  child=$!
  wait "$child"
}
