#!/bin/bash
# The prepared calls for a lent GPU (15 minutes of device time in all, starts included):
#   bash bench/gpu_session.sh mfu        issue 3: bench.gpu_check's MFU variants (~5.5 min)
#   bash bench/gpu_session.sh federated  issue 4: vmapped against loop federated rounds at
#                                        8 clients, bfloat16, whole and chunked loss (~5 min)
#   bash bench/gpu_session.sh            both, if one call's 10 minutes allow it
# Each part has its own timeout so one slow part keeps the other's figures. Results land
# in $OUT (the device tool brings them back).
#
# The device image has jax, flax, optax and orbax but not ml_collections or dp_accounting,
# which bench/federated imports. Here, before the call (pure-Python wheels):
#   echo /.whl/ >> .git/info/exclude
#   .venv/bin/pip download --no-deps --only-binary=:all: -d .whl \
#       ml_collections==1.1.0 dp_accounting==0.6.0
# then run it with carry=['.whl'].
set -u
PART=${1:-all}
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [ "$PART" = mfu ] || [ "$PART" = all ]; then
  timeout 340 python3 -m bench.gpu_check --budget_s=270 --out="$OUT/gpu_check.json" \
      2>&1 | tee "$OUT/gpu_check.log"
fi
if [ "$PART" = federated ] || [ "$PART" = all ]; then
  for chunk in 0 32; do
    timeout 150 python3 -m bench.federated --clients=8 --local_steps=8 --rounds=2 \
        --dtype=bfloat16 --loss_chunk=$chunk --repeats=2 \
        --out="$OUT/federated_bf16_chunk$chunk.json" 2>&1 | tee "$OUT/federated_$chunk.log"
  done
fi
