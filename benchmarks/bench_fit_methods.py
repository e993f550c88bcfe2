"""Fit methods compared on neurons that are not reported (settings are chosen here).

For each layer asked: odd neuron ids >= --start (live ones, in order), the paper's split of their
top 20 windows (10 train / 10 test), and an ordinary-text sample drawn from the evaluation's
held-out windows (``evaluate.heldout_window_ids``), which no fit sees (the scan runs on the other
windows only). Each fit method fits the same neurons; token lookup is fitted on the same training
windows as the method (the paper's 10, plus ``FitResult.extra_train`` for a method that learns
from more). Printed per layer and method:

- paper: mean F1 on the held-out top windows (N2G / token lookup);
- ordinary: mean F1 over the neurons that fire there at least once, false fires per 1,000 tokens
  and Pearson correlation (all neurons), for N2G / token lookup, and the mean paired F1
  difference N2G - token lookup;
- seconds per neuron of the fit.

    .venv/bin/python benchmarks/bench_fit_methods.py --layers 0 1 3 --per-layer 8 --ordinary 300
    .venv/bin/python benchmarks/bench_fit_methods.py --methods calibrated --set calibrate_fire_rate=0.5

The scan of each layer is cached in --cache (delete it after a model or corpus change).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _dev import CACHE, DevCorpus, DevLayer, lookup_predict, scores, token_lookup  # noqa: E402
from n2g_service.fit import fit_neurons, preset  # noqa: E402


def parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 1, 3])
    ap.add_argument("--per-layer", type=int, default=8)
    ap.add_argument("--start", type=int, default=1001, help="first neuron id (odd ids from here)")
    ap.add_argument("--ordinary", type=int, default=300, help="held-out windows scored as ordinary text")
    ap.add_argument("--methods", nargs="+", default=["paper", "calibrated"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="FitConfig override for every method but paper (repeatable)")
    ap.add_argument("--scan-k", type=int, default=60)
    ap.add_argument("--cache", default=CACHE)
    ap.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, ...)")
    args = ap.parse_args()
    overrides = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}

    corpus = DevCorpus.load(args.ordinary, args.device)
    model, windows, ordinary = corpus.model, corpus.windows, corpus.ordinary
    scans = corpus.scans(args.layers, args.scan_k, args.cache)

    rows = []
    for layer in args.layers:
        dev = DevLayer.load(corpus, layer, scans[layer], args.start, args.per_layer)
        neurons, amax = dev.neurons, dev.amax
        ord_tokens = windows[ordinary]
        for method in args.methods:
            cfg = preset(method, **({} if method == "paper" else overrides))
            t0 = time.perf_counter()
            fitted = fit_neurons(model, layer, neurons, dev.train, amax, cfg, extra=dev.pool)
            sec = (time.perf_counter() - t0) / len(neurons)
            for n in neurons:
                g = fitted[n].graph
                tr = dev.training(n, fitted[n])
                table = token_lookup(tr)
                te_tok = windows[dev.test_ids[n]]
                te_true = dev.true(n, dev.test_ids[n])
                od_true = dev.true(n, ordinary)
                row = {"layer": layer, "neuron": n, "method": method, "seconds": sec,
                       "n_train": len(tr), "n_paths": int(g.n_paths),
                       "fire_rate": fitted[n].stats.get("fire_rate")}
                for name, toks, true in (("paper", te_tok, te_true), ("ordinary", ord_tokens, od_true)):
                    pn = np.asarray(g.predict(toks, semantics="all_paths_max"))[:, 1:].ravel()
                    pt = lookup_predict(table, toks)[:, 1:].ravel()
                    tt = true[:, 1:].ravel()
                    row[name] = {"n2g": scores(tt, pn), "tl": scores(tt, pt)}
                rows.append(row)
            print(f"layer {layer} {method}: fitted {len(neurons)} neurons, {sec:.2f} s each", flush=True)

    print()
    print(f"{'layer':>5} {'method':>11} {'n':>3} | paper F1 N2G/TL | ordinary F1 N2G/TL (n fire) | "
          f"FF/1k N2G/TL | r N2G/TL | dF1 ord | s/neuron | train windows")
    for layer in args.layers:
        for method in args.methods:
            rs = [r for r in rows if r["layer"] == layer and r["method"] == method]
            if not rs:
                continue
            m = lambda k, s, w: float(np.mean([r[s][w][k] for r in rs]))  # noqa: E731
            fire = [r for r in rs if r["ordinary"]["n2g"]["fires"] > 0]
            of = lambda w: float(np.mean([r["ordinary"][w]["f1"] for r in fire])) if fire else float("nan")  # noqa: E731
            d = float(np.mean([r["ordinary"]["n2g"]["f1"] - r["ordinary"]["tl"]["f1"] for r in fire])) if fire else float("nan")
            print(f"{layer:>5} {method:>11} {len(rs):>3} | {m('f1', 'paper', 'n2g'):.2f} / {m('f1', 'paper', 'tl'):.2f}     | "
                  f"{of('n2g'):.2f} / {of('tl'):.2f} ({len(fire):>2})           | "
                  f"{m('ff', 'ordinary', 'n2g'):4.1f} / {m('ff', 'ordinary', 'tl'):4.1f}  | "
                  f"{m('r', 'ordinary', 'n2g'):.2f} / {m('r', 'ordinary', 'tl'):.2f} | {d:+.2f}    | "
                  f"{np.mean([r['seconds'] for r in rs]):6.2f}   | {np.mean([r['n_train'] for r in rs]):.0f}")
    out = Path(args.cache) / "last_rows.json"
    out.write_text(json.dumps(rows))
    print(f"\nper-neuron rows: {out}")


if __name__ == "__main__":
    main()
