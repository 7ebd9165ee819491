#!/usr/bin/env bash
# N processes of `python -m jaxdistill.train` on this machine, joined by JAX's distributed runtime over
# 127.0.0.1 (CPU processes talk over gloo): a real multi-host run without a cluster.
#
#   launch/local.sh 2 --config configs/tiny.py --workdir runs/two-hosts [--config.mesh.sizes.fsdp=-1 ...]
#
# Each process gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (read by
# jaxdistill.sharding.initialize_distributed); $PYTHON (default python) runs them, on the CPU unless
# JAX_PLATFORMS says otherwise (one machine's GPUs are one process's devices: run the trainer itself there).
# Logs: WORKDIR/process_I.log, appended to (a relaunch that resumes keeps the earlier run's log above a dated
# line); process 0 also prints to the terminal. When a process fails, the others are stopped (they would wait for it
# in a collective until JAX's heartbeat gives up) and the launcher exits with the failed one's status.
# Ctrl-C, SIGTERM or SIGHUP (a closed terminal) stops all: each checkpoints first, and the launcher waits for
# every one of them, then exits with the first non-zero status of a process (0 when all stopped cleanly).
set -euo pipefail
usage="usage: $0 NUM_PROCESSES --config CONFIG --workdir DIR [--config.FIELD=VALUE ...]"
if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "$usage" >&2
  exit 2
fi
n=$1; shift
workdir=""
for ((i = 1; i <= $#; i++)); do
  if [[ "${!i}" == "--workdir" ]]; then
    ((i < $#)) || { echo "$0: --workdir needs a value; $usage" >&2; exit 2; }
    j=$((i + 1)); workdir="${!j}"
  fi
  if [[ "${!i}" == --workdir=* ]]; then workdir="${!i#--workdir=}"; fi
done
[[ -n "$workdir" ]] || { echo "$0: give --workdir DIR; $usage" >&2; exit 2; }
mkdir -p "$workdir"
port=${JAX_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
# Only forward: the processes checkpoint, then exit, and the loop below waits for all of them.
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM HUP
for ((p = 0; p < n; p++)); do
  echo "==== $(date '+%Y-%m-%d %H:%M:%S') $0: process $p of $n" >> "$workdir/process_$p.log"
done
start=$(($(wc -c < "$workdir/process_0.log") + 1))  # this launch's part of process 0's log
for ((p = 0; p < n; p++)); do
  env JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$p" \
      JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" \
      "${PYTHON:-python}" -m jaxdistill.train "$@" >> "$workdir/process_$p.log" 2>&1 &
  pids+=($!)
done
# GNU tail ends by itself once process 0 has ended and its log is read to the end; BSD tail (macOS's) has no
# --pid and is stopped below.
gnu_tail=$(tail --version > /dev/null 2>&1 && echo 1 || true)
tail -c +"$start" -f ${gnu_tail:+--pid "${pids[0]}"} "$workdir/process_0.log" &
tail_pid=$!
# Poll rather than `wait PID` in turn: a signal interrupts `wait`, and the order the processes end in is the
# one that matters (and bash 3.2, macOS's, has no `wait -n`).
status=0
left=$n
ended=()
while ((left)); do
  for ((p = 0; p < n; p++)); do
    if [[ -n "${ended[p]:-}" ]] || kill -0 "${pids[p]}" 2>/dev/null; then continue; fi
    ended[p]=1; left=$((left - 1))
    s=0; wait "${pids[p]}" || s=$?
    if ((s != 0 && status == 0)); then
      status=$s
      echo "$0: process $p exited with status $s (see $workdir/process_$p.log); stopping the others" >&2
      kill -TERM "${pids[@]}" 2>/dev/null || true
    fi
  done
  ((left == 0)) || sleep 0.2 || true  # Ctrl-C kills the sleep too: keep waiting for the checkpoints
done
if [[ -z "$gnu_tail" ]]; then
  sleep 1 || true  # BSD tail follows by kqueue: a second is ample to print the rest of the log
  kill "$tail_pid" 2>/dev/null || true
fi
wait "$tail_pid" 2>/dev/null || true
exit $status
