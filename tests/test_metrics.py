"""The scoring functions (n2g_service.metrics) on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from n2g_service.config import EvalConfig
from n2g_service.metrics import (
    Interval,
    bootstrap_mean,
    check_threshold,
    detection_scores,
    false_fires_per_1k,
    firing_scores,
    paired_comparison,
    pearson,
    window_max,
)


def test_firing_scores_counts_and_threshold_inclusive():
    true = [0.9, 0.5, 0.1, 0.7, 0.0]
    pred = [0.6, 0.2, 0.5, 0.8, 0.49]
    s = firing_scores(true, pred, 0.5)
    # fires: 0, 1, 3; predicted: 0, 2, 3 -> tp 2 (0, 3), fp 1 (2), fn 1 (1)
    assert (s["n_tokens"], s["n_fires"], s["n_predicted"], s["tp"], s["fp"], s["fn"]) == (5, 3, 3, 2, 1, 1)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert firing_scores([0.9], [0.9], 0.9)["f1"] == 1.0  # the threshold itself fires


def test_firing_scores_zero_fire_neuron_counts_as_zero():
    s = firing_scores([0.1, 0.2, 0.3], [0.7, 0.0, 0.0])  # never fires, one false fire
    assert (s["precision"], s["recall"], s["f1"]) == (0.0, 0.0, 0.0)
    assert (s["n_fires"], s["fp"]) == (0, 1)
    s = firing_scores([0.1, 0.2], [0.0, 0.0])  # nothing fires, nothing predicted: 0/0 -> 0
    assert (s["precision"], s["recall"], s["f1"], s["n_predicted"]) == (0.0, 0.0, 0.0, 0)
    s = firing_scores([0.9, 0.8], [0.0, 0.0])  # fires, nothing predicted
    assert (s["precision"], s["recall"], s["fn"]) == (0.0, 0.0, 2)
    assert firing_scores([], [])["n_tokens"] == 0


def test_false_fires_per_1k():
    true = [0.9, 0.1, 0.1, 0.2]
    pred = [0.9, 0.6, 0.0, 0.5]  # predicted fires at 0 (true fire), 1 and 3 (false)
    assert false_fires_per_1k(true, pred) == pytest.approx(500.0)
    assert false_fires_per_1k(true, pred, threshold=0.55) == pytest.approx(250.0)
    assert false_fires_per_1k(np.zeros(2000), np.r_[0.7, np.zeros(1999)]) == pytest.approx(0.5)
    assert false_fires_per_1k([], []) == 0.0


def test_pearson_including_constant_inputs():
    x = np.array([0.0, 0.2, 0.4, 0.9])
    assert pearson(x, 3 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    # constant prediction, constant neuron, both, a single token: defined as 0
    assert pearson(x, np.zeros(4)) == 0.0
    assert pearson(np.full(4, 0.3), x) == 0.0
    assert pearson(np.zeros(3), np.zeros(3)) == 0.0
    assert pearson([0.5], [0.5]) == 0.0
    assert pearson(np.full(5, 0.1, np.float32), np.linspace(0, 1, 5)) == 0.0


def test_window_max_skips_bos():
    assert window_max([np.array([9.0, 0.1, 0.4]), np.array([9.0, 0.7]), np.array([9.0])]).tolist() == [0.4, 0.7, -np.inf]


def test_detection_balanced_accuracy():
    s = detection_scores([0.9, 0.2], [0.1, 0.6, 0.3], 0.5)
    # positives: 1 of 2 detected; negatives: 2 of 3 left alone
    assert (s["tp"], s["tn"], s["n_positive"], s["n_negative"]) == (1, 2, 2, 3)
    assert s["tpr"] == 0.5 and s["tnr"] == pytest.approx(2 / 3)
    assert s["balanced_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert detection_scores([0.5], [0.49])["balanced_accuracy"] == 1.0  # threshold detects
    # a predictor that fires everywhere, or nowhere, is at chance
    assert detection_scores([1, 1], [1, 1, 1])["balanced_accuracy"] == 0.5
    assert detection_scores([0, 0], [0, 0])["balanced_accuracy"] == 0.5
    # one class missing: that class's rate; none: 0
    assert detection_scores([0.9, 0.1], [])["balanced_accuracy"] == 0.5
    assert detection_scores([], [0.1])["balanced_accuracy"] == 1.0
    assert detection_scores([], [])["balanced_accuracy"] == 0.0
    # a window with no scored token (-inf) is never detected
    assert detection_scores([-np.inf], [-np.inf])["balanced_accuracy"] == 0.5


def test_bootstrap_mean_intervals():
    # two neurons 0 and 1: resampled means are 0, .5 or 1 (1/4, 1/2, 1/4): the 95% interval is [0, 1]
    iv = bootstrap_mean([0.0, 1.0], n_boot=4000, seed=0)
    assert (iv.mean, iv.low, iv.high, iv.n) == (0.5, 0.0, 1.0, 2)
    # three neurons 0, 0, 1: P(mean 0) = 8/27, P(mean 1) = 1/27 > 2.5%: interval [0, 1]; at 90%: [0, 2/3]
    iv = bootstrap_mean([0.0, 0.0, 1.0], n_boot=4000, seed=1)
    assert iv.mean == pytest.approx(1 / 3) and (iv.low, iv.high) == (0.0, 1.0)
    iv = bootstrap_mean([0.0, 0.0, 1.0], n_boot=4000, seed=1, level=0.90)
    assert (iv.low, iv.high) == (0.0, pytest.approx(2 / 3))
    assert bootstrap_mean([0.4] * 7, seed=3) == Interval(pytest.approx(0.4), pytest.approx(0.4), pytest.approx(0.4), 7)
    assert bootstrap_mean([0.7]) == Interval(0.7, 0.7, 0.7, 1)
    empty = bootstrap_mean([])
    assert empty.n == 0 and math.isnan(empty.mean) and math.isnan(empty.low) and math.isnan(empty.high)
    vals = np.random.default_rng(5).uniform(size=40)
    a, b = bootstrap_mean(vals, seed=[0, 3]), bootstrap_mean(vals, seed=[0, 3])
    assert a == b  # seeded
    assert vals.min() <= a.low < a.mean < a.high <= vals.max()
    # more neurons, narrower interval
    wide = bootstrap_mean(vals[:10], seed=0)
    assert (a.high - a.low) < (wide.high - wide.low)
    # a whole layer's neurons resample in bounded chunks: the same interval as one full draw
    many = np.random.default_rng(6).uniform(size=5000)
    rng = np.random.default_rng(9)
    means = many[rng.integers(0, many.size, size=(700, many.size))].mean(axis=1)
    iv = bootstrap_mean(many, n_boot=700, seed=9)
    assert (iv.low, iv.high) == tuple(np.quantile(means, [0.025, 0.975]))


def test_paired_comparison():
    method, base = [0.8, 0.5, 0.3, 0.9], [0.6, 0.5, 0.4, 0.9]
    d = paired_comparison(method, base, n_boot=2000, seed=0)
    assert d.mean_diff == pytest.approx(0.025)
    assert (d.wins, d.ties, d.losses, d.n) == (1, 2, 1, 4)
    assert -0.1 <= d.low <= d.mean_diff <= d.high <= 0.2
    lower = paired_comparison(method, base, seed=0, higher_is_better=False)  # e.g. false fires
    assert (lower.wins, lower.ties, lower.losses) == (1, 2, 1) and lower.mean_diff == pytest.approx(0.025)
    lower = paired_comparison([1.0, 3.0], [2.0, 3.0], seed=0, higher_is_better=False)
    assert (lower.wins, lower.ties, lower.losses, lower.mean_diff) == (1, 1, 0, -0.5)
    # every neuron better by the same amount: the interval is that amount
    d = paired_comparison([0.5, 0.7, 0.9], [0.4, 0.6, 0.8], seed=0)
    assert d.low == pytest.approx(0.1) and d.high == pytest.approx(0.1) and d.wins == 3
    assert paired_comparison([0.5], [0.5 + 1e-12]).ties == 1  # within the tie tolerance
    assert paired_comparison([], []).n == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1, "x", None])
def test_bad_thresholds_are_refused(bad):
    with pytest.raises(ValueError, match="threshold"):
        check_threshold(bad)
    with pytest.raises(ValueError, match="threshold"):
        firing_scores([0.1], [0.2], bad)
    with pytest.raises(ValueError, match="threshold"):
        detection_scores([0.1], [0.2], bad)
    with pytest.raises(ValueError, match="threshold"):
        false_fires_per_1k([0.1], [0.2], bad)


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="NaN or infinite"):
        firing_scores([0.1, float("nan")], [0.0, 0.0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        pearson([0.1, 0.2], [0.0, float("inf")])
    with pytest.raises(ValueError, match="differ in length"):
        firing_scores([0.1, 0.2], [0.0])
    with pytest.raises(ValueError, match="different numbers of neurons"):
        paired_comparison([0.1, 0.2], [0.0])
    with pytest.raises(ValueError, match="NaN"):
        detection_scores([float("nan")], [0.1])
    with pytest.raises(ValueError, match="NaN or infinite"):
        bootstrap_mean([0.1, float("nan")])
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_mean([0.1], n_boot=0)
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean([0.1], level=1.0)
    with pytest.raises(ValueError, match="tie_tolerance"):
        paired_comparison([0.1], [0.2], tie_tolerance=-1)


def test_eval_config_validates():
    for bad in (float("nan"), float("inf"), -0.5, 1.01):
        with pytest.raises(ValueError, match="fire_threshold"):
            EvalConfig(fire_threshold=bad)
    with pytest.raises(ValueError, match="ordinary_windows"):
        EvalConfig(ordinary_windows=0)
    for bad in (1.5, 1.0, 1e-12):  # an "interval" of a 1e-12 level is the median, beside the mean
        with pytest.raises(ValueError, match="confidence"):
            EvalConfig(confidence=bad)
    for bad in (0, 1, 2, 99, 10_001):  # with 1 resample the interval of [0, .2, .9, 1] was [.75, .75], mean .525
        with pytest.raises(ValueError, match="n_bootstrap must be from 100"):
            EvalConfig(n_bootstrap=bad)
    for field in ("seed", "heldout_seed"):
        with pytest.raises(ValueError, match="seed"):
            EvalConfig(**{field: -1})
    cfg = EvalConfig.from_dict({"ordinary_windows": 300, "fire_threshold": 0.4})
    assert EvalConfig.from_dict(cfg.to_dict()) == cfg
    assert EvalConfig.from_dict({"n_train": 10, "seed": 0, "fire_threshold": 0.5}) == EvalConfig()  # old dicts
