"""Evaluation (n2g-method.md section 8, the paper's Table 1).

Per neuron: its top-k examples are split at random into train and test (10 / 10 by default); the
graph and both baselines are fitted on train only. On the test examples a token "fires" when its
true normalised activation is >= fire_threshold (0.5) and is "predicted to fire" when the
prediction is >= fire_threshold. Precision, recall and F1 of the firing class are pooled over all
test tokens of the neuron, then averaged per layer over neurons (F1 averaged per neuron).

Decisions:
- split seed: ``numpy.random.default_rng([seed, layer, neuron])`` - deterministic, independent
  per neuron and independent of the order neurons are built in (:func:`split_train_test`). With
  fewer than 2 x n_train examples, train takes the first half (rounded up) of the shuffle.
- BOS (position 0 of every example) is never scored and never fitted.
- zero division: precision with no predicted fire, recall with no true fire, and F1 with
  precision + recall = 0 are 0 (scikit-learn's ``zero_division=0``); such a neuron still counts
  in the layer means. ``n_fires`` / ``n_predicted`` are reported so that such cases can be seen.
- baselines are keyed on token ids, not strings: the same as the reference's raw (un-normalised)
  token strings for every token whose string is unique, and exact for byte-level pieces that
  print alike. The 5-gram key is the token and its 5 preceding tokens (6 ids; near the start of
  an example, the tokens that exist, BOS included).
- N2G is scored with both prediction semantics of section 6: "n2g_all_paths_max" and
  "n2g_greedy_deepest" (the reference code). Methods come from the registry in methods.py.

Section 8b (:func:`evaluate_workspace`) scores every registered method on three test sets: the
paper protocol above, ordinary text (a fixed, seeded held-out sample of corpus windows that no fit
sees, :func:`heldout_window_ids`; true activations from shared forward passes, stored once in the
workspace) and detection (each neuron's held-out top windows + as many ordinary windows where it
does not fire; window-level balanced accuracy). Metrics are in metrics.py.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from . import methods, metrics
from .config import EvalConfig
from .workspace import WorkspaceError

log = logging.getLogger("n2g.evaluate")
from .methods import (  # noqa: F401  (re-exported: the baselines' fit / predict)
    Example,
    ngram_lookup_fit,
    ngram_lookup_predict,
    token_lookup_fit,
    token_lookup_predict,
)

# The methods registered when this module was imported (the registry in methods.py is the source;
# these two stay for callers that name the paper's four).
METHODS = methods.method_ids()
METHOD_TITLES = {m.id: m.title for m in methods.all_methods()}


def split_train_test(
    n_examples: int,
    n_train: int = 10,
    seed: int = 0,
    layer: int | None = None,
    neuron: int | None = None,
) -> tuple[list[int], list[int]]:
    """Random train / test indices of one neuron's examples (both sorted).

    Seeded with ``[seed, layer, neuron]`` when layer and neuron are given (else ``seed``).
    """
    if n_examples < 0:
        raise ValueError("n_examples must be >= 0")
    key = [int(seed)] if layer is None or neuron is None else [int(seed), int(layer), int(neuron)]
    perm = np.random.default_rng(key).permutation(n_examples)
    k = n_train if n_examples >= 2 * n_train else (n_examples + 1) // 2
    return sorted(int(i) for i in perm[:k]), sorted(int(i) for i in perm[k:])


# ---- the paper protocol on one neuron (stored with every build) ---------------------------


def prf(true: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Precision / recall / F1 of the firing class (zero division -> 0), with the counts."""
    out = metrics.firing_scores(true, pred, threshold)
    del out["n_tokens"]
    return out


