"""n2g_fast.GraphStore through the public module (issue 3), including wrong inputs."""

import itertools
import multiprocessing as mp
import random
import struct
import threading
import zlib

import numpy as np
import pytest

from n2g_fast import GraphStore, N2GError, NeuronGraph

# --- helpers ---------------------------------------------------------------------------------


def make_graph(layer, neuron, paths, hook="blocks.0.mlp.hook_post"):
    g = NeuronGraph("m", layer, neuron, hook, 2.0)
    for act, ctx, end in paths:
        g.add_path(act, ctx, end)
    g.finalize()
    return g


def tok(k, value=0.9):
    """Label t{k} with ids {k, k + 100}."""
    return (f"t{k}", [k, k + 100], value)


def random_graphs(seed, n=40, vocab=10):
    rng = random.Random(seed)
    graphs = []
    for i in range(n):
        paths = []
        for _ in range(rng.randint(0, 5)):
            ctx = [None if rng.random() < 0.3 else tok(rng.randrange(vocab)) for _ in range(rng.randint(0, 4))]
            paths.append((tok(rng.randrange(vocab), rng.uniform(0.5, 1)), ctx, rng.uniform(0.5, 1)))
        graphs.append(make_graph(i % 3, i, paths))
    return graphs


def store_of(graphs):
    s = GraphStore()
    for g in graphs:
        s.add(g)
    return s


@pytest.fixture(scope="module")
def graphs():
    return random_graphs(0)


@pytest.fixture(scope="module")
def store(graphs):
    return store_of(graphs)


# --- add / get / remove / keys -----------------------------------------------------------------


def test_add_get_remove_keys(graphs):
    s = GraphStore()
    assert len(s) == 0 and s.keys() == [] and repr(s) == "GraphStore(n_graphs=0)"
    for g in graphs[:5]:
        s.add(g)
    assert len(s) == 5 and s.keys() == sorted((g.layer, g.neuron) for g in graphs[:5])
    assert (graphs[0].layer, graphs[0].neuron) in s and (9, 9) not in s
    got = s.get((graphs[1].layer, graphs[1].neuron))
    assert got == graphs[1] and got is not graphs[1]
    got.add_path(("zzz", [7], 1.0), [], 0.5)  # a copy: the store is unchanged
    assert s.get((graphs[1].layer, graphs[1].neuron)) == graphs[1]
    replacement = make_graph(graphs[1].layer, graphs[1].neuron, [(tok(3), [], 0.7)])
    s.add(replacement)
    assert len(s) == 5 and s.get((graphs[1].layer, graphs[1].neuron)) == replacement
    s.remove((graphs[1].layer, graphs[1].neuron))
    assert len(s) == 4 and (graphs[1].layer, graphs[1].neuron) not in s


def test_add_finalizes_a_copy():
    g = NeuronGraph("m", 0, 1, "h", 1.0)
    g.add_path(("a", [1], 1.0), [("x", [2], 0.8), ("y", [3], 0.8)], 0.5)
    g.add_path(("a", [1], 1.0), [None, ("z", [4], 0.8)], 0.6)
    s = GraphStore()
    s.add(g)
    assert s.get((0, 1)).context_labels() == ["y", "z"]  # x dropped by finalize


@pytest.mark.parametrize("bad", [(1,), (1, 2, 3), ("a", 1), (-1, 0), (0, 2**33), 5, None])
def test_bad_keys(store, bad):
    with pytest.raises(N2GError):
        store.get(bad)
    with pytest.raises(N2GError):
        store.remove(bad)


def test_unknown_key(store):
    with pytest.raises(N2GError, match=r"no graph for key \(layer=7, neuron=7\)"):
        store.get((7, 7))
    with pytest.raises(N2GError, match="no graph"):
        GraphStore().remove((0, 0))


# --- bytes / files -----------------------------------------------------------------------------


def test_bytes_list_round_trip_and_all_or_nothing(graphs, store):
    blobs = [g.to_bytes() for g in graphs]
    s = GraphStore.from_bytes_list(blobs)
    assert s.keys() == store.keys()
    bad = list(blobs)
    bad[3] = bad[3][:-2]
    t = GraphStore()
    with pytest.raises(N2GError, match="blob 3"):
        t.add_bytes(bad)
    assert len(t) == 0
    with pytest.raises(N2GError, match="blobs\\[1\\] is not bytes"):
        t.add_bytes([blobs[0], "x"])
    with pytest.raises(N2GError, match="wrap it in a list"):
        t.add_bytes(blobs[0])
    t.add_bytes([])
    assert len(t) == 0


