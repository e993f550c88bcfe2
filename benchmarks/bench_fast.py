"""n2g_fast against a pure-Python reference of the N2G reference code (not a test).

    python benchmarks/bench_fast.py            # defaults below; about a minute on 2 cores
    options: --graphs 1000 --sequences 100 --tokens 128 --pair-graphs 20000 --pair-ref 2000
             --store-graphs 46080 --pred-ref-graphs 1000 --memory-graphs 10000 --seed 0
             --baseline DIR   (d) also measures the n2g_fast package found in DIR (e.g. a copy of
                              an earlier build's site-packages/n2g_fast), same inputs, same run

Same inputs, one run, results checked equal before any ratio is printed:
(a) prediction: Python dict tries built from each graph's JSON export and the reference walk
    (`greedy_deepest`: exact child, else IGNORE, else stop; deepest END) vs GraphStore.predict;
(b) all pairs: the quadratic overlap loop over label sets vs GraphStore.similar_pairs +
    subset_pairs. The loop is timed on the first --pair-ref graphs (compared for equality with
    n2g_fast on exactly those graphs) and extrapolated to all graphs by n^2;
(c) GraphStore.save / GraphStore.load time and file bytes per graph;
(d) a whole model's graphs in memory (issue 9): bytes per graph held by a GraphStore (RSS growth
    of a fresh process loading the store file, the same after malloc_trim, and the store's own
    accounted heap_bytes), load time of --memory-graphs graphs from the store file (fresh
    process, best of 3) and from to_bytes() blobs, and prediction throughput on 1,000 of them;
    with --baseline, the same for an earlier build, side by side. The figures quoted for
    albertsgarde's n2g-rs come from issue 9 (measured there; n2g-rs is not installed here).

Synthetic graphs (seeded): a vocabulary of 8,000 token ids; ids 0..1999 share labels in pairs
(like " the" / "the"), the rest have a label each. Each neuron draws 1-5 activating tokens from a
Zipf(0.8) distribution over a shuffled vocabulary (neurons fire on fairly specific tokens) and
10-40 paths; each path has 0-6 context elements, IGNORE with probability 0.35, else a token from
a Zipf(1.1) distribution (context tokens are common words), importance in [0.75, 1], activation
and END in [0.5, 1]. For (b), 2% of graphs are copies of another graph, half of them with one
extra path (so similar and subset pairs exist). Sequences for (a) are drawn from the mix of the
two distributions, so activating tokens occur often.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

import n2g_fast

VOCAB = 8000


def label(t: int) -> str:
    return f"w{t // 2}" if t < 2000 else f"w{t}"


def ids_of(t: int) -> list[int]:
    return [t - t % 2, t - t % 2 + 1] if t < 2000 else [t]


class Synth:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        ranks = np.arange(1, VOCAB + 1, dtype=np.float64)
        self.p_act = ranks**-0.8 / (ranks**-0.8).sum()
        self.p_ctx = ranks**-1.1 / (ranks**-1.1).sum()
        self.act_perm = self.rng.permutation(VOCAB)
        self._ctx_pool, self._ctx_at = np.empty(0, np.int64), 0

    def _ctx_token(self) -> int:
        # Drawn in bulk: one weighted draw per token would dominate the run.
        if self._ctx_at == len(self._ctx_pool):
            self._ctx_pool, self._ctx_at = self.rng.choice(VOCAB, size=1 << 16, p=self.p_ctx), 0
        self._ctx_at += 1
        return int(self._ctx_pool[self._ctx_at - 1])

    def paths(self) -> list:
        rng = self.rng
        acts = self.act_perm[rng.choice(VOCAB, size=rng.integers(1, 6), p=self.p_act)]
        out = []
        for _ in range(rng.integers(10, 41)):
            a = int(acts[rng.integers(len(acts))])
            ctx = []
            for _ in range(rng.integers(0, 7)):
                if rng.random() < 0.35:
                    ctx.append(None)
                else:
                    c = self._ctx_token()
                    ctx.append((label(c), ids_of(c), float(rng.uniform(0.75, 1.0))))
            act = float(rng.uniform(0.5, 1.0))
            out.append(((label(a), ids_of(a), act), ctx, act))
        return out

    def graph(self, layer: int, neuron: int, paths=None) -> n2g_fast.NeuronGraph:
        g = n2g_fast.NeuronGraph("synthetic", layer, neuron, f"blocks.{layer}.mlp.hook_post", 1.0)
        for p in paths if paths is not None else self.paths():
            g.add_path(*p)
        g.finalize()
        return g

    def sequences(self, n: int, t: int) -> np.ndarray:
        a = self.act_perm[self.rng.choice(VOCAB, size=(n, t), p=self.p_act)]
        c = self.rng.choice(VOCAB, size=(n, t), p=self.p_ctx)
        return np.where(self.rng.random((n, t)) < 0.5, a, c).astype(np.int64)


# --- the pure-Python reference ----------------------------------------------------------------


def dict_trie(g: n2g_fast.NeuronGraph) -> dict:
    """{token id: root node}; node = {"end": float|None, "children": {id: node}, "ignore": node|None}.
    Built from the finalized graph's JSON export; first sibling by label wins on a shared id, as
    in n2g_fast."""

    def node(d):
        n = {"end": d["end"], "children": {}, "ignore": None}
        for c in d["children"]:
            if c["ignore"]:
                n["ignore"] = node(c)
            else:
                cn = node(c)
                for t in c["token_ids"]:
                    n["children"].setdefault(t, cn)
        return n

    roots = {}
    for r in json.loads(g.to_json())["roots"]:
        rn = node(r)
        for t in r["token_ids"]:
            roots.setdefault(t, rn)
    return roots


def py_greedy(roots: dict, seq: list[int]) -> list[float]:
    out = []
    for i in range(len(seq)):
        node = roots.get(seq[i])
        if node is None:
            out.append(0.0)
            continue
        best = node["end"] if node["end"] is not None else 0.0
        for j in range(i - 1, -1, -1):
            nxt = node["children"].get(seq[j]) or node["ignore"]
            if nxt is None:
                break
            node = nxt
            if node["end"] is not None:
                best = node["end"]
        out.append(best)
    return out


def py_pairs(sets: list[tuple[tuple[int, int], set, set]], t: float):
    """The quadratic loop of the reference: every pair, overlap by max (similar) / min (subset)."""
    sim, sub = [], []
    n = len(sets)
    for i in range(n):
        ki, ai, ci = sets[i]
        for j in range(i + 1, n):
            kj, aj, cj = sets[j]
            ia, ic = len(ai & aj), len(ci & cj)
            if ia / max(len(ai), len(aj), 1) >= t and ic / max(len(ci), len(cj), 1) >= t:
                sim.append((min(ki, kj), max(ki, kj)))
            elif ia / max(min(len(ai), len(aj)), 1) >= t and ic / max(min(len(ci), len(cj)), 1) >= t:
                si, sj = len(ai) + len(ci), len(aj) + len(cj)
                sub.append((ki, kj) if (si, ki) <= (sj, kj) else (kj, ki))
    return sorted(sim), sorted(sub)


# --- benchmarks -----------------------------------------------------------------------------


def timed(f, *a, repeat: int = 1):
    """(result, best wall time); the previous result is freed outside the timing."""
    best, out = float("inf"), None
    for _ in range(repeat):
        out = None
        t0 = time.perf_counter()
        out = f(*a)
        best = min(best, time.perf_counter() - t0)
    return out, best


def bench_predict(args, synth: Synth) -> None:
    print(f"(a) prediction: {args.graphs} graphs x {args.sequences} sequences x {args.tokens} tokens")
    graphs = [synth.graph(0, n) for n in range(args.graphs)]
    store = n2g_fast.GraphStore()
    for g in graphs:
        store.add(g)
    keys = store.keys()
    seqs = synth.sequences(args.sequences, args.tokens)
    store.predict(keys, seqs[:1])  # starts the pool, compiles every trie once
    nt = len(keys) * seqs.size
    rust, t_rust = timed(store.predict, keys, seqs, "greedy_deepest", repeat=5)
    _, t_rust_all = timed(store.predict, keys, seqs, "all_paths_max", repeat=5)
    n_ref = min(args.pred_ref_graphs, len(keys))
    tries = [dict_trie(g) for g in graphs[:n_ref]]
    lists = seqs.tolist()
    t0 = time.perf_counter()
    ref = [[py_greedy(tr, s) for s in lists] for tr in tries]
    t_py = time.perf_counter() - t0
    np.testing.assert_array_equal(np.asarray(ref, dtype=np.float32), rust[:n_ref])
    py_rate = n_ref * seqs.size / t_py
    mean_nodes = np.mean([g.n_nodes for g in graphs])
    hit = float((rust > 0).mean())
    print(f"    graphs: mean {mean_nodes:.0f} nodes; {hit:.1%} of neuron-tokens predict > 0")
    print(f"    Python reference (greedy_deepest), {n_ref} graphs: {py_rate / 1e6:8.3f} M neuron-tokens/s  ({t_py:.2f} s)")
    print(f"    n2g_fast greedy_deepest (best of 5):    {nt / t_rust / 1e6:8.1f} M neuron-tokens/s  ({t_rust * 1e3:.1f} ms)  ratio {nt / t_rust / py_rate:,.0f}x")
    print(f"    n2g_fast all_paths_max (best of 5):     {nt / t_rust_all / 1e6:8.1f} M neuron-tokens/s  ({t_rust_all * 1e3:.1f} ms)")
    print("    results equal: yes (greedy_deepest, every neuron-token of the reference graphs)")


def pair_graphs(args, synth: Synth) -> list[n2g_fast.NeuronGraph]:
    graphs, paths_of = [], []
    for n in range(args.pair_graphs):
        if n > 10 and synth.rng.random() < 0.02:
            src = paths_of[synth.rng.integers(len(paths_of))]
            paths = list(src) + (synth.paths()[:1] if synth.rng.random() < 0.5 else [])
        else:
            paths = synth.paths()
        paths_of.append(paths)
        graphs.append(synth.graph(n // 3072, n % 3072, paths))
    return graphs


def bench_pairs(args, synth: Synth) -> None:
    t = 0.9
    print(f"(b) all pairs, threshold {t}: {args.pair_graphs} graphs")
    t0 = time.perf_counter()
    graphs = pair_graphs(args, synth)
    blobs = [g.to_bytes() for g in graphs]
    print(f"    built in {time.perf_counter() - t0:.1f} s")
    store, t_load = timed(n2g_fast.GraphStore.from_bytes_list, blobs)
    # Best of 3 on fresh stores: the first query builds the inverted index, and the store keeps
    # the last join's result, so subset_pairs after similar_pairs is nearly free.
    t_index = t_join = t_rust = float("inf")
    for _ in range(3):
        store = n2g_fast.GraphStore.from_bytes_list(blobs)
        t0 = time.perf_counter()
        store.search([(0, "either")])  # builds the inverted index
        t1 = time.perf_counter()
        sim = store.similar_pairs(t)  # the join (both lists)
        t2 = time.perf_counter()
        sub = store.subset_pairs(t)
        t3 = time.perf_counter()
        t_index, t_join, t_rust = min(t_index, t1 - t0), min(t_join, t2 - t1), min(t_rust, t3 - t0)
    # Reference on a prefix of the graphs, checked against n2g_fast on the same prefix.
    m = min(args.pair_ref, len(graphs))
    sets = [((g.layer, g.neuron), set(g.activating_labels()), set(g.context_labels())) for g in graphs[:m]]
    ref, t_py = timed(py_pairs, sets, t)
    small = n2g_fast.GraphStore.from_bytes_list(blobs[:m])
    got = ([(a, b) for a, b, _, _ in small.similar_pairs(t)], [(a, b) for a, b, _, _ in small.subset_pairs(t)])
    assert got == ref, "pair lists differ from the reference"
    t_py_full = t_py * (len(graphs) / m) ** 2
    print(f"    n2g_fast: {len(sim)} similar + {len(sub)} subset pairs in {t_rust * 1e3:.0f} ms on a fresh store "
          f"(inverted-index build {t_index * 1e3:.0f} ms + join {t_join * 1e3:.0f} ms; best of 3)")
    print(f"              (loading the {len(graphs)} graphs with from_bytes_list: {t_load * 1e3:.0f} ms, not counted)")
    print(f"    Python quadratic loop: {t_py:.2f} s on {m} graphs ({len(ref[0])} + {len(ref[1])} pairs, equal to n2g_fast on them)")
    print(f"              extrapolated by n^2 to {len(graphs)} graphs: {t_py_full:,.0f} s; ratio {t_py_full / t_rust:,.0f}x (index build included)")


def bench_store(args, synth: Synth) -> None:
    n = args.store_graphs
    print(f"(c) store file: {n} graphs")
    t0 = time.perf_counter()
    base = [synth.graph(0, i).to_bytes() for i in range(min(n, 4096))]
    # Distinct keys; graphs beyond the first 4096 reuse their structure (timing and size only
    # depend on the bytes).
    blobs = []
    for i in range(n):
        g = n2g_fast.NeuronGraph.from_bytes(base[i % len(base)])
        g.layer, g.neuron = i // 1536, i % 1536
        blobs.append(g.to_bytes())
    store = n2g_fast.GraphStore.from_bytes_list(blobs)
    print(f"    built in {time.perf_counter() - t0:.1f} s; mean {np.mean([len(b) for b in blobs]):.0f} bytes per graph blob")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "graphs.n2gs")
        _, t_save = timed(store.save, path, repeat=3)
        size = os.path.getsize(path)
        del store
        loads = []
        for _ in range(3):
            t0 = time.perf_counter()
            loaded = n2g_fast.GraphStore.load(path)
            loads.append(time.perf_counter() - t0)
            if len(loads) < 3:
                del loaded  # dropped outside the timing
    assert len(loaded) == n and loaded.keys()[-1] == ((n - 1) // 1536, (n - 1) % 1536)
    g = loaded.get(loaded.keys()[-1])
    assert g.to_bytes() == blobs[-1]
    print(f"    save {t_save * 1e3:.0f} ms (best of 3); load {min(loads) * 1e3:.0f} ms best of 3, first {loads[0] * 1e3:.0f} ms; "
          f"file {size / 1e6:.1f} MB = {size / n:.0f} bytes per graph")


# --- (d) memory and load, each measurement in a fresh interpreter ---------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    """Returns freed heap to the OS, so RSS shows what is held, not what the allocator keeps."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def memory_child(mode: str, workdir: str) -> None:
    """Runs in a fresh interpreter with the n2g_fast under test first on sys.path."""
    import pickle

    if mode == "prep":  # the store file in this build's own format
        with open(os.path.join(workdir, "blobs.pkl"), "rb") as f:
            blobs = pickle.load(f)
        n2g_fast.GraphStore.from_bytes_list(blobs).save(os.path.join(workdir, "store.n2gs"))
        return
    path = os.path.join(workdir, "store.n2gs")
    _trim()
    r0 = _rss()
    t0 = time.perf_counter()
    store = n2g_fast.GraphStore.load(path)
    t_load = time.perf_counter() - t0
    r1 = _rss()
    _trim()
    r2 = _rss()
    out = {"load_s": t_load, "rss": r1 - r0, "rss_trim": r2 - r0, "n": len(store),
           "heap": store.heap_bytes() if hasattr(store, "heap_bytes") else None,
           "file": os.path.getsize(path), "version": n2g_fast.__file__}
    if mode == "full":
        seqs = np.load(os.path.join(workdir, "seqs.npy"))
        keys = store.keys()[:1000]
        store.predict(keys, seqs[:1])  # pool start, first touches; the output is freed
        _trim()
        out["rss_after_predict"] = _rss() - r0
        for sem in ("greedy_deepest", "all_paths_max"):
            _, t = timed(store.predict, keys, seqs, sem, repeat=5)
            out[sem] = len(keys) * seqs.size / t
        with open(os.path.join(workdir, "blobs.pkl"), "rb") as f:
            blobs = pickle.load(f)
        t0 = time.perf_counter()
        other = n2g_fast.GraphStore.from_bytes_list(blobs)
        out["blobs_s"] = time.perf_counter() - t0
        del other
    print(json.dumps(out))


