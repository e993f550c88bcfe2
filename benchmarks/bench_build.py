"""Whole-model build figures on this machine (default model SmolLM2-135M-Instruct):

1. scan vs a bare forward pass to the same depth (tokens/s, measured alternately in one run;
   goal: the scan >= 80% of the bare pass);
2. fit seconds and forward-pass tokens per neuron at layers 0, 7, 15, 29, with where the time goes
   (the fit's stages; tokens counted at every forward pass);
3. in-process vs Ray executor on the same neurons (identical graphs, overhead);
4. the projected time of a whole SmolLM2 build (all 46,080 neurons) here.

    .venv/bin/python benchmarks/bench_build.py [--windows 128] [--fit-layers 0 7 15 29] [--per-layer 2]
                                               [--ray-neurons 4] [--device cpu|cuda] [--precision bfloat16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "service"))

from n2g_service.activations import forward_to_layer, forward_tokens  # noqa: E402
from n2g_service.config import EvalConfig, FitConfig, ScanConfig  # noqa: E402
from n2g_service.fit import scan_k  # noqa: E402
from n2g_service.corpus import load_texts, make_windows  # noqa: E402
from n2g_service.build.compute import compute_group  # noqa: E402
from n2g_service.build.request import BuildRequest  # noqa: E402
from n2g_service.build.runner import run_build  # noqa: E402
from n2g_service.models import load_model  # noqa: E402
from n2g_service.scan import compare_precision, scan_layers  # noqa: E402
from n2g_service.workspace import Workspace  # noqa: E402


def sync(model):
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def bare_pass(model, windows, layer, batch):
    """(wall, cpu) seconds of bare forward passes to ``layer`` over ``windows``."""
    sync(model)
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(0, len(windows), batch):
        forward_to_layer(model, torch.from_numpy(windows[s: s + batch]), layer)
    sync(model)
    return time.perf_counter() - t0, time.process_time() - c0


def scan_pass(model, windows, layers, cfg, precision="float32"):
    """(wall, cpu) seconds of the scan of ``windows`` for ``layers``."""
    sync(model)
    t0, c0 = time.perf_counter(), time.process_time()
    scan_layers(model, windows, layers, cfg, progress=False, precision=precision)
    sync(model)
    return time.perf_counter() - t0, time.process_time() - c0


def compare_scan(model, windows, layers, cfg, repeats, chunk):
    """Bare pass and scan alternated chunk by chunk (so a busy machine slows both alike); returns
    tokens/s of each by wall and by CPU time. A chunk is at least a scan batch: on a GPU (256
    windows a batch) smaller chunks would time launch overhead, not the scan."""
    bare, scan = np.zeros(2), np.zeros(2)
    for _ in range(repeats):
        for s in range(0, len(windows), chunk):
            w = windows[s: s + chunk]
            bare += bare_pass(model, w, layers[-1], cfg.batch_size)
            scan += scan_pass(model, w, layers, cfg)
    n = windows.size * repeats
    return n / bare, n / scan


class StageClock:
    """Wraps the fit's stage functions to sum their seconds and forward tokens. The stages are
    looked up in every fit module that names them (``methods`` imports them from ``pipeline`` and
    ``calibrate``), so both the paper and the calibrated fit are timed. PER_LAYER stages are one
    pass for every neuron group of a layer (cached), not a cost per neuron."""

    STAGES = ["original_examples", "prune_stage", "saliency_stage", "augment_stage",
              "augmented_saliency_stage", "collect_paths", "vocabulary_sweep", "first_token_activations",
              "prompt_activations", "calibrate_paths", "learn_from_misses", "graded_paths", "make_graph", "windows_measured"]
    # The calibrated fit measures its extra windows (ordinary, occurrence and path windows) with
    # FitRun.run between the stages; those passes count as the pseudo-stage "windows_measured".
    METHODS = {"windows_measured": ("FitRun", "run")}
    # prompt_activations alone: the real-context passes (graded prior, split_labels); the
    # first-token pass calls it too and is counted as first_token_activations
    PER_LAYER = ("vocabulary_sweep", "first_token_activations", "prompt_activations")

    def __init__(self):
        import n2g_service.fit.calibrate as calibrate
        import n2g_service.fit.methods as methods
        import n2g_service.fit.pipeline as pipeline

        self.mods = [pipeline, calibrate, methods]
        self.seconds: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.saved = []
        self.depth = 0  # a stage called from another stage is counted once, in the outer one

    def __enter__(self):
        pipeline = self.mods[0]
        targets = [(m, name, name) for m in self.mods for name in self.STAGES if hasattr(m, name)]
        targets += [(getattr(pipeline, cls), attr, stage) for stage, (cls, attr) in self.METHODS.items()]
        for owner, attr, name in targets:
            orig = getattr(owner, attr)
            self.saved.append((owner, attr, orig))

            def wrapped(*a, _orig=orig, _name=name, **k):
                if self.depth:
                    return _orig(*a, **k)
                self.depth += 1
                t0, n0 = time.perf_counter(), forward_tokens()[0]
                try:
                    return _orig(*a, **k)
                finally:
                    self.depth -= 1
                    self.seconds[_name] = self.seconds.get(_name, 0.0) + time.perf_counter() - t0
                    self.tokens[_name] = self.tokens.get(_name, 0) + forward_tokens()[0] - n0
            setattr(owner, attr, wrapped)
        return self

    def __exit__(self, *exc):
        for m, name, orig in reversed(self.saved):
            setattr(m, name, orig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=128, help="corpus windows for the scan figures")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=0, help="top windows per neuron in the scan (0: what a default build keeps)")
    ap.add_argument("--fit-layers", type=int, nargs="+", default=[0, 7, 15, 29])
    ap.add_argument("--per-layer", type=int, default=2, help="neurons fitted (one group) per layer")
    ap.add_argument("--ray-neurons", type=int, default=4, help="layer-0 neurons built in-process and on Ray (0: skip)")
    ap.add_argument("--ray-workers", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--precision", default=None, help="also scan in this precision (checked against float32)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = load_model(device=args.device)
    print(f"model {model.name} on {model.device} ({torch.get_num_threads()} torch threads), "
          f"loaded in {time.perf_counter() - t0:.1f} s")
    texts = load_texts("fortunes")
    all_windows = make_windows(model, texts, window_tokens=64)
    windows = all_windows[: args.windows]
    # the k a default build keeps (2 x 10 paper windows + the calibrated fit's extra_top)
    k = args.k or scan_k(FitConfig(), EvalConfig().n_train, ScanConfig.k)
    cfg = ScanConfig(k=k, batch_size=16 if model.device.type == "cpu" else 256)
    print(f"corpus: {len(all_windows)} windows x 64 tokens; figures on the first {len(windows)} "
          f"({windows.size:,} tokens), scan batch {cfg.batch_size}, top k {cfg.k}")

    # 1. scan vs bare forward pass, alternated
    chunk = max(32, cfg.batch_size)
    print(f"\n== scan vs bare forward pass to the same depth (tokens/s over {args.repeats} x {len(windows)} windows, "
          f"alternated every {chunk} windows) ==")
    scan_rates = {}
    for layers in ([0, 1], list(range(model.n_layers))):
        deepest = layers[-1]
        bare_pass(model, windows[:32], deepest, cfg.batch_size)  # warm-up
        bare, scan = compare_scan(model, windows, layers, cfg, args.repeats, chunk)
        scan_rates[deepest] = scan[0]
        print(f"layers {layers[0]}-{deepest:<2} bare {bare[0]:9,.0f} tok/s   scan {scan[0]:9,.0f} tok/s   "
              f"scan/bare {scan[0] / bare[0]:6.1%}   (by CPU time: {bare[1]:,.0f} vs {scan[1]:,.0f} tok/s, "
              f"{scan[1] / bare[1]:.1%})")
    if args.precision:
        c = compare_precision(model, windows, list(range(model.n_layers)), args.precision, cfg)
        print(f"{args.precision} scan of layers 0-{model.n_layers - 1}: {c['seconds_float32'] / c['seconds']:.2f}x "
              f"float32's speed, max a_max error {c['max_rel_amax_error']:.2e} (relative), top-k overlap "
              f"{c['topk_overlap']:.1%}")

    # 2. fit cost by depth
    fit_cfg = FitConfig()
    print(f"\n== fit: {args.per_layer} neurons (one group) per layer, the default fit ({fit_cfg.method!r}) ==")
    print("(s/neuron and tokens/neuron leave out the per-layer passes, listed apart: one pass serves "
          "every neuron of the layer)")
    scans = scan_layers(model, windows, args.fit_layers, cfg, progress=False)
    req = BuildRequest(layers=args.fit_layers, neurons=[0], group_size=args.per_layer)
    fit_cost = {}
    per_layer_cost = {}
    shown = [n for n in StageClock.STAGES if n not in StageClock.PER_LAYER]
    print("layer  s/neuron  tokens/neuron | per-layer passes s (tokens) | share of the per-neuron time: "
          + " ".join(n[:12] for n in shown))
    for layer in args.fit_layers:
        s = scans[layer]
        live = [int(n) for n in np.flatnonzero(s.max_activation > 0)]
        neurons = [live[i] for i in np.linspace(0, len(live) - 1, args.per_layer).astype(int)]
        tok0 = forward_tokens()[0]
        with StageClock() as clock:
            t1 = time.perf_counter()
            recs = compute_group(model, layer, neurons, all_windows, [float(s.max_activation[n]) for n in neurons],
                                 [s.top_window_ids[n].tolist() for n in neurons], req, None)
            wall = time.perf_counter() - t1
        lay_s = sum(clock.seconds.get(n, 0.0) for n in StageClock.PER_LAYER)
        lay_t = sum(clock.tokens.get(n, 0) for n in StageClock.PER_LAYER)
        secs = (wall - lay_s) / len(neurons)
        toks = (forward_tokens()[0] - tok0 - lay_t) / len(neurons)
        fit_cost[layer] = (secs, toks)
        per_layer_cost[layer] = lay_s
        per_neuron = secs * len(neurons) or 1.0
        shares = " ".join(f"{clock.seconds.get(n, 0) / per_neuron:12.0%}" for n in shown)
        print(f"{layer:5d} {secs:9.2f} {toks:14,.0f} | {lay_s:10.1f} s ({lay_t:,}) | {shares}")
        tok_shares = ", ".join(f"{n} {clock.tokens.get(n, 0) / len(neurons):,.0f}" for n in shown
                               if clock.tokens.get(n))
        print(f"      tokens/neuron by stage: {tok_shares}; graphs: "
              + ", ".join(str(r.stats.get('n_paths', r.stats.get('paths', '?'))) for r in recs) + " paths")

    # 3. in-process vs Ray
    if args.ray_neurons:
        print(f"\n== in-process vs Ray ({args.ray_workers} workers) on the same {args.ray_neurons} layer-0 neurons ==")
        s0 = scan_layers(model, windows, [0], cfg, progress=False)[0]
        neurons = [int(n) for n in np.flatnonzero(s0.max_activation > 0)[: args.ray_neurons]]
        graphs, times = {}, {}
        threads = torch.get_num_threads()
        with tempfile.TemporaryDirectory() as tmp:
            for ex in ("inprocess", "ray"):
                ws = Workspace(Path(tmp) / ex, create=True, model=model.name, corpus="fortunes", hook=model.hook)
                ws.save_windows(windows)
                req = BuildRequest(layers=[0], neurons=neurons, group_size=1, scan=cfg, shard_windows=64,
                                   executor=ex, workers=args.ray_workers, worker_threads=1)
                executor = None
                if ex == "ray":
                    from n2g_service.build.executors import RayExecutor, model_spec
                    t1 = time.perf_counter()
                    executor = RayExecutor(model_spec(model), workers=args.ray_workers, threads=1)
                    start_s = time.perf_counter() - t1
                else:
                    torch.set_num_threads(1)  # same kernels as the 1-thread actors: same floats
                try:
                    t1 = time.perf_counter()
                    run_build(ws, model, req, executor=executor)
                    times[ex] = time.perf_counter() - t1
                finally:
                    torch.set_num_threads(threads)
                    if executor is not None:
                        executor.close()
                graphs[ex] = ws.graph_bytes()
                ws.close()
        same = graphs["inprocess"] == graphs["ray"]
        print(f"in-process (1 thread) {times['inprocess']:.1f} s; Ray {times['ray']:.1f} s after {start_s:.1f} s of "
              f"cluster + actor start-up; graphs identical: {same}")

    # 4. projection
    from n2g_service.evaluate import heldout_window_ids

    held = heldout_window_ids(len(all_windows))
    scan_tokens = (len(all_windows) - held.size) * 64
    deep = model.n_layers - 1
    scan_s = scan_tokens / scan_rates[deep]
    xs = sorted(fit_cost)
    per_layer = [float(np.interp(l, xs, [fit_cost[x][0] for x in xs])) for l in range(model.n_layers)]
    layer_passes = [float(np.interp(l, xs, [per_layer_cost[x] for x in xs])) for l in range(model.n_layers)]
    fit_s = model.d_mlp * sum(per_layer) + sum(layer_passes)
    print(f"\n== projected whole-model build here ({model.n_layers} x {model.d_mlp} = "
          f"{model.n_layers * model.d_mlp:,} neurons) ==")
    print(f"scan  {scan_tokens:,} tokens (held-out windows left out) at {scan_rates[deep]:,.0f} tok/s: "
          f"{scan_s / 60:.1f} min")
    print(f"fit   {fit_s / 3600:.1f} h ({np.mean(per_layer):.2f} s/neuron on average, interpolated by depth, "
          f"+ {sum(layer_passes) / 60:.1f} min of per-layer passes)")
    print(f"total {(scan_s + fit_s) / 3600:.1f} h on {model.device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
