# Shared by the sbatch templates (sourced; not a job script). Runs `cvtk-job ARGS…` on every task of
# this job step with the chosen runtime, forwards a preemption signal to it, and requeues the job
# when it stopped after a checkpoint (exit 75).
#
# What each task receives, whatever the runtime:
# - SLURM_* of its own task (rank, local rank, node list), which cvtk-job reads to join the job's
#   process group; MASTER_ADDR and MASTER_PORT computed here on the host, where scontrol works (the
#   first node's NodeAddr: node names need not resolve inside a container) and the port from the job id;
# - AWS_* (credentials, endpoint, profile and its files' paths; $HOME, with ~/.aws, is mounted by
#   apptainer and pyxis), CVTK_*, PYTHONUNBUFFERED, proxies. `apptainer exec --cleanenv` starts with an
#   empty environment, so these go in as APPTAINERENV_* variables set inside each task (per-task values);
#   pyxis and `none` pass the task's environment as it is.

# The variables a task needs inside a clean container (bash patterns).
CVTK_PASS_ENV='SLURM_* AWS_* CVTK_* MASTER_ADDR MASTER_PORT PYTHONUNBUFFERED HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy'

# Run inside each task (srun): export APPTAINERENV_X for every variable to pass, then exec the command.
cvtk_apptainer_env() {
  local name pattern
  for name in $(compgen -e); do
    for pattern in $CVTK_PASS_ENV; do
      # shellcheck disable=SC2053 # a glob pattern on purpose
      if [[ $name == $pattern ]]; then export "APPTAINERENV_$name=${!name}"; break; fi
    done
  done
  exec "$@"
}

cvtk_master() {
  local first addr
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  addr=$(scontrol show node "$first" | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
  export MASTER_ADDR=${MASTER_ADDR:-${addr:-$first}}
  export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
}

run_cvtk() {
  local launcher
  cvtk_master
  export PYTHONUNBUFFERED=1
  case "$CVTK_RUNTIME" in
    apptainer)
      launcher=(bash -c "$(declare -f cvtk_apptainer_env); CVTK_PASS_ENV='$CVTK_PASS_ENV'; cvtk_apptainer_env \"\$@\"" cvtk-env
                apptainer exec --nv --cleanenv "$CVTK_IMAGE" cvtk-job) ;;
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
