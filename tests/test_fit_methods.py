"""Fit methods: the registry, the paper preset against the orchestrator it replaced (byte for
byte), the calibrated fit's stages on hand-made data, and the calibrated fit end to end on a
native random model and on real layer-0 neurons."""

from __future__ import annotations

import dataclasses
import json

import n2g_fast
import numpy as np
import pytest

import fit_paper_reference
from conftest import pick_neurons
from n2g_service.activations import ActivationRunner
from n2g_service.config import FitConfig, ScanConfig
from n2g_service.fit import (
    FitMethod,
    FitResult,
    TrainingPool,
    fit_method,
    fit_methods,
    fit_neurons,
    preset,
    register_fit_method,
    training_pool,
)
from n2g_service.fit.calibrate import (
    Calibration,
    calibrate_paths,
    context_prefixes,
    graded_paths,
    split_labels,
    split_name,
    token_share,
    first_token_activations,
    learn_from_misses,
    measure_tokens,
    prompt_activations,
    select_occurrences,
    select_path_occurrences,
    start_candidates,
    start_paths,
    vocabulary_sweep,
)
from n2g_service.fit.methods import _labels
from n2g_service.fit.pipeline import collect_paths, make_graph, run_paper_stages
from n2g_service.scan import scan_layers

N_PAPER = 16  # top windows per neuron in these tests: 8 train + 8 test


@pytest.fixture(scope="module")
def native_scan(native_model, native_windows):
    return scan_layers(native_model, native_windows, [1], ScanConfig(k=40), progress=False)[1]


@pytest.fixture(scope="module")
def native_setup(native_windows, native_scan):
    neurons = [int(n) for n in np.argsort(-native_scan.max_activation)[:3]]
    top = native_scan.top_window_ids
    train = {n: [native_windows[i] for i in top[n][:8]] for n in neurons}
    test_ids = {n: [int(i) for i in top[n][8:N_PAPER]] for n in neurons}
    amax = {n: float(native_scan.max_activation[n]) for n in neurons}
    heldout = np.arange(0, len(native_windows), 4)
    pool = training_pool(native_windows, top, neurons, N_PAPER, test_ids, heldout)
    return neurons, train, test_ids, amax, heldout, pool


# ---- registry and settings ---------------------------------------------------------------------
def test_registry_and_presets():
    assert {"paper", "calibrated"} <= set(fit_methods())
    assert fit_method("calibrated").uses_pool and not fit_method("paper").uses_pool
    with pytest.raises(ValueError, match="unknown fit method 'nope'.*calibrated.*paper"):
        fit_method("nope")
    assert preset("paper") == FitConfig(method="paper")
    cfg = preset("calibrated", extra_top=3)
    assert cfg.method == "calibrated" and cfg.extra_top == 3
    assert FitConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="already registered"):
        register_fit_method(FitMethod("paper", "again", fit_method("paper").fit))
    with pytest.raises(ValueError, match="calibrate_fire_rate"):
        FitConfig(calibrate_fire_rate=1.5)
    for field in ("extra_top", "start_tokens", "start_vocab", "graded_tokens", "token_contexts",
                  "token_context_length"):
        with pytest.raises(ValueError, match=f"{field}.*>= 0"):
            FitConfig(**{field: -1})
    # every size has a ceiling, every threshold a range: a request cannot ask for a machine's worth
    for field, value, error in (("random_windows", 10 ** 9, "random_windows must be at most 8192"),
                                ("start_vocab", 10 ** 12, "start_vocab must be at most"),
                                ("batch_tokens", 10 ** 9, "batch_tokens must be at most"),
                                ("activation_threshold", -0.1, "activation_threshold must be between 0 and 1"),
                                ("importance_threshold", 1.5, "importance_threshold must be between 0 and 1"),
                                ("sweep_threshold", float("nan"), "sweep_threshold must be between 0 and 1"),
                                ("prune_threshold", float("inf"), "prune_threshold must be a finite number"),
                                ("calibration_seed", -1, "calibration_seed must be 0 or more")):
        with pytest.raises(ValueError, match=error):
            FitConfig(**{field: value})
    assert FitConfig(prune_threshold=2.0).prune_threshold == 2.0  # never prunes: a valid choice
    with pytest.raises(ValueError, match="batch_size must be from 1 to 65536"):
        ScanConfig(batch_size=10 ** 9)


def test_unknown_method_is_refused_before_any_work(native_model):
    with pytest.raises(ValueError, match="unknown fit method"):
        fit_neurons(native_model, 1, [0], {0: []}, {0: 1.0}, FitConfig(method="mystery"))


def test_a_registered_method_runs_through_fit_neurons(native_model, native_setup):
    """The interface: a method made of the pipeline's stages (here: the paper's paths cut to their
    activating token) is fitted, timed and recorded like the built-in ones."""
    neurons, train, _, amax, _, _ = native_setup

    def tokens_only(fr, train, pool, bar, details):
        examples, augmented, _ = run_paper_stages(fr, train, bar)
        paths = collect_paths(fr, examples, augmented)
        bar.update()
        return {n: FitResult(make_graph(fr, n, [(a, [], e) for a, _, e in paths[n]]), {"n": len(paths[n])})
                for n in fr.neurons}

    if "test_tokens_only" not in fit_methods():
        register_fit_method(FitMethod("test_tokens_only", "paper paths without context", tokens_only))
    cfg = preset("test_tokens_only")
    res = fit_neurons(native_model, 1, neurons, train, amax, cfg)
    paper = fit_neurons(native_model, 1, neurons, train, amax, preset("paper"))
    for n in neurons:
        assert res[n].stats["method"] == "test_tokens_only"
        assert res[n].stats["fit_config"] == cfg.to_dict()
        assert res[n].graph.context_labels() == []
        assert sorted(res[n].graph.activating_labels()) == sorted(paper[n].graph.activating_labels())


# ---- paper: the same graphs as before the split ------------------------------------------------
def _same_as_reference(model, layer, neurons, train, amax, cfg, pool=None):
    ref = fit_paper_reference.fit_neurons(model, layer, neurons, train, amax, cfg)
    new = fit_neurons(model, layer, neurons, train, amax, cfg, extra=pool)
    for n in neurons:
        assert new[n].graph.to_bytes() == ref[n].graph.to_bytes()
        volatile = ("seconds", "forward_passes_shared")
        # the one intended difference: the stats list every configured proposer, also with
        # nothing proposed (the reference lists only those that ran: {} for a neuron with none)
        want = {k: v for k, v in ref[n].stats.items() if k not in volatile}
        want["augmented_by_proposer"] = {p: want["augmented_by_proposer"].get(p, {"positive": 0, "negative": 0})
                                         for p in new[n].stats["augmented_by_proposer"]}
        assert set(want["augmented_by_proposer"]) == {"model", "embedding"} & set(cfg.proposers)
        assert {k: v for k, v in new[n].stats.items() if k not in volatile + ("method", "fit_config")} == want
        assert new[n].stats["method"] == "paper" and new[n].stats["fit_config"] == cfg.to_dict()
        assert new[n].extra_train == []
    return new