def evaluate_neuron(
    graph: Any,
    train: Sequence[Example],
    test: Sequence[Example],
    cfg: EvalConfig = EvalConfig(),
) -> dict[str, dict[str, float]]:
    """Paper-protocol scores of one neuron on its test examples, for every registered method.

    ``graph`` is the ``n2g_fast.NeuronGraph`` fitted on ``train``; the baselines are fitted here.
    """
    if not test:
        return {m: prf(np.zeros(0), np.zeros(0), cfg.fire_threshold) for m in methods.method_ids()}
    art = methods.Artefacts.from_graph(graph, train)
    test_tokens = [np.asarray(t, dtype=np.int64) for t, _ in test]
    true = np.concatenate([np.asarray(a, dtype=np.float32)[1:] for _, a in test])
    out = {}
    for m in methods.all_methods():
        preds = m.make_predictor(art)(test_tokens)
        p = np.concatenate([np.asarray(x, dtype=np.float32)[1:] for x in preds])
        out[m.id] = prf(true, p, cfg.fire_threshold)
    return out


# ---- per-layer summary ---------------------------------------------------------------------


def summarise(rows: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, dict[str, float]]]:
    """Per-layer means over neurons.

    ``rows``: one mapping per neuron with ``layer`` and ``metrics`` (the output of
    :func:`evaluate_neuron`). Returns ``{layer: {method: {precision, recall, f1, n_neurons}}}``.
    """
    acc: dict[int, dict[str, list[dict[str, float]]]] = {}
    for row in rows:
        layer = int(row["layer"])
        for m, v in row["metrics"].items():
            acc.setdefault(layer, {}).setdefault(m, []).append(v)
    out: dict[int, dict[str, dict[str, float]]] = {}
    for layer in sorted(acc):
        out[layer] = {}
        for m, vals in acc[layer].items():
            out[layer][m] = {
                k: float(np.mean([v[k] for v in vals])) for k in ("precision", "recall", "f1")
            }
            out[layer][m]["n_neurons"] = len(vals)
    return out


def _fmt(x: float) -> str:
    s = f"{x:.2f}"
    return s[1:] if s.startswith("0.") else s


def format_table(summary: Mapping[int, Mapping[str, Mapping[str, float]]], method_ids: Sequence[str] | None = None) -> str:
    """The paper's Table 1 layout: one row per layer, precision / recall / F1 per method."""
    order = list(method_ids) if method_ids is not None else list(methods.method_ids())
    order += sorted({m for l in summary for m in summary[l]} - set(order)) if method_ids is None else []
    shown = [m for m in order if any(m in summary[l] for l in summary)]
    titles = {m.id: m.title for m in methods.all_methods()}
    col = 16
    head1 = f"{'layer':>5} {'n':>4} | " + " | ".join(f"{titles.get(m, m):^{col}}" for m in shown)
    head2 = f"{'':>5} {'':>4} | " + " | ".join(f"{'P':>4} {'R':>5} {'F1':>5}".center(col) for _ in shown)
    lines = [head1, head2, "-" * len(head1)]
    for layer in sorted(summary):
        row = summary[layer]
        n = max((int(v.get("n_neurons", 0)) for v in row.values()), default=0)
        cells = []
        for m in shown:
            v = row.get(m)
            cells.append(
                f"{'-':^{col}}" if v is None
                else f"{_fmt(v['precision']):>4} {_fmt(v['recall']):>5} {_fmt(v['f1']):>5}".center(col)
            )
        lines.append(f"{layer:>5} {n:>4} | " + " | ".join(cells))
    return "\n".join(lines)


# =============================================================================================
# Scoring that matches how graphs are used (n2g-method.md section 8b): three test sets, the
# same for every registered method.
# =============================================================================================

TEST_SETS = ("paper", "ordinary", "detection")
TEST_SET_TITLES = {
    "paper": "paper protocol: held-out top windows",
    "ordinary": "ordinary text: held-out corpus windows",
    "detection": "detection: held-out top windows + as many ordinary windows",
}
TOKEN_METRICS = ("precision", "recall", "f1", "false_fires_per_1k", "pearson")
DETECTION_METRICS = ("balanced_accuracy", "tpr", "tnr")
# P / R / F1 say nothing about a neuron that never fires in a test set (0/0): their layer means and
# paired comparisons take the neurons with at least one true fire there; the other metrics take all.
FIRING_ONLY = frozenset({"precision", "recall", "f1"})
PAIRED_METRICS = {"paper": ("f1", "pearson", "false_fires_per_1k"),
                  "ordinary": ("f1", "pearson", "false_fires_per_1k"),
                  "detection": ("balanced_accuracy",)}