def test_save_load(tmp_path, graphs, store):
    path = tmp_path / "graphs.n2gs"
    store.save(path)
    assert not (tmp_path / "graphs.n2gs.tmp").exists()
    back = GraphStore.load(str(path))
    assert back.keys() == store.keys()
    for k in store.keys():
        assert back.get(k) == store.get(k)
    assert GraphStore.from_bytes(store.to_bytes()).to_bytes() == store.to_bytes()
    GraphStore().save(tmp_path / "empty.n2gs")
    assert len(GraphStore.load(tmp_path / "empty.n2gs")) == 0


def version_1_file(graphs) -> bytes:
    """A store file as builds before format version 2 wrote it: each graph's to_bytes() blob,
    sorted by key, behind the 40-byte header."""
    import struct
    import zlib

    blobs = [g.to_bytes() for g in sorted(graphs, key=lambda g: (g.layer, g.neuron))]
    payload = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    head = b"N2GSTORE" + struct.pack("<IIQQ", 1, 0, len(blobs), len(payload))
    return head + struct.pack("<II", zlib.crc32(payload, zlib.crc32(head)), 0) + payload


def test_version_1_files_still_load(tmp_path, graphs, store):
    path = tmp_path / "old.n2gs"
    path.write_bytes(version_1_file(graphs))
    back = GraphStore.load(path)
    assert back.keys() == store.keys()
    for g in graphs:
        assert back.get((g.layer, g.neuron)) == g
    # Saving writes version 2, the same bytes as a store built from the graphs directly.
    assert back.to_bytes()[8:12] == (2).to_bytes(4, "little")
    assert back.to_bytes() == store.to_bytes()
    damaged = bytearray(version_1_file(graphs))
    damaged[-5] ^= 0x10
    with pytest.raises(N2GError, match="checksum"):
        GraphStore.from_bytes(bytes(damaged))


def test_heap_bytes_grow_with_graphs_and_stay_compact(graphs):
    s = GraphStore()
    assert s.heap_bytes() < 4096
    s.add_bytes([g.to_bytes() for g in graphs])
    full = s.heap_bytes()
    nodes = sum(g.n_nodes + 1 for g in graphs)
    # 16 bytes per node plus per-graph and shared-table overhead, far below a node struct each.
    assert 16 * nodes < full < 16 * nodes + 200 * len(graphs) + 64 * 1024
    s.remove((graphs[0].layer, graphs[0].neuron))
    assert s.heap_bytes() < full


def test_corrupt_files_refused(tmp_path, store):
    data = store.to_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "header": data[:20],
        "flipped": data[:100] + bytes([data[100] ^ 0x10]) + data[101:],
        "extra": data + b"x",
        "magic": b"NOTASTOR" + data[8:],
        "version": data[:8] + (7).to_bytes(4, "little") + data[12:],
    }
    needles = {
        "truncated": "truncated",
        "header": "truncated",
        "flipped": "checksum",
        "extra": "extra bytes",
        "magic": "not an n2g store",
        "version": "version 7",
    }
    for name, bad in cases.items():
        p = tmp_path / f"{name}.n2gs"
        p.write_bytes(bad)
        with pytest.raises(N2GError, match=needles[name]):
            GraphStore.load(p)
    with pytest.raises(N2GError, match="cannot read"):
        GraphStore.load(tmp_path / "missing.n2gs")
    with pytest.raises(N2GError, match="cannot write"):
        store.save(tmp_path / "no" / "such" / "dir.n2gs")


# --- predict -----------------------------------------------------------------------------------


@pytest.mark.parametrize("semantics", ["all_paths_max", "greedy_deepest"])
def test_predict_equals_per_graph_predict(graphs, store, semantics):
    rng = np.random.default_rng(1)
    seqs = rng.integers(0, 110, size=(7, 25))
    keys = store.keys()[::-1] + store.keys()[:2]  # any order, repeats allowed
    out = store.predict(keys, seqs, semantics)
    assert out.shape == (len(keys), 7, 25) and out.dtype == np.float32
    by_key = {(g.layer, g.neuron): g for g in graphs}
    for r, k in enumerate(keys):
        want = np.stack(by_key[k].predict(seqs, semantics))
        np.testing.assert_array_equal(out[r], want)
    assert (out > 0).any()
    # Lists of equal length and int32 arrays give the same.
    np.testing.assert_array_equal(store.predict(keys, seqs.tolist(), semantics), out)
    np.testing.assert_array_equal(store.predict(keys, [np.int32(0) + s.astype(np.int32) for s in seqs], semantics), out)


