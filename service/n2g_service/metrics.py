"""Scoring functions of the evaluation (n2g-method.md sections 8 and 8b), pure numpy.

Conventions, the same for every method and test set:
- a token *fires* when its normalised activation is >= ``threshold``; a prediction fires when it
  is >= ``threshold`` (so ``threshold`` itself fires);
- zero division gives 0: precision with no predicted fire, recall with no true fire, F1 with
  precision + recall = 0 (scikit-learn's ``zero_division=0``); the counts are returned so such
  cases can be seen;
- Pearson's r of a constant input (true or predicted: zero variance, or fewer than 2 tokens) is 0:
  a constant prediction carries no information about where the neuron is higher or lower, and a
  constant neuron has nothing for a prediction to follow;
- detection (as Delphi scores explanations): a window is *detected* when its largest prediction
  is >= ``threshold``; balanced accuracy = (TPR + TNR) / 2 over the classes that have windows
  (only one class present: that class's rate; none: 0);
- intervals are percentile bootstrap intervals over neurons, seeded, so a report is reproducible.

Every function validates its arguments and raises ``ValueError`` with the reason.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "Interval", "PairedDiff", "firing_scores", "false_fires_per_1k", "pearson", "window_max",
    "detection_scores", "bootstrap_mean", "paired_comparison", "check_threshold",
]


# ---- argument checks -------------------------------------------------------------------------


def check_threshold(threshold: float, name: str = "threshold") -> float:
    """A fire threshold: a finite number >= 0."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {threshold!r}") from None
    if not math.isfinite(t):
        raise ValueError(f"{name} must be finite, got {threshold!r}")
    if t < 0:
        raise ValueError(f"{name} must be >= 0, got {threshold!r}")
    return t


def _values(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        a = a.reshape(-1)
    if a.size and not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return a


def _pair(true, pred) -> tuple[np.ndarray, np.ndarray]:
    t, p = _values(true, "true activations"), _values(pred, "predictions")
    if t.shape != p.shape:
        raise ValueError(f"true activations ({t.size}) and predictions ({p.size}) differ in length")
    return t, p


# ---- token-level metrics ---------------------------------------------------------------------


def firing_scores(true, pred, threshold: float = 0.5) -> dict[str, float]:
    """Precision, recall and F1 of the firing class over the tokens given, with the counts.

    Returns ``precision, recall, f1, n_tokens, n_fires, n_predicted, tp, fp, fn``.
    """
    threshold = check_threshold(threshold)
    t, p = _pair(true, pred)
    tf, pf = t >= threshold, p >= threshold
    tp = int(np.sum(tf & pf))
    n_fires, n_pred = int(tf.sum()), int(pf.sum())
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_fires if n_fires else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "precision": precision, "recall": recall, "f1": f1, "n_tokens": int(t.size),
        "n_fires": n_fires, "n_predicted": n_pred, "tp": tp, "fp": n_pred - tp, "fn": n_fires - tp,
    }


def false_fires_per_1k(true, pred, threshold: float = 0.5) -> float:
    """Predicted fires where the neuron does not fire, per 1,000 tokens (0 for no tokens)."""
    threshold = check_threshold(threshold)
    t, p = _pair(true, pred)
    if t.size == 0:
        return 0.0
    return 1000.0 * float(np.sum((p >= threshold) & (t < threshold))) / t.size


def pearson(true, pred) -> float:
    """Pearson correlation of predicted with true activations; 0 for a constant input."""
    t, p = _pair(true, pred)
    if t.size < 2:
        return 0.0
    dt, dp = t - t.mean(), p - p.mean()
    st, sp = float(np.sqrt(np.dot(dt, dt))), float(np.sqrt(np.dot(dp, dp)))
    # relative tolerance: float32 noise around a constant must not read as a signal
    if st <= 1e-12 * max(1.0, float(np.abs(t).max())) or sp <= 1e-12 * max(1.0, float(np.abs(p).max())):
        return 0.0
    return float(np.clip(np.dot(dt, dp) / (st * sp), -1.0, 1.0))


# ---- window-level detection ------------------------------------------------------------------


