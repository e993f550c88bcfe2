"""n2g_fast phase 1 through the public module: TopK and NeuronGraph, including wrong inputs."""

import json
import multiprocessing as mp
import pickle

import numpy as np
import pytest

import n2g_fast
from n2g_fast import N2GError, NeuronGraph, TopK


# --- helpers ---------------------------------------------------------------------------------


def differing_graph() -> NeuronGraph:
    """a(1) END .2;  a <- b(2) END .3;  a <- IGNORE <- c(3) END .9 (semantics differ on it)."""
    g = NeuronGraph("m", 1, 2, "blocks.1.mlp.hook_post", 3.5)
    g.add_path(("a", [1], 1.0), [], 0.2)
    g.add_path(("a", [1], 1.0), [("b", [2], 0.9)], 0.3)
    g.add_path(("a", [1], 1.0), [None, ("c", [3], 0.9)], 0.9)
    return g


def topk_reference(batches, n, k):
    scores = {j: [] for j in range(n)}
    amax = np.full(n, -np.inf, dtype=np.float32)
    for acts, ids, mask in batches:
        b, t, _ = acts.shape
        for w in range(b):
            sel = np.ones(t, bool) if mask is None else mask[w]
            if not sel.any():
                continue
            m = acts[w][sel].max(axis=0)
            for j in range(n):
                scores[j].append((-m[j], ids[w]))
            amax = np.maximum(amax, m)
    top_ids = np.full((n, k), -1, np.int64)
    top_scores = np.full((n, k), -np.inf, np.float32)
    for j in range(n):
        for r, (s, i) in enumerate(sorted(scores[j])[:k]):
            top_ids[j, r], top_scores[j, r] = i, -s
    return top_ids, top_scores, amax


# --- TopK ------------------------------------------------------------------------------------


def test_topk_matches_brute_force_with_masks_and_ties():
    rng = np.random.default_rng(0)
    n, k = 37, 4
    tk = TopK(n, k)
    assert (tk.n_neurons, tk.k) == (n, k)
    batches = []
    next_id = 0
    for b, t in [(3, 5), (4, 2), (1, 7), (5, 3)]:
        acts = rng.integers(-3, 4, size=(b, t, n)).astype(np.float32)  # ties on purpose
        ids = np.arange(next_id, next_id + b, dtype=np.int64)[::-1].copy()
        next_id += b
        mask = rng.random((b, t)) > 0.3
        mask[0] = False  # a fully masked window is not scored
        tk.update(acts, ids, mask)
        batches.append((acts, ids, mask))
    ids, scores, amax = topk_reference(batches, n, k)
    got_ids, got_scores = tk.top()
    assert got_ids.dtype == np.int64 and got_scores.dtype == np.float32
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_scores, scores)
    np.testing.assert_array_equal(tk.max_activation(), amax)


def test_topk_pads_and_accepts_views_and_lists():
    tk = TopK(3, 5)
    base = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
    tk.update(base[:, ::2, :], [10, 11])  # non-contiguous view, list of ids, no mask
    ids, scores = tk.top()
    assert ids[0].tolist() == [11, 10, -1, -1, -1]
    assert scores[0, 2] == -np.inf
    assert tk.max_activation().tolist() == [18.0, 19.0, 20.0]
    assert np.isneginf(TopK(2).max_activation()).all()
    assert TopK(2).k == 20


@pytest.mark.parametrize(
    "acts, ids, mask, needle",
    [
        (np.zeros((2, 3, 4), np.float64), np.arange(2), None, "float32"),
        (np.zeros((2, 3), np.float32), np.arange(2), None, "2-D"),
        ([[[0.0] * 4]], np.arange(1), None, "numpy array"),
        (np.zeros((2, 3, 5), np.float32), np.arange(2), None, "5 neurons"),
        (np.zeros((2, 3, 4), np.float32), np.arange(3), None, "window_ids has 3"),
        (np.zeros((2, 3, 4), np.float32), np.zeros((2, 1)), None, "window_ids"),
        (np.zeros((2, 3, 4), np.float32), np.arange(2), np.ones((2, 2), bool), "token_mask has shape"),
        (np.zeros((2, 3, 4), np.float32), np.arange(2), np.ones((2, 3), np.int8), "bool"),
    ],
)
def test_topk_refuses_bad_inputs(acts, ids, mask, needle):
    tk = TopK(4, 2)
    with pytest.raises(N2GError, match=needle):
        tk.update(acts, ids, mask)


