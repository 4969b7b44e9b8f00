# Shared by the sbatch templates (sourced; not a job script). Runs `cvtk-job ARGS…` on every task of
# this job step with the chosen runtime, forwards a preemption signal to it, and requeues the job
# when it stopped after a checkpoint (exit 75).

run_cvtk() {
  local launcher
  case "$CVTK_RUNTIME" in
    apptainer) launcher=(apptainer exec --nv --cleanenv --env PYTHONUNBUFFERED=1 "$CVTK_IMAGE" cvtk-job) ;;
    pyxis) launcher=(--container-image="$CVTK_IMAGE" cvtk-job) ;;
    none) launcher=("$CVTK_PYTHON" -m cvtk_job) ;;
    *) echo "CVTK_RUNTIME must be apptainer, pyxis or none (got '$CVTK_RUNTIME')" >&2; exit 2 ;;
  esac
  srun --kill-on-bad-exit=1 "${launcher[@]}" "$@" &
  local step=$!
  # Slurm's --signal=B:USR1@… reaches only this shell: pass it on to the tasks (srun forwards it).
  trap 'echo "cvtk: USR1 received, asking the job to checkpoint and stop" >&2; kill -USR1 "$step"' USR1
  trap 'kill -TERM "$step"' TERM
  local rc=0
  wait "$step" || rc=$?
  while kill -0 "$step" 2>/dev/null; do  # `wait` returns early when a trapped signal arrives
    rc=0
    wait "$step" || rc=$?
  done
  trap - USR1 TERM
  if [ "$rc" -eq 75 ]; then
    local restarts=${SLURM_RESTART_COUNT:-0}
    if [ "$restarts" -lt "$CVTK_MAX_REQUEUES" ]; then
      echo "cvtk: checkpointed and stopped (exit 75); requeueing (restart $((restarts + 1)) of $CVTK_MAX_REQUEUES)" >&2
      scontrol requeue "$SLURM_JOB_ID"
      exit 0
    fi
    echo "cvtk: stopped after a checkpoint, but already requeued $restarts times; resubmit to continue" >&2
  fi
  exit "$rc"
}
