"""n2g_fast phase 1 through the public module: TopK and NeuronGraph, including wrong inputs."""

import json
import math
import multiprocessing as mp
import os
import pickle
import random
import struct
import subprocess
import sys
import threading
import zlib

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
    with pytest.raises(N2GError, match="label is not valid Unicode text .*lone surrogate"):
        g.add_path(("a", [1], 1.0), [("b\ud800", [2], 0.5)], 0.5)
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


def test_graphviz_draws_each_label_as_shown_and_the_title_once():
    """Graphviz decodes HTML entities in plain labels ("&amp;" drew "&", "&#x202e;" a raw RLO,
    "&#10;" a line break), each column's cluster inherited the graph's label (the title was
    drawn once per depth), and a NUL in the model name (a graph read from JSON) was a syntax error."""
    labels = ["&amp;", "&nbsp;", "&#x202e;x", "a&#10;b", "&lt;b&gt;", "\\N\\", '"&"']
    g = NeuronGraph("m\x00", 0, 0, "h", 1.0)
    for i, label in enumerate(labels):
        g.add_path((label, [i], 0.9), [("c&", [100], 0.9)], 0.9)
    out = subprocess.run(["dot", "-Tjson"], input=g.to_dot().encode(), capture_output=True, check=True).stdout
    doc = json.loads(out)
    drawn = [op["text"] for o in [doc, *doc.get("objects", [])] for op in o.get("_ldraw_", []) if op["op"] == "T"]
    title = [t for t in drawn if t.startswith("m\ufffd · layer 0")]
    assert len(title) == 1, drawn
    assert sorted(t for t in drawn if t not in title) == sorted(map(n2g_fast.visible, [*labels, "c&"]))


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