def test_predict_large_batch_parallel(store):
    seqs = np.random.default_rng(2).integers(0, 110, size=(64, 128))
    keys = store.keys()
    out = store.predict(keys, seqs)
    for r in (0, len(keys) - 1):
        np.testing.assert_array_equal(out[r], np.stack(store.get(keys[r]).predict(seqs)))


@pytest.mark.parametrize(
    "keys, seqs, kwargs, needle",
    [
        ([], [[1, 2]], {}, "keys is empty"),
        ([(0, 0)], [], {}, "token_id_sequences is empty"),
        ([(0, 0)], np.zeros((0, 5), np.int64), {}, "token_id_sequences is empty"),
        ([(0, 0)], [[], []], {}, "0 tokens"),
        ([(0, 0)], [[1, 2], [3]], {}, "ragged: sequence 1 has 1 tokens, sequence 0 has 2"),
        ([(5, 5)], [[1, 2]], {}, "no graph for key"),
        ([(0, 0)], [[1, -2]], {}, "negative token id -2 at sequence 0, position 1"),
        ([(0, 0)], np.array([[1, 2], [3, 2**40]]), {}, "too large"),
        ([(0, 0)], [[1, 200]], {"vocab_size": 150}, "out of vocabulary"),
        ([(0, 0)], [[1, 2]], {"semantics": "deepest"}, "semantics must be"),
        ([(0, 0)], np.ones((2, 2), np.float64), {}, "integer"),
        ([(0, 0)], np.ones(3, np.int64), {}, "2-D"),
        ([(0,)], [[1]], {}, "pair of ints"),
        ((0, 0), [[1]], {}, "pair of ints"),
        ([(0, 0)], "abc", {}, "tokenize"),
    ],
)
def test_predict_wrong_inputs(store, keys, seqs, kwargs, needle):
    with pytest.raises(N2GError, match=needle):
        store.predict(keys, seqs, **kwargs)


# --- search ------------------------------------------------------------------------------------


def holds(g, term, role):
    import json

    doc = json.loads(g.to_json())
    act, ctx = [], []

    def walk(n, depth):
        (act if depth == 0 else ctx).append(n)
        for c in n["children"]:
            walk(c, depth + 1)

    for r in doc["roots"]:
        walk(r, 0)

    def hit(n):
        if n["ignore"]:
            return False
        return term in n["token_ids"] if isinstance(term, int) else n["label"] == term

    a, c = any(map(hit, act)), any(map(hit, ctx))
    return {"activating": a, "context": c, "either": a or c}[role]


def test_search_equals_brute_force(graphs, store):
    rng = random.Random(3)
    for _ in range(60):
        clauses = [
            (rng.choice([rng.randrange(115), f"t{rng.randrange(11)}"]), rng.choice(["activating", "context", "either"]))
            for _ in range(rng.randint(1, 3))
        ]
        want = sorted((g.layer, g.neuron) for g in graphs if all(holds(g, t, r) for t, r in clauses))
        assert store.search(clauses) == want, clauses


@pytest.mark.parametrize(
    "clauses, needle",
    [
        ([], "at least one"),
        ([(1, "both")], "role must be"),
        ([(1.5, "context")], "token id \\(int\\) or a label"),
        ([(True, "context")], "token id \\(int\\) or a label"),
        ([(-1, "context")], "negative token id"),
        ([(1,)], "pair"),
        (5, "sequence"),
    ],
)
def test_search_wrong_inputs(store, clauses, needle):
    with pytest.raises(N2GError, match=needle):
        store.search(clauses)