def bench_memory(args, synth: Synth) -> None:
    import pickle
    import subprocess

    n = args.memory_graphs
    print(f"(d) a whole model's graphs in memory: {n} graphs")
    blobs = [synth.graph(i // 4096, i % 4096).to_bytes() for i in range(n)]
    nodes = sum(n2g_fast.NeuronGraph.from_bytes(b).n_nodes for b in blobs[:2000]) / min(n, 2000)
    builds = [("this build", None)] + ([("baseline", args.baseline)] if args.baseline else [])
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for name, path in builds:
            d = os.path.join(root, name.replace(" ", "_"))
            os.makedirs(d)
            with open(os.path.join(d, "blobs.pkl"), "wb") as f:
                pickle.dump(blobs, f)
            np.save(os.path.join(d, "seqs.npy"), synth.sequences(args.sequences, args.tokens))
            env = dict(os.environ)
            if path:
                env["PYTHONPATH"] = os.path.abspath(path) + os.pathsep + env.get("PYTHONPATH", "")

            def child(mode):
                p = subprocess.run([sys.executable, os.path.abspath(__file__), "--_memory-child", mode, d],
                                   env=env, capture_output=True, text=True, check=True)
                return json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else None

            child("prep")
            runs = [child("full" if r == 0 else "load") for r in range(3)]
            results[name] = (runs, runs[0])
    print(f"    synthetic graphs as in (a), mean {nodes:.0f} nodes; every figure from fresh processes")
    print("    n2g-rs (issue 9, measured there): 1.0-1.3 KB per graph; loads 10,000 graphs about 2x faster than the GraphStore before this change")
    for name, (runs, full) in results.items():
        load = min(r["load_s"] for r in runs)
        print(f"    {name}: {full['version']}")
        print(f"        bytes per graph: RSS growth {full['rss'] / n:,.0f}, after malloc_trim {full['rss_trim'] / n:,.0f}"
              + (f", accounted heap_bytes {full['heap'] / n:,.0f}" if full["heap"] else "")
              + f"; after a first prediction over {min(n, 1000):,} graphs (trimmed) {full['rss_after_predict'] / n:,.0f}")
        print(f"        load {n} graphs from the store file: {load * 1e3:.0f} ms best of 3 (file {full['file'] / n:.0f} bytes per graph); "
              f"from to_bytes() blobs: {full['blobs_s'] * 1e3:.0f} ms")
        print(f"        predict {min(n, 1000):,} graphs x {args.sequences} x {args.tokens}: greedy_deepest {full['greedy_deepest'] / 1e6:.0f} M, "
              f"all_paths_max {full['all_paths_max'] / 1e6:.0f} M neuron-tokens/s (best of 5)")
    if len(results) == 2:
        (a, fa), (b, fb) = results["this build"], results["baseline"]
        la, lb = min(r["load_s"] for r in a), min(r["load_s"] for r in b)
        print(f"    this build vs baseline: {fb['rss_trim'] / max(fa['rss_trim'], 1):.1f}x less memory (after trim), "
              f"load {lb / la:.1f}x faster, greedy {fa['greedy_deepest'] / fb['greedy_deepest']:.2f}x, "
              f"all_paths {fa['all_paths_max'] / fb['all_paths_max']:.2f}x the prediction throughput")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graphs", type=int, default=1000)
    ap.add_argument("--sequences", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--pred-ref-graphs", type=int, default=1000, help="graphs the Python walk runs on")
    ap.add_argument("--pair-graphs", type=int, default=20000)
    ap.add_argument("--pair-ref", type=int, default=2000, help="graphs the quadratic loop runs on")
    ap.add_argument("--store-graphs", type=int, default=46080)
    ap.add_argument("--memory-graphs", type=int, default=10000)
    ap.add_argument("--baseline", help="directory holding an earlier build's n2g_fast package, for (d)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["a", "b", "c", "d"], nargs="*")
    ap.add_argument("--_memory-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._memory_child:
        memory_child(*args._memory_child)
        return
    print(f"n2g_fast {n2g_fast.__version__}; {os.cpu_count()} CPUs; RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'unset')}; Python {sys.version.split()[0]}")
    only = set(args.only or "abcd")
    if "a" in only:
        bench_predict(args, Synth(args.seed))
    if "b" in only:
        bench_pairs(args, Synth(args.seed + 1))
    if "c" in only:
        bench_store(args, Synth(args.seed + 2))
    if "d" in only:
        bench_memory(args, Synth(args.seed + 3))


if __name__ == "__main__":
    main()