# --- robustness (fuzzing probe) ------------------------------------------------------------------


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter: a crash there (abort, segfault) fails the test, not the run."""
    prelude = "import numpy as np, n2g_fast as nf\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RUST_BACKTRACE": "0"})


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def encode_blob(nodes, n_roots, labels, finalized=True) -> bytes:
    """An N2GG v1 blob (format.rs docs) with any trie, merged or not: `nodes` breadth-first as
    (label or None for IGNORE, value, end or None, ids, n_children)."""
    s = lambda x: _varint(len(x.encode())) + x.encode()  # noqa: E731
    body = s("m") + _varint(0) + _varint(0) + s("h") + struct.pack("<d", 1.0)
    body += _varint(len(labels)) + b"".join(s(lab) for lab in labels) + _varint(len(nodes)) + _varint(n_roots)
    for label, value, end, ids, n_children in nodes:
        body += bytes([(label is None) | ((end is not None) << 1)])
        body += b"" if label is None else _varint(labels.index(label))
        body += struct.pack("<f", value) + (b"" if end is None else struct.pack("<f", end))
        body += _varint(len(ids)) + b"".join(_varint(t if i == 0 else t - ids[i - 1] - 1) for i, t in enumerate(ids))
        body += _varint(n_children)
    head = b"N2GG" + struct.pack("<HHI", 1, int(finalized), len(body))
    return head + struct.pack("<I", zlib.crc32(head + body)) + body


def _exponential_doc(n: int) -> str:
    """a <- x1 <- ... <- xn, each x_i with an END and an IGNORE sibling leading to y: 3n + 1 nodes
    whose IGNORE merge would make about 3 * 2**n."""
    def node(label, ids, end, children, ignore=False, root=False):
        return {"label": label, "token_ids": ids, "ignore": ignore, "importance": 0.9,
                "activation": 1.0 if root else None, "end": end, "children": children}
    sub = []
    for i in range(n, 0, -1):
        sub = [node(f"x{i}", [i], 0.9, sub), node("<IGNORE>", [], None, [node("y", [999], 0.8, [])], ignore=True)]
    return json.dumps({"schema": "n2g.graph/v1", "model": "m", "layer": 0, "neuron": 0, "hook": "h",
                       "max_activation": 1.0, "roots": [node("a", [0], 0.9, sub, root=True)]})


def test_finalize_refuses_exponential_growth():
    # An 11 KB document would need ~100M nodes (tens of GB) once merged.
    with pytest.raises(N2GError, match="would need more than 1000000 nodes"):
        NeuronGraph.from_json(_exponential_doc(25))
    assert NeuronGraph.from_json(_exponential_doc(8)).n_nodes == 3 * 2**8 - 2  # small ones still merge
    # Built path by path: reading the trie raises, and leaves the graph as it was.
    g = NeuronGraph("m", 0, 0, "h", 1.0)
    for i in range(1, 26):
        ctx = [(f"x{j}", [j], 0.9) for j in range(1, i + 1)]
        g.add_path(("a", [0], 1.0), ctx, 0.9)
        g.add_path(("a", [0], 1.0), ctx[:-1] + [None, ("y", [999], 0.9)], 0.8)
    for read in (g.finalize, lambda: g.n_nodes, g.to_bytes, lambda: g.predict([[1, 0]])):
        with pytest.raises(N2GError, match="would need more than"):
            read()


def test_finalize_refusal_from_bytes_and_store():
    # The same exponential trie as a blob not flagged finalized (one flagged so is taken as
    # merged, and read as it is). Breadth-first: a; x1 IG1; x2 IG2 y; x3 IG3 y; ...; xn IGn y; y.
    n = 22
    x = lambda i: (f"x{i}", 0.9, 0.9, [i], 2 if i < n else 0)  # noqa: E731
    ig, y = (None, 0.0, None, [], 1), ("y", 0.9, 0.8, [999], 0)
    bfs = [("a", 1.0, 0.9, [0], 2), x(1), ig]
    for i in range(2, n + 1):
        bfs += [x(i), ig, y]
    bfs.append(y)
    labels = ["a", "y"] + [f"x{i}" for i in range(1, n + 1)]
    blob = encode_blob(bfs, 1, labels, finalized=False)
    with pytest.raises(N2GError, match="would need more than"):
        NeuronGraph.from_bytes(blob).n_nodes
    with pytest.raises(N2GError, match="blob 0: .*would need more than"):
        n2g_fast.GraphStore.from_bytes_list([blob])
    assert NeuronGraph.from_bytes(encode_blob(bfs, 1, labels, finalized=True)).n_nodes == len(bfs)


def test_add_path_reentrant_calls_do_not_panic():
    g = NeuronGraph("m", 0, 0, "h", 1.0)
    g.add_path(("a", [1], 1.0), [], 0.9)
    seen = []

    def context():
        seen.append(g.predict([[2, 1]])[0].tolist())  # uses the graph while add_path reads its arguments
        yield ("b", [2], 0.5)

    class Value:
        def __float__(self):
            seen.append(len(pickle.dumps(g)) > 0)
            return 0.5

    g.add_path(("a", [1], 1.0), context(), 0.7)
    g.add_path(("a", [1], Value()), [], 0.9)
    assert seen[0] == pytest.approx([0.0, 0.9]) and seen[1] is True
    assert g.predict([[2, 1]])[0].tolist() == pytest.approx([0.0, 0.9])


def test_add_path_with_a_generator_while_another_thread_predicts():
    g = NeuronGraph("m", 0, 0, "h", 1.0)
    g.add_path(("a", [1], 1.0), [], 0.9)
    errors, stop = [], threading.Event()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def reader():
        while not stop.is_set():
            try:
                g.predict([[1, 2, 3]])
            except BaseException as e:  # noqa: BLE001 - a PanicException is a BaseException
                errors.append(e)
                return

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(300):
            g.add_path(("a", [1], 1.0), ((f"c{j}", [j], 0.5) for j in range(i % 20)), 0.7)
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    assert errors == []


def test_json_round_trips_awkward_doubles():
    rng = random.Random(0)
    values = [4.0745362639427185e-10, 5e-324, 1.7976931348623157e308, 0.1 + 0.2]
    while len(values) < 300:
        v = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        if math.isfinite(v):
            values.append(v)
    for v in values:
        g = NeuronGraph("m", 0, 0, "h", v)
        g.add_path(("a", [1], rng.random()), [("b", [2], rng.random())], rng.random())
        back = NeuronGraph.from_json(g.to_json())
        assert back.max_activation == v and back == g, v


def test_deep_refused_json_on_a_small_thread_stack():
    code = r'''
import threading
n = 2048
def doc(schema, root_ignore):
    head = "".join('{"label":"c%d","token_ids":%s,"ignore":%s,"importance":0.5,"activation":%s,"end":null,"children":['
                   % (i, "[]" if (i == 0 and root_ignore) else "[1]", "true" if (i == 0 and root_ignore) else "false",
                      "1.0" if i == 0 else "null") for i in range(n - 1))
    leaf = '{"label":"z","token_ids":[1],"ignore":false,"importance":0.5,"activation":null,"end":0.5,"children":[]}'
    return ('{"schema":"%s","model":"m","layer":0,"neuron":0,"hook":"h","max_activation":1.0,"roots":[' % schema
            + head + leaf + "]}" * (n - 1) + "]}")
out = []
def run():
    for text in (doc("n2g.graph/v9", False), doc("n2g.graph/v1", True), doc("n2g.graph/v1", False)[:-40] + "x"):
        try:
            nf.NeuronGraph.from_json(text)
            out.append("accepted")
        except nf.N2GError:
            out.append("refused")
    out.append(nf.NeuronGraph.from_json(doc("n2g.graph/v1", False)).n_nodes)
threading.stack_size(128 * 1024)
t = threading.Thread(target=run)
t.start()
t.join()
print(out)
'''
    p = _run_isolated(code)
    assert p.returncode == 0 and p.stdout.strip() == "['refused', 'refused', 'refused', 2048]", (p.returncode, p.stdout, p.stderr[-500:])


def test_topk_too_large_is_a_clean_error():
    p = _run_isolated("""
