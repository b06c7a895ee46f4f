#!/usr/bin/env bash
# airbench94 on one GPU, tracking on, over 5 seeds after one warm-up seed (100, not counted), in
# one process (the dataset is decoded once). Prints each run's training seconds and accuracy.
# Run through the device tool with `.gpu` carried: .gpu/wheels (hydra, omegaconf, mlflow-skinny
# and what they need beyond that machine's image) and .gpu/cifar10-train-jpeg.tar.gz.
# usage: [SEEDS=100,0,1] bash benchmarks/airbench_gpu.sh [extra overrides...]
set -euo pipefail
if [ -d .gpu/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH=/tmp/site
fi
root=/tmp/cifar10-jpeg
python3 benchmarks/unpack_cifar_jpeg.py .gpu/cifar10-train-jpeg.tar.gz "$root"
store=${OUT:-/tmp}/gpu-mlruns
export MLFLOW_TRACKING_URI="sqlite:///$store/mlflow.db" PYTHONUNBUFFERED=1
mkdir -p "$store"
python3 -m cifar_exp experiment=airbench94 dataset=imagefolder dataset.root="$root" \
  seed=${SEEDS:-100,0,1,2,3,4} hydra.sweep.dir=/tmp/multirun "$@" -m 2>&1 | grep -E "^epoch|device|Error|error|rror:" || true
python3 benchmarks/summarise_sweep.py
