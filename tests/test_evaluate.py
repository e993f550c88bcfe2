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
    np.testing.assert_allclose(token_lookup_predict(table, [BOS, 6, 42, 8]), [0, 0.9, 0, 0.6])  # 42: past the ids seen
    np.testing.assert_array_equal(token_lookup_predict({}, [BOS, 3, 4]), [0, 0, 0])
    np.testing.assert_array_equal(ngram_lookup_predict({}, [BOS, 3, 4]), [0, 0, 0])


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


# ---- the method registry and the held-out ordinary windows (section 8b) ----------------------


def test_registry_keeps_the_paper_methods_and_takes_new_ones():
    from n2g_service import methods

    assert methods.method_ids()[:4] == METHODS
    assert methods.baseline_ids() == ("token_lookup", "ngram_lookup")
    assert methods.get("ngram_lookup").title == "5-gram lookup"
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        methods.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.get("token_lookup"))
    with pytest.raises(ValueError, match="family"):
        methods.Method("x", "x", "other", lambda art: None)

    def constant(art):  # predicts the largest training activation everywhere
        top = max(float(np.max(a[1:])) for _, a in art.train)
        return lambda seqs: [np.r_[0.0, np.full(len(s) - 1, top)].astype(np.float32) for s in seqs]

    methods.register(methods.Method("constant_max", "constant", "baseline", constant))
    try:
        g = n2g_fast.NeuronGraph("m", 0, 0, "mlp.hook_post", 2.0)
        g.add_path(("d", [8], 0.7), [], 0.7)
        g.finalize()
        out = evaluate_neuron(g, TRAIN, [([BOS, 5, 6], [9.0, 0.1, 0.8])], EvalConfig())
        assert out["constant_max"]["n_predicted"] == 2 and out["constant_max"]["tp"] == 1
        assert "constant" in format_table(summarise([{"layer": 0, "neuron": 0, "metrics": out}]))
    finally:
        methods.unregister("constant_max")
    assert "constant_max" not in methods.method_ids()


def test_baselines_predict_batches_like_one_by_one():
    from n2g_service import methods

    art = methods.Artefacts.from_graph(None, TRAIN)
    seqs = np.array([[BOS, 5, 6, 7, 8], [BOS, 6, 6, 9, 8], [BOS, 4, 6, 42, 8]])
    tok = methods.get("token_lookup").make_predictor(art)(seqs)
    ng = methods.get("ngram_lookup").make_predictor(art)(seqs)
    t_table, n_table = token_lookup_fit(TRAIN), ngram_lookup_fit(TRAIN, 5)
    for s, pt, pn in zip(seqs, tok, ng):
        np.testing.assert_array_equal(pt, token_lookup_predict(t_table, s))
        np.testing.assert_array_equal(pn, ngram_lookup_predict(n_table, s, 5))
    np.testing.assert_allclose(ng[1], [0, 0.3, 0.4, 0.0, 0.2], rtol=1e-6)
    np.testing.assert_allclose(tok[2], [0, 0, 0.9, 0, 0.6], rtol=1e-6)  # 4 and 42 unseen
    np.testing.assert_allclose(tok[0], [0, 0.1, 0.9, 0.2, 0.6], rtol=1e-6)


def test_heldout_window_ids_seeded_sample():
    from n2g_service.evaluate import heldout_window_ids

    ids = heldout_window_ids(10_000, EvalConfig())
    assert ids.size == 2000 and np.all(np.diff(ids) > 0) and ids[0] >= 0 and ids[-1] < 10_000
    assert np.array_equal(ids, heldout_window_ids(10_000, EvalConfig()))
    other = heldout_window_ids(10_000, EvalConfig(heldout_seed=1))
    assert not np.array_equal(ids, other)
    assert heldout_window_ids(10_000, EvalConfig(ordinary_windows=300)).size == 300
    assert heldout_window_ids(101, EvalConfig()).size == 50  # at most half of the windows
    assert heldout_window_ids(1, EvalConfig()).size == 0
    with pytest.raises(ValueError, match="n_windows"):
        heldout_window_ids(-1, EvalConfig())