def test_paper_is_byte_identical_native(native_model, native_setup):
    neurons, train, _, amax, _, pool = native_setup
    res = _same_as_reference(native_model, 1, neurons, train, amax, preset("paper"), pool)  # pool ignored
    assert sum(r.stats["n_paths"] for r in res.values()) > 0
    _same_as_reference(native_model, 1, neurons, train, amax, preset("paper", mask_token="pad", n_substitutes=2))


def test_stats_list_every_configured_proposer(native_model, native_setup):
    """A neuron with nothing augmented reports zero counts per proposer, not an empty mapping."""
    neurons, train, _, amax, _, _ = native_setup
    zero = {"positive": 0, "negative": 0}
    res = fit_neurons(native_model, 1, neurons[:1], train, amax, preset("paper", n_substitutes=0))
    assert res[neurons[0]].stats["augmented_by_proposer"] == {"model": zero, "embedding": zero}
    res = fit_neurons(native_model, 1, neurons[:1], train, amax, preset("paper", proposers=("embedding",)))
    assert list(res[neurons[0]].stats["augmented_by_proposer"]) == ["embedding"]


@pytest.mark.real_model
def test_paper_is_byte_identical_real_layer0(real_model, real_windows, real_scan0):
    neurons = pick_neurons(real_scan0, range(3, 1536, 61), 6)  # test_fit's real neurons
    train = {n: [real_windows[i] for i in real_scan0.top_window_ids[n][:10]] for n in neurons}
    amax = {n: float(real_scan0.max_activation[n]) for n in neurons}
    res = _same_as_reference(real_model, 0, neurons, train, amax, preset("paper", mask_token="pad"))
    assert sum(r.stats["n_augmented_positive"] for r in res.values()) > 0  # augmentation exercised


# ---- calibration on hand-made data -------------------------------------------------------------
def _ids(model, text):
    return model.encode(text)


def test_calibration_on_hand_made_occurrences(native_model):
    """ " cat" fires only after " the" (2 of 6 occurrences): its token path stops firing, END = the
    mean there, and the context " the" is learnt; " dog" fires in 4 of 5 occurrences and had no
    path: it gets one, END the mean of all 5."""
    m = native_model
    label_of, names = _labels(m)
    cat, the, a, dog, sat = (m.label_token_ids(m.token_labels()[_ids(m, s)[0]])
                             for s in (" cat", " the", " a", " dog", " sat"))
    cat_t, the_t, a_t, dog_t, sat_t = cat[0], the[0], a[0], dog[0], sat[0]
    bos = m.bos_id
    rows = [
        ([bos, the_t, cat_t, sat_t], [0, 0.0, 0.9, 0.0]),
        ([bos, the_t, cat_t, sat_t], [0, 0.0, 0.8, 0.0]),
        ([bos, a_t, cat_t, sat_t], [0, 0.0, 0.1, 0.0]),
        ([bos, a_t, cat_t, dog_t], [0, 0.0, 0.1, 0.7]),
        ([bos, sat_t, cat_t, dog_t], [0, 0.0, 0.2, 0.6]),
        ([bos, sat_t, cat_t, dog_t], [0, 0.0, 0.0, 0.8]),
        ([bos, dog_t, sat_t, dog_t], [0, 0.2, 0.0, 0.9]),
    ]
    tokens = np.array([r for r, _ in rows], dtype=np.int64)
    true = np.array([v for _, v in rows], dtype=np.float32)
    valid = np.ones_like(tokens, dtype=bool)
    valid[:, 0] = False
    cfg = FitConfig(calibrate_min_support=4, calibrate_fire_rate=0.4)

    def factory():
        return n2g_fast.NeuronGraph(m.name, 1, 0, m.hook, 1.0)

    lab_cat, lab_the = names[label_of[cat_t]], names[label_of[the_t]]
    paths = [((lab_cat, cat, 0.9), [], 0.9)]  # the paper's path: " cat" alone, END 0.9
    cal = Calibration()
    out = calibrate_paths(paths, tokens, true, valid, factory, cfg, cal)
    assert len(out) == 1 and cal.n_calibrated == 1 and cal.n_stopped_firing == 1
    end = out[0][2]
    assert end < 0.5 and end == pytest.approx(min((0.9 + 0.8 + 0.1 + 0.1 + 0.2 + 0.0) / 6, 0.5), abs=1e-6)
    g = factory()
    for p in out:
        g.add_path(*p)
    predicted = np.asarray(g.predict(tokens))
    learnt = learn_from_misses(predicted, tokens, true, valid, label_of, names, m.label_token_ids,
                               FitConfig(calibrate_min_support=2, calibrate_fire_rate=0.4), cal)
    by_label = {(p[0][0], tuple(None if c is None else c[0] for c in p[1])): p[2] for p in learnt}
    assert by_label[(lab_cat, (lab_the,))] == pytest.approx(0.85)  # context learnt, END the mean there
    assert by_label[(names[label_of[dog_t]], ())] == pytest.approx((0.7 + 0.6 + 0.8 + 0.2 + 0.9) / 5)
    assert cal.n_tokens_learnt == 1 and cal.n_contexts_learnt >= 1
    g2 = factory()
    for p in out + learnt:
        g2.add_path(*p)
    pred = np.asarray(g2.predict(tokens))
    wrong = np.argwhere((pred >= 0.5) != (true >= 0.5))
    assert wrong.tolist() == [[6, 1]]  # the one silent " dog" (first in its window) is all it misses