def window_max(windows: Sequence[np.ndarray], skip_first: int = 1) -> np.ndarray:
    """The largest value of each window after its first ``skip_first`` positions (BOS); a window
    with nothing left scores -inf (never detected)."""
    out = np.full(len(windows), -np.inf, dtype=np.float64)
    for i, w in enumerate(windows):
        w = _values(w, "window values")[skip_first:]
        if w.size:
            out[i] = w.max()
    return out


def detection_scores(positive_max, negative_max, threshold: float = 0.5) -> dict[str, float]:
    """Window-level balanced accuracy of detection from each window's largest prediction.

    ``positive_max``: windows the neuron should be detected on; ``negative_max``: windows it
    should not. Returns ``balanced_accuracy, tpr, tnr, n_positive, n_negative, tp, tn``.
    """
    threshold = check_threshold(threshold)
    pos = np.asarray(positive_max, dtype=np.float64).reshape(-1)
    neg = np.asarray(negative_max, dtype=np.float64).reshape(-1)
    if np.isnan(pos).any() or np.isnan(neg).any():
        raise ValueError("window scores hold NaN")
    tp, tn = int(np.sum(pos >= threshold)), int(np.sum(neg < threshold))
    rates = []
    tpr = tp / pos.size if pos.size else 0.0
    tnr = tn / neg.size if neg.size else 0.0
    if pos.size:
        rates.append(tpr)
    if neg.size:
        rates.append(tnr)
    return {
        "balanced_accuracy": float(np.mean(rates)) if rates else 0.0, "tpr": tpr, "tnr": tnr,
        "n_positive": int(pos.size), "n_negative": int(neg.size), "tp": tp, "tn": tn,
    }


# ---- layer means and paired comparisons ------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A mean over neurons with its bootstrap interval (NaN bounds when n = 0)."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class PairedDiff:
    """Method minus baseline, neuron by neuron: the mean difference with its bootstrap interval,
    and how many neurons the method wins, ties and loses (better = ``higher_is_better``)."""

    mean_diff: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int
    n: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _check_boot(n_boot: int, level: float) -> None:
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not (isinstance(level, (int, float)) and 0 < level < 1):
        raise ValueError(f"level must be between 0 and 1 (exclusive), got {level!r}")


def _boot_interval(x: np.ndarray, n_boot: int, seed, level: float) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    # in chunks of about a million draws, so memory stays bounded for a whole layer's neurons; the
    # generator yields the same numbers as one draw of the full array
    rows = max(1, (1 << 20) // x.size)
    means = np.concatenate([x[rng.integers(0, x.size, size=(min(rows, int(n_boot) - i), x.size))].mean(axis=1)
                            for i in range(0, int(n_boot), rows)])
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def bootstrap_mean(values, n_boot: int = 1000, seed=0, level: float = 0.95) -> Interval:
    """Mean of per-neuron ``values`` with a percentile bootstrap interval (resampling neurons).

    ``seed`` is anything ``numpy.random.default_rng`` takes. One value: the interval is that value;
    none: NaN mean and bounds.
    """
    _check_boot(n_boot, level)
    x = _values(values, "values")
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    low, high = _boot_interval(x, n_boot, seed, level)
    return Interval(float(x.mean()), low, high, int(x.size))


def paired_comparison(method_values, baseline_values, n_boot: int = 1000, seed=0, level: float = 0.95,
                      higher_is_better: bool = True, tie_tolerance: float = 1e-9) -> PairedDiff:
    """Per-neuron differences ``method - baseline`` (same neuron order in both): their mean with
    a bootstrap interval, and wins / ties / losses (|difference| <= ``tie_tolerance`` ties)."""
    _check_boot(n_boot, level)
    m = _values(method_values, "method values")
    b = _values(baseline_values, "baseline values")
    if m.shape != b.shape:
        raise ValueError(f"method ({m.size}) and baseline ({b.size}) have different numbers of neurons")
    tol = check_threshold(tie_tolerance, "tie_tolerance")
    d = m - b
    if d.size == 0:
        return PairedDiff(math.nan, math.nan, math.nan, 0, 0, 0, 0)
    better = d if higher_is_better else -d
    wins, losses = int(np.sum(better > tol)), int(np.sum(better < -tol))
    low, high = _boot_interval(d, n_boot, seed, level)
    return PairedDiff(float(d.mean()), low, high, wins, int(d.size) - wins - losses, losses, int(d.size))