def test_heldout_window_ids_fixed_once_recorded(tmp_path):
    from n2g_service.evaluate import heldout_window_ids
    from n2g_service.workspace import Workspace

    ws = Workspace(tmp_path / "ws", create=True)
    with pytest.raises(ValueError, match="no corpus windows"):
        heldout_window_ids(ws, EvalConfig())
    ws.save_windows(np.arange(400 * 4).reshape(400, 4))
    first = heldout_window_ids(ws, EvalConfig(ordinary_windows=50))
    assert np.array_equal(first, heldout_window_ids(400, EvalConfig(ordinary_windows=50)))
    # a later config cannot move the set: a scan has already left these windows out
    assert np.array_equal(heldout_window_ids(ws, EvalConfig(ordinary_windows=80, heldout_seed=3)), first)
    assert ws.load_heldout_windows()["requested"] == 50


def test_ordinary_window_ids_drop_the_neurons_own_windows():
    from n2g_service.evaluate import ordinary_window_ids

    windows = np.arange(10 * 3).reshape(10, 3)
    heldout = np.array([1, 3, 5, 7, 9])
    examples = {"train": [{"token_ids": windows[3].tolist(), "activations": [0, 1, 0]}],
                "test": [{"token_ids": windows[9].tolist(), "activations": [0, 1, 0]}]}
    assert ordinary_window_ids(heldout, windows, examples).tolist() == [1, 5, 7]
    assert ordinary_window_ids(heldout, windows, examples, scan_top_ids=np.array([5, 2, -1])).tolist() == [1, 7]
    assert ordinary_window_ids(heldout, windows, {}).tolist() == [1, 3, 5, 7, 9]


def _plain_ngram_fit(train, n):
    """The definition, one position at a time: the max per (n preceding tokens, token), BOS left out."""
    table = {}
    for tokens, acts in train:
        for i in range(1, len(tokens)):
            key = tuple(int(t) for t in tokens[max(0, i - n): i + 1])
            table[key] = max(table.get(key, -np.inf), float(acts[i]))
    return table


def test_ngram_lookup_is_exact_when_hashes_collide(monkeypatch):
    """With every multiplier 1 the hash is the sum of the ids, so many keys share it: predictions
    must still be exactly the table's, in the fit (keys grouped) and in the lookup."""
    from n2g_service import methods

    monkeypatch.setattr(methods, "_MULT", np.ones(64, dtype=np.uint64))
    rng = np.random.default_rng(1)
    train = [(np.r_[BOS, rng.integers(2, 9, 11)], rng.uniform(size=12)) for _ in range(8)]
    table = _plain_ngram_fit(train, 2)
    test = np.c_[np.full(60, BOS), rng.integers(2, 9, (60, 11))]
    index = methods._NgramIndex.fit(train, 2)
    assert index.as_dict() == table
    assert index.shared  # the collisions this test is about
    for s, p in zip(test, index.predict(test)):
        want = [0.0] + [table.get(tuple(int(t) for t in s[max(0, i - 2): i + 1]), 0.0) for i in range(1, len(s))]
        np.testing.assert_array_equal(p, np.asarray(want, np.float32))