def test_a_fire_rate_is_measured_on_ordinary_windows(native_model):
    """Top windows are chosen where the neuron fires, so they overstate how often a token fires:
    " cat" fires at its 4 top-window occurrences and at 1 of its 5 ordinary ones. Measured on
    the ordinary windows (fire_rate_from="ordinary") its path stops firing, END their mean, and
    no token path is learnt for it; measured on all (the default) it keeps firing (5 of 9). With fewer
    than calibrate_min_support ordinary matches the path is measured on all windows."""
    m = native_model
    label_of, names = _labels(m)
    cat = m.label_token_ids(m.token_labels()[_ids(m, " cat")[0]])
    sat = m.label_token_ids(m.token_labels()[_ids(m, " sat")[0]])
    bos, c, s_ = m.bos_id, cat[0], sat[0]
    top = [([bos, c, s_], [0, 0.9, 0.0])] * 4
    ordinary_rows = [([bos, c, s_], [0, v, 0.0]) for v in (0.8, 0.1, 0.0, 0.2, 0.1)]
    rows = top + ordinary_rows
    tokens = np.array([r for r, _ in rows], dtype=np.int64)
    true = np.array([v for _, v in rows], dtype=np.float32)
    valid = np.ones_like(tokens, dtype=bool)
    valid[:, 0] = False
    ordinary = valid.copy()
    ordinary[: len(top)] = False
    lab_cat = names[label_of[c]]
    paths = [((lab_cat, cat, 0.9), [], 0.9)]

    def factory():
        return n2g_fast.NeuronGraph(m.name, 1, 0, m.hook, 1.0)

    def calibrated(cfg, ordinary_mask):
        return calibrate_paths(paths, tokens, true, valid, factory, cfg, Calibration(), ordinary_mask)

    assert FitConfig().fire_rate_from == "all"  # the default (see FitConfig)
    cfg = FitConfig(calibrate_min_support=4, calibrate_fire_rate=0.4, fire_rate_from="ordinary")
    [(_, _, end)] = calibrated(cfg, ordinary)
    assert end == pytest.approx((0.8 + 0.1 + 0.0 + 0.2 + 0.1) / 5, abs=1e-6)  # below 0.5: silent
    [(_, _, end_all)] = calibrated(FitConfig(calibrate_min_support=4, fire_rate_from="all"), ordinary)
    assert end_all == pytest.approx(max((4 * 0.9 + 1.2) / 9, 0.5), abs=1e-6)  # fires
    [(_, _, end_few)] = calibrated(FitConfig(calibrate_min_support=6, fire_rate_from="ordinary"), ordinary)  # 5 < 6
    assert end_few == pytest.approx(end_all, abs=1e-6)
    # the " cat" the graph misses in the top windows is not learnt as a token: it rarely fires
    g = factory()
    predicted = np.asarray(g.predict(tokens))
    learnt = learn_from_misses(predicted, tokens, true, valid, label_of, names, m.label_token_ids,
                               cfg, Calibration(), ordinary)
    assert [p for p in learnt if not p[1]] == []
    learnt_all = learn_from_misses(predicted, tokens, true, valid, label_of, names, m.label_token_ids,
                                   FitConfig(calibrate_min_support=4, fire_rate_from="all"), Calibration(), ordinary)
    assert [(p[0][0], p[1]) for p in learnt_all] == [(lab_cat, [])]
    with pytest.raises(ValueError, match="fire_rate_from"):
        FitConfig(fire_rate_from="top")


def test_a_rare_context_path_gets_windows_where_it_matches(native_model):
    """A firing context path [" cat", " the"] that the windows drawn so far never match gets up
    to occurrence_windows windows where " the cat" occurs (never a window drawn, skipped or
    excluded, never " a cat"), drawn the same way for the same seed; a path with enough support,
    a path that cannot fire and max_path_windows=0 get none; max_path_windows caps the total."""
    m = native_model
    cat, the, a, sat = (m.label_token_ids(m.token_labels()[_ids(m, s)[0]])
                        for s in (" cat", " the", " a", " sat"))
    bos = m.bos_id
    the_cat = [bos, the[0], cat[0], sat[0]]
    a_cat = [bos, a[0], cat[0], sat[0]]
    windows = np.array([the_cat] * 12 + [a_cat] * 12 + [[bos, sat[0], sat[0], sat[0]]] * 6, dtype=np.int64)
    the_ids = set(range(12))
    pool = TrainingPool(windows, exclude={7: {0, 1}})
    names = m.token_labels()
    lab = lambda ids: names[ids[0]]  # noqa: E731
    ctx = [((lab(cat), cat, 0.9), [(lab(the), the, 1.0)], 0.9)]

    def factory():
        return n2g_fast.NeuronGraph(m.name, 1, 7, m.hook, 1.0)

    assert FitConfig().max_path_windows == 0  # off by default (see FitConfig)
    cfg = FitConfig(occurrence_windows=4, calibrate_min_support=4, max_path_windows=128)
    drawn, skip = [12, 13, 24], [2]
    got = select_path_occurrences(pool, 7, ctx, drawn, skip, factory, cfg, np.random.default_rng(0))
    assert len(got) == 4 and set(got) <= the_ids - {0, 1, 2} and got == sorted(got)
    assert got == select_path_occurrences(pool, 7, ctx, drawn, skip, factory, cfg, np.random.default_rng(0))
    # enough support among the windows drawn: nothing more
    assert select_path_occurrences(pool, 7, ctx, [3, 4, 5, 6], [], factory, cfg, np.random.default_rng(0)) == []
    silent = [((lab(cat), cat, 0.3), [(lab(the), the, 1.0)], 0.3)]
    assert select_path_occurrences(pool, 7, silent, drawn, skip, factory, cfg, np.random.default_rng(0)) == []
    off = FitConfig(max_path_windows=0)
    assert select_path_occurrences(pool, 7, ctx, drawn, skip, factory, off, np.random.default_rng(0)) == []
    capped = FitConfig(occurrence_windows=4, max_path_windows=3)
    assert len(select_path_occurrences(pool, 7, ctx, drawn, skip, factory, capped, np.random.default_rng(0))) == 3
    with pytest.raises(ValueError, match="max_path_windows"):
        FitConfig(max_path_windows=-1)


def test_graded_paths_on_hand_made_windows(native_model):
    """Graded token paths: a label's mean over its occurrences as a never-firing END (either sign),
    enough support and distance from 0 required, labels that have a token path skipped, most
    variance (count x mean^2) first, at most graded_tokens."""
    m = native_model
    label_of, names = _labels(m)
    cat, the, a, dog, sat = (m.label_token_ids(m.token_labels()[_ids(m, s)[0]])
                             for s in (" cat", " the", " a", " dog", " sat"))
    bos = m.bos_id
    rows = [
        ([bos, the[0], cat[0], sat[0], dog[0]], [0, 0.30, 0.9, -0.10, 0.01]),
        ([bos, the[0], cat[0], sat[0], a[0]], [0, 0.20, 0.7, -0.20, 0.30]),
        ([bos, the[0], sat[0], cat[0], a[0]], [0, 0.25, -0.15, 0.8, 0.20]),
        ([bos, dog[0], the[0], sat[0], dog[0]], [0, 0.00, 0.25, -0.15, 0.02]),
    ]
    tokens = np.array([r for r, _ in rows], dtype=np.int64)
    true = np.array([v for _, v in rows], dtype=np.float32)
    valid = np.ones_like(tokens, dtype=bool)
    valid[:, 0] = False
    lab = {s: names[label_of[t[0]]] for s, t in ((" cat", cat), (" the", the), (" a", a), (" dog", dog), (" sat", sat))}
    cfg = FitConfig(graded_tokens=10, graded_floor=0.05, graded_min_support=3)
    got = graded_paths(tokens, true, valid, label_of, names, m.label_token_ids, set(), cfg)
    ends = {p[0][0]: p[2] for p in got}
    assert all(p[1] == [] for p in got)
    # " the" 4 x .25; " cat" 3 x .8 (kept below the threshold); " sat" 4 x -.15; " a" has 2
    # occurrences (too few), " dog" a mean of .01 (too close to 0)
    assert set(ends) == {lab[" the"], lab[" cat"], lab[" sat"]}
    assert ends[lab[" the"]] == pytest.approx(0.25) and ends[lab[" sat"]] == pytest.approx(-0.15)
    assert 0.49 < ends[lab[" cat"]] < 0.5
    assert [p[0][0] for p in got] == [lab[" cat"], lab[" the"], lab[" sat"]]  # 3 x .64 > 4 x .0625 > 4 x .0225
    two = graded_paths(tokens, true, valid, label_of, names, m.label_token_ids, {lab[" cat"]},
                       FitConfig(graded_tokens=1, graded_floor=0.05, graded_min_support=3))
    assert [p[0][0] for p in two] == [lab[" the"]]  # " cat" has a path already; one at most
    assert graded_paths(tokens, true, valid, label_of, names, m.label_token_ids, set(), FitConfig(graded_tokens=0)) == []


