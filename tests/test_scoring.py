"""Scoring beyond the paper's protocol (n2g-method.md section 8b), end to end on a native random
model: a build, then every registered method on the paper, ordinary-text and detection sets."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from n2g_service import methods
from n2g_service.config import EvalConfig, ScanConfig
from n2g_service.evaluate import (
    PAIRED_METRICS,
    TEST_SETS,
    evaluate_workspace,
    format_report,
    format_table,
    heldout_window_ids,
    ordinary_window_ids,
    summarise,
)
from n2g_service.build.request import BuildRequest
from n2g_service.build.runner import run_build
from n2g_service.workspace import Workspace

CFG = EvalConfig(ordinary_windows=200, n_bootstrap=300)
LAYERS = [0, 1]


@pytest.fixture(scope="module")
def built(native_model, native_windows, tmp_path_factory):
    """A workspace with 2 built neurons per layer; the evaluation first without a model (nothing
    stored yet), then with it, then without it again (reading what was stored)."""
    ws = Workspace(tmp_path_factory.mktemp("scoring") / "ws", create=True, model="native", corpus="fortunes")
    ws.save_windows(native_windows)
    req = BuildRequest(layers=LAYERS, sample=2, scan=ScanConfig(k=20, window_tokens=native_windows.shape[1]),
                       eval=CFG)
    keys = run_build(ws, native_model, req)
    ws.close()
    shutil.copytree(ws.path, ws.path.parent / "copy")  # built, nothing scored on ordinary text yet
    before = evaluate_workspace(ws, None, None, CFG)
    events = []
    with_model = evaluate_workspace(ws, native_model, None, CFG, progress=events.append)
    after = evaluate_workspace(ws, None, None, CFG)
    return ws, keys, before, with_model, after, events


def test_report_has_every_method_on_every_test_set(built):
    ws, keys, _, report, _, events = built
    ids = methods.method_ids()
    assert report.methods == list(ids) and report.test_sets == list(TEST_SETS)
    assert set(ids) >= {"n2g_all_paths_max", "n2g_greedy_deepest", "token_lookup", "ngram_lookup"}
    got = {(s.layer, s.neuron, s.method, s.test_set) for s in report.neurons}
    assert got == {(l, n, m, t) for l, n in keys for m in ids for t in TEST_SETS}
    assert {(s.layer, s.method, s.test_set) for s in report.layers} == {(l, m, t) for l in LAYERS for m in ids for t in TEST_SETS}
    for s in report.layers:
        assert s.n_neurons == 2
        for iv in s.metrics.values():  # every mean lies in its interval
            assert iv.n == 0 or iv.low - 1e-9 <= iv.mean <= iv.high + 1e-9
    n2g = [m for m in ids if not methods.get(m).is_baseline]
    expected = {(l, t, metric, m, b) for l in LAYERS for t in TEST_SETS for metric in PAIRED_METRICS[t]
                for m in n2g for b in methods.baseline_ids()}
    assert {(p.layer, p.test_set, p.metric, p.method, p.baseline) for p in report.paired} == expected
    for p in report.paired:
        assert p.diff.wins + p.diff.ties + p.diff.losses == p.diff.n
    assert report.unavailable == {}
    assert report.heldout["size"] == min(CFG.ordinary_windows, ws.window_count() // 2)
    assert events[-1].stage == "done" and events[-1].done == len(keys)


def test_ordinary_windows_never_overlap_training_windows(built, native_windows):
    ws, keys, _, report, _, _ = built
    heldout = heldout_window_ids(ws, CFG)
    assert heldout.size == report.heldout["size"] > 0
    held_rows = {native_windows[i].tobytes() for i in heldout}
    for layer in LAYERS:
        scan = ws.load_layer_scan(layer)
        for l, n in keys:
            if l != layer:
                continue
            # the build's scan left the held-out windows out of every neuron's top windows ...
            assert not np.isin(scan["top_window_ids"][n], heldout).any()
            rec = ws.get_neuron(l, n)
            # ... so no training (or held-out top) example is an ordinary window, by content
            for part in ("train", "test"):
                for e in rec.examples[part]:
                    assert np.asarray(e["token_ids"], np.int64).tobytes() not in held_rows
            # and the ordinary windows it is scored on are the whole held-out set
            assert np.array_equal(ordinary_window_ids(heldout, native_windows, rec.examples, scan["top_window_ids"][n]),
                                  heldout)
            ordinary = report.neuron_metrics(l, n)["ordinary"]
            assert {m["n_tokens"] for m in ordinary.values()} == {heldout.size * (native_windows.shape[1] - 1)}


def test_stored_activations_are_the_neurons_and_serve_without_the_model(built, native_model, native_windows):
    from n2g_service.activations import neuron_activations

    ws, keys, before, report, after, _ = built
    layer, neuron = keys[-1]
    heldout = heldout_window_ids(ws, CFG)
    stored = ws.load_ordinary_activations(layer, [neuron])[neuron]
    assert stored.shape == (heldout.size, native_windows.shape[1])
    rows = native_windows[heldout[:8]]
    true = neuron_activations(native_model, layer, rows, [neuron] * len(rows)).cpu().numpy()
    np.testing.assert_allclose(stored[:8], true, rtol=2e-3, atol=2e-3)  # float16 storage
    # without the model the stored activations give the same report
    assert after.to_dict() == report.to_dict()
    # before anything was stored, only the paper protocol could be scored, and the report says why
    assert {s.test_set for s in before.neurons} == {"paper"}
    assert set(before.unavailable) == {"ordinary", "detection"}
    assert "needs the model" in before.unavailable["ordinary"]
    paper = [s for s in report.neurons if s.test_set == "paper"]
    assert [(s.layer, s.neuron, s.method, s.metrics) for s in before.neurons] == \
        [(s.layer, s.neuron, s.method, s.metrics) for s in paper]


def test_paper_protocol_matches_the_stored_build_metrics(built):
    ws, keys, _, report, _, _ = built
    for l, n in keys:
        stored = ws.get_neuron(l, n).metrics
        for method, m in report.neuron_metrics(l, n)["paper"].items():
            for k in ("precision", "recall", "f1", "n_fires", "n_predicted", "tp"):
                assert m[k] == pytest.approx(stored[method][k])


def test_detection_mixes_top_windows_with_as_many_quiet_ordinary_windows(built):
    ws, keys, _, report, _, _ = built
    for s in report.neurons:
        if s.test_set != "detection":
            continue
        m = s.metrics
        assert m["n_positive"] == len(ws.get_neuron(s.layer, s.neuron).examples["test"]) > 0  # held-out top windows
        assert 0 < m["n_negative"] <= m["n_positive"]
        assert m["balanced_accuracy"] == pytest.approx((m["tpr"] + m["tnr"]) / 2)


def test_text_forms(built):
    ws, keys, _, report, _, _ = built
    text = format_report(report)
    for title in ("paper protocol", "ordinary text", "detection", "paired vs token lookup"):
        assert title in text
    for m in methods.all_methods():
        assert m.title in text
    assert "needs the model" in format_report(built[2])
    rows = [{"layer": l, "neuron": n, "metrics": ws.get_neuron(l, n).metrics} for l, n in keys]
    assert "5-gram lookup" in format_table(summarise(rows)).splitlines()[0]


def test_unbuilt_keys_are_refused(built):
    ws = built[0]
    with pytest.raises(ValueError, match="not built"):
        evaluate_workspace(ws, None, [(0, 10_000)], CFG)


def test_a_read_only_workspace_is_scored_without_writing(built, native_model):
    ws, _, _, report, _, _ = built
    reader = Workspace(ws.path, mode="read")
    assert reader.load_ordinary_activations(0, [n for l, n in ws.built_keys() if l == 0])
    assert evaluate_workspace(reader, None, None, CFG).to_dict() == report.to_dict()
    # built but never scored on ordinary text: with the model, scored in memory, nothing written
    copy = Workspace(ws.path.parent / "copy", mode="read")
    fresh = evaluate_workspace(copy, native_model, None, CFG)
    assert fresh.unavailable == {} and {s.test_set for s in fresh.neurons} == set(TEST_SETS)
    assert all(not copy.load_ordinary_activations(l, [n]) for l, n in copy.built_keys())
    for a, b in zip(fresh.neurons, report.neurons):
        assert (a.layer, a.neuron, a.method, a.test_set) == (b.layer, b.neuron, b.method, b.test_set)
        # the stored activations are float16: a token (or window) at the threshold may flip
        counts = {"n_tokens", "n_fires", "n_predicted", "tp", "fp", "fn", "tn", "n_positive", "n_negative"}
        for k, v in a.metrics.items():
            tol = 2 if k in counts else 0.5 if k == "false_fires_per_1k" else 0.1 if a.test_set == "detection" else 0.02
            assert v == pytest.approx(b.metrics[k], abs=tol), (a.layer, a.neuron, a.method, a.test_set, k)


def test_report_to_dict_is_strict_json(built):
    import json

    report = built[3]
    d = report.to_dict()
    text = json.dumps(d, allow_nan=False)  # an empty interval (NaN) would fail here
    back = json.loads(text)
    assert back["test_sets"] == list(TEST_SETS) and len(back["neurons"]) == len(report.neurons)
    assert {(p["layer"], p["test_set"], p["metric"], p["method"], p["baseline"]) for p in back["paired"]} == \
        {(p.layer, p.test_set, p.metric, p.method, p.baseline) for p in report.paired}


def test_a_workspace_another_writer_holds_is_scored_with_the_passes_it_ran(built, native_model):
    """`n2g eval --compute` beside a running build: the true activations cannot be stored (the
    build holds the writer lock), so they are used for this evaluation instead of failing after
    every forward pass ran; the next evaluation computes them again."""
    ws, _, _, report, _, _ = built
    path = ws.path.parent / "locked"
    shutil.copytree(ws.path.parent / "copy", path)  # built, never scored on ordinary text
    builder = Workspace(path, mode="write", purpose="a build (test)")
    try:
        evaluator = Workspace(path)
        fresh = evaluate_workspace(evaluator, native_model, None, CFG)
        assert fresh.unavailable == {} and {s.test_set for s in fresh.neurons} == set(TEST_SETS)
        assert all(not evaluator.load_ordinary_activations(l, [n]) for l, n in evaluator.built_keys())
        assert len(fresh.neurons) == len(report.neurons)
    finally:
        builder.close()
