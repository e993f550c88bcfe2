"""The graph-store calls on a whole model's graphs (not a test): neighbours and predictions.

    python benchmarks/bench_whole_model.py --workspace W [--baseline DIR] [--neighbours 50]

W is a built workspace, ideally a whole model's (SmolLM2-135M: 46,080 graphs; the figures in
the README came from `benchmarks/make_whole_model_ws.py`, which fills one in the shape of a
real default fit). Each figure comes from a fresh process that loads every graph of W into a
`n2g_fast.GraphStore`; with --baseline, the same for the n2g_fast package found in DIR (e.g. an
earlier build's wheel unpacked with `pip install --target DIR`), same inputs, same run, and the
answers are checked equal before a ratio is printed:

- neighbours: `GraphStore.neighbours(key, 8)` (the report's "most similar neurons" and
  FindSimilar) for --neighbours seeded neurons: median ms a neuron;
- predict: every graph on one 64-token corpus window (`Predict` of all neurons): seconds and the
  process's peak memory above its memory after the load (peak RSS reset before the call).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(workspace: str, n_neighbours: int, seed: int) -> None:
    import numpy as np

    sys.path[:0] = [str(REPO / "service"), str(REPO / "python_client")]
    import n2g_fast
    from n2g_service.workspace import Workspace

    ws = Workspace(workspace, mode="read")
    keys = ws.built_keys()
    blobs = [bytes(b) for _, _, _, _, b in ws.graph_rows(keys)]
    t0 = time.perf_counter()
    store = n2g_fast.GraphStore.from_bytes_list(blobs)
    load_s = time.perf_counter() - t0
    del blobs
    rng = np.random.default_rng(seed)
    picks = [tuple(keys[i]) for i in rng.choice(len(keys), size=min(n_neighbours, len(keys)), replace=False)]
    times, digest = [], hashlib.sha256()
    for k in picks:
        t = time.perf_counter()
        got = store.neighbours(k, 8)
        times.append(time.perf_counter() - t)
        digest.update(repr([(tuple(o[0]), round(float(o[1]), 6)) for o in got]).encode())
    windows = ws.load_windows()
    window = windows[int(rng.integers(len(windows)))][None, :] if windows is not None else \
        rng.integers(0, 1000, size=(1, 64))
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := RSS now
    before = _status("VmRSS")
    t = time.perf_counter()
    out = store.predict([tuple(k) for k in keys], np.asarray(window, np.int64), "all_paths_max")
    predict_s = time.perf_counter() - t
    peak = _status("VmHWM") - before
    digest.update(np.ascontiguousarray(out).tobytes())
    print(json.dumps({"version": getattr(n2g_fast, "__version__", "?"), "graphs": len(keys), "load_s": load_s,
                      "neighbours_ms": 1e3 * statistics.median(times), "predict_s": predict_s,
                      "predict_peak_bytes": peak, "digest": digest.hexdigest()}))


def run(workspace: Path, n: int, seed: int, package_dir: str | None) -> dict:
    env = dict(os.environ)
    if package_dir:
        env["PYTHONPATH"] = os.pathsep.join([package_dir] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    p = subprocess.run([sys.executable, __file__, "--_child", str(workspace), "--neighbours", str(n), "--seed", str(seed)],
                       env=env, capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path)
    ap.add_argument("--baseline", default=None, help="a folder holding an earlier build's n2g_fast package")
    ap.add_argument("--neighbours", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        child(args._child, args.neighbours, args.seed)
        return 0
    if args.workspace is None:
        ap.error("give --workspace")
    builds = {"this build": None} | ({"baseline": args.baseline} if args.baseline else {})
    results = {name: run(args.workspace, args.neighbours, args.seed, d) for name, d in builds.items()}
    first = next(iter(results.values()))
    print(f"{first['graphs']:,} graphs of {args.workspace}; each figure from a fresh process")
    for name, r in results.items():
        print(f"  {name}: load {r['load_s']:.1f} s; neighbours {r['neighbours_ms']:.1f} ms a neuron (median of "
              f"{args.neighbours}); predict all graphs x 1 x 64: {r['predict_s']:.2f} s, peak "
              f"{r['predict_peak_bytes'] / 2**20:,.0f} MiB above the loaded store "
              f"({r['predict_peak_bytes'] / r['graphs'] / 1024:.1f} KiB a graph)")
    if args.baseline:
        a, b = results["this build"], results["baseline"]
        if a["digest"] != b["digest"]:
            print("  ANSWERS DIFFER between the builds: no ratio")
            return 1
        print(f"  same answers; this build vs baseline: neighbours {b['neighbours_ms'] / a['neighbours_ms']:.1f}x "
              f"faster, predict {b['predict_s'] / a['predict_s']:.1f}x faster with "
              f"{b['predict_peak_bytes'] / max(a['predict_peak_bytes'], 1):.1f}x less peak memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