def test_in_context_neurons():
    s = store_of(
        [
            make_graph(0, 0, [(tok(1), [tok(1)], 0.8), (tok(2), [tok(2)], 0.8)]),  # 2 of 2 repeated
            make_graph(0, 1, [(tok(1), [tok(1)], 0.8), (tok(3), [tok(4)], 0.8)]),  # 1 of 2
            make_graph(0, 2, [(tok(5), [tok(5)], 0.8)]),  # 1 of 1
            make_graph(0, 3, [(tok(6), [tok(7)], 0.8)]),  # none
        ]
    )
    got = s.in_context_neurons()
    assert [(k, labels) for k, labels, _ in got] == [((0, 0), ["t1", "t2"]), ((0, 2), ["t5"]), ((0, 1), ["t1"])]
    assert [f for _, _, f in got] == [1.0, 1.0, 0.5]
    assert s.in_context_neurons(limit=1) == got[:1]


# --- similarity --------------------------------------------------------------------------------


def label_sets(g):
    return set(g.activating_labels()), set(g.context_labels())


def brute_pairs(graphs, t):
    sim, sub = [], []
    for g, h in itertools.combinations(graphs, 2):
        (a, c), (b, d) = label_sets(g), label_sets(h)
        kg, kh = (g.layer, g.neuron), (h.layer, h.neuron)
        ma = len(a & b) / max(len(a), len(b), 1)
        mc = len(c & d) / max(len(c), len(d), 1)
        if ma >= t and mc >= t:
            sim.append((min(kg, kh), max(kg, kh)))
            continue
        na = len(a & b) / max(min(len(a), len(b)), 1)
        nc = len(c & d) / max(min(len(c), len(d)), 1)
        if na >= t and nc >= t:
            sg, sh = len(a) + len(c), len(b) + len(d)
            sub.append((kg, kh) if (sg, kg) <= (sh, kh) else (kh, kg))
    return sorted(sim), sorted(sub)


@pytest.mark.parametrize("t", [0.9, 0.5, 1.0, 0.3])
def test_pairs_equal_brute_force(t):
    graphs = random_graphs(4, n=80, vocab=5)
    s = store_of(graphs)
    sim, sub = brute_pairs(graphs, t)
    got_sim, got_sub = s.similar_pairs(t), s.subset_pairs(t)
    assert [(a, b) for a, b, _, _ in got_sim] == sim
    assert [(a, b) for a, b, _, _ in got_sub] == sub
    assert sim or sub


def test_pairs_small_case_and_scores():
    x = [(tok(1), [tok(2), tok(3)], 0.8)]
    s = store_of(
        [
            make_graph(0, 0, x),
            make_graph(1, 0, x),  # identical graph in another layer: similar
            make_graph(0, 1, x + [(tok(1), [tok(4), tok(5), tok(6)], 0.8)]),  # superset of both
            make_graph(0, 2, [(tok(1), [], 0.8)]),  # no context: never paired
            make_graph(0, 3, [(tok(1), [], 0.8)]),
        ]
    )
    assert s.similar_pairs() == [((0, 0), (1, 0), 1.0, 1.0)]
    assert s.subset_pairs() == [((0, 0), (0, 1), 1.0, 1.0), ((1, 0), (0, 1), 1.0, 1.0)]
    nb = s.neighbours((0, 0), 10)
    assert nb[0] == ((1, 0), 1.0, 1.0, 1.0)
    assert [k for k, *_ in nb] == [(1, 0), (0, 1), (0, 2), (0, 3)]
    assert nb[1][1] == pytest.approx((1.0 + 2 / 5) / 2)
    assert s.neighbours((0, 0), 1) == nb[:1]


def test_neighbours_equal_brute_force():
    graphs = random_graphs(5, n=50, vocab=8)
    s = store_of(graphs)
    for g in graphs[:10]:
        (a, c) = label_sets(g)
        want = []
        for h in graphs:
            if h is g:
                continue
            b, d = label_sets(h)
            pa = len(a & b) / max(len(a), len(b), 1)
            pc = len(c & d) / max(len(c), len(d), 1)
            if pa + pc > 0:
                want.append(((h.layer, h.neuron), (pa + pc) / 2))
        want.sort(key=lambda x: (-x[1], x[0]))
        got = s.neighbours((g.layer, g.neuron), 5)
        assert [k for k, *_ in got] == [k for k, _ in want[:5]]
        assert [x[1] for x in got] == pytest.approx([x[1] for _, x in zip(range(5), want)])


@pytest.mark.parametrize("t", [0.0, -0.1, 1.01, float("nan")])
def test_threshold_refused(store, t):
    with pytest.raises(N2GError, match="threshold"):
        store.similar_pairs(t)
    with pytest.raises(N2GError, match="threshold"):
        store.subset_pairs(t)