def test_graded_paths_with_a_measured_prior():
    """With graded_prior k > 0 and measured values that the window means follow (a line fitted
    by support), a label seen n times takes (n x mean + k x line) / (n + k), a measured label the
    windows never showed takes the line, labels are ranked by corpus count x END^2; a line that
    falls (or k = 0) leaves the plain means."""
    label_of = np.arange(40)
    names = [f"t{i}" for i in range(40)]
    ids_of = lambda name: [int(name[1:])]  # noqa: E731
    x = np.linspace(0.0, 1.0, 12)  # measured values of labels 1..12
    level = 0.05 + 0.3 * x  # what the windows show: 4 occurrences each, on the line
    rows = [[0] + [lab] * 4 for lab in range(1, 13)]
    vals = [[0.0] + [float(v)] * 4 for v in level]
    rows.append([0, 20, 21, 21, 21])  # label 20 seen once, off the line; 21 not measured, 3 times
    vals.append([0.0, 0.40, 0.2, 0.2, 0.2])
    tokens, true = np.array(rows, dtype=np.int64), np.array(vals, dtype=np.float32)
    valid = np.ones_like(tokens, dtype=bool)
    valid[:, 0] = False
    m_lab = np.array(list(range(1, 13)) + [20, 30], dtype=np.int64)
    m_val = np.concatenate([x, [0.5, 1.2]])  # label 30: measured, never in the windows
    m_count = np.array([10] * 12 + [5, 1000], dtype=np.float64)
    cfg = FitConfig(graded_tokens=100, graded_floor=0.01, graded_min_support=1, graded_prior=2.0)
    got = graded_paths(tokens, true, valid, label_of, names, ids_of, set(), cfg, (m_lab, m_val, m_count))
    ends = {p[0][0]: p[2] for p in got}
    # the line through the measured labels the windows show, weighted by support (label 20 too)
    b, a = np.polyfit(np.append(x, 0.5), np.append(level, 0.40), 1, w=np.sqrt([4.0] * 12 + [1.0]))
    line = lambda v: a + b * v  # noqa: E731
    assert 0.29 < b < 0.31
    assert ends["t30"] == pytest.approx(line(1.2), abs=1e-6)  # never in the windows: the line
    assert ends["t20"] == pytest.approx((1 * 0.40 + 2 * line(0.5)) / 3, abs=1e-6)
    assert ends["t21"] == pytest.approx(0.2)  # not measured: its mean
    for lab, xv, v in zip(range(1, 13), x, level):
        assert ends[f"t{lab}"] == pytest.approx((4 * v + 2 * line(xv)) / 6, abs=1e-6)
    assert got[0][0][0] == "t30"  # 1000 occurrences in the corpus x .41^2 first
    plain = graded_paths(tokens, true, valid, label_of, names, ids_of, set(), FitConfig(graded_tokens=100))
    assert "t30" not in {p[0][0] for p in plain}
    assert {p[0][0]: p[2] for p in plain}["t20"] == pytest.approx(0.40)
    off = graded_paths(tokens, true, valid, label_of, names, ids_of, set(),
                       dataclasses.replace(cfg, graded_prior=0.0), (m_lab, m_val, m_count))
    assert off == plain
    flipped = (m_lab, np.concatenate([x[::-1], [0.5, 1.2]]), m_count)  # the windows fall as it rises
    assert graded_paths(tokens, true, valid, label_of, names, ids_of, set(), cfg, flipped) == plain
    with pytest.raises(ValueError, match="graded_prior"):
        FitConfig(graded_prior=-1.0)


