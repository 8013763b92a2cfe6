#!/usr/bin/env bash
# `make study` as a new user meets it: a fresh clone, installed, then run with an empty
# JAX compilation cache (cold) and again with the cache it filled (warm; runs removed).
# Prints both wall times and the breakdown (bench/study_time.py) for docs/BENCHMARKS.md.
#   bash bench/cold_study.sh [WORK_FOLDER]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
git clone -q "$repo" "$work/collab"
cd "$work/collab"
make .venv/.installed >/dev/null
export JAX_COMPILATION_CACHE_DIR="$work/jax-cache"
rm -rf "$JAX_COMPILATION_CACHE_DIR"
for pass in cold warm; do
  start=$(date +%s.%N)
  make study >"$work/$pass.log" 2>&1
  end=$(date +%s.%N)
  echo "$pass make study: $(python3 -c "print(round($end - $start))") s wall"
  mv runs/default "$work/$pass"
done
.venv/bin/python -m bench.study_time --cold="$work/cold" --warm="$work/warm"
