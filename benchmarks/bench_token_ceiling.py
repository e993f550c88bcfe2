"""How far a token-level predictor can go on ordinary text, next to N2G (not a test).

For each layer asked, on the dev neurons of ``bench_fit_methods.py`` (odd ids >= --start, live
ones, never the scoring table's), ordinary-text firing F1 (threshold .5 of the neuron's a_max,
mean over the neurons that fire in the sample) of:

- N2G: the default (calibrated) fit, and token lookup fitted on the same training windows;
- corpus labels: each label's mean activation over every usable corpus window (the whole corpus
  but the evaluation's held-out windows): a token table keyed as N2G's nodes are, on labels
  (" The", "the" and "The" are one label);
- corpus tokens: the same per token id, i.e. token lookup given all the data there is;
- corpus bigrams / trigrams: the mean over every usable occurrence of the token with the one / two
  tokens before it, where seen at least twice, else the order below: context, given all the data
  there is;
- test tokens: each token's mean on the scored sample itself (fitted on the answers: it bounds
  what any token table can score there, and overstates it where tokens are rare).

A method that can only say "this token fires" (token lookup, and N2G where its graphs hold no
context) cannot pass the corpus-token figure; the bigram figure shows what one token of context
adds with unlimited data.

    .venv/bin/python benchmarks/bench_token_ceiling.py --layers 0 1 --per-layer 16 --ordinary 1000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _dev import CACHE, THR, DevCorpus, DevLayer, lookup_predict, scores, token_lookup  # noqa: E402
from n2g_service.activations import layer_activations  # noqa: E402
from n2g_service.fit import fit_neurons, preset  # noqa: E402
from n2g_service.fit.methods import _labels  # noqa: E402

COLUMNS = ("n2g", "token lookup", "corpus labels", "corpus tokens", "corpus bigrams", "corpus trigrams",
           "test tokens")


def context_codes(w: np.ndarray, v: int, n: int) -> np.ndarray:
    """int64 code [W * (T-1)] of the n-gram (the token and the n-1 before it) at each position
    after BOS of windows ``w`` [W, T]; a place before the window's first token codes as 0, which
    no token does (token t codes as t + 1)."""
    t = w.shape[1]
    code = np.zeros((w.shape[0], t - 1), dtype=np.int64)
    for back in range(n - 1, -1, -1):
        prev = np.full((w.shape[0], t - 1), -1, dtype=np.int64)
        src = w[:, max(1 - back, 0): t - back] if back else w[:, 1:]
        prev[:, (t - 1) - src.shape[1]:] = src
        code = code * (v + 1) + (prev + 1)
    return code.ravel()


class NgramTable:
    """Mean activation of each neuron over every occurrence of each n-gram (the token and the
    n-1 before it) in some windows: ``mean(codes)`` [N, neurons] and ``count(codes)`` [N]."""

    def __init__(self, codes: np.ndarray, acts: np.ndarray):
        self.keys, inv = np.unique(codes, return_inverse=True)
        self.n = np.bincount(inv)
        self.sums = np.stack([np.bincount(inv, weights=acts[:, j]) for j in range(acts.shape[1])], axis=1)

    def lookup(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        at = np.minimum(np.searchsorted(self.keys, codes), self.keys.size - 1)
        return at, np.where(self.keys[at] == codes, self.n[at], 0)


def corpus_tables(model, windows: np.ndarray, ids: np.ndarray, layer: int, neurons: list[int],
                  orders=(1, 2, 3), batch: int = 128) -> dict[int, NgramTable]:
    """n-gram tables (n in ``orders``) of the neurons' activations over the windows ``ids``."""
    v = model.d_vocab
    codes: dict[int, list[np.ndarray]] = {n: [] for n in orders}
    acts = []
    for i in range(0, len(ids), batch):
        w = windows[ids[i: i + batch]]
        acts.append(layer_activations(model, w, [layer])[layer][:, 1:, neurons].numpy().reshape(-1, len(neurons)))
        for n in orders:
            codes[n].append(context_codes(w, v, n))
    a = np.concatenate(acts)
    return {n: NgramTable(np.concatenate(c), a) for n, c in codes.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--per-layer", type=int, default=16)
    ap.add_argument("--start", type=int, default=1001, help="first neuron id (odd ids from here)")
    ap.add_argument("--ordinary", type=int, default=1000, help="held-out windows scored as ordinary text")
    ap.add_argument("--scan-k", type=int, default=60)
    ap.add_argument("--cache", default=CACHE, help="scan cache shared with bench_fit_methods")
    args = ap.parse_args()

    corpus = DevCorpus.load(args.ordinary)
    model, windows, ordinary = corpus.model, corpus.windows, corpus.ordinary
    scans = corpus.scans(args.layers, args.scan_k, args.cache)
    usable_ids = corpus.usable_ids
    v = model.d_vocab

    results = []
    for layer in args.layers:
        dev = DevLayer.load(corpus, layer, scans[layer], args.start, args.per_layer)
        neurons, amax = dev.neurons, dev.amax
        t0 = time.perf_counter()
        tables = corpus_tables(model, windows, usable_ids, layer, neurons)
        print(f"layer {layer}: corpus pass over {usable_ids.size} windows {time.perf_counter() - t0:.0f} s", flush=True)
        fitted = fit_neurons(model, layer, neurons, dev.train, amax, preset("calibrated"), extra=dev.pool)
        ot = windows[ordinary]
        toks = ot[:, 1:].ravel()
        found = {n: t.lookup(context_codes(ot, v, n)) for n, t in tables.items()}
        # the label table: the unigram table's sums and counts folded onto labels
        label_of, _ = _labels(model)
        uni = tables[1]
        lab_keys = label_of[uni.keys - 1]  # unigram code = token id + 1
        lab_n = np.bincount(lab_keys, weights=uni.n, minlength=label_of.max() + 1)
        ot_lab = label_of[toks]
        for j, n in enumerate(neurons):
            true = dev.true(n, ordinary)[:, 1:].ravel()
            if not (true >= THR).any():
                continue
            # each order backs off to the one below where its n-gram was seen fewer than twice
            backed = np.zeros(toks.shape)
            ngram = {}
            for order, table in tables.items():
                at, count = found[order]
                mean = table.sums[at, j] / np.maximum(count, 1) / amax[n]
                backed = np.where(count >= (1 if order == 1 else 2), mean, backed)
                ngram[order] = backed
            lab_mean = np.bincount(lab_keys, weights=uni.sums[:, j], minlength=lab_n.size) / np.maximum(lab_n, 1)
            test_tok = (np.bincount(toks, weights=true, minlength=v) / np.maximum(np.bincount(toks, minlength=v), 1))[toks]
            preds = {
                "n2g": np.asarray(fitted[n].graph.predict(ot, semantics="all_paths_max"))[:, 1:].ravel(),
                "token lookup": lookup_predict(token_lookup(dev.training(n, fitted[n])), ot)[:, 1:].ravel(),
                "corpus labels": lab_mean[ot_lab] / amax[n],
                "corpus tokens": ngram[1],
                "corpus bigrams": ngram[2],
                "corpus trigrams": ngram[3],
                "test tokens": test_tok,
            }
            results.append((layer, n, {k: scores(true, p)["f1"] for k, p in preds.items()}))

    print("\nordinary-text F1, mean over the neurons that fire in the sample")
    print(f"{'layer':>5} {'n':>3} | " + " | ".join(f"{c:>14}" for c in COLUMNS))
    for layer in args.layers:
        rs = [r for l, _, r in results if l == layer]
        if rs:
            print(f"{layer:>5} {len(rs):>3} | " + " | ".join(f"{np.mean([r[c] for r in rs]):>14.3f}" for c in COLUMNS))


if __name__ == "__main__":
    main()