LOWER_IS_BETTER = frozenset({"false_fires_per_1k"})
_HELDOUT_KEY = 0x8B  # mixes the held-out sample's seed apart from every other seeded draw


def heldout_window_ids(ws_or_n_windows: Any, cfg: EvalConfig = EvalConfig()) -> np.ndarray:
    """Sorted ids of the ordinary-text windows that no neuron's fit may see.

    With a number of windows: a seeded sample (``cfg.heldout_seed``) of ``cfg.ordinary_windows``
    ids, at most half of the windows. With a workspace: the set recorded in it, else that sample,
    which is then recorded - so the set is fixed for the workspace from its first use on, whatever
    a later ``cfg`` says (a scan that excluded it must keep matching). A build calls this before
    its dataset scan and leaves these windows out of every neuron's examples.
    """
    if isinstance(ws_or_n_windows, (int, np.integer)):
        n = int(ws_or_n_windows)
        if n < 0:
            raise ValueError(f"n_windows must be >= 0, got {n}")
        size = min(cfg.ordinary_windows, n // 2)
        perm = np.random.default_rng([int(cfg.heldout_seed), _HELDOUT_KEY]).permutation(n)
        return np.sort(perm[:size]).astype(np.int64)
    ws = ws_or_n_windows
    rec = ws.load_heldout_windows()
    if rec is not None:
        return rec["ids"]
    n = ws.window_count()
    if n is None:
        raise ValueError(f"workspace {ws.path} holds no corpus windows yet: tokenise the corpus (build) first")
    ids = heldout_window_ids(n, cfg)
    try:
        return ws.record_heldout_windows(ids, cfg.heldout_seed, cfg.ordinary_windows, n)["ids"]
    except WorkspaceError as e:
        if e.kind != "read_only":
            raise
        return ids  # a reader: the same seeded sample, recorded by the next writer


def _row_keys(rows: np.ndarray) -> list[bytes]:
    return [np.ascontiguousarray(r, dtype=np.int64).tobytes() for r in rows]


def ordinary_window_ids(heldout: np.ndarray, windows: np.ndarray, examples: Mapping[str, Any],
                        scan_top_ids: np.ndarray | None = None) -> np.ndarray:
    """The held-out ids one neuron is scored on: ``heldout`` less any window that is one of the
    neuron's examples (its training windows and its held-out top windows, compared by content)
    or one of its scan's top windows. In a workspace whose scan excluded the held-out set this
    removes nothing; in an older one it keeps every neuron's training data out of its test."""
    heldout = np.asarray(heldout, dtype=np.int64)
    seen = set()
    for part in ("train", "test"):
        for e in examples.get(part) or []:
            seen.add(np.asarray(e["token_ids"], dtype=np.int64).tobytes())
    keep = np.array([k not in seen for k in _row_keys(windows[heldout])], dtype=bool) if heldout.size else np.zeros(0, bool)
    if scan_top_ids is not None:
        keep &= ~np.isin(heldout, np.asarray(scan_top_ids, dtype=np.int64))
    return heldout[keep]


_HELDOUT_LOCK = threading.Lock()  # see ensure_ordinary_activations


def ensure_ordinary_activations(ws, model, layer: int, neurons: Sequence[int], cfg: EvalConfig = EvalConfig(),
                                *, heldout: np.ndarray | None = None, windows: np.ndarray | None = None,
                                model_lock: Any = None) -> dict[int, np.ndarray]:
    """True activations ``{neuron: float32 [n_heldout, window_tokens]}`` on the held-out windows.

    Stored ones are read; with a model, the missing ones come from shared forward passes (every
    missing neuron of the layer read from one pass over each batch of windows) and are stored.
    Without a model, neurons that have none stored are left out of the result.
    """
    neurons = sorted({int(n) for n in neurons})
    have = ws.load_ordinary_activations(layer, neurons)
    missing = [n for n in neurons if n not in have]
    if not missing or model is None:
        return have
    import contextlib

    import torch

    from .activations import layer_activations

    if heldout is None:
        heldout = heldout_window_ids(ws, cfg)
    if windows is None:
        windows = ws.load_windows()
    toks = np.asarray(windows[heldout], dtype=np.int64)
    n, t = toks.shape
    rows = max(1, cfg.batch_tokens // max(t, 1))
    lock = model_lock if model_lock is not None else contextlib.nullcontext()
    for c0 in range(0, len(missing), 1024):  # bounds host memory on whole-layer evaluations
        # one evaluation at a time computes and stores a chunk: one that waited for it reads what
        # the other stored (concurrent evaluations each ran every pass again, under the model lock)
        with _HELDOUT_LOCK:
            part = missing[c0: c0 + 1024]
            stored = ws.load_ordinary_activations(layer, part)
            have.update(stored)
            chunk = [nn for nn in part if nn not in stored]
            if not chunk:
                continue
            out = np.zeros((n, t, len(chunk)), dtype=np.float32)
            with lock:
                idx = None
                for s in range(0, n, rows):
                    acts = layer_activations(model, torch.from_numpy(toks[s: s + rows]), [layer])[layer]
                    if idx is None:
                        idx = torch.as_tensor(chunk, dtype=torch.long, device=acts.device)
                    out[s: s + rows] = acts.index_select(2, idx).cpu().numpy()
            got = {nn: np.ascontiguousarray(out[:, :, j]) for j, nn in enumerate(chunk)}
            try:
                ws.save_ordinary_activations(layer, got)
            except WorkspaceError as e:
                if e.kind not in ("read_only", "locked"):
                    raise
                # a read-only workspace, or one another process is writing (a build): use them now,
                # compute them again next time, rather than lose the passes just run
                log.warning("layer %d: true activations on the held-out windows not stored (%s)", layer, e)
                have.update(got)
    have.update(ws.load_ordinary_activations(layer, [nn for nn in missing if nn not in have]))
    return have


# ---- the report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeuronScore:
    """One neuron x method x test set. ``metrics``: token sets (paper, ordinary): precision,
    recall, f1, false_fires_per_1k, pearson and the counts n_tokens, n_fires, n_predicted, tp,
    fp, fn; detection: balanced_accuracy, tpr, tnr, n_positive, n_negative, tp, tn."""

    layer: int
    neuron: int
    method: str
    test_set: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class LayerScore:
    """Layer means over neurons with bootstrap intervals, one per metric of the test set."""

    layer: int
    method: str
    test_set: str
    n_neurons: int
    metrics: dict[str, metrics.Interval]


@dataclass(frozen=True)
class PairedScore:
    """``method`` minus ``baseline`` on one metric, neuron by neuron, within a layer."""

    layer: int
    test_set: str
    metric: str
    method: str
    baseline: str
    diff: metrics.PairedDiff


@dataclass(frozen=True)
class EvalEvent:
    """Progress: ``stage`` is activations | score | done."""

    stage: str
    done: int
    total: int
    message: str = ""
    layer: int | None = None


@dataclass
class EvaluationReport:
    config: EvalConfig
    methods: list[str]
    test_sets: list[str]
    neurons: list[NeuronScore]
    layers: list[LayerScore]
    paired: list[PairedScore]
    heldout: dict[str, Any]  # the ordinary-text sample: seed, requested, n_windows (corpus), size
    unavailable: dict[str, str] = field(default_factory=dict)  # test set -> why some neurons lack it

    def neuron_metrics(self, layer: int, neuron: int) -> dict[str, dict[str, dict[str, float]]]:
        """``{test_set: {method: metrics}}`` of one neuron."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for s in self.neurons:
            if (s.layer, s.neuron) == (layer, neuron):
                out.setdefault(s.test_set, {})[s.method] = s.metrics
        return out

    def layer_score(self, layer: int, method: str, test_set: str) -> LayerScore | None:
        for s in self.layers:
            if (s.layer, s.method, s.test_set) == (layer, method, test_set):
                return s
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (an undefined mean or bound, NaN, becomes None)."""
        return _json_safe({
            "config": self.config.to_dict(), "methods": list(self.methods), "test_sets": list(self.test_sets),
            "heldout": dict(self.heldout), "unavailable": dict(self.unavailable),
            "neurons": [asdict(s) for s in self.neurons],
            "layers": [{"layer": s.layer, "method": s.method, "test_set": s.test_set, "n_neurons": s.n_neurons,
                        "metrics": {k: v.to_dict() for k, v in s.metrics.items()}} for s in self.layers],
            "paired": [{"layer": p.layer, "test_set": p.test_set, "metric": p.metric, "method": p.method,
                        "baseline": p.baseline, **p.diff.to_dict()} for p in self.paired],
        })


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def _token_metrics(true: np.ndarray, pred: np.ndarray, threshold: float) -> dict[str, float]:
    out = metrics.firing_scores(true, pred, threshold)
    out["false_fires_per_1k"] = metrics.false_fires_per_1k(true, pred, threshold)
    out["pearson"] = metrics.pearson(true, pred)
    return out


def _pairs_of(examples: Sequence[Mapping[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.asarray(e["token_ids"], dtype=np.int64), np.asarray(e["activations"], dtype=np.float32))
            for e in examples]


def _score_neuron(rec, ord_tokens: np.ndarray | None, ord_true: np.ndarray | None,
                  cfg: EvalConfig) -> list[NeuronScore]:
    """Every registered method on the neuron's test sets. ``ord_tokens`` [m, T] / ``ord_true``
    (normalised) [m, T]: its ordinary windows, or None when their activations are unknown."""
    thr = cfg.fire_threshold
    art = methods.Artefacts.from_record(rec)
    test = _pairs_of(rec.examples.get("test") or [])
    test_tokens = [t for t, _ in test]
    paper_true = np.concatenate([a[1:] for _, a in test]) if test else np.zeros(0, np.float32)
    negatives = None
    if ord_true is not None and ord_tokens is not None:
        # detection negatives: ordinary windows where the neuron does not fire (a window where it
        # fires would be a positive), as many as positives, seeded per neuron
        quiet = np.flatnonzero(ord_true[:, 1:].max(axis=1, initial=-np.inf) < thr)
        rng = np.random.default_rng([int(cfg.seed), int(rec.layer), int(rec.neuron), _HELDOUT_KEY])
        negatives = np.sort(rng.permutation(quiet)[: len(test)])
    out = []
    for m in methods.all_methods():
        predict = m.make_predictor(art)
        paper_pred = predict(test_tokens) if test else []
        p = np.concatenate([np.asarray(x, np.float32)[1:] for x in paper_pred]) if test else np.zeros(0, np.float32)
        out.append(NeuronScore(rec.layer, rec.neuron, m.id, "paper", _token_metrics(paper_true, p, thr)))
        if ord_true is None or ord_tokens is None:
            continue
        # a 2-D batch: predictors may answer with one 2-D array (its rows) or with a list of rows
        ord_pred = np.asarray(predict(ord_tokens), np.float32) if len(ord_tokens) else np.zeros_like(ord_true)
        out.append(NeuronScore(rec.layer, rec.neuron, m.id, "ordinary",
                               _token_metrics(ord_true[:, 1:].ravel(), ord_pred[:, 1:].ravel(), thr)))
        pos = metrics.window_max(paper_pred) if test else np.zeros(0)
        neg = metrics.window_max(list(ord_pred[negatives])) if negatives is not None else np.zeros(0)
        out.append(NeuronScore(rec.layer, rec.neuron, m.id, "detection", metrics.detection_scores(pos, neg, thr)))
    return out


def _metric_values(scores: Sequence[NeuronScore], metric: str) -> dict[tuple[int, int], float]:
    """Per-neuron values of ``metric``; P/R/F1 only where the neuron fires in the test set."""
    out = {}
    for s in scores:
        if metric in FIRING_ONLY and s.metrics.get("n_fires", 1) == 0:
            continue
        out[(s.layer, s.neuron)] = float(s.metrics[metric])
    return out


def summarise_scores(scores: Sequence[NeuronScore], cfg: EvalConfig = EvalConfig()
                     ) -> tuple[list[LayerScore], list[PairedScore]]:
    """Layer means with bootstrap intervals, and every non-baseline method against every
    baseline, per layer and test set (intervals seeded by ``cfg.seed``, layer, set and metric)."""
    groups: dict[tuple[int, str, str], list[NeuronScore]] = {}
    for s in scores:
        groups.setdefault((s.layer, s.test_set, s.method), []).append(s)
    order = {m: i for i, m in enumerate(methods.method_ids())}
    layers_out, paired_out = [], []
    for (layer, ts, m) in sorted(groups, key=lambda k: (k[0], TEST_SETS.index(k[1]) if k[1] in TEST_SETS else 99,
                                                        order.get(k[2], 99), k[2])):
        group = groups[(layer, ts, m)]
        names = DETECTION_METRICS if ts == "detection" else TOKEN_METRICS
        means = {}
        for i, metric in enumerate(names):
            vals = _metric_values(group, metric)
            seed = [int(cfg.seed), int(layer), TEST_SETS.index(ts), i]
            means[metric] = metrics.bootstrap_mean(list(vals.values()), cfg.n_bootstrap, seed, cfg.confidence)
        layers_out.append(LayerScore(layer, m, ts, len(group), means))
    baselines = set(methods.baseline_ids())
    for (layer, ts, m) in sorted(groups):
        if m in baselines:
            continue
        for b in sorted(baselines, key=lambda x: order.get(x, 99)):
            if (layer, ts, b) not in groups:
                continue
            for i, metric in enumerate(PAIRED_METRICS.get(ts, ())):
                mv, bv = _metric_values(groups[(layer, ts, m)], metric), _metric_values(groups[(layer, ts, b)], metric)
                common = sorted(set(mv) & set(bv))
                seed = [int(cfg.seed), int(layer), TEST_SETS.index(ts), 100 + i]
                diff = metrics.paired_comparison([mv[k] for k in common], [bv[k] for k in common], cfg.n_bootstrap,
                                                 seed, cfg.confidence, higher_is_better=metric not in LOWER_IS_BETTER)
                paired_out.append(PairedScore(layer, ts, metric, m, b, diff))
    paired_out.sort(key=lambda p: (p.layer, TEST_SETS.index(p.test_set), order.get(p.method, 99),
                                   order.get(p.baseline, 99)))
    return layers_out, paired_out


def evaluate_workspace(ws, model=None, keys: Sequence[tuple[int, int]] | None = None,
                       cfg: EvalConfig = EvalConfig(),
                       progress: Callable[[EvalEvent], None] | None = None,
                       *, model_lock: Any = None) -> EvaluationReport:
    """Scores every registered method on the built neurons ``keys`` (default: all) of ``ws``.

    Test sets: "paper" (the neuron's held-out top windows, from its stored examples; needs no
    model), "ordinary" (the workspace's held-out corpus windows, :func:`heldout_window_ids`, less
    the neuron's own example windows) and "detection" (held-out top windows + as many ordinary
    windows where the neuron does not fire). The last two need the true activations on the
    held-out windows: read from the workspace, else computed with ``model`` (shared forward passes,
    then stored; ``model_lock`` is held around them). Neurons without them are listed in
    ``report.unavailable``.
    """
    progress = progress or (lambda e: None)
    if keys is None:
        keys = ws.built_keys()
    keys = sorted({(int(l), int(n)) for l, n in keys})
    missing = [k for k in keys if not ws.has_neuron(*k)]
    if missing:
        raise ValueError(f"not built: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    unavailable: dict[str, str] = {}
    windows = ws.load_windows()
    heldout = None
    heldout_info: dict[str, Any] = {}
    if windows is None:
        unavailable["ordinary"] = unavailable["detection"] = "the workspace holds no corpus windows"
    else:
        heldout = heldout_window_ids(ws, cfg)
        # (a reader on a workspace that never recorded its sample gets the seeded one unrecorded)
        rec_h = ws.load_heldout_windows() or {"seed": cfg.heldout_seed, "requested": cfg.ordinary_windows,
                                              "n_windows": int(windows.shape[0])}
        heldout_info = {"seed": rec_h["seed"], "requested": rec_h["requested"], "n_windows": rec_h["n_windows"],
                        "size": int(heldout.size)}
        if not heldout.size:
            unavailable["ordinary"] = unavailable["detection"] = (
                f"the workspace's {rec_h['n_windows']} corpus window(s) are too few for a held-out sample")
            heldout = None
    scores: list[NeuronScore] = []
    no_acts: list[tuple[int, int]] = []
    done = 0
    for layer in sorted({l for l, _ in keys}):
        neurons = [n for l, n in keys if l == layer]
        acts: dict[int, np.ndarray] = {}
        scan_ids = None
        if heldout is not None:
            if model is not None:
                progress(EvalEvent("activations", done, len(keys),
                                   f"layer {layer}: true activations on {heldout.size} held-out windows", layer))
            acts = ensure_ordinary_activations(ws, model, layer, neurons, cfg, heldout=heldout, windows=windows,
                                               model_lock=model_lock)
            scan = ws.load_layer_scan(layer)
            scan_ids = None if scan is None else scan["top_window_ids"]
        for n in neurons:
            rec = ws.get_neuron(layer, n)
            ord_tokens = ord_true = None
            if n in acts:
                ids = ordinary_window_ids(heldout, windows, rec.examples,
                                          None if scan_ids is None else scan_ids[n])
                rows = np.searchsorted(heldout, ids)
                ord_tokens = windows[ids]
                amax = float(rec.max_activation)
                raw = acts[n][rows]
                ord_true = raw / amax if amax > 0 and np.isfinite(amax) else np.zeros_like(raw)
            elif heldout is not None:
                no_acts.append((layer, n))
            scores.extend(_score_neuron(rec, ord_tokens, ord_true, cfg))
            done += 1
            progress(EvalEvent("score", done, len(keys), f"scored {layer}/{n}", layer))
    if no_acts:
        layers = sorted({l for l, _ in no_acts})
        msg = (f"{len(no_acts)} of {len(keys)} neuron(s) (layers {layers}) have no stored true activations on the "
               f"held-out windows: scoring them on ordinary text and detection needs the model to compute them "
               f"once (`n2g eval --compute`; the Evaluate RPC's compute_heldout on a server with the model)")
        unavailable["ordinary"] = unavailable["detection"] = msg
    layer_scores, paired = summarise_scores(scores, cfg)
    progress(EvalEvent("done", done, len(keys), "evaluation finished"))
    return EvaluationReport(cfg, list(methods.method_ids()), list(TEST_SETS), scores, layer_scores, paired,
                            heldout_info, unavailable)


# ---- text form -------------------------------------------------------------------------------


def _ci(iv: metrics.Interval) -> str:
    if iv.n == 0:
        return f"{'-':^15}"
    return f"{_fmt(iv.mean)} [{_fmt(iv.low)},{_fmt(iv.high)}]".ljust(15)


def _signed(x: float) -> str:
    if not np.isfinite(x):
        return "-"
    s = _fmt(abs(x))
    return ("+" if x >= 0 else "-") + s


def format_report(report: EvaluationReport, baseline: str = "token_lookup") -> str:
    """The report as text: per test set and layer, P/R/F1, false fires per 1,000 tokens and r
    (token sets) or balanced accuracy (detection), each mean with its 95% interval; then every
    N2G method's paired differences against ``baseline`` (wins / ties / losses). Token sets show
    n (neurons) and fire (neurons that fire there at least once: the P/R/F1 means are over them)."""
    titles = {m.id: m.title for m in methods.all_methods()}
    pct = f"{round(report.config.confidence * 100)}%"
    lines: list[str] = []
    if report.heldout:
        h = report.heldout
        lines.append(f"ordinary text: {h['size']} held-out windows of {h['n_windows']} (seed {h['seed']}); "
                     f"fire threshold {report.config.fire_threshold}; intervals: {pct} bootstrap over neurons")
    for ts in report.test_sets:
        rows = [s for s in report.layers if s.test_set == ts]
        lines.append("")
        lines.append(f"== {TEST_SET_TITLES.get(ts, ts)} ==")
        if not rows:
            lines.append(f"   no scores: {report.unavailable.get(ts, 'nothing to score')}")
            continue
        if ts == "detection":
            head = f"{'layer':>5} {'n':>4}  {'method':<24} {'balanced acc. [CI]':<15}  {'TPR':>5} {'TNR':>5}"
        else:
            head = (f"{'layer':>5} {'n':>4} {'fire':>4}  {'method':<24} {'P':>5} {'R':>5}  {'F1 [CI]':<15}  "
                    f"{'FF/1k [CI]':<19}  {'r [CI]':<15}")
        lines += [head, "-" * len(head)]
        for s in rows:
            mm = s.metrics
            if ts == "detection":
                lines.append(f"{s.layer:>5} {s.n_neurons:>4}  {titles.get(s.method, s.method):<24} "
                             f"{_ci(mm['balanced_accuracy'])}  {_fmt(mm['tpr'].mean):>5} {_fmt(mm['tnr'].mean):>5}")
            else:
                ff = mm["false_fires_per_1k"]
                ffs = f"{ff.mean:.1f} [{ff.low:.1f},{ff.high:.1f}]" if ff.n else "-"
                nf = mm["f1"].n
                lines.append(f"{s.layer:>5} {s.n_neurons:>4} {nf:>4}  {titles.get(s.method, s.method):<24} "
                             f"{_fmt(mm['precision'].mean) if nf else '-':>5} {_fmt(mm['recall'].mean) if nf else '-':>5}  "
                             f"{_ci(mm['f1'])}  {ffs:<19}  {_ci(mm['pearson'])}".rstrip())
        if ts in report.unavailable:
            lines.append(f"   note: {report.unavailable[ts]}")
    pairs = [p for p in report.paired if p.baseline == baseline]
    if pairs:
        lines.append("")
        lines.append(f"== paired vs {titles.get(baseline, baseline)}: mean per-neuron difference [{pct} CI] "
                     f"wins/ties/losses ==")
        head = f"{'layer':>5}  {'test set':<9}  {'method':<24} {'metric':<18} {'diff [CI]':<20} {'w/t/l':>10}"
        lines += [head, "-" * len(head)]
        for p in pairs:
            d = p.diff
            ci = f"{_signed(d.mean_diff)} [{_signed(d.low)},{_signed(d.high)}]" if d.n else "-"
            if p.metric == "false_fires_per_1k" and d.n:
                ci = f"{d.mean_diff:+.1f} [{d.low:+.1f},{d.high:+.1f}]"
            lines.append(f"{p.layer:>5}  {p.test_set:<9}  {titles.get(p.method, p.method):<24} {p.metric:<18} "
                         f"{ci:<20} {f'{d.wins}/{d.ties}/{d.losses}':>10}")
    return "\n".join(lines).lstrip("\n")
