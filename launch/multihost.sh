#!/usr/bin/env bash
# Start N local processes of one JAX program as a single multi-host run (atlas_jax.distributed).
#
#   launch/multihost.sh [-n N] [-p PORT] [-d DEVICES] [-l LOGDIR] -- COMMAND [ARGS...]
#
#   -n N        processes to start (default 2)
#   -p PORT     coordinator port on 127.0.0.1 (default: a free port)
#   -d DEVICES  fake CPU devices per process (sets XLA_FLAGS=--xla_force_host_platform_device_count)
#   -l LOGDIR   write process i's output to LOGDIR/process_i.log (default: prefix lines with [i] on stdout)
#
# Each process gets ATLAS_COORDINATOR=127.0.0.1:PORT, ATLAS_NUM_PROCESSES=N, ATLAS_PROCESS_ID=i and runs
# COMMAND, e.g.
#   launch/multihost.sh -n 2 -d 4 -- python -m launch.train --config=configs/run/quickstart_ci.py
# If one process fails, the others are stopped; the exit code is the first failing process's.
#
# Real clusters run one process per host instead; see docs/multihost.md:
#   every host:  ATLAS_COORDINATOR=<host0>:<port> ATLAS_NUM_PROCESSES=<hosts> ATLAS_PROCESS_ID=<rank> \
#                python -m launch.train --config=...
#   SLURM:       srun --ntasks=<hosts> python -m launch.train ...        (settings detected)
#   TPU pod:     gcloud compute tpus tpu-vm ssh NAME --worker=all \
#                  --command="ATLAS_DISTRIBUTED=auto python -m launch.train ..."
set -euo pipefail

n=2
port=""
devices=""
logdir=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) n="$2"; shift 2 ;;
    -p) port="$2"; shift 2 ;;
    -d) devices="$2"; shift 2 ;;
    -l) logdir="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "multihost.sh: unknown option '$1' (options come before --; see --help)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "multihost.sh: no command given: launch/multihost.sh [-n N] -- COMMAND [ARGS...]" >&2
  exit 2
fi
if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
  echo "multihost.sh: -n must be a positive integer, got '$n'" >&2
  exit 2
fi
if [[ -n "$devices" && ! "$devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "multihost.sh: -d must be a positive integer, got '$devices'" >&2
  exit 2
fi
if [[ -z "$port" ]]; then
  py="${PYTHON:-python3}"
  port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
if [[ -n "$logdir" ]]; then mkdir -p "$logdir"; fi

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup INT TERM

for ((i = 0; i < n; i++)); do
  (
    export ATLAS_COORDINATOR="127.0.0.1:${port}" ATLAS_NUM_PROCESSES="$n" ATLAS_PROCESS_ID="$i"
    if [[ -n "$devices" ]]; then
      export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"
    fi
    if [[ -n "$logdir" ]]; then
      exec "$@" >"${logdir}/process_${i}.log" 2>&1
    else
      exec "$@" > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2)
    fi
  ) &
  pids+=("$!")
done

status=0
while [[ ${#pids[@]} -gt 0 ]]; do
  done_pid=""
  set +e
  wait -n -p done_pid "${pids[@]}"
  rc=$?
  set -e
  if [[ -z "${done_pid:-}" ]]; then break; fi
  left=()
  for pid in "${pids[@]}"; do
    if [[ "$pid" != "$done_pid" ]]; then left+=("$pid"); fi
  done
  pids=("${left[@]}")
  if [[ $rc -ne 0 ]]; then
    status=$rc
    echo "multihost.sh: process pid $done_pid exited with status $rc; stopping the others" >&2
    cleanup
    break
  fi
done
wait || true  # reap whatever was stopped
exit "$status"