def test_topk_nan_refused_and_state_unchanged():
    tk = TopK(2, 2)
    acts = np.ones((1, 2, 2), np.float32)
    acts[0, 1, 1] = np.nan
    with pytest.raises(N2GError, match=r"\[0, 1, 1\]"):
        tk.update(acts, np.array([5]))
    assert np.isneginf(tk.max_activation()).all()
    for bad in [(0, 2), (2, 0), (-1, 2)]:
        with pytest.raises(N2GError):
            TopK(*bad)


# --- NeuronGraph: semantics -----------------------------------------------------------------


def test_semantics_differ_and_inputs_forms_agree():
    g = differing_graph()
    seq = [3, 2, 1, 7, 1]
    greedy = [0.0, 0.0, 0.3, 0.0, 0.2]
    allp = [0.0, 0.0, 0.9, 0.0, 0.2]
    forms = [
        [seq],
        (tuple(seq),),
        np.array([seq], dtype=np.int64),
        np.array([seq], dtype=np.int32),
        np.array([seq], dtype=np.uint16),
        [np.array(seq)],
        np.asfortranarray(np.array([seq, seq])),
    ]
    for form in forms:
        out = g.predict(form, "greedy_deepest")
        assert all(o.dtype == np.float32 for o in out)
        np.testing.assert_allclose(out[0], greedy, rtol=0, atol=1e-7)
        np.testing.assert_allclose(g.predict(form)[0], allp, rtol=0, atol=1e-7)


def test_predict_ragged_and_empty():
    g = differing_graph()
    out = g.predict([[1], [], [2, 1, 5]])
    assert [o.tolist() for o in out] == [pytest.approx([0.2]), [], pytest.approx([0.0, 0.3, 0.0])]
    assert g.predict([]) == []
    assert g.predict(np.zeros((2, 0), np.int64))[1].shape == (0,)
    empty = NeuronGraph("m", 0, 0, "h", 1.0)
    assert empty.predict([[1, 2, 3]])[0].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "seqs, kwargs, needle",
    [
        ([[1, -2]], {}, "negative token id -2 at sequence 0, position 1"),
        (np.array([[1, 2], [3, -1]]), {}, "sequence 1, position 1"),
        ([[1, 2**40]], {}, "too large"),
        ([[1, 50]], {"vocab_size": 50}, "out of vocabulary"),
        ([[1]], {"vocab_size": 0}, "vocab_size"),
        (np.array([1, 2, 3]), {}, "2-D"),
        (np.zeros((1, 2), np.float32), {}, "integer"),
        ("hello", {}, "tokenize"),
        (["hello"], {}, "str"),
        ([[1.5]], {}, "sequence of int"),
        (5, {}, "list of token id sequences"),
        ([[1]], {"semantics": "max"}, "semantics must be"),
    ],
)
def test_predict_refuses_bad_inputs(seqs, kwargs, needle):
    with pytest.raises(N2GError, match=needle):
        differing_graph().predict(seqs, **kwargs)


def test_finalize_merges_under_ignore():
    g = NeuronGraph("m", 0, 0, "h", 1.0)
    g.add_path(("a", [1], 1.0), [("x", [2], 0.8), ("y", [3], 0.8)], 0.5)
    g.add_path(("a", [1], 1.0), [("z", [4], 0.8), ("w", [5], 0.9)], 0.6)
    g.add_path(("a", [1], 1.0), [("z", [4], 0.8)], 0.55)
    g.add_path(("a", [1], 1.0), [None, ("y", [6], 0.7)], 0.9)
    g.finalize()
    g.finalize()  # idempotent
    doc = json.loads(g.to_json())
    (root,) = doc["roots"]
    assert [c["label"] for c in root["children"]] == ["z", "<IGNORE>"]  # x dropped (no END)
    ignore = root["children"][1]
    assert [c["label"] for c in ignore["children"]] == ["w", "y"]
    y = ignore["children"][1]
    assert (y["token_ids"], y["end"]) == ([3, 6], pytest.approx(0.9))
    assert g.activating_labels() == ["a"]
    assert g.context_labels() == ["w", "y", "z"]
    assert (g.n_nodes, g.n_paths) == (6, 4)  # a, z, z<-w, IGNORE, IGNORE<-w, IGNORE<-y
    # a path whose END is below the firing threshold (0.5) carries a graded level: predicted,
    # but not among the labels the graph fires on
    g.add_path(("b", [7], 0.3), [("v", [8], 0.9)], 0.3)
    assert g.activating_labels() == ["a"] and g.context_labels() == ["w", "y", "z"]
    assert float(g.predict([[0, 8, 7]])[0][2]) == pytest.approx(0.3)