def test_neighbours_wrong_inputs(store):
    with pytest.raises(N2GError, match="no graph"):
        store.neighbours((9, 9))
    with pytest.raises(N2GError, match="k must be"):
        store.neighbours(store.keys()[0], 0)


def test_results_follow_changes():
    s = store_of([make_graph(0, 0, [(tok(1), [tok(2)], 0.8)]), make_graph(0, 1, [(tok(1), [tok(2)], 0.8)])])
    assert len(s.similar_pairs()) == 1 and s.search([("t1", "activating")]) == [(0, 0), (0, 1)]
    s.remove((0, 1))
    assert s.similar_pairs() == [] and s.search([("t1", "activating")]) == [(0, 0)]


# --- concurrency and fork --------------------------------------------------------------------


def test_queries_and_changes_from_threads(graphs):
    s = store_of(graphs)
    seqs = np.random.default_rng(6).integers(0, 110, size=(16, 64))
    errors = []
    rounds = []

    def query():
        for _ in range(20):
            try:
                s.predict(s.keys()[:5] or [(0, 0)], seqs)
            except N2GError as e:  # a key removed between keys() and predict is fine
                if "no graph" not in str(e):
                    errors.append(e)
            except Exception as e:  # pragma: no cover
                errors.append(e)
            try:
                s.similar_pairs(0.5)
                s.search([(1, "either")])
                rounds.append(1)
            except Exception as e:  # pragma: no cover
                errors.append(e)

    def change():
        for g in graphs[:20]:
            s.remove((g.layer, g.neuron))
            s.add(g)

    threads = [threading.Thread(target=query) for _ in range(3)] + [threading.Thread(target=change)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not errors
    assert len(rounds) == 3 * 20  # every thread ran every round
    assert len(s) == len(graphs)


def _child_predict(data: bytes):
    s = GraphStore.from_bytes(data)
    return s.predict(s.keys(), np.arange(40).reshape(2, 20) % 110).sum()


def test_fork_after_store_calls(store):
    data = store.to_bytes()
    expected = store.predict(store.keys(), np.arange(40).reshape(2, 20) % 110).sum()
    store.similar_pairs(0.5)
    with mp.get_context("fork").Pool(2) as pool:
        got = pool.map_async(_child_predict, [data] * 3).get(timeout=60)
    assert got == [pytest.approx(expected)] * 3


# --- robustness (fuzzing probe) ------------------------------------------------------------------


def test_predict_refuses_an_output_too_large_to_allocate():
    # Keys may repeat: 8 MB of keys and tokens would ask numpy for 4 TB (a panic before).
    s = store_of([make_graph(0, 0, [(tok(1), [], 0.9)])])
    with pytest.raises(N2GError, match="smaller batches"):
        s.predict([(0, 0)] * 1_000_000, np.ones((1000, 1000), np.int64))
    assert s.predict([(0, 0)] * 3, np.ones((2, 2), np.int64)).shape == (3, 2, 2)


def test_thresholds_below_float32_range_still_select_pairs():
    s = GraphStore()
    for neuron in (0, 1):
        s.add(make_graph(0, neuron, [(tok(1), [tok(2)], 0.9), (tok(10 + neuron), [tok(20 + neuron)], 0.9)]))
    want = s.similar_pairs(1e-30)
    assert want and s.subset_pairs(1e-30) == s.subset_pairs(1e-50) == s.subset_pairs(5e-324)
    assert s.similar_pairs(1e-50) == s.similar_pairs(5e-324) == want
    with pytest.raises(N2GError):
        s.similar_pairs(0.0)


def test_predict_with_a_huge_token_id_allocates_nothing_by_it(tmp_path):
    """The prediction's lookup table flagged each input id in an array as long as the largest id:
    an id near 2^32 asked 4 GiB, and under an address-space limit Rust aborted the interpreter
    (SIGABRT, which Python cannot catch). Run in a child with a 1 GiB limit."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import resource
        import numpy as np
        from n2g_fast import GraphStore, NeuronGraph
        g = NeuronGraph("m", 0, 1, "h", 2.0)
        g.add_path(("a", [1, 4294967295], 2.0), [], 1.0)
        g.finalize()
        s = GraphStore()
        s.add(g)
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        out = s.predict([(0, 1)], np.array([[1, 4294967295, 7]], np.int64), "all_paths_max")
        print(out.tolist())
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[[[1.0, 1.0, 0.0]]]"
