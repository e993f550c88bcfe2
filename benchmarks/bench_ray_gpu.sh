#!/usr/bin/env bash
# In-process against Ray actors sharing the GPUs, on the same sampled neurons of one layer (the
# README's whole-model figures): on a GPU the default fit waits on host work and small sequential
# passes, so several model-holding actors a GPU can overlap them (executors.actor_layout).
#
#   benchmarks/bench_ray_gpu.sh [OUT_DIR] [LAYER] [SAMPLE] [GROUP_SIZE] [WORKERS...]
#   benchmarks/bench_ray_gpu.sh workspaces/raygpu 15 256 16 4
#
# Each build is one `n2g build` (model load, scan and fit: the wall time a user waits; Ray's
# start-up counts against Ray). Prints seconds and neurons a second for each, then how many graphs
# the Ray builds share byte for byte with the in-process one (batches are sized to each actor's
# share of the GPU, so float sums can differ in the last bits). N2G="python3 -m n2g.cli" picks the CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-workspaces/raygpu}; layer=${2:-15}; sample=${3:-256}; group=${4:-16}
shift $(( $# < 4 ? $# : 4 )) || true
workers=("$@"); [ ${#workers[@]} -gt 0 ] || workers=(4)
read -r -a n2g <<< "${N2G:-.venv/bin/n2g}"  # e.g. N2G="python3 -m n2g.cli"
device=${DEVICE:-cuda}
rm -rf "$out"; mkdir -p "$out"

build() {  # name, extra build args...
  local name=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  "${n2g[@]}" build --workspace "$out/$name" --layers "$layer" --sample "$sample" --group-size "$group" \
    --device "$device" "$@" > "$out/$name.log" 2>&1 || { tail -20 "$out/$name.log"; exit 1; }
  t1=$(date +%s.%N)
  "${n2g[@]}" export --workspace "$out/$name" --out "$out/$name.export" > /dev/null
  python3 - "$name" "$t0" "$t1" "$out/$name.export" <<'EOF'
import sys, pathlib
name, t0, t1, d = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), pathlib.Path(sys.argv[4])
n = len(list((d / "graphs").glob("*.json")))
print(f"{name:>12}: {n} neurons in {t1 - t0:6.1f} s  ({n / (t1 - t0):.2f} neurons/s, wall time of the command)")
EOF
}

build inprocess
for w in "${workers[@]}"; do
  build "ray$w" --executor ray --workers "$w"
done
python3 - "$out" "${workers[@]}" <<'EOF'
import sys, pathlib
out, workers = pathlib.Path(sys.argv[1]), sys.argv[2:]
ref = {p.name: p.read_bytes() for p in (out / "inprocess.export" / "graphs").glob("*.json")}
for w in workers:
    got = {p.name: p.read_bytes() for p in (out / f"ray{w}.export" / "graphs").glob("*.json")}
    same = sum(got.get(k) == v for k, v in ref.items())
    print(f"ray {w} workers: {same} of {len(ref)} graphs byte-identical to in-process; "
          f"neurons {'the same' if set(got) == set(ref) else 'DIFFER'}")
EOF