def test_add_path_refuses_bad_inputs():
    g = NeuronGraph("m", 0, 0, "h", 1.0)
    with pytest.raises(N2GError, match="tuple"):
        g.add_path(("a", [1]), [], 0.5)
    with pytest.raises(N2GError, match=r"activating token_ids\[1\]"):
        g.add_path(("a", [1, -1], 1.0), [], 0.5)
    with pytest.raises(N2GError, match=r"context\[1\]"):
        g.add_path(("a", [1], 1.0), [None, ("b", "x", 0.5)], 0.5)
    with pytest.raises(N2GError, match="finite"):
        g.add_path(("a", [1], 1.0), [], float("nan"))
    with pytest.raises(N2GError, match="label must be a str"):
        g.add_path((3, [1], 1.0), [], 0.5)
    with pytest.raises(N2GError, match="layer"):
        NeuronGraph("m", -1, 0, "h", 1.0)
    with pytest.raises(N2GError, match="finite"):
        NeuronGraph("m", 0, 0, "h", float("inf"))
    with pytest.raises(N2GError):
        g.layer = -3
    assert g.n_paths == 0


def test_attributes_are_settable():
    g = differing_graph()
    g.model, g.layer, g.neuron, g.hook, g.max_activation = "x", 7, 8, "hk", 2.25
    assert (g.model, g.layer, g.neuron, g.hook, g.max_activation) == ("x", 7, 8, "hk", 2.25)
    assert "layer=7" in repr(g)


# --- formats ----------------------------------------------------------------------------------


def test_json_document_and_round_trip():
    g = differing_graph()
    text = g.to_json()
    doc = json.loads(text)
    assert set(doc) == {"schema", "model", "layer", "neuron", "hook", "max_activation", "roots"}
    assert doc["schema"] == n2g_fast.GRAPH_SCHEMA == "n2g.graph/v1"
    (root,) = doc["roots"]
    assert set(root) == {"label", "token_ids", "ignore", "importance", "activation", "end", "children"}
    assert (root["importance"], root["activation"], root["end"]) == (1.0, 1.0, pytest.approx(0.2))
    ig = root["children"][1]
    assert (ig["label"], ig["token_ids"], ig["ignore"], ig["activation"]) == ("<IGNORE>", [], True, None)
    back = NeuronGraph.from_json(text)
    assert back == g and back.to_json() == text


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d.update(schema="n2g.graph/v0"), "schema"),
        (lambda d: d.pop("hook"), "missing field"),
        (lambda d: d.update(extra=1), "unknown field"),
        (lambda d: d["roots"][0].update(activation=None), "numeric activation"),
        (lambda d: d["roots"][0].update(ignore=True), "cannot be IGNORE"),
        (lambda d: d["roots"][0]["children"][0].update(activation=0.3), "activation null"),
        (lambda d: d["roots"][0]["children"][0].update(end=None), "leaf without END"),
        (lambda d: d["roots"].append(dict(d["roots"][0])), "repeat label"),
        (lambda d: d["roots"][0].update(token_ids=[-1]), "invalid value"),
        (lambda d: d["roots"][0]["children"][1].update(label="*", token_ids=[4]), "must have no token_ids"),
        (lambda d: d["roots"][0]["children"][1].update(label="*", end=0.5), "end null"),
    ],
)
def test_json_refusals(mutate, needle):
    doc = json.loads(differing_graph().to_json())
    mutate(doc)
    with pytest.raises(N2GError, match=needle):
        NeuronGraph.from_json(json.dumps(doc))


@pytest.mark.parametrize("label", ["*", "", "IGNORE", "b"])
def test_json_ignore_node_with_another_label_is_read_as_ignore(label):
    # The schema marks IGNORE by "ignore": true; other tools may write their own label.
    g = differing_graph()
    text = g.to_json()
    doc = json.loads(text)
    ig = doc["roots"][0]["children"][1]
    assert ig["ignore"] is True
    ig["label"] = label
    back = NeuronGraph.from_json(json.dumps(doc))
    assert back == g and back.to_json() == text
    assert back.predict([[3, 9, 1]], "all_paths_max")[0].tolist() == pytest.approx([0, 0, 0.9])


