#!/usr/bin/env bash
# N processes of `python -m jaxdistill.train` on this machine, joined by JAX's distributed runtime over
# 127.0.0.1 (CPU processes talk over gloo): a real multi-host run without a cluster.
#
#   launch/local.sh 2 --config configs/tiny.py --workdir runs/two-hosts [--config.mesh.sizes.fsdp=-1 ...]
#
# Each process gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (read by
# jaxdistill.sharding.initialize_distributed). Logs: WORKDIR/process_I.log; process 0 also prints to the
# terminal. Exits with the first failing process's status; Ctrl-C stops all (each checkpoints first).
set -euo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_PROCESSES --config CONFIG --workdir DIR [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
n=$1; shift
workdir=""
for ((i = 1; i <= $#; i++)); do
  if [[ "${!i}" == "--workdir" ]]; then j=$((i + 1)); workdir="${!j}"; fi
  if [[ "${!i}" == --workdir=* ]]; then workdir="${!i#--workdir=}"; fi
done
[[ -n "$workdir" ]] || { echo "$0: give --workdir DIR" >&2; exit 2; }
mkdir -p "$workdir"
port=${JAX_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
for ((p = 0; p < n; p++)); do
  env JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$p" \
      JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" \
      "${PYTHON:-python}" -m jaxdistill.train "$@" > "$workdir/process_$p.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$workdir/process_0.log" --pid "${pids[0]}" &
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { s=$?; [[ $status -ne 0 ]] || status=$s; }
done
exit $status
