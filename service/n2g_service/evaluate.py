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
  "n2g_greedy_deepest" (the reference code).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .config import EvalConfig

METHODS = ("n2g_all_paths_max", "n2g_greedy_deepest", "token_lookup", "ngram_lookup")
METHOD_TITLES = {
    "n2g_all_paths_max": "N2G (all paths, max)",
    "n2g_greedy_deepest": "N2G (greedy, deepest)",
    "token_lookup": "token lookup",
    "ngram_lookup": "5-gram lookup",
}

Example = tuple[Sequence[int], Sequence[float]]  # (token ids with BOS, normalised activations)


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


# ---- baselines -----------------------------------------------------------------------------


def token_lookup_fit(train: Sequence[Example]) -> dict[int, float]:
    """Each token id's maximum normalised activation in train (BOS excluded)."""
    table: dict[int, float] = {}
    for tokens, acts in train:
        for t, a in zip(list(tokens)[1:], list(acts)[1:]):
            t, a = int(t), float(a)
            if a > table.get(t, -np.inf):
                table[t] = a
    return table


def token_lookup_predict(table: Mapping[int, float], tokens: Sequence[int]) -> np.ndarray:
    out = np.zeros(len(tokens), dtype=np.float32)
    for i in range(1, len(tokens)):
        out[i] = table.get(int(tokens[i]), 0.0)
    return out


def _ngram_key(tokens: Sequence[int], i: int, n: int) -> tuple[int, ...]:
    return tuple(int(t) for t in tokens[max(0, i - n) : i + 1])


def ngram_lookup_fit(train: Sequence[Example], n: int = 5) -> dict[tuple[int, ...], float]:
    """Maximum normalised activation per (n preceding tokens, token) in train (BOS excluded)."""
    table: dict[tuple[int, ...], float] = {}
    for tokens, acts in train:
        tokens, acts = list(tokens), list(acts)
        for i in range(1, len(tokens)):
            key = _ngram_key(tokens, i, n)
            a = float(acts[i])
            if a > table.get(key, -np.inf):
                table[key] = a
    return table


def ngram_lookup_predict(table: Mapping[tuple[int, ...], float], tokens: Sequence[int], n: int = 5) -> np.ndarray:
    out = np.zeros(len(tokens), dtype=np.float32)
    for i in range(1, len(tokens)):
        out[i] = table.get(_ngram_key(tokens, i, n), 0.0)
    return out


# ---- metrics -------------------------------------------------------------------------------


def prf(true: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Precision / recall / F1 of the firing class (zero division -> 0)."""
    t = np.asarray(true) >= threshold
    p = np.asarray(pred) >= threshold
    tp = int(np.sum(t & p))
    n_fires, n_pred = int(t.sum()), int(p.sum())
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_fires if n_fires else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "precision": precision, "recall": recall, "f1": f1,
        "n_fires": n_fires, "n_predicted": n_pred,
        "tp": tp, "fp": n_pred - tp, "fn": n_fires - tp,
    }


def evaluate_neuron(
    graph: Any,
    train: Sequence[Example],
    test: Sequence[Example],
    cfg: EvalConfig = EvalConfig(),
) -> dict[str, dict[str, float]]:
    """Scores of one neuron on its test examples for every method in :data:`METHODS`.

    ``graph`` is the ``n2g_fast.NeuronGraph`` fitted on ``train``; the baselines are fitted here.
    """
    if not test:
        return {m: prf(np.zeros(0), np.zeros(0), cfg.fire_threshold) for m in METHODS}
    test_tokens = [np.asarray(t, dtype=np.int64) for t, _ in test]
    true = np.concatenate([np.asarray(a, dtype=np.float32)[1:] for _, a in test])
    preds: dict[str, list[np.ndarray]] = {}
    preds["n2g_all_paths_max"] = graph.predict(test_tokens, semantics="all_paths_max")
    preds["n2g_greedy_deepest"] = graph.predict(test_tokens, semantics="greedy_deepest")
    tok_table = token_lookup_fit(train)
    preds["token_lookup"] = [token_lookup_predict(tok_table, t) for t in test_tokens]
    ng_table = ngram_lookup_fit(train, 5)
    preds["ngram_lookup"] = [ngram_lookup_predict(ng_table, t, 5) for t in test_tokens]
    out = {}
    for m in METHODS:
        p = np.concatenate([np.asarray(x, dtype=np.float32)[1:] for x in preds[m]])
        out[m] = prf(true, p, cfg.fire_threshold)
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


def format_table(summary: Mapping[int, Mapping[str, Mapping[str, float]]], methods: Sequence[str] = METHODS) -> str:
    """The paper's Table 1 layout: one row per layer, precision / recall / F1 per method."""
    methods = [m for m in methods if any(m in summary[l] for l in summary)]
    col = 16
    head1 = f"{'layer':>5} {'n':>4} | " + " | ".join(f"{METHOD_TITLES.get(m, m):^{col}}" for m in methods)
    head2 = f"{'':>5} {'':>4} | " + " | ".join(f"{'P':>4} {'R':>5} {'F1':>5}".center(col) for _ in methods)
    lines = [head1, head2, "-" * len(head1)]
    for layer in sorted(summary):
        row = summary[layer]
        n = max((int(v.get("n_neurons", 0)) for v in row.values()), default=0)
        cells = []
        for m in methods:
            v = row.get(m)
            cells.append(
                f"{'-':^{col}}" if v is None
                else f"{_fmt(v['precision']):>4} {_fmt(v['recall']):>5} {_fmt(v['f1']):>5}".center(col)
            )
        lines.append(f"{layer:>5} {n:>4} | " + " | ".join(cells))
    return "\n".join(lines)