def test_json_reading_reapplies_the_ignore_merge():
    # a <- b <- c and a <- IGNORE <- d: finalize copies c under the IGNORE and drops b (no END).
    # A document with b kept and c not copied (another tool's output) reads as that canonical graph.
    g = NeuronGraph("m", 1, 2, "h", 3.5)
    g.add_path(("a", [1], 1.0), [("b", [2], 0.8), ("c", [3], 0.9)], 0.7)
    g.add_path(("a", [1], 1.0), [None, ("d", [4], 0.9)], 0.6)
    text = g.to_json()
    doc = json.loads(text)
    (ig,) = doc["roots"][0]["children"]
    assert ig["ignore"] and [c["label"] for c in ig["children"]] == ["c", "d"]
    c = ig["children"].pop(0)
    b = {"label": "b", "token_ids": [2], "ignore": False, "importance": 0.8, "activation": None, "end": None}
    doc["roots"][0]["children"].insert(0, {**b, "children": [c]})
    back = NeuronGraph.from_json(json.dumps(doc))
    assert back == g and back.to_json() == text
    assert back.predict([[3, 9, 1]])[0].tolist() == pytest.approx([0, 0, 0.7])


def test_json_not_json():
    with pytest.raises(N2GError, match="invalid graph JSON"):
        NeuronGraph.from_json("{not json")


def test_bytes_round_trip_and_corruption():
    g = differing_graph()
    data = g.to_bytes()
    assert data[:4] == b"N2GG"
    assert NeuronGraph.from_bytes(data) == g
    assert NeuronGraph.from_bytes(bytearray(data)) == g
    for cut in (0, 3, 15, len(data) - 1):
        with pytest.raises(N2GError, match="truncated|magic"):
            NeuronGraph.from_bytes(data[:cut])
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    with pytest.raises(N2GError, match="checksum"):
        NeuronGraph.from_bytes(bytes(flipped))
    newer = bytearray(data)
    newer[4] = 9
    with pytest.raises(N2GError, match="version 9"):
        NeuronGraph.from_bytes(bytes(newer))
    with pytest.raises(N2GError, match="extra bytes"):
        NeuronGraph.from_bytes(data + b"\0")


def test_pickle_round_trip():
    g = differing_graph()
    assert pickle.loads(pickle.dumps(g)) == g
    assert g != differing_graph().__class__("m", 1, 2, "other", 3.5)


def test_render_dot_and_svg():
    g = NeuronGraph("m", 3, 4, "h", 1.0)
    g.add_path((" <b>", [1], 0.9), [("x y", [2], 0.9), None, ("\n", [3], 0.8)], 0.9)
    dot = g.to_dot()
    assert "rankdir=RL" in dot and "IGNORE" not in dot
    assert 'label="·<b>"' in dot and 'label="x·y"' in dot and 'label="⏎"' in dot
    svg = g.to_svg()
    assert svg.startswith("<svg") and "&lt;b&gt;" in svg and "<b>" not in svg
    import xml.dom.minidom

    xml.dom.minidom.parseString(svg)  # well-formed


def test_a_drawing_holds_at_most_64_activating_labels():
    """A neuron that fires on hundreds of first tokens: the 64 highest are drawn, with the BOS
    context they hang from, and the title says how many were left out; predictions keep all."""
    import xml.dom.minidom

    g = NeuronGraph("m", 1, 2, "h", 1.0)
    n = 100
    for i in range(n):
        v = 0.5 + 0.4 * i / n
        g.add_path((f"t{i:03}", [10 + i], v), [("<bos>", [1], 1.0)], v)
    g.finalize()
    svg, dot = g.to_svg(), g.to_dot()
    assert "64 of 100 activating tokens drawn" in svg and "64 of 100 activating tokens drawn" in dot
    assert "t099" in svg and "t035" not in svg and "t036" in svg and "&lt;bos&gt;" in svg
    xml.dom.minidom.parseString(svg)
    assert len(g.activating_labels()) == n
    assert g.predict(np.array([[1, 10]]))[0][1] == pytest.approx(0.5)


# --- fork safety -------------------------------------------------------------------------------


def _predict_in_child(data: bytes) -> list:
    g = NeuronGraph.from_bytes(data)
    tk = TopK(4, 2)
    tk.update(np.ones((2, 3, 4), np.float32), np.arange(2))
    return g.predict(np.array([[3, 2, 1]]))[0].tolist()


def test_fork_after_batch_call_does_not_deadlock():
    g = differing_graph()
    tk = TopK(300, 3)
    tk.update(np.random.default_rng(1).random((8, 16, 300), dtype=np.float32), np.arange(8))
    g.predict(np.ones((64, 64), np.int64))  # the thread pool now exists in the parent
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        res = pool.map_async(_predict_in_child, [g.to_bytes()] * 4).get(timeout=60)
    assert res == [pytest.approx([0.0, 0.0, 0.9])] * 4