try:
    nf.TopK(2**34, 1)
except nf.N2GError as e:
    print("refused:", e)
""")
    assert p.returncode == 0 and "too large" in p.stdout, (p.returncode, p.stdout, p.stderr[-500:])


@pytest.mark.parametrize("call", [
    "g.predict(np.empty((2**40, 0), np.int64))",
    "g.predict(np.broadcast_to(np.int64(1), (10**6, 10**6)))",
    "g.predict([np.broadcast_to(np.int64(1), (10**12,))])",
    "nf.TopK(2, 1).update(np.broadcast_to(np.float32(0), (10**6, 10**6, 2)), np.arange(10**6))",
    "nf.TopK(2, 1).update_window_max(np.zeros((1, 2), np.float32), np.broadcast_to(np.int64(0), (10**12,)))",
])
def test_huge_logical_arrays_are_clean_errors(call):
    p = _run_isolated(f"""
g = nf.NeuronGraph('m', 0, 0, 'h', 1.0)
g.add_path(('a', [1], 1.0), [], 0.9)
try:
    {call}
    print("no error")
except (nf.N2GError, MemoryError) as e:
    print("clean:", type(e).__name__, e)
""")
    assert p.returncode == 0 and p.stdout.startswith("clean:"), (p.returncode, p.stdout, p.stderr[-500:])


def test_vocab_size_of_2_to_the_32_or_more_admits_every_id():
    g = NeuronGraph("m", 0, 0, "h", 1.0)
    g.add_path(("a", [2**32 - 1], 1.0), [], 0.9)
    for vocab in (2**32, 2**33):
        assert g.predict([[2**32 - 1]], vocab_size=vocab)[0].tolist() == pytest.approx([0.9])
    with pytest.raises(N2GError, match="out of vocabulary"):
        g.predict([[2**32 - 1]], vocab_size=2**32 - 1)


def test_topk_window_ids_are_exact_and_non_negative():
    t = TopK(1, 2)
    with pytest.raises(N2GError, match="too large"):
        t.update(np.ones((1, 1, 1), np.float32), np.array([2**64 - 1], np.uint64))
    for update in (lambda ids: t.update(np.ones((1, 1, 1), np.float32), ids),
                   lambda ids: t.update_window_max(np.ones((1, 1), np.float32), ids)):
        with pytest.raises(N2GError, match="negative"):
            update([-1])
    assert t.top()[0].tolist() == [[-1, -1]]
    t.update(np.ones((1, 1, 1), np.float32), np.array([2**63 - 1], np.uint64))
    assert t.top()[0].tolist() == [[2**63 - 1, -1]]


def test_the_type_stub_parses_and_declares_the_module():
    """n2g_fast.pyi (what type checkers and editors read) is valid Python and declares every public
    name of the module and of its classes; the copy beside the crate is the same file."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = (root / "n2g_fast.pyi").read_text()
    assert (root / "n2g_fast" / "n2g_fast.pyi").read_text() == text
    tree = ast.parse(text)

    def declared(body) -> set[str]:
        out = set()
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                out.add(node.name)
            elif isinstance(node, ast.Assign):
                out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.AnnAssign):
                out.add(node.target.id)
        return out

    public = {n for n in dir(n2g_fast) if not n.startswith("_") and n != "n2g_fast"}  # the .so submodule
    assert public - declared(tree.body) == set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name != "N2GError":
            real = {m for m in dir(getattr(n2g_fast, node.name)) if not m.startswith("_")}
            assert real - declared(node.body) == set(), node.name
