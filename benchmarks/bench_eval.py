"""Evaluation speed (n2g-method.md section 8b): every registered method on the three test sets.

Builds --neurons neurons per layer of a workspace (default: a native random model, so it needs no
download; --model default for SmolLM2-135M on the device), then times evaluate_workspace twice:
with the model (the shared forward passes over the held-out windows, then stored) and without it
(from the stored activations). Prints seconds per neuron and the report.

    .venv/bin/python benchmarks/bench_eval.py --layers 0 1 --neurons 8
    .venv/bin/python benchmarks/bench_eval.py --model default --layers 0 --neurons 24 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "service"))

from n2g_service.config import EvalConfig, ScanConfig  # noqa: E402
from n2g_service.corpus import load_texts, make_windows  # noqa: E402
from n2g_service.evaluate import evaluate_workspace, format_report  # noqa: E402
from n2g_service.build.request import BuildRequest  # noqa: E402
from n2g_service.build.runner import run_build  # noqa: E402
from n2g_service.workspace import Workspace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="native", help="'native' (random, tiny) or 'default' (SmolLM2-135M)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--neurons", type=int, default=8, help="sampled live neurons per layer")
    ap.add_argument("--ordinary", type=int, default=2000, help="held-out ordinary windows")
    ap.add_argument("--workspace", default=None, help="default: a temporary directory")
    args = ap.parse_args()

    if args.model == "native":
        from n2g_service.models import native_random_model

        model = native_random_model(n_layers=max(args.layers) + 1, d_model=64, d_mlp=128, seed=0)
        windows = make_windows(model, load_texts("fortunes"), window_tokens=64)
    else:
        from n2g_service.models import load_model

        model = load_model(device=args.device)
        windows = None
    path = Path(args.workspace or tempfile.mkdtemp(prefix="bench_eval_"))
    ws = Workspace(path, create=True, model=args.model, corpus="fortunes")
    if windows is not None and ws.load_windows() is None:
        ws.save_windows(windows)
    cfg = EvalConfig(ordinary_windows=args.ordinary)
    t0 = time.perf_counter()
    keys = run_build(ws, model, BuildRequest(layers=args.layers, sample=args.neurons, seed=7,
                                             scan=ScanConfig(window_tokens=64), eval=cfg))
    print(f"build: {len(keys)} neurons in {time.perf_counter() - t0:.1f} s ({ws.window_count()} windows)")
    t0 = time.perf_counter()
    report = evaluate_workspace(ws, model, keys, cfg)
    with_model = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate_workspace(ws, None, keys, cfg)
    stored = time.perf_counter() - t0
    print(f"evaluate, {report.heldout.get('size', 0)} held-out windows, {len(report.methods)} methods: "
          f"{with_model:.2f} s with the forward passes ({with_model / len(keys):.3f} s/neuron), "
          f"{stored:.2f} s from stored activations ({stored / len(keys):.3f} s/neuron)")
    print(format_report(report))


if __name__ == "__main__":
    main()