def test_split_labels_decides_per_token_id():
    """A label's ids that fire alone get their own token path; the others keep the label's, below
    the threshold. Hand-made: label "a" = ids 1, 2, 3 (id 1 fires, 2 and 3 do not), label "b" =
    ids 4, 5 (both fire, no token path yet), label "c" = ids 6, 7 (7 fires, "c" also starts a
    context path), label "d" = ids 8, 9 (too few occurrences: nothing changes)."""
    label_of = np.array([0, 1, 1, 1, 2, 2, 3, 3, 4, 4], dtype=np.int64)
    names = ["<s>", "a", "b", "c", "d"]
    groups = {"a": [1, 2, 3], "b": [4, 5], "c": [6, 7], "d": [8, 9]}
    ids_of = lambda name: list(groups.get(name, []))  # noqa: E731
    strings = ["<s>", " a", "A", "a", " b", "b", " c", "C", " d", "d"]
    # id: (occurrences, value): 1 fires at .8 x6; 2 at .1 x5; 3 at .2 x4; 4, 5 at .7 x4;
    # 6 at .1 x4, 7 at .9 x4; 8 at .9 x1, 9 at .1 x1
    occ = [(1, .8, 6), (2, .1, 5), (3, .2, 4), (4, .7, 4), (5, .7, 4), (6, .1, 4), (7, .9, 4), (8, .9, 1), (9, .1, 1)]
    flat = [(i, v) for i, v, k in occ for _ in range(k)]
    tokens = np.array([[0, i] for i, _ in flat], dtype=np.int64)
    true = np.array([[0.0, v] for _, v in flat], dtype=np.float32)
    valid = np.ones_like(tokens, dtype=bool)
    valid[:, 0] = False
    cfg = FitConfig(calibrate_min_support=4, calibrate_fire_rate=0.4, graded_floor=0.01)
    paths = [(("a", [1, 2, 3], 0.6), [], 0.6),  # fires for every id of "a" (wrongly)
             (("c", [6, 7], 0.3), [("x", [9], 1.0)], 0.7),  # a context path at "c"
             (("d", [8, 9], 0.9), [], 0.9)]
    cal = Calibration()
    got = split_labels(paths, tokens, true, valid, None, label_of, names, ids_of, strings, cfg, cal)
    token = {p[0][0]: (sorted(p[0][1]), p[2]) for p in got if not p[1]}
    assert token["a"] == ([1], pytest.approx(0.8))  # the label keeps the id that fires
    assert token['"A"|"a"'] == ([2, 3], pytest.approx((5 * .1 + 4 * .2) / 9))  # the rest, apart, below
    assert token["b"] == ([4, 5], pytest.approx(0.7))  # every id fires: the label does
    assert token['"C"'] == ([7], pytest.approx(0.9))  # "c" starts a context path: 7 goes apart
    assert "c" not in token  # "c" had no token path to keep
    assert token["d"] == ([8, 9], 0.9)  # too few occurrences to decide: unchanged
    assert (("c", [6, 7], 0.3), [("x", [9], 1.0)], 0.7) in got  # context paths stay
    assert cal.n_labels_split == 2 and cal.n_tokens_learnt == 1
    # the graph predicts per id: 1 and 7 fire, 2, 3 and 6 do not, 4 and 5 do
    g = n2g_fast.NeuronGraph("m", 0, 0, "hook", 1.0)
    for p in got:
        g.add_path(*p)
    g.finalize()
    pred = np.asarray(g.predict(np.array([[0, 1, 2, 3, 4, 5, 6, 7]], dtype=np.int64), semantics="all_paths_max"))[0]
    assert list(pred[1:] >= 0.5) == [True, False, False, True, True, False, True]
    # real-context measurements count as occurrences: 4 contexts (id 8 fires, 9 stays low) decide "d"
    measured = (np.array([8, 9]), np.tile([0.9, 0.05], (4, 1)))
    got = split_labels(paths, tokens, true, valid, measured, label_of, names, ids_of, strings, cfg, Calibration())
    token = {p[0][0]: (sorted(p[0][1]), p[2]) for p in got if not p[1]}
    assert token["d"] == ([8], pytest.approx(0.9))
    assert token['"d"'] == ([9], pytest.approx((0.1 + 4 * 0.05) / 5))
    assert split_name([" a"], {'" a"'}) == '" a"' + "'"
    # the gate: how much of the variance over contexts the token explains
    by_token = np.tile(np.linspace(0, 1, 50), (4, 1))  # [4 contexts, 50 tokens], context-free
    assert token_share(by_token) == pytest.approx(1.0)
    by_context = np.tile(np.array([[0.0], [1.0], [0.2], [0.7]]), (1, 50))  # context alone decides
    assert token_share(by_context) == pytest.approx(0.0, abs=1e-12)
    assert token_share(0.5 * by_token + 0.5 * by_context) == pytest.approx(
        1 - by_context.var(axis=0).mean() * 0.25 / (0.5 * by_token + 0.5 * by_context).var())
    assert token_share(np.zeros((4, 3))) == 0.0
    with pytest.raises(ValueError, match="split_min_token_share"):
        FitConfig(split_min_token_share=1.5)


def test_start_paths_on_hand_made_values(native_model):
    """Start paths: a label's value is the count-weighted mean of its ids' first-token
    activations; it fires at >= the threshold; BOS is the context at offset 1 (importance 1); the
    most frequent labels first, at most start_tokens; 0 turns them off."""
    m = native_model
    label_of, names = _labels(m)
    lab = lambda t: names[label_of[t]]  # noqa: E731
    # two ids of one label where there is one (" the" / "the"), else any plain ids
    the = m.label_token_ids(lab(_ids(m, " the")[0]))
    cat, dog, sat = (_ids(m, s)[0] for s in (" cat", " dog", " sat"))
    ids = np.array([cat, dog, sat] + the[:2], dtype=np.int64)
    values = np.array([0.9, 0.3, 0.55] + [0.8, 0.2][: len(the[:2])])
    counts = np.array([5, 50, 20] + [30, 10][: len(the[:2])])
    cfg = FitConfig(start_tokens=10)
    got = start_paths(values, ids, counts, label_of, names, m.label_token_ids, lab(m.bos_id), cfg)
    ends = {p[0][0]: p[2] for p in got}
    the_mean = 0.8 * 30 / 40 + 0.2 * 10 / 40 if len(the) > 1 else 0.8  # .65 if two ids
    assert ends == pytest.approx({lab(cat): 0.9, lab(sat): 0.55, lab(the[0]): the_mean})  # " dog" .3 does not fire
    for (activating, context, end) in got:
        assert activating[1] == m.label_token_ids(activating[0]) and activating[2] == end
        assert context == [(lab(m.bos_id), m.label_token_ids(lab(m.bos_id)), 1.0)]
    assert [p[0][0] for p in got] == [lab(the[0]), lab(sat), lab(cat)]  # 40 (or 30), 20, 5
    one = start_paths(values, ids, counts, label_of, names, m.label_token_ids, lab(m.bos_id), FitConfig(start_tokens=1))
    assert [p[0][0] for p in one] == [lab(the[0])]
    assert start_paths(values, ids, counts, label_of, names, m.label_token_ids, lab(m.bos_id), FitConfig(start_tokens=0)) == []
    # in a graph the path fires at the first token only
    g = n2g_fast.NeuronGraph(m.name, 1, 0, m.hook, 1.0)
    for p in got:
        g.add_path(*p)
    g.finalize()
    pred = np.asarray(g.predict(np.array([[m.bos_id, cat, cat, sat]], dtype=np.int64)))[0]
    assert pred[1] == pytest.approx(0.9) and pred[2] == 0 and pred[3] == 0


