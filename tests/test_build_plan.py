"""The build plan: layer specs, shards, fit groups, the exact merge of shard top-k (against a
single pass, ties included), request compatibility with stored jobs, the dry run."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import pytest

import n2g_fast
from n2g.layers import parse_layers
from n2g_service.build.plan import fit_groups, shard_ranges
from n2g_service.build.summary import plan_summary
from n2g_service.config import ScanConfig
from n2g_service.build.request import BuildRequest
from n2g_service.build.runner import run_build
from n2g_service.scan import LayerScan, merge_partials
from n2g_service.workspace import BuildStore, Workspace


@pytest.mark.parametrize("spec, n_layers, want", [
    ("all", 30, list(range(30))),
    ("0-5", 30, [0, 1, 2, 3, 4, 5]),
    ("0,2,4-6", 30, [0, 2, 4, 5, 6]),
    ("7 3 3", 30, [3, 7]),
    ([1, "3-4", 0], 30, [0, 1, 3, 4]),
    (29, 30, [29]),
    (["all"], 3, [0, 1, 2]),
])
def test_parse_layers(spec, n_layers, want):
    assert parse_layers(spec, n_layers) == want


@pytest.mark.parametrize("spec, n_layers, error", [
    ("", 30, "no layers"), ([], 30, "no layers"), ("5-2", 30, "end is before"), ("a-b", 30, "bad layer spec"),
    ("0-30", 30, "layer 30 out of range"), ("all", None, "needs the model"), ("-1", 30, "bad layer spec"),
    ("\u0663", 30, "bad layer spec"),  # an Arabic-Indic three is no layer number
    # refused before the range is made, with or without the model's layer count (not a huge set)
    ("0-99999999999999999999999999999", 30, "layer 30 out of range"),
    ("40-99999999999999999999999999999", 30, "layer 40 out of range"),
    ("0-99999999999999999999999999999", None, "layer 4096 out of range"),
])
def test_parse_layers_errors(spec, n_layers, error):
    with pytest.raises(ValueError, match=error):
        parse_layers(spec, n_layers)


def test_shards_and_groups():
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(0, 4) == []
    with pytest.raises(ValueError):
        shard_ranges(10, 0)
    groups = fit_groups([(1, 5), (0, 3), (0, 1), (1, 2), (0, 2), (0, 1)], 2)
    assert [(g.layer, g.neurons) for g in groups] == [(0, (1, 2)), (0, (3,)), (1, (2, 5))]
    assert len({g.unit_id for g in groups}) == 3


def _single_and_sharded(rng, n_windows, tokens, d, k, bounds, integer_scores):
    acts = rng.normal(size=(n_windows, tokens, d)).astype(np.float32)
    if integer_scores:  # many ties, across shards too
        acts = np.round(acts * 2).astype(np.float32)
    ids = np.arange(n_windows, dtype=np.int64)
    single = n2g_fast.TopK(d, k)
    single.update(acts, ids)
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        t = n2g_fast.TopK(d, k)
        for s in range(a, b, 3):  # any batch size
            e = min(s + 3, b)
            t.update(np.ascontiguousarray(acts[s:e]), ids[s:e])
        top_ids, top_scores = t.top()
        parts.append(LayerScan(0, np.asarray(t.max_activation()), np.asarray(top_ids), np.asarray(top_scores)))
    return single, parts


def merge_topk_reference(parts: Sequence[LayerScan], k: int) -> LayerScan:
    """Partial top-k results merged with numpy: best score first, ties to the lower window id (the
    order a single pass over the windows in id order keeps). The reference `merge_partials` (the
    Rust merge) is checked against."""
    if not parts:
        raise ValueError("nothing to merge")
    ids = np.concatenate([p.top_window_ids for p in parts], axis=1)
    scores = np.concatenate([p.top_scores for p in parts], axis=1).astype(np.float32)
    d = ids.shape[0]
    # pads (-1) sort last: give them -inf and the largest id
    key_ids = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    key_scores = np.where(ids < 0, -np.inf, scores)
    out_ids = np.full((d, k), -1, np.int64)
    out_scores = np.full((d, k), -np.inf, np.float32)
    for n in range(d):
        order = np.lexsort((key_ids[n], -key_scores[n]))[:k]
        keep = order[ids[n, order] >= 0]
        out_ids[n, : keep.size] = ids[n, keep]
        out_scores[n, : keep.size] = scores[n, keep]
    amax = np.max(np.stack([p.max_activation for p in parts]), axis=0).astype(np.float32)
    return LayerScan(parts[0].layer, amax, out_ids, out_scores, sum(p.seconds for p in parts))


@pytest.mark.parametrize("seed", range(6))
def test_merge_equals_single_pass(seed):
    """Property: random data, random shard boundaries, shards merged in a random order."""
    rng = np.random.default_rng(seed)
    n, d, k = int(rng.integers(1, 60)), int(rng.integers(1, 40)), int(rng.integers(1, 12))
    cuts = sorted(set(rng.integers(0, n + 1, size=int(rng.integers(0, 6))).tolist()) | {0, n})
    single, parts = _single_and_sharded(rng, n, 4, d, k, cuts, integer_scores=seed % 2 == 0)
    order = rng.permutation(len(parts))
    want_ids, want_scores = single.top()
    merged = merge_partials([parts[i] for i in order], k)
    ref = merge_topk_reference([parts[i] for i in order], k)
    for got in (merged, ref):
        assert np.array_equal(got.top_window_ids, want_ids)
        assert np.array_equal(got.top_scores, want_scores)
        assert np.array_equal(got.max_activation, single.max_activation())


def test_request_round_trip_and_old_requests():
    old = {"layers": [0, 1], "neurons": [3], "sample": None, "seed": 0, "group_size": 8,
           "scan": ScanConfig().to_dict(), "fit": BuildRequest([0]).fit.to_dict(), "eval": BuildRequest([0]).eval.to_dict()}
    req = BuildRequest.from_dict(old)
    assert req.executor == "inprocess" and req.shard_windows == 1024 and req.precision == "float32"
    assert req.to_dict() == old  # a job stored before the plan existed compares equal
    new = BuildRequest(layers="all", sample=4, executor="ray", ray_address="ray://h:10001", workers=2,
                       worker_threads=3, shard_windows=64, precision="bfloat16", group_size=0)
    back = BuildRequest.from_dict(new.to_dict())
    assert back == new and back.to_dict()["layers"] == "all"
    for bad, msg in [(dict(executor="dask"), "unknown executor"), (dict(precision="int8"), "unknown precision"),
                     (dict(shard_windows=0), "shard_windows"), (dict(layers="0-9"), "layer 2 out of range"),
                     (dict(group_size=-1), "group_size")]:
        with pytest.raises(ValueError, match=msg):
            BuildRequest(**{"layers": [0], "neurons": [1], **bad}).validate(2, 128)


def _ws(path, model, windows):
    ws = Workspace(path, create=True, model=model.name, corpus="fortunes", hook=model.hook)
    ws.save_windows(windows)
    return ws


def test_layers_all_plans_every_layer(native_model, native_windows, tmp_path):
    """`layers="all"` plans (and builds) every layer; the scan shards and the fit groups are
    persisted units, and the sharded scan equals one pass over the same windows."""
    from n2g_service.evaluate import heldout_window_ids
    from n2g_service.scan import scan_layers

    windows = native_windows[:150]
    ws = _ws(tmp_path, native_model, windows)
    req = BuildRequest(layers="all", neurons=[5, 9, 60], group_size=2, scan=ScanConfig(k=5, window_tokens=32),
                       shard_windows=40)
    dry = plan_summary(ws, native_model, req)
    assert dry.layers == dry.layers_to_scan == [0, 1] and dry.deepest_layer == 1
    assert dry.scan_shards == 4 and dry.neurons == 6 and dry.fit_groups == 4 and dry.neurons_built == 0
    assert dry.scan_tokens == (150 - dry.excluded_windows) * 32
    assert dry.total_seconds > 0 and set(dry.forward_tokens_per_s) == {0, 1}
    assert "layers        0,1" in dry.format()
    assert BuildStore(ws).plans() == []  # the dry run wrote no plan
    keys = run_build(ws, native_model, req)
    assert keys == [(l, n) for l in (0, 1) for n in (5, 9, 60)]
    store = BuildStore(ws)
    plan_id, = store.plans()
    units = store.units(plan_id)
    assert [u.unit_id for u in units if u.kind == "scan"] == ["scan:0-40", "scan:40-80", "scan:80-120", "scan:120-150"]
    assert sorted(u.spec["layer"] for u in units if u.kind == "fit") == [0, 0, 1, 1]
    assert all(u.state == "done" and u.attempts == 1 for u in units)
    held = heldout_window_ids(ws, req.eval)
    assert held.size > 0
    single = scan_layers(native_model, windows, [0, 1], req.scan, progress=False, exclude=held)
    for l in (0, 1):
        s = ws.load_layer_scan(l)
        assert np.array_equal(s["top_window_ids"], single[l].top_window_ids)
        assert np.array_equal(s["top_scores"], single[l].top_scores)
        assert not np.isin(s["top_window_ids"], held).any()
    after = plan_summary(ws, native_model, req, calibrate=False)
    assert after.scan_shards == 0 and after.fit_groups == 0 and after.neurons_built == 6
    # the same request again: nothing to do, no unit runs twice
    assert run_build(ws, native_model, req) == keys
    assert all(u.attempts == 1 for u in store.units(plan_id))


def test_the_estimate_follows_the_fit_method(native_model, native_windows, tmp_path):
    """The dry run prices a neuron by its fit method (the calibrated fit runs ~7x the paper's
    forward tokens plus passes once a layer), then by the workspace's own neurons built with that
    method: of the same layer, else of the nearest layer."""
    from n2g_service.fit import fit_method, preset

    ws = _ws(tmp_path, native_model, native_windows[:120])

    def req(method, neurons, layers=(0,)):
        return BuildRequest(layers=list(layers), neurons=neurons, group_size=2, fit=preset(method),
                            scan=ScanConfig(k=5, window_tokens=32))

    dry = {m: plan_summary(ws, native_model, req(m, [1, 2, 3])) for m in ("paper", "calibrated")}
    for m, s in dry.items():
        method, rate = fit_method(m), s.forward_tokens_per_s[0]
        once = method.layer_tokens(req(m, [1]).fit, native_model.d_vocab)
        assert s.fit_seconds == pytest.approx((3 * method.fit_tokens_per_neuron + once) / rate)
        assert f"groups of 2, {m} fit" in s.format()
    assert fit_method("paper").layer_tokens(preset("paper"), native_model.d_vocab) == 0
    # the vocabulary sweep [BOS, mask, t], the first-token pass [BOS, t] and the graded prior's
    # passes [BOS, 8 context tokens, t] in 4 contexts over the start_vocab most frequent tokens
    # (8,192: all 1,000 here); the neutral prompt [BOS, mask, t] where there are no contexts
    assert fit_method("calibrated").layer_tokens(preset("calibrated"), 1000) == 3 * 1000 + 2 * 1000 + 4 * 10 * 1000
    neutral = preset("calibrated", token_contexts=0)
    assert fit_method("calibrated").layer_tokens(neutral, 1000) == 3 * 1000 + 2 * 1000 + 3 * 1000
    # the contexts serve split_labels too; with neither, no pass
    assert fit_method("calibrated").layer_tokens(preset("calibrated", graded_prior=0.0), 1000) == 3 * 1000 + 2 * 1000 + 4 * 10 * 1000
    none = preset("calibrated", graded_prior=0.0, split_labels=False)
    assert fit_method("calibrated").layer_tokens(none, 1000) == 3 * 1000 + 2 * 1000
    # at most, the rarer ids up to split_vocab too (measured where a neuron passes the split's gate)
    rarer = preset("calibrated", start_vocab=100, split_vocab=400)
    assert fit_method("calibrated").layer_tokens(rarer, 1000) == 3 * 1000 + (2 + 4 * 10) * 400
    assert fit_method("calibrated").layer_tokens(dataclasses.replace(rarer, split_labels=False), 1000) == 3 * 1000 + (2 + 4 * 10) * 100
    tokens = {m: s.fit_seconds * s.forward_tokens_per_s[0] for m, s in dry.items()}  # free of timing noise
    assert tokens["calibrated"] > 5 * tokens["paper"]

    def recorded(layer, neurons):
        return float(np.median([ws.get_neuron(layer, n).stats["fit_tokens"] for n in neurons]))

    run_build(ws, native_model, req("paper", [1, 2]))
    at0 = recorded(0, [1, 2])
    assert at0 > 0
    after = plan_summary(ws, native_model, req("paper", [1, 2, 3], layers=(0, 1)))
    assert after.neurons_built == 2
    assert after.fit_seconds_per_neuron[0] == pytest.approx(at0 / after.forward_tokens_per_s[0])
    rate = after.forward_tokens_per_s
    assert after.fit_seconds_per_neuron[1] == pytest.approx(at0 / rate[1])  # none there yet: the nearest layer's
    assert after.fit_seconds == pytest.approx(at0 / rate[0] + 3 * at0 / rate[1])
    run_build(ws, native_model, req("paper", [5], layers=(1,)))
    at1 = recorded(1, [5])
    again = plan_summary(ws, native_model, req("paper", [1, 2, 3], layers=(0, 1)), calibrate=False)
    assert again.neurons_built == 2 and again.fit_groups == 3
    # neurons built with another method say nothing about this one's cost
    other = plan_summary(ws, native_model, req("calibrated", [3, 4]))
    once = fit_method("calibrated").layer_tokens(preset("calibrated"), native_model.d_vocab)
    assert other.fit_seconds == pytest.approx((2 * fit_method("calibrated").fit_tokens_per_neuron + once)
                                              / other.forward_tokens_per_s[0])
    own = plan_summary(ws, native_model, req("paper", [7], layers=(0, 1)))
    for l, t in ((0, at0), (1, at1)):
        assert own.fit_seconds_per_neuron[l] == pytest.approx(t / own.forward_tokens_per_s[l])
    assert sorted((l, m) for l, m, t in ws.fit_costs() if t) == [(0, "paper"), (0, "paper"), (1, "paper")]


def test_a_scan_shard_reports_its_batches_and_stops_within_one(native_model, native_windows, tmp_path,
                                                                monkeypatch):
    """Inside a scan shard the build reports its windows batch by batch (partial events, below
    the shard's commit), and a cancel stops it within a batch with nothing of the shard stored;
    the rerun scans it whole and equals one pass."""
    import threading

    import n2g_service.build.runner as runner
    from n2g_service.build.request import BuildCancelled

    monkeypatch.setattr(runner, "PARTIAL_EVENT_EVERY_S", 0.0)
    windows = native_windows[:96]
    req = BuildRequest(layers=[0, 1], neurons=[3], scan=ScanConfig(k=4, window_tokens=32, batch_size=8),
                       shard_windows=48)
    ws = _ws(tmp_path / "a", native_model, windows)
    events = []
    run_build(ws, native_model, req, progress=events.append)
    scan = [e for e in events if e.stage == "scan"]
    partial = [e for e in scan if e.partial]
    assert len(partial) >= 4  # 2 shards of ~24 scanned windows in batches of 8
    assert [e.done for e in scan] == sorted(e.done for e in scan)  # never backwards
    committed = [e.done for e in scan if not e.partial]
    assert committed == [0, 48, 96]
    for e in partial:  # within its own shard's windows
        a, b = map(int, e.message.removeprefix("shard scan:").split("-"))
        assert a < e.done <= b and (e.eta_s is None or e.eta_s >= 0)

    ws2 = _ws(tmp_path / "b", native_model, windows)
    cancel = threading.Event()
    seen = []

    def stop_at_first_batch(ev):
        seen.append(ev)
        if ev.partial:
            cancel.set()

    with pytest.raises(BuildCancelled):
        run_build(ws2, native_model, req, progress=stop_at_first_batch, cancel=cancel)
    assert sum(e.partial for e in seen) == 1  # stopped at the next batch
    plan_id, = BuildStore(ws2).plans()
    assert not any(u.state == "done" for u in BuildStore(ws2).units(plan_id, "scan"))  # nothing committed
    run_build(ws2, native_model, req)
    for l in (0, 1):
        a, b = ws.load_layer_scan(l), ws2.load_layer_scan(l)
        assert np.array_equal(a["top_window_ids"], b["top_window_ids"])
        assert np.array_equal(a["top_scores"], b["top_scores"])


def test_work_sizes_follow_the_device():
    from n2g_service.build.request import device_sizes

    req = BuildRequest(layers=[0], neurons=[1])
    dims = {"d_model": 576, "d_mlp": 1536, "n_heads": 9}
    assert device_sizes(dims, "cpu", None, req) == {"group_size": 8, "batch_tokens": 4096, "scan_batch": 16}
    small = device_sizes(dims, "cuda", 8 * 2**30, req)
    big = device_sizes(dims, "cuda", 70 * 2**30, req)
    assert 64 <= small["group_size"] < big["group_size"] and 4096 < small["batch_tokens"] < big["batch_tokens"]
    assert big["scan_batch"] == 256
    assert device_sizes(dims, "cuda", 70 * 2**30, BuildRequest(layers=[0], neurons=[1], group_size=5))["group_size"] == 5


def test_progress_bars_one_per_stage(capsys):
    """The command line's progress (local and remote builds alike): a bar per stage with its unit,
    lines for the other stages, each job state said once across re-opened watches."""
    from n2g.cli import _progress_printer
    from n2g.types import Job, JobEvent

    job = Job("j", "running", 10, 0, "", 0.0, 0.0, {})
    show = _progress_printer(json_mode=False)
    for ev in (JobEvent(job, "state", 0, 0, "running", None, 0.0), JobEvent(job, "corpus", 0, 1, "tokenising corpus", None, 0.0),
               JobEvent(job, "scan", 0, 300, "3 shards", None, 0.0), JobEvent(job, "scan", 100, 300, "shard scan:0-100", None, 0.0),
               JobEvent(job, "state", 0, 0, "running", None, 0.0), JobEvent(job, "fit", 4, 10, "6 neurons to build", None, 0.0),
               JobEvent(job, "fit", 6, 10, "layer 0: built [3, 4]", None, 0.0)):
        show(ev)
    show.close()
    err = capsys.readouterr().err
    assert err.count("[state] running") == 1 and "[corpus] tokenising corpus" in err
    assert "100/300" in err and "window" in err and "6/10" in err and "neuron" in err


def test_a_neuron_that_never_fires_gets_an_empty_graph(native_model, native_windows):
    """A whole-layer build meets neurons with a_max <= 0: they are stored (finite values, an
    empty graph, no fires), not fitted, and do not stop their group."""
    import n2g_fast
    from n2g_service.activations import layer_activations
    from n2g_service.build.compute import compute_group

    ids = list(range(20))
    recs = compute_group(native_model, 0, [4, 9], native_windows, [-0.25, 1.5], [ids, ids],
                         BuildRequest(layers=[0], neurons=[4, 9]), None)
    dead, live = recs
    g = n2g_fast.NeuronGraph.from_bytes(dead.graph_bytes)
    assert dead.stats["dead"] and g.max_activation == -0.25 and dead.stats["n_paths"] == 0
    assert "dead" not in live.stats
    Workspace.neuron_row(dead)  # storable: every value finite
    # its examples hold raw activations (not divided by a non-positive a_max)
    ex = dead.examples["train"][0]
    raw = layer_activations(native_model, np.array([ex["token_ids"]]), [0])[0][0, :, 4].numpy()
    np.testing.assert_allclose(ex["activations"], raw, atol=1e-5)
