#!/usr/bin/env bash
# The anchor (#14) in one call of the device tool: benchmarks/airbench_anchor.py on one GPU, the
# reference (airbench 0.1.8's train94) and our experiment=airbench94 (as configured, and with
# trainer.half) on the same 40,000/10,000 split of the JPEG CIFAR-10 images; a warm-up run, then 5
# seeds of each. About 3-5 minutes on an H100.
#
# The device machine has no internet, so all it needs travels in .gpu/ (git-ignored), made here
# beforehand, with internet, by
#     bash benchmarks/airbench_anchor_gpu.sh prepare
#   .gpu/wheels/                 hydra, omegaconf, mlflow-skinny, SQLAlchemy, alembic and the rest
#                                of what they import beyond that machine's image (Python 3.12);
#                                checked here against the image's package list (KINDS.md)
#   .gpu/airbench-0.1.8.tar.gz   the reference, an sdist of pure Python: unpacked onto PYTHONPATH
#                                there, never installed, never a dependency of this project
#   .gpu/cifar10-train-jpeg.tar.gz   the images (CIFAR-10 JPEGs), split by unpack_cifar_jpeg.py
# Then, through the device tool (about 40 MB travels):
#     run(command="bash benchmarks/airbench_anchor_gpu.sh", carry=[".gpu"], timeout_s=600)
# Back under $OUT: anchor.log (all it printed), anchor.json (the summary and every run), mlflow.db.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
  python=${PYTHON:-python3}
  mkdir -p .gpu/wheels
  # the versions this project's tests run with; binary wheels for the device's CPython 3.12
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_34_x86_64 -d .gpu/wheels \
    hydra-core==1.3.8 omegaconf==2.3.1 mlflow-skinny==3.17.2 sqlalchemy==2.1.9 alembic==1.20.1 \
    mako==1.4.3 pydantic==2.14.4 pydantic-core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0 \
    opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2 \
    opentelemetry-semantic-conventions==0.66b2 sqlparse==0.6.1 cachetools==7.3.3 fastapi==0.165.0 \
    starlette==1.10.0 importlib-metadata==9.1.0 databricks-sdk==0.162.0 cryptography==50.0.2 cffi==2.1.1
  # only an sdist on PyPI: a pure-Python wheel built here
  "$python" -m pip wheel -q --no-deps -w .gpu/wheels antlr4-python3-runtime==4.9.3
  "$python" -m pip download -q --no-deps --no-binary=:all: -d .gpu airbench==0.1.8
  cp ../shared/data/cifar10-train-jpeg.tar.gz .gpu/ 2>/dev/null || cp /work/shared/data/cifar10-train-jpeg.tar.gz .gpu/
  du -sh .gpu
  exit 0
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl
mkdir -p /tmp/airbench-src && tar -xzf .gpu/airbench-0.1.8.tar.gz -C /tmp/airbench-src
export PYTHONPATH="/tmp/site:/tmp/airbench-src/airbench-0.1.8:$PWD" PYTHONUNBUFFERED=1
python3 -c "import airbench, hydra, mlflow, sqlalchemy, alembic, cifar_exp.run" # fails fast, before any GPU work
python3 benchmarks/unpack_cifar_jpeg.py .gpu/cifar10-train-jpeg.tar.gz /tmp/cifar10-jpeg
out=${OUT:-/tmp/anchor-out}
mkdir -p "$out"
set +e
python3 benchmarks/airbench_anchor.py --data /tmp/cifar10-jpeg --out /tmp/anchor "$@" 2>&1 | tee "$out/anchor.log"
status=${PIPESTATUS[0]}
cp /tmp/anchor/anchor.json /tmp/anchor/mlflow.db "$out/" 2>/dev/null
exit "$status"
