#!/usr/bin/env bash
# The per-layer scoring table of the default model (issue 11): the same seeded neurons built
# with the default fit (calibrated) and with the paper's, each scored by `n2g eval --compute` on
# the paper protocol, ordinary text and detection, with token lookup and 5-gram baselines fitted
# on the same training windows as each build.
#
#   benchmarks/scoring_table.sh [OUT_DIR] [SAMPLE] [SEED] [LAYERS...]
#   benchmarks/scoring_table.sh workspaces/table 24 11 0 1 3 7 15 29
#
# Writes OUT_DIR/{calibrated,paper} (workspaces) and OUT_DIR/{calibrated,paper}.txt (reports).
# METHODS="calibrated" (say) builds only those (e.g. after a change that leaves the paper fit as it is).
# Settings were chosen on other neurons (benchmarks/bench_fit_methods.py: odd ids >= 1001).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-workspaces/table}; sample=${2:-24}; seed=${3:-11}; shift $(( $# < 3 ? $# : 3 )) || true
layers=("$@"); [ ${#layers[@]} -gt 0 ] || layers=(0 1 3 7 15 29)
mkdir -p "$out"
for method in ${METHODS:-calibrated paper}; do
  /usr/bin/time -f "$method build: %e s" .venv/bin/n2g build --workspace "$out/$method" \
    --layers "${layers[@]}" --sample "$sample" --seed "$seed" --method "$method"
  /usr/bin/time -f "$method eval: %e s" .venv/bin/n2g eval --workspace "$out/$method" --compute \
    | tee "$out/$method.txt"
done
