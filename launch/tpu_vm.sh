#!/usr/bin/env bash
# A Cloud TPU VM (single host or pod slice): create it, copy this checkout to every worker, install, run
# the same command on all workers (JAX finds the other workers itself), delete it.
#
#   export TPU_NAME=jaxdistill ZONE=us-central2-b ACCELERATOR=v4-32 RUNTIME=tpu-ubuntu2204-base
#   launch/tpu_vm.sh create
#   launch/tpu_vm.sh setup
#   launch/tpu_vm.sh prepare --source 'tar:/mnt/shared/laion/*.tar' --pipeline /mnt/shared/sdxl --out /mnt/shared/laion
#   launch/tpu_vm.sh run --config configs/ssd1b.py --workdir /mnt/shared/runs/ssd1b --config.teacher=/mnt/shared/sdxl \
#       --config.data.path=/mnt/shared/laion
#   launch/tpu_vm.sh ssh 'tail -f jaxdistill/run.log'        # any command on all workers
#   launch/tpu_vm.sh delete
#
# The workdir (checkpoints, written by all workers together) and the data must be on storage every worker
# sees: a Filestore/NFS mount, or a bucket mounted with gcsfuse. `run` keeps going after you disconnect
# (nohup); its output is appended to ~/jaxdistill/run.log on each worker, its pid goes to
# ~/jaxdistill/train.pid (what `stop` signals; `run` is refused while that process still runs); `prepare`
# likewise to prepare.log and prepare.pid (it resumes where it stopped).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-8}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
tpu=(gcloud compute tpus tpu-vm)
on_all() { "${tpu[@]}" ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }
case "${1:-}" in
  create)
    "${tpu[@]}" create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" --version "$RUNTIME" ;;
  setup)
    here=$(cd "$(dirname "$0")/.." && pwd)
    tar -C "$here" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/jaxdistill.tgz .
    "${tpu[@]}" scp /tmp/jaxdistill.tgz "$TPU_NAME":~/ --zone "$ZONE" --worker=all
    # jaxdistill needs Python ≥ 3.11; tpu-ubuntu2204-base has 3.10: uv then fetches a 3.11 for the venv
    on_all "mkdir -p jaxdistill && tar -C jaxdistill -xzf jaxdistill.tgz && cd jaxdistill \
            && if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then python3 -m venv .venv; \
               else python3 -m pip install -q --user uv && python3 -m uv venv -q --seed --python 3.11 .venv; fi \
            && . .venv/bin/activate && pip install -q -e '.[tpu]'" ;;
  run|prepare)  # run: the trainer (run.log, train.pid); prepare: the data set encoder (prepare.log, prepare.pid)
    task=$([[ $1 == run ]] && echo train || echo prepare)
    log=$([[ $1 == run ]] && echo run.log || echo prepare.log)
    shift
    args=$(printf '%q ' "$@")
    # Refused on a worker where the last one still runs (a second would hide it from `stop`); logs are appended.
    on_all "cd jaxdistill && if pid=\$(cat $task.pid 2>/dev/null) && grep -qs jaxdistill.$task /proc/\$pid/cmdline; \
            then echo \"\$(hostname): jaxdistill.$task still runs (pid \$pid); launch/tpu_vm.sh stop first\" >&2; exit 1; \
            fi; . .venv/bin/activate && echo \"==== \$(date '+%F %T') $task\" $args >> $log \
            && { nohup python -m jaxdistill.$task $args >> $log 2>&1 & echo \$! > $task.pid; }" ;;
  ssh)
    (($# == 2)) || { echo "usage: $0 ssh 'COMMAND' (one quoted argument)" >&2; exit 2; }
    on_all "$2" ;;
  stop)  # the trainer checkpoints, then exits; prepare stops (finished shards are kept). By the pid `run` or
         # `prepare` wrote (if that process is still the one): `pkill -f jaxdistill.train` would match, and
         # kill, the remote shell whose command line holds it. Returns once they have exited (the checkpoint
         # written): `delete` right after loses nothing.
    on_all 'for task in train prepare; do pid=$(cat jaxdistill/$task.pid 2>/dev/null) \
              && grep -qs jaxdistill.$task "/proc/$pid/cmdline" && kill -TERM "$pid" \
              && echo "$(hostname): waiting for $task ($pid) to save and exit" \
              && while kill -0 "$pid" 2>/dev/null; do sleep 1; done; rm -f jaxdistill/$task.pid; \
            done' ;;
  delete)
    "${tpu[@]}" delete "$TPU_NAME" --zone "$ZONE" --quiet ;;
  *)
    echo "usage: $0 create|setup|run ARGS...|prepare ARGS...|ssh COMMAND|stop|delete" >&2; exit 2 ;;
esac
