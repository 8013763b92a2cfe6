#!/bin/bash
# The one prepared call for a lent GPU: issue 3's MFU variants, then issue 4's vmapped-
# against-loop federated rounds in bfloat16 at 8 clients. About 9 minutes on an H100
# (compiles included); each part has its own timeout so one slow part keeps the other's
# figures. Results land in $OUT (the device tool brings them back).
#
# The device image has jax, flax, optax and orbax but not ml_collections or dp_accounting,
# which bench/federated imports. Here, before the call (pure-Python wheels):
#   echo /.whl/ >> .git/info/exclude
#   .venv/bin/pip download --no-deps --only-binary=:all: -d .whl \
#       ml_collections==1.1.0 dp_accounting==0.6.0
# then run it with carry=['.whl']:  bash bench/gpu_session.sh
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 340 python3 -m bench.gpu_check --budget_s=270 --out="$OUT/gpu_check.json" \
    2>&1 | tee "$OUT/gpu_check.log"
timeout 200 python3 -m bench.federated --clients=8 --local_steps=8 --rounds=2 \
    --dtype=bfloat16 --repeats=2 --out="$OUT/federated_bf16.json" 2>&1 \
    | tee "$OUT/federated_bf16.log"
