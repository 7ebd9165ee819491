#!/usr/bin/env bash
# The GPU figures of bench/ in one bounded run, most important first (a lent GPU's time is short):
#   1. bench/distill_step.py full-size SDXL → SSD-1B at 1024², bf16, one training step at a global batch of
#      32: ours as 4 micro-batches of 8 (the headline: 48.6 % on the fourth H100 run), PyTorch as 8 of 4
#      (8 does not fit its memory on an 80 GB card), ours profiled (--profile: time by primitive and pass,
#      how busy the GPU is, and time by kernel and kind of kernel — convolution, matmul, attention,
#      reduction, elementwise — which names the work inside command buffers too, if the trace holds their
#      kernels: not yet seen);
#   2. ours at one micro-batch of 8 with XLA's command buffers off, profiled: the op-level profile (inside
#      command buffers the profile names no ops); if 1 found micro-batches of 8 too big, first 1 again as 8
#      micro-batches of 4, and the profile at 4;
#   3. the same global batch as half the micro-batches of twice the size, with remat "dots" (matmul outputs
#      kept, the rest recomputed in the backward): does remat buy a micro-batch that runs faster?
#   4. bench/unet_forward.py SDXL / SSD-1B / Vega forward at 1024², bf16: student speed-ups, ours vs PyTorch;
#   5. bench/attention.py    cuDNN's fused attention vs the XLA path: parity and kernel times.
# (The step with XLA's attention, the fused kernel's "before", was measured on the H200: bench/results/h200/.)
# Each step gets what is left of the budget; the scripts print their progress and rewrite their JSON as they
# go, so a step cut short keeps what it finished. At most 8 files land in OUT_DIR (a lease brings back 8).
#
#     bash bench/gpu.sh OUT_DIR [BUDGET_SECONDS]      # e.g. bash bench/gpu.sh bench/out/gpu 560
# The device image lacks some of our dependencies: `bash bench/device_wheels.sh` here first, carry .whl, and
# install them there as that script says.
# Environment: BATCH (global, default 32), ACCUMULATION (ours, default 4), TORCH_ACCUMULATION (default 8),
# SIZE (the distillation steps' model and image, default "--full --resolution 1024"; a dry run of the script's
# logic on a CPU before a lease, ~7 min on 2 cores: SIZE="--width 16 --resolution 64" SKIP="forward attention"
# BATCH=8 bash bench/gpu.sh /tmp/dry 1100 — at the default BATCH=32 PyTorch's side alone outlasts the distill
# step's share of a smaller budget on a CPU), PYTHON (default python3), SKIP (step names to leave out, e.g.
# "forward attention"), AUTOTUNE (a .tgz of an earlier run's XLA autotuning results to start from: the run
# packs its own into OUT_DIR/autotune.tgz; carried to the next lease, it spares that run's compiles most of
# their autotuning).
set -u
out=${1:-bench/out/gpu}
budget=${2:-560}
batch=${BATCH:-32}
acc=${ACCUMULATION:-4}
torch_acc=${TORCH_ACCUMULATION:-8}
micro=$((batch / acc))
size=${SIZE:---full --resolution 1024}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false
# JAX takes 75 % of a GPU by default: too little for the headline step (67 GB of an 80 GB H100, bench/NOTES.md)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.97}
# XLA keeps each fusion's autotuning result here: later steps (and, carried, later leases) skip the search
autotune=/tmp/jaxdistill_autotune
mkdir -p "$autotune"
if [[ -n "${AUTOTUNE:-}" ]]; then tar xzf "$AUTOTUNE" -C "$autotune" && echo "autotuning results from $AUTOTUNE"; fi
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_per_fusion_autotune_cache_dir=$autotune"
py=${PYTHON:-python3}
left() { echo $((budget - SECONDS)); }
step() {  # step NAME RESERVE_SECONDS COMMAND...: run with the budget left minus a reserve for later steps
    local name=$1 reserve=$2
    shift 2
    local limit=$(($(left) - reserve))
    if [[ " ${SKIP:-} " == *" $name "* ]]; then echo "== $name: skipped (SKIP)" | tee -a "$out/log.txt"; return 1; fi
    if ((limit < 30)); then echo "== $name: skipped, ${limit}s left" | tee -a "$out/log.txt"; return 1; fi
    echo "== $name (limit ${limit}s, at ${SECONDS}s)" | tee -a "$out/log.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/log.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc $rc at ${SECONDS}s" | tee -a "$out/log.txt"
    return "$rc"
}

{ nvidia-smi -L; "$py" -c "import jax, flax, optax, torch, diffusers
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__,
      'diffusers', diffusers.__version__, jax.devices())"; } 2>&1 | tee "$out/log.txt"

step distill 100 "$py" bench/distill_step.py $size --batch "$batch" --accumulation "$acc" \
    --torch-accumulation "$torch_acc" --dtype bf16 --iters 5 --profile /tmp/jaxdistill_trace --json "$out/distill.json"
# micro-batch 8 out of memory (an error, not the time limit): the same global batch as twice the micro-batches
# of half the size, instead
if "$py" -c "import json, sys; sys.exit('error' not in json.load(open(sys.argv[1]))['variants'][0])" \
        "$out/distill.json" 2>/dev/null; then
    acc=$((acc * 2)) micro=$((micro / 2))
    step distill_retry 30 "$py" bench/distill_step.py $size --batch "$batch" --accumulation "$acc" \
        --dtype bf16 --iters 5 --no-torch --profile /tmp/jaxdistill_trace --json "$out/distill_retry.json"
fi
step distill_ops 0 "$py" bench/distill_step.py $size --batch "$micro" --dtype bf16 --iters 5 \
    --no-torch --variant "xla_gpu_enable_command_buffer=" --profile /tmp/jaxdistill_trace --json "$out/distill_ops.json"
step distill_remat 0 "$py" bench/distill_step.py $size --batch "$batch" \
    --accumulation $((acc / 2)) --remat dots --dtype bf16 --iters 5 --no-torch --json "$out/distill_remat.json"
step forward 0 "$py" bench/unet_forward.py --resolution 1024 --batch 2 --dtype bf16 --iters 10 \
    --json "$out/forward.json"
step attention 0 "$py" bench/attention.py --iters 20 --json "$out/attention.json"
tar czf "$out/autotune.tgz" -C "$autotune" . && ls -l "$out/autotune.tgz" | tee -a "$out/log.txt"
exit 0
