#!/usr/bin/env bash
# In-process against Ray actors sharing the GPUs, on the same sampled neurons of one layer (the
# README's whole-model figures): on a GPU the default fit waits on host work and small sequential
# passes, so several model-holding actors a GPU can overlap them (executors.actor_layout).
#
#   benchmarks/bench_ray_gpu.sh [OUT_DIR] [LAYER] [SAMPLE] [GROUP_SIZE] [WORKERS...]
#   benchmarks/bench_ray_gpu.sh workspaces/raygpu 15 256 16 4
#
# Each build is one `n2g build` (model load, scan and fit: the wall time a user waits; Ray's
# start-up counts against Ray). Printed as each build ends, so a run cut short keeps what it
# measured: its seconds, neurons a second, its fit phase (the build's own progress bar) and how
# many graphs it shares byte for byte with the in-process build. N2G="python3 -m n2g.cli" picks
# the CLI; DEVICE=cpu runs it on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-workspaces/raygpu}; layer=${2:-15}; sample=${3:-256}; group=${4:-16}
shift $(( $# < 4 ? $# : 4 )) || true
workers=("$@"); [ ${#workers[@]} -gt 0 ] || workers=(4)
read -r -a n2g <<< "${N2G:-.venv/bin/n2g}"  # e.g. N2G="python3 -m n2g.cli"
device=${DEVICE:-cuda}
rm -rf "$out"; mkdir -p "$out"

report() {  # out, name, t0, t1
  python3 - "$@" <<'PY'
import pathlib, re, sys
out, name, t0, t1 = pathlib.Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
graphs = {p.name: p.read_bytes() for p in (out / f"{name}.export" / "graphs").glob("*.json")}
# the fit phase: the last full reading of the build's progress bar, "N/N [mm:ss"
bars = re.findall(r"building neurons: +100%\|[^|]*\| *\d+/\d+ \[(\d+):(\d+)", (out / f"{name}.log").read_text())
fit = f"fit phase {int(bars[-1][0]) * 60 + int(bars[-1][1])} s" if bars else "fit phase not read"
line = (f"{name:>10}: {len(graphs)} neurons, command {t1 - t0:6.1f} s "
        f"({len(graphs) / (t1 - t0):.2f} neurons/s), {fit}")
ref_dir = out / "inprocess.export" / "graphs"
if name != "inprocess" and ref_dir.is_dir():
    ref = {p.name: p.read_bytes() for p in ref_dir.glob("*.json")}
    same = sum(graphs.get(k) == v for k, v in ref.items())
    line += f"; {same} of {len(ref)} graphs byte-identical to in-process"
    line += "" if set(graphs) == set(ref) else ", NEURONS DIFFER"
print(line, flush=True)
PY
}

build() {  # name, extra build args...
  local name=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  "${n2g[@]}" build --workspace "$out/$name" --layers "$layer" --sample "$sample" --group-size "$group" \
    --device "$device" "$@" > "$out/$name.log" 2>&1 || { tail -20 "$out/$name.log"; exit 1; }
  t1=$(date +%s.%N)
  "${n2g[@]}" export --workspace "$out/$name" --out "$out/$name.export" > /dev/null
  report "$out" "$name" "$t0" "$t1"
}

build inprocess
for w in "${workers[@]}"; do
  build "ray$w" --executor ray --workers "$w"
done
