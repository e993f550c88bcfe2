"""The dev set-up the fit benchmarks share: neurons that are never reported, their data, scores.

Dev neurons: the odd ids >= a start (live ones, in order) of a layer, never in the scoring table's
seeded sample, so settings are chosen on them. Each gets the paper's split of its top 20 windows
(10 train / 10 test); ordinary text is a seeded sample of the evaluation's held-out windows
(``evaluate.heldout_window_ids``), which no fit sees (the scan runs on the other windows only).
The scan of each layer is cached (delete the cache after a model or corpus change).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "service") not in sys.path:
    sys.path.insert(0, str(ROOT / "service"))

from n2g_service.activations import layer_activations  # noqa: E402
from n2g_service.config import EvalConfig, ScanConfig  # noqa: E402
from n2g_service.corpus import load_texts, make_windows  # noqa: E402
from n2g_service.evaluate import heldout_window_ids, split_train_test  # noqa: E402
from n2g_service.fit import TrainingPool, training_pool  # noqa: E402
from n2g_service.models import load_model  # noqa: E402
from n2g_service.scan import scan_layers  # noqa: E402

N_PAPER = 20  # the paper's top windows per neuron: 10 train + 10 test
THR = 0.5
CACHE = "/tmp/n2g_bench_fit_methods"


def token_lookup(train: list[tuple[np.ndarray, np.ndarray]]) -> dict[int, float]:
    """The token-lookup baseline: each token's highest normalised activation in ``train``."""
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


@dataclass
class DevCorpus:
    """The default model on the CPU, its corpus windows, the held-out ones and the ordinary sample."""

    model: object
    windows: np.ndarray
    heldout: np.ndarray
    usable: np.ndarray  # bool [n]: False for the held-out windows
    ordinary: np.ndarray  # ids of the held-out windows scored as ordinary text

    @classmethod
    def load(cls, n_ordinary: int, device: str = "cpu") -> "DevCorpus":
        model = load_model(device=device)
        windows = make_windows(model, load_texts("fortunes"), window_tokens=64)
        heldout = heldout_window_ids(len(windows), EvalConfig())
        usable = np.ones(len(windows), dtype=bool)
        usable[heldout] = False
        ordinary = np.random.default_rng(1).choice(heldout, size=min(n_ordinary, heldout.size), replace=False)
        print(f"{len(windows)} windows, {heldout.size} held out, {ordinary.size} scored as ordinary text", flush=True)
        return cls(model, windows, heldout, usable, ordinary)

    @property
    def usable_ids(self) -> np.ndarray:
        return np.flatnonzero(self.usable)

    def scans(self, layers: list[int], k: int, cache: str = CACHE) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per layer (a_max [d_mlp], top window ids [d_mlp, k] as corpus window ids, -1 pads), from
        the cache; the layers missing there are scanned in one pass, the held-out windows left out."""
        folder = Path(cache)
        folder.mkdir(parents=True, exist_ok=True)
        file = {l: folder / f"scan_L{l}_k{k}_n{len(self.windows)}.npz" for l in layers}
        missing = [l for l in layers if not file[l].exists()]
        if missing:
            t0 = time.perf_counter()
            ids = self.usable_ids
            scanned = scan_layers(self.model, self.windows[self.usable], missing, ScanConfig(k=k, batch_size=32),
                                  progress=False)
            for l, s in scanned.items():
                top = np.where(s.top_window_ids >= 0, ids[np.maximum(s.top_window_ids, 0)], -1)
                np.savez(file[l], amax=s.max_activation, top=top)
            print(f"layers {missing}: scan {time.perf_counter() - t0:.0f} s", flush=True)
        out = {}
        for l in layers:
            z = np.load(file[l])
            out[l] = (z["amax"], z["top"])
        return out


@dataclass
class DevLayer:
    """A layer's dev neurons and their data: the paper split of their top windows, the training
    pool of a build, and the true activations of their top 20 windows and of the ordinary sample
    (``true_of[window id]`` [T, len(neurons)], raw)."""

    layer: int
    neurons: list[int]
    amax: dict[int, float]
    top_ids: np.ndarray
    splits: dict[int, tuple]
    train: dict[int, list[np.ndarray]]
    test_ids: dict[int, list[int]]
    pool: TrainingPool
    true_of: dict[int, np.ndarray]

    @classmethod
    def load(cls, corpus: DevCorpus, layer: int, scan: tuple[np.ndarray, np.ndarray], start: int,
             per_layer: int) -> "DevLayer":
        amax_all, top_ids = scan
        model, windows = corpus.model, corpus.windows
        neurons = [n for n in range(start | 1, model.d_mlp, 2)
                   if amax_all[n] > 0 and (top_ids[n][:N_PAPER] >= 0).all()][:per_layer]
        splits = {n: split_train_test(N_PAPER, 10, 0, layer, n) for n in neurons}
        train = {n: [windows[top_ids[n][i]] for i in splits[n][0]] for n in neurons}
        test_ids = {n: [int(top_ids[n][i]) for i in splits[n][1]] for n in neurons}
        pool = training_pool(windows, top_ids, neurons, N_PAPER, test_ids, corpus.heldout)
        # true activations: test windows, training windows and the ordinary sample, in shared passes
        need = sorted({int(w) for n in neurons for w in top_ids[n][:N_PAPER]} | {int(w) for w in corpus.ordinary})
        true_of: dict[int, np.ndarray] = {}
        for i in range(0, len(need), 64):
            ids = need[i: i + 64]
            a = layer_activations(model, windows[ids], [layer])[layer][:, :, neurons].cpu().numpy()
            true_of.update({w: a[j] for j, w in enumerate(ids)})
        return cls(layer, neurons, {n: float(amax_all[n]) for n in neurons}, top_ids, splits, train, test_ids,
                   pool, true_of)

    def true(self, n: int, window_ids) -> np.ndarray:
        """Neuron ``n``'s normalised true activations [len(window_ids), T] on those windows."""
        j = self.neurons.index(n)
        return np.stack([self.true_of[int(w)][:, j] for w in window_ids]) / self.amax[n]

    def training(self, n: int, fitted) -> list[tuple[np.ndarray, np.ndarray]]:
        """(tokens, normalised activations) of every window a fit of ``n`` learnt from: the paper's
        training windows and the fit's ``extra_train`` (what token lookup is fitted on)."""
        top = [int(self.top_ids[n][i]) for i in self.splits[n][0]]
        return list(zip(self.train[n], self.true(n, top))) + [(t, a) for _, t, a in fitted.extra_train]