def test_start_candidates_and_first_token_activations(native_model, native_windows):
    m = native_model
    pool = TrainingPool(native_windows)
    counts = np.bincount(native_windows[:, 1:].ravel())
    special = m.special_ids()
    ids, c = start_candidates(pool, 6, special)
    assert len(ids) == 6 and not set(ids.tolist()) & set(special)
    np.testing.assert_array_equal(c, counts[ids])
    assert (np.diff(c) <= 0).all()  # most frequent first
    rest = np.setdiff1d(np.flatnonzero(counts), np.concatenate([ids, list(special)]))
    assert counts[rest].max() <= c.min()
    acts = first_token_activations(m, 1, ids, batch_tokens=6)  # several batches
    assert acts.shape == (6, m.d_mlp)
    assert np.shares_memory(first_token_activations(m, 1, ids, batch_tokens=6), acts)  # cached
    direct = ActivationRunner(m, 1).run([[m.bos_id, int(t)] for t in ids], [5] * len(ids))
    np.testing.assert_allclose(acts[:, 5], [a[1] for a in direct], rtol=1e-4, atol=1e-5)
    # longer prompts (real contexts [BOS, context, t]): one row a prefix; the last two calls stay
    # cached
    prefixes = [[m.bos_id, int(ids[0])], [m.bos_id, int(ids[1]), int(ids[2])]]
    in_context = prompt_activations(m, 1, prefixes, ids, batch_tokens=7)
    assert in_context.shape == (2, 6, m.d_mlp)
    for c, p in enumerate(prefixes):
        direct = ActivationRunner(m, 1).run([p + [int(t)] for t in ids], [5] * len(ids))
        np.testing.assert_allclose(in_context[c, :, 5], [a[-1] for a in direct], rtol=1e-4, atol=1e-5)
    assert not np.allclose(in_context[0], in_context[1])
    assert np.shares_memory(first_token_activations(m, 1, ids, batch_tokens=6), acts)
    assert prompt_activations(m, 1, prefixes, ids) is in_context
    with pytest.raises(ValueError, match="at least one prefix"):
        prompt_activations(m, 1, [], ids)
    # measure_tokens: a layer's frequent ids, and the rarer ones measured apart and joined, are the
    # same measurements as one pass over both (first token and prompts, per neuron)
    whole = measure_tokens(m, 1, pool, (0, 9), prefixes, True, batch_tokens=7)
    head = measure_tokens(m, 1, pool, (0, 4), prefixes, True, batch_tokens=7)
    both = head.joined(measure_tokens(m, 1, pool, (4, 9), prefixes, True, batch_tokens=7))
    np.testing.assert_array_equal(both.ids, whole.ids)
    np.testing.assert_array_equal(both.counts, whole.counts)
    np.testing.assert_array_equal(whole.ids[:6], ids)
    for n in (0, 5):
        np.testing.assert_allclose(both.first(n), whole.first(n), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(both.prompts(n), whole.prompts(n), rtol=1e-5, atol=1e-6)
        assert both.prompts(n).shape == (2, 9)
    np.testing.assert_allclose(whole.first(5)[:6], acts[:, 5], rtol=1e-4, atol=1e-5)
    bare = measure_tokens(m, 1, pool, (0, 9), [], False)
    assert bare.first(0) is None and bare.prompts(0) is None and len(bare.ids) == 9
    beyond = measure_tokens(m, 1, pool, (10**6, 2 * 10**6), prefixes, True)  # past the corpus's ids
    assert len(beyond.ids) == 0 and beyond.first(5).shape == (0,) and beyond.prompts(5).shape == (2, 0)
    assert whole.joined(beyond).prompts(5).shape == (2, 9)


def test_context_prefixes_come_from_allowed_windows():
    """The prior's contexts: seeded, of the length asked, and never from a window the evaluation
    holds out or any neuron's test windows (each window's tokens here name it)."""
    n = 60
    windows = np.zeros((n, 9), dtype=np.int64)
    windows[:, 1:] = 1000 * np.arange(n)[:, None] + np.arange(1, 9)
    usable = np.ones(n, dtype=bool)
    usable[::3] = False
    tests = {7: set(range(1, n, 3)), 9: {2, 5}}
    pool = TrainingPool(windows, usable, tests)
    got = context_prefixes(pool, 12, 5, [0, 1, 2])
    assert len(got) == 12 and all(c == [1000 * (c[0] // 1000) + k for k in range(1, 6)] for c in got)
    drawn = [c[0] // 1000 for c in got]
    assert len(set(drawn)) == 12
    assert all(usable[w] and w not in tests[7] and w not in tests[9] for w in drawn)
    assert got == context_prefixes(pool, 12, 5, [0, 1, 2])
    assert got != context_prefixes(pool, 12, 5, [0, 1, 3])
    allowed = [w for w in range(n) if usable[w] and w not in tests[7] and w not in tests[9]]
    every = context_prefixes(pool, 10 * n, 5, [0])
    assert sorted(c[0] // 1000 for c in every) == allowed  # at most every allowed window, once
    assert context_prefixes(pool, 0, 5, [0]) == [] and context_prefixes(pool, 3, 0, [0]) == []


def test_pool_rules(native_windows):
    n = len(native_windows)
    usable = np.ones(n, dtype=bool)
    usable[:10] = False
    pool = TrainingPool(native_windows, usable, {7: {10, 11}}, {7: [3, 10, 12, 12, 13]})
    assert pool.top_windows(7, 5) == [12, 13]  # held out, excluded and repeated ids skipped
    assert not pool.allowed(7)[:12].any() and pool.allowed(8)[10]
    t = int(native_windows[20, 5])
    assert all(t in native_windows[w, 1:] for w in pool.windows_with([t]))
    assert 20 in pool.windows_with([t])
    rng = np.random.default_rng(0)
    got = select_occurrences(pool, 7, [[t]], skip=[20], cfg=FitConfig(occurrence_windows=5), rng=rng)
    assert len(got) <= 5 and all(pool.allowed(7)[w] and w != 20 and t in native_windows[w] for w in got)
    with pytest.raises(ValueError, match="out of range"):
        TrainingPool(native_windows, exclude={1: [n]})
    with pytest.raises(ValueError, match="usable"):
        TrainingPool(native_windows, usable=np.ones(3, dtype=bool))


def test_vocabulary_sweep_is_the_top_of_the_neutral_prompt(native_model):
    m = native_model
    prefix = m.token_id_for(" the")
    values, ids = vocabulary_sweep(m, 1, prefix, 5, batch_tokens=3000)
    assert values.shape == ids.shape == (5, m.d_mlp)
    assert vocabulary_sweep(m, 1, prefix, 5) is vocabulary_sweep(m, 1, prefix, 5)  # cached
    # brute force for two neurons: every token in [BOS, prefix, t]
    seqs = [[m.bos_id, prefix, t] for t in range(m.d_vocab)]
    for n in (3, 100):
        direct = np.array([a[2] for a in ActivationRunner(m, 1, 8192).run(seqs, [n] * len(seqs))])
        order = np.argsort(-direct, kind="stable")[:5]
        np.testing.assert_allclose(values[:, n], direct[order], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(direct[ids[:, n]], values[:, n], rtol=1e-4, atol=1e-5)


# ---- calibrated, end to end --------------------------------------------------------------------
def _check_calibrated(model, layer, neurons, train, test_ids, amax, heldout, pool, res, cfg):
    runner = ActivationRunner(model, layer)
    forbidden = set(int(i) for i in heldout)
    for n in neurons:
        r = res[n]
        st = r.stats
        assert st["method"] == "calibrated" and FitConfig.from_dict(st["fit_config"]) == cfg
        ids = [w for w, _, _ in r.extra_train]
        assert ids == st["extra_train_windows"] and len(set(ids)) == len(ids)
        assert not (set(ids) & forbidden) and not (set(ids) & set(test_ids[n]))  # never held-out or test
        assert st["n_extra_top"] == len(pool.top_windows(n, cfg.extra_top)) > 0
        assert st["n_random_windows"] > 0 and st["n_occurrence_windows"] > 0
        assert st["n_sweep_candidates"] <= cfg.sweep_tokens
        assert len(ids) == st["n_extra_top"] + st["n_random_windows"] + st["n_occurrence_windows"]
        # the activations stored with each window are the neuron's, normalised by a_max
        true = runner.run([t for _, t, _ in r.extra_train], [n] * len(ids))
        for (w, t, a), tr in zip(r.extra_train, true):
            np.testing.assert_array_equal(t, pool.windows[w])
            np.testing.assert_allclose(a, tr / amax[n], atol=1e-4)


def test_calibrated_with_path_windows_and_ordinary_rates(native_model, native_setup):
    """The two off-by-default settings through fit_neurons: the path windows are drawn within the
    cap, counted among the occurrence windows, never held-out or test windows, and stored with
    the neuron's activations like every other window the fit learnt from."""
    neurons, train, test_ids, amax, heldout, pool = native_setup
    cfg = preset("calibrated", extra_top=6, random_windows=40, occurrence_windows=4, max_occurrence_windows=24,
                 graded_tokens=0, fire_rate_from="ordinary", max_path_windows=16)
    res = fit_neurons(native_model, 1, neurons, train, amax, cfg, extra=pool)
    _check_calibrated(native_model, 1, neurons, train, test_ids, amax, heldout, pool, res, cfg)
    drawn = [res[n].stats["n_path_windows"] for n in neurons]
    assert all(0 <= k <= cfg.max_path_windows for k in drawn) and sum(drawn) > 0
    for n in neurons:
        assert res[n].stats["n_path_windows"] <= res[n].stats["n_occurrence_windows"]


def _f1(graph, pairs):
    tok = np.stack([t for t, _ in pairs])
    true = np.stack([a for _, a in pairs])[:, 1:] >= 0.5
    pred = np.asarray(graph.predict(tok))[:, 1:] >= 0.5
    tp = (true & pred).sum()
    return 2 * tp / max(true.sum() + pred.sum(), 1)


def test_calibrated_native_end_to_end(native_model, native_setup):
    neurons, train, test_ids, amax, heldout, pool = native_setup
    cfg = preset("calibrated", extra_top=6, random_windows=40, occurrence_windows=4, max_occurrence_windows=24,
                 graded_tokens=0)
    res = fit_neurons(native_model, 1, neurons, train, amax, cfg, extra=pool, details=True)
    _check_calibrated(native_model, 1, neurons, train, test_ids, amax, heldout, pool, res, cfg)
    for n in neurons:
        assert res[n].stats["n_examples"] == 8 + res[n].stats["n_extra_top"]  # more positives, whole fit
        assert res[n].stats["n_paths_calibrated"] > 0
    # start paths: the labels each neuron fires on as the first token after BOS, measured
    m = native_model
    label_of, names = _labels(m)

    def start_fires(k):
        """Per neuron, {label: its count-weighted value as the first token} for the labels it fires
        on there, over the k most frequent corpus tokens (forward passes of their own)."""
        cand, counts = start_candidates(pool, k, m.special_ids())
        direct = np.stack([np.array([a[1] for a in ActivationRunner(m, 1).run([[m.bos_id, int(t)] for t in cand], [n] * len(cand))])
                           for n in neurons], axis=1)
        out = {}
        for j, n in enumerate(neurons):
            value, weight = {}, {}
            for t, c, a in zip(cand, counts, direct[:, j] / amax[n]):
                lab = names[label_of[t]]
                value[lab] = value.get(lab, 0.0) + c * a
                weight[lab] = weight.get(lab, 0) + c
            out[n] = {lab: value[lab] / weight[lab] for lab in value if value[lab] / weight[lab] >= 0.5}
        return out

    n_start = 0
    for n, fires in start_fires(cfg.start_vocab).items():
        assert res[n].stats["n_start_paths"] == min(len(fires), cfg.start_tokens)
        n_start += len(fires)
        for lab, v in fires.items():
            t = m.label_token_ids(lab)[0]
            p = np.asarray(res[n].graph.predict(np.array([[m.bos_id, t]], dtype=np.int64)))[0, 1]
            assert p >= v - 1e-5
    assert n_start > 0
    # the same call again: the same graphs (seeded sampling)
    again = fit_neurons(native_model, 1, neurons, train, amax, cfg, extra=pool)
    assert all(again[n].graph.to_bytes() == res[n].graph.to_bytes() for n in neurons)
    # graded paths: predictions follow the neuron below the threshold, but never fire more,
    # and the store's search and drawings see only the paths that can fire
    graded = fit_neurons(native_model, 1, neurons, train, amax, dataclasses.replace(cfg, graded_tokens=32),
                         extra=pool)
    store = n2g_fast.GraphStore()
    for n in neurons:
        g0, g1 = res[n].graph, graded[n].graph
        assert graded[n].stats["n_graded_tokens"] > 0
        assert g1.n_paths == g0.n_paths + graded[n].stats["n_graded_tokens"]
        tok = np.stack([t for _, t, _ in graded[n].extra_train])
        p0, p1 = np.asarray(g0.predict(tok)), np.asarray(g1.predict(tok))
        np.testing.assert_array_equal(p1 >= 0.5, p0 >= 0.5)
        assert (p1 != p0).any()
        assert g1.to_svg() == g0.to_svg()
        store.add(g1)
    def roots(g):
        return {r["label"] for r in json.loads(g.to_json())["roots"]}

    firing = {lab for n in neurons for lab in roots(res[n].graph)}
    only_graded = {lab for n in neurons for lab in roots(graded[n].graph)} - firing
    assert only_graded
    assert all(graded[n].graph.activating_labels() == res[n].graph.activating_labels() for n in neurons)
    for lab in sorted(only_graded)[:5]:
        assert store.search([(lab, "activating")]) == []
    # the measured prior (graded_prior, on by default) gives a level to labels that no window the
    # fit learnt from holds; without it every graded label comes from the windows
    def unseen_graded(fitted):
        out = []
        for n in neurons:
            seen = {names[label_of[int(t)]] for w in [*train[n], *(t for _, t, _ in fitted[n].extra_train)] for t in w[1:]}
            out += [lab for lab in roots(fitted[n].graph) - roots(res[n].graph) if lab not in seen]
        return out

    every = dataclasses.replace(cfg, graded_tokens=1000)  # room for every label of the small vocabulary
    assert every.graded_prior > 0 and unseen_graded(fit_neurons(native_model, 1, neurons, train, amax, every, extra=pool))
    plain = fit_neurons(native_model, 1, neurons, train, amax, dataclasses.replace(every, graded_prior=0.0), extra=pool)
    assert unseen_graded(plain) == []
    # split_labels: the neuron's token share is recorded; below split_min_token_share (0.9) no label
    # is split and the graphs are those without it; with the gate at 0 labels split, and every
    # token path on a label holds a part of its ids (a split name holds the rest)
    for n in neurons:
        assert 0.0 <= res[n].stats["token_share"] < cfg.split_min_token_share
        assert res[n].stats["n_labels_split"] == 0
    unsplit = fit_neurons(native_model, 1, neurons, train, amax, dataclasses.replace(cfg, split_labels=False), extra=pool)
    assert all(unsplit[n].graph.to_bytes() == res[n].graph.to_bytes() for n in neurons)
    split = fit_neurons(native_model, 1, neurons, train, amax, dataclasses.replace(cfg, split_min_token_share=0.0),
                        extra=pool)
    assert sum(split[n].stats["n_labels_split"] for n in neurons) > 0
    parts, vocabulary = 0, set(names)
    for n in neurons:
        for r in json.loads(split[n].graph.to_json())["roots"]:
            full = set(m.label_token_ids(r["label"]))
            if r["label"] not in vocabulary:  # a split name: ids of one label, not all of them
                labs = {label_of[t] for t in r["token_ids"]}
                assert len(labs) == 1 and set(r["token_ids"]) < set(m.label_token_ids(names[labs.pop()]))
                parts += 1
            else:
                assert set(r["token_ids"]) <= full
                parts += set(r["token_ids"]) < full
    assert parts > 0
    # the rarer ids (frequency ranks start_vocab..split_vocab) are measured only for the neurons
    # the split runs on; their start paths then come from every id measured
    few = dataclasses.replace(cfg, start_vocab=20, split_vocab=10_000)
    every = len(start_candidates(pool, 10_000, m.special_ids())[0])
    assert every > 20
    gated = fit_neurons(native_model, 1, neurons, train, amax, dataclasses.replace(few, split_min_token_share=0.0),
                        extra=pool)
    ungated = fit_neurons(native_model, 1, neurons, train, amax, few, extra=pool)
    fires_few, fires_every = start_fires(20), start_fires(10_000)
    for n in neurons:
        assert ungated[n].stats["n_tokens_measured"] == 20
        assert ungated[n].stats["n_start_paths"] == min(len(fires_few[n]), cfg.start_tokens)
        assert gated[n].stats["n_tokens_measured"] == every
        assert gated[n].stats["n_start_paths"] == min(len(fires_every[n]), cfg.start_tokens)
    assert sum(map(len, fires_every.values())) > sum(map(len, fires_few.values()))
    # without a pool it is the paper's fit on the training windows, calibrated on them alone
    alone = fit_neurons(native_model, 1, neurons, train, amax, cfg)
    assert all(r.extra_train == [] and r.stats["n_examples"] == 8 for r in alone.values())


def test_fire_rate_follows_each_neurons_f1(native_model, native_setup):
    """fire_rate_f1: each neuron's fire rate is that fraction of the F1 its graph, calibrated at
    calibrate_fire_rate, scores on the windows it learnt from (positions >= 2: BOS is never
    fitted, the first token is measured), at least fire_rate_floor; and its graph is the one a
    fit at that fixed rate makes."""
    neurons, train, test_ids, amax, heldout, pool = native_setup
    assert FitConfig().fire_rate_f1 == 0.5 and FitConfig().fire_rate_floor == 0.3  # the default (see FitConfig)
    cfg = preset("calibrated", extra_top=6, random_windows=40, occurrence_windows=4, max_occurrence_windows=24,
                 graded_tokens=0, fire_rate_f1=0.0)
    fixed = fit_neurons(native_model, 1, neurons, train, amax, cfg, extra=pool)
    own = dataclasses.replace(cfg, fire_rate_f1=0.5, fire_rate_floor=0.05)
    res = fit_neurons(native_model, 1, neurons, train, amax, own, extra=pool)
    runner = ActivationRunner(native_model, 1)
    rates = {}
    for n in neurons:
        assert fixed[n].stats["fire_rate"] == cfg.calibrate_fire_rate
        seen = [(np.asarray(t), a / amax[n]) for t, a in zip(train[n], runner.run(train[n], [n] * len(train[n])))]
        seen += [(t, a) for _, t, a in res[n].extra_train]
        tp = fires = predicted = 0
        for t, a in seen:
            p = np.asarray(fixed[n].graph.predict(t[None]))[0, 2:] >= 0.5
            f = a[2:] >= 0.5
            tp, fires, predicted = tp + int((p & f).sum()), fires + int(f.sum()), predicted + int(p.sum())
        rates[n] = max(0.5 * 2 * tp / max(fires + predicted, 1), own.fire_rate_floor)
        assert res[n].stats["fire_rate"] == pytest.approx(rates[n], abs=1e-4)
    assert any(r != cfg.calibrate_fire_rate for r in rates.values())
    assert any(res[n].graph.to_bytes() != fixed[n].graph.to_bytes() for n in neurons)  # the rate decides
    for rate in set(rates.values()):  # the same neurons at that fixed rate (a group's passes batch together)
        at = fit_neurons(native_model, 1, neurons, train, amax, dataclasses.replace(cfg, calibrate_fire_rate=rate),
                         extra=pool)
        for n in (n for n in neurons if rates[n] == rate):
            assert at[n].graph.to_bytes() == res[n].graph.to_bytes()
    with pytest.raises(ValueError, match="fire_rate_f1"):
        FitConfig(fire_rate_f1=1.5)


@pytest.mark.real_model
def test_calibrated_real_layer0(real_model, real_windows, real_scan0):
    neurons = pick_neurons(real_scan0, range(5, 1536, 97), 3)
    top = real_scan0.top_window_ids
    train = {n: [real_windows[i] for i in top[n][:8]] for n in neurons}
    test_ids = {n: [int(i) for i in top[n][8:N_PAPER]] for n in neurons}
    amax = {n: float(real_scan0.max_activation[n]) for n in neurons}
    heldout = np.arange(1, len(real_windows), 5)
    pool = training_pool(real_windows, top, neurons, N_PAPER, test_ids, heldout)
    cfg = preset("calibrated", extra_top=4, random_windows=32, occurrence_windows=4, max_occurrence_windows=32)
    res = fit_neurons(real_model, 0, neurons, train, amax, cfg, extra=pool)
    _check_calibrated(real_model, 0, neurons, train, test_ids, amax, heldout, pool, res, cfg)
    # at layer 0 the token decides: the neurons pass split_labels' gate, and every corpus token
    # of the pool is measured for them (the slice has fewer than start_vocab + split_vocab ids)
    every = len(np.setdiff1d(np.flatnonzero(pool.token_counts()), real_model.special_ids()))
    for n in neurons:
        assert res[n].stats["token_share"] >= cfg.split_min_token_share
        assert res[n].stats["n_tokens_measured"] == min(every, cfg.split_vocab)
    paper = fit_neurons(real_model, 0, neurons, train, amax, preset("paper"))
    # on the windows it learnt from beyond the paper's, the calibrated graph fits the neuron at
    # least as well as the paper's graph (mean F1 over the neurons)
    cal_f1 = np.mean([_f1(res[n].graph, [(t, a) for _, t, a in res[n].extra_train]) for n in neurons])
    pap_f1 = np.mean([_f1(paper[n].graph, [(t, a) for _, t, a in res[n].extra_train]) for n in neurons])
    assert cal_f1 >= pap_f1