def test_ngram_lookup_vectorised_equals_the_plain_loop():
    from n2g_service import methods

    rng = np.random.default_rng(0)
    train = [(np.r_[BOS, rng.integers(2, 6, 15)], rng.uniform(size=16)) for _ in range(6)]
    table = _plain_ngram_fit(train, 5)
    assert ngram_lookup_fit(train, 5) == table
    assert token_lookup_fit(train) == {k[0]: v for k, v in _plain_ngram_fit(train, 0).items()}
    test = np.c_[np.full(40, BOS), rng.integers(2, 6, (40, 15))]  # 4 tokens: many repeated keys
    got = methods.get("ngram_lookup").make_predictor(methods.Artefacts.from_graph(None, train))(test)
    hits = 0
    for s, p in zip(test, got):
        want = [0.0] + [table.get(tuple(int(t) for t in s[max(0, i - 5): i + 1]), 0.0) for i in range(1, len(s))]
        np.testing.assert_array_equal(p, np.asarray(want, np.float32))
        hits += int(np.count_nonzero(p))
    assert hits > 0
    # ragged input, one sequence at a time, is the same
    ragged = [test[0][:7], test[1]]
    out = methods.get("ngram_lookup").make_predictor(methods.Artefacts.from_graph(None, train))(ragged)
    np.testing.assert_array_equal(out[0], got[0][:7])
    np.testing.assert_array_equal(out[1], got[1])


def test_layer_means_and_paired_rules_on_hand_scores():
    import json
    import math

    from n2g_service import methods
    from n2g_service.evaluate import EvaluationReport, NeuronScore, format_report, summarise_scores

    def tok(f1, n_fires, ff, r):
        return {"precision": f1, "recall": f1, "f1": f1, "n_fires": n_fires, "false_fires_per_1k": ff,
                "pearson": r, "n_tokens": 100, "n_predicted": 1, "tp": 0, "fp": 0, "fn": 0}

    scores = []
    # neuron 1 fires on ordinary text, neuron 2 never does (its F1 0/0 = 0 is left out of the means)
    for m in methods.method_ids():
        better = 0.2 if m.startswith("n2g") else 0.0
        scores.append(NeuronScore(0, 1, m, "ordinary", tok(0.5 + better, 3, 1.0, 0.3 + better)))
        scores.append(NeuronScore(0, 2, m, "ordinary", tok(0.0, 0, 3.0 - 10 * better, 0.1)))
        scores.append(NeuronScore(0, 3, m, "paper", tok(0.0, 0, 0.0, 0.0)))  # a set where nothing fires
    cfg = EvalConfig(n_bootstrap=200)
    layers, paired = summarise_scores(scores, cfg)
    by = {(s.method, s.test_set): s for s in layers}
    tl = by[("token_lookup", "ordinary")].metrics
    assert (tl["f1"].mean, tl["f1"].n) == (0.5, 1)  # the firing neuron only
    assert (tl["false_fires_per_1k"].mean, tl["false_fires_per_1k"].n) == (2.0, 2)  # every neuron
    assert tl["pearson"].mean == pytest.approx(0.2)
    empty = by[("token_lookup", "paper")].metrics["f1"]
    assert empty.n == 0 and math.isnan(empty.mean)
    p = {(x.method, x.baseline, x.test_set, x.metric): x.diff for x in paired}
    d = p[("n2g_all_paths_max", "token_lookup", "ordinary", "f1")]
    assert (d.mean_diff, d.wins, d.n) == (pytest.approx(0.2), 1, 1)
    ff = p[("n2g_all_paths_max", "token_lookup", "ordinary", "false_fires_per_1k")]
    assert (ff.mean_diff, ff.wins, ff.ties, ff.losses) == (pytest.approx(-1.0), 1, 1, 0)  # fewer false fires win
    assert p[("n2g_greedy_deepest", "ngram_lookup", "paper", "f1")].n == 0
    assert not any(x.method in methods.baseline_ids() for x in paired)  # baselines are not compared
    report = EvaluationReport(cfg, list(methods.method_ids()), ["paper", "ordinary"], scores, layers, paired, {})
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    f1 = [x for x in d["layers"] if x["test_set"] == "paper"][0]["metrics"]["f1"]
    assert f1 == {"mean": None, "low": None, "high": None, "n": 0}
    text = format_report(report)
    assert "ordinary text" in text and "+.20" in text
