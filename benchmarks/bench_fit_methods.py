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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "service"))

from n2g_service.activations import layer_activations  # noqa: E402
from n2g_service.config import EvalConfig, ScanConfig  # noqa: E402
from n2g_service.corpus import load_texts, make_windows  # noqa: E402
from n2g_service.evaluate import heldout_window_ids, split_train_test  # noqa: E402
from n2g_service.fit import fit_neurons, preset, training_pool  # noqa: E402
from n2g_service.models import load_model  # noqa: E402
from n2g_service.scan import scan_layers  # noqa: E402

N_PAPER = 20  # the paper's top windows per neuron: 10 train + 10 test
THR = 0.5


def parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def token_lookup(train: list[tuple[np.ndarray, np.ndarray]]) -> dict[int, float]:
    table: dict[int, float] = {}
    for toks, acts in train:
        for t, a in zip(toks[1:], acts[1:]):
            if a > table.get(int(t), -np.inf):
                table[int(t)] = float(a)
    return table


def lookup_predict(table: dict[int, float], tokens: np.ndarray) -> np.ndarray:
    out = np.zeros(tokens.shape, dtype=np.float32)
    for t, v in table.items():
        out[tokens == t] = v
    out[..., 0] = 0.0
    return out


def scores(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    t, p = true >= THR, pred >= THR
    tp, n_t, n_p = int((t & p).sum()), int(t.sum()), int(p.sum())
    prec = tp / n_p if n_p else 0.0
    rec = tp / n_t if n_t else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
    ff = 1000.0 * float((p & ~t).sum()) / max(t.size, 1)
    r = float(np.corrcoef(true, pred)[0, 1]) if true.std() > 0 and pred.std() > 0 else 0.0
    return {"p": prec, "rec": rec, "f1": f1, "ff": ff, "r": r, "fires": n_t, "predicted": n_p}


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
    ap.add_argument("--cache", default="/tmp/n2g_bench_fit_methods")
    args = ap.parse_args()
    overrides = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}

    model = load_model(device="cpu")
    windows = make_windows(model, load_texts("fortunes"), window_tokens=64)
    heldout = heldout_window_ids(len(windows), EvalConfig())
    usable = np.ones(len(windows), dtype=bool)
    usable[heldout] = False
    train_ids_all = np.flatnonzero(usable)
    ordinary = np.random.default_rng(1).choice(heldout, size=min(args.ordinary, heldout.size), replace=False)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    print(f"{len(windows)} windows, {heldout.size} held out, {ordinary.size} scored as ordinary text", flush=True)

    scan_file = {l: cache / f"scan_L{l}_k{args.scan_k}_n{len(windows)}.npz" for l in args.layers}
    missing = [l for l in args.layers if not scan_file[l].exists()]
    if missing:  # one pass for every layer missing; the held-out windows are left out
        t0 = time.perf_counter()
        scanned = scan_layers(model, windows[usable], missing, ScanConfig(k=args.scan_k, batch_size=32), progress=False)
        for l, s in scanned.items():
            top = np.where(s.top_window_ids >= 0, train_ids_all[np.maximum(s.top_window_ids, 0)], -1)
            np.savez(scan_file[l], amax=s.max_activation, top=top)
        print(f"layers {missing}: scan {time.perf_counter() - t0:.0f} s", flush=True)

    rows = []
    for layer in args.layers:
        z = np.load(scan_file[layer])
        amax_all, top_ids = z["amax"], z["top"]
        neurons = [n for n in range(args.start | 1, model.d_mlp, 2)
                   if amax_all[n] > 0 and (top_ids[n][:N_PAPER] >= 0).all()][: args.per_layer]
        amax = {n: float(amax_all[n]) for n in neurons}
        splits = {n: split_train_test(N_PAPER, 10, 0, layer, n) for n in neurons}
        train = {n: [windows[top_ids[n][i]] for i in splits[n][0]] for n in neurons}
        test_ids = {n: [int(top_ids[n][i]) for i in splits[n][1]] for n in neurons}
        pool = training_pool(windows, top_ids, neurons, N_PAPER, test_ids, heldout)
        # true activations: test windows, training windows and the ordinary sample, in shared passes
        need = sorted({int(w) for n in neurons for w in top_ids[n][:N_PAPER]} | {int(w) for w in ordinary})
        true_of: dict[int, np.ndarray] = {}
        for i in range(0, len(need), 64):
            ids = need[i: i + 64]
            a = layer_activations(model, windows[ids], [layer])[layer][:, :, neurons].numpy()
            for j, w in enumerate(ids):
                true_of[w] = a[j]
        col = {n: j for j, n in enumerate(neurons)}
        ord_tokens = windows[ordinary]
        for method in args.methods:
            cfg = preset(method, **({} if method == "paper" else overrides))
            t0 = time.perf_counter()
            fitted = fit_neurons(model, layer, neurons, train, amax, cfg, extra=pool)
            sec = (time.perf_counter() - t0) / len(neurons)
            for n in neurons:
                g = fitted[n].graph
                tr = [(windows[top_ids[n][i]], true_of[int(top_ids[n][i])][:, col[n]] / amax[n]) for i in splits[n][0]]
                tr += [(t, a) for _, t, a in fitted[n].extra_train]
                table = token_lookup(tr)
                te_tok = windows[test_ids[n]]
                te_true = np.stack([true_of[w][:, col[n]] for w in test_ids[n]]) / amax[n]
                od_true = np.stack([true_of[int(w)][:, col[n]] for w in ordinary]) / amax[n]
                row = {"layer": layer, "neuron": n, "method": method, "seconds": sec,
                       "n_train": len(tr), "n_paths": int(g.n_paths)}
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
    out = cache / "last_rows.json"
    out.write_text(json.dumps(rows))
    print(f"\nper-neuron rows: {out}")


if __name__ == "__main__":
    main()
