"""Evaluation protocol (n2g-method.md section 8): split, baselines, metrics, per-layer table."""

from __future__ import annotations

import numpy as np
import pytest

import n2g_fast
from n2g_service.config import EvalConfig
from n2g_service.evaluate import (
    METHODS,
    evaluate_neuron,
    format_table,
    ngram_lookup_fit,
    ngram_lookup_predict,
    prf,
    split_train_test,
    summarise,
    token_lookup_fit,
    token_lookup_predict,
)


def test_split_is_seeded_per_neuron():
    tr, te = split_train_test(20, 10, seed=0, layer=3, neuron=17)
    assert len(tr) == len(te) == 10 and sorted(tr + te) == list(range(20))
    assert (tr, te) == split_train_test(20, 10, seed=0, layer=3, neuron=17)
    others = {tuple(split_train_test(20, 10, seed=0, layer=3, neuron=n)[0]) for n in range(10)}
    assert len(others) > 5  # neurons get different splits
    assert split_train_test(20, 10, seed=1, layer=3, neuron=17) != (tr, te)
    tr, te = split_train_test(7, 10, seed=0, layer=0, neuron=0)
    assert len(tr) == 4 and len(te) == 3 and sorted(tr + te) == list(range(7))
    tr, te = split_train_test(25, 10, seed=0)
    assert len(tr) == 10 and len(te) == 15


BOS = 1
TRAIN = [
    ([BOS, 5, 6, 7, 8], [9.0, 0.1, 0.9, 0.2, 0.6]),
    ([BOS, 6, 6, 9, 8], [9.0, 0.3, 0.4, 0.0, 0.2]),
]


def test_token_lookup():
    table = token_lookup_fit(TRAIN)
    assert BOS not in table  # BOS never fitted
    assert table == {5: 0.1, 6: pytest.approx(0.9), 7: pytest.approx(0.2), 8: pytest.approx(0.6), 9: 0.0}
    np.testing.assert_allclose(token_lookup_predict(table, [BOS, 6, 42, 8]), [0, 0.9, 0, 0.6])


def test_ngram_lookup():
    table = ngram_lookup_fit(TRAIN, n=5)
    assert table[(BOS, 5, 6)] == pytest.approx(0.9)
    assert table[(BOS, 5, 6, 7, 8)] == pytest.approx(0.6)
    pred = ngram_lookup_predict(table, [BOS, 5, 6, 7, 8], n=5)
    np.testing.assert_allclose(pred, [0, 0.1, 0.9, 0.2, 0.6], rtol=1e-6)
    # a different earlier token changes the key: no match
    np.testing.assert_allclose(ngram_lookup_predict(table, [BOS, 4, 6, 7, 8], n=5), 0)
    # 6 tokens of key: the token and its 5 predecessors
    long_train = [([BOS, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 0, 0, 0, 0.8])]
    t = ngram_lookup_fit(long_train, n=5)
    assert (2, 3, 4, 5, 6, 7) in t
    assert ngram_lookup_predict(t, [BOS, 9, 2, 3, 4, 5, 6, 7], n=5)[-1] == pytest.approx(0.8)


def test_prf_zero_division():
    assert prf(np.array([0.9, 0.1]), np.array([0.6, 0.7])) == {
        "precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "n_fires": 1, "n_predicted": 2,
        "tp": 1, "fp": 1, "fn": 0}
    nothing = prf(np.array([0.1, 0.2]), np.array([0.0, 0.0]))
    assert (nothing["precision"], nothing["recall"], nothing["f1"]) == (0.0, 0.0, 0.0)
    assert prf(np.array([0.5]), np.array([0.5]))["f1"] == 1.0  # >= threshold fires


def test_evaluate_neuron_hand_graph():
    g = n2g_fast.NeuronGraph("m", 0, 0, "mlp.hook_post", 2.0)
    g.add_path(("b", [6], 0.9), [("a", [5], 0.9)], 0.9)  # "b" after "a"
    g.add_path(("d", [8], 0.7), [], 0.7)
    g.finalize()
    test = [([BOS, 5, 6, 6, 8], [9.0, 0.0, 0.8, 0.7, 0.1]), ([BOS, 8, 7], [9.0, 0.6, 0.0])]
    out = evaluate_neuron(g, TRAIN, test, EvalConfig())
    assert set(out) == set(METHODS)
    # true fires (BOS excluded): test0 pos 2, 3; test1 pos 1 -> 3 fires
    n2g = out["n2g_all_paths_max"]  # predicts test0 pos 2 (a b), test0 pos 4 (d), test1 pos 1 (d)
    assert (n2g["n_fires"], n2g["n_predicted"], n2g["tp"]) == (3, 3, 2)
    assert n2g["precision"] == pytest.approx(2 / 3) and n2g["recall"] == pytest.approx(2 / 3)
    tok = out["token_lookup"]  # 6 -> 0.9, 8 -> 0.6: predicts test0 2, 3, 4 and test1 1
    assert (tok["n_predicted"], tok["tp"]) == (4, 3)
    assert out["ngram_lookup"]["n_predicted"] == 1  # only (BOS, 5, 6) is in train
    assert evaluate_neuron(g, TRAIN, [], EvalConfig())["token_lookup"]["f1"] == 0.0


def test_summarise_and_table():
    def m(p, r, f):
        return {"precision": p, "recall": r, "f1": f, "n_fires": 1, "n_predicted": 1}

    rows = [
        {"layer": 0, "neuron": 1, "metrics": {k: m(1.0, 0.5, 0.6) for k in METHODS}},
        {"layer": 0, "neuron": 2, "metrics": {k: m(0.5, 0.5, 0.4) for k in METHODS}},
        {"layer": 3, "neuron": 9, "metrics": {k: m(0.2, 1.0, 0.3) for k in METHODS}},
    ]
    s = summarise(rows)
    assert sorted(s) == [0, 3]
    assert s[0]["token_lookup"]["precision"] == pytest.approx(0.75)
    assert s[0]["token_lookup"]["f1"] == pytest.approx(0.5)  # mean of per-neuron F1
    assert s[0]["token_lookup"]["n_neurons"] == 2
    table = format_table(s)
    lines = table.splitlines()
    assert "N2G (all paths, max)" in lines[0] and "5-gram lookup" in lines[0]
    assert lines[3].split()[:5] == ["0", "2", "|", ".75", ".50"]
    assert lines[4].split()[:5] == ["3", "1", "|", ".20", "1.00"]
