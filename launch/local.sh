#!/usr/bin/env bash
# One host, N GPUs: the same `python -m cc2dv2_jax.main ...` as the cluster templates.
#
#   launch/local.sh --config=configs/ceph.py --workdir=workdirs/ceph --stage=all
#       one process driving every visible GPU (the usual choice on one host)
#   NPROC=4 launch/local.sh --config=configs/ceph.py --workdir=workdirs/ceph
#       4 processes, one GPU each, joined through jax.distributed on 127.0.0.1 (the multi-host
#       code path on one machine; also works on CPU: JAX_PLATFORMS=cpu NPROC=2 launch/local.sh ...)
#   DRY_RUN=1 NPROC=2 launch/local.sh ...   prints the commands instead of running them
#
# Run it from the repository root (or with cc2dv2_jax installed). Exit status: the first non-zero
# status of the processes (75 = preempted after a checkpoint: run the same command again).
set -uo pipefail

NPROC=${NPROC:-1}
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}

# DRY_RUN=1: print each command, shell-quoted, instead of running it.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [[ "$NPROC" -le 1 ]]; then
  run "$PYTHON" -m cc2dv2_jax.main "$@"
  exit $?
fi

PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
# Ctrl-C / SIGTERM reach every process, so each one checkpoints and exits cleanly.
trap 'kill -TERM "${pids[@]}" 2>/dev/null' INT TERM
for ((i = 0; i < NPROC; i++)); do
  # JAX_LOCAL_DEVICE_IDS: process i drives GPU i only (ignored on CPU).
  env_vars=(JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$NPROC"
            JAX_PROCESS_ID="$i" JAX_LOCAL_DEVICE_IDS="$i")
  if [[ "$DRY_RUN" == 1 ]]; then
    run env "${env_vars[@]}" "$PYTHON" -m cc2dv2_jax.main "$@"
  else
    env "${env_vars[@]}" "$PYTHON" -m cc2dv2_jax.main "$@" &
    pids+=($!)
  fi
done
rc=0
for pid in ${pids[@]+"${pids[@]}"}; do
  wait "$pid"
  status=$?
  # A trapped signal interrupts `wait`; wait again for the process's own exit status.
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid"
    status=$?
  done
  if [[ "$rc" -eq 0 && "$status" -ne 0 ]]; then rc=$status; fi
done
exit "$rc"
