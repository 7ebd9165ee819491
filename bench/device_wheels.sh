#!/usr/bin/env bash
# The wheels a lent GPU machine's image lacks for bench/ (it has jax, flax, optax, orbax, torch, transformers;
# nothing can be installed there from a registry), downloaded here into .whl/ (git-ignored) to travel with the
# call. On the device machine, before bench/gpu.sh:
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# (2026-11-26: a run without ml_collections failed every distillation step at import.)
set -eu
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 ml_collections
ls .whl
