"""n2g_fast against a pure-Python reference of the N2G reference code (not a test).

    python benchmarks/bench_fast.py            # defaults below; about a minute on 2 cores
    options: --graphs 1000 --sequences 100 --tokens 128 --pair-graphs 20000 --pair-ref 2000
             --store-graphs 46080 --pred-ref-graphs 1000 --seed 0

Same inputs, one run, results checked equal before any ratio is printed:
(a) prediction: Python dict tries built from each graph's JSON export and the reference walk
    (`greedy_deepest`: exact child, else IGNORE, else stop; deepest END) vs GraphStore.predict;
(b) all pairs: the quadratic overlap loop over label sets vs GraphStore.similar_pairs +
    subset_pairs. The loop is timed on the first --pair-ref graphs (compared for equality with
    n2g_fast on exactly those graphs) and extrapolated to all graphs by n^2;
(c) GraphStore.save / GraphStore.load time and file bytes per graph.

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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graphs", type=int, default=1000)
    ap.add_argument("--sequences", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--pred-ref-graphs", type=int, default=1000, help="graphs the Python walk runs on")
    ap.add_argument("--pair-graphs", type=int, default=20000)
    ap.add_argument("--pair-ref", type=int, default=2000, help="graphs the quadratic loop runs on")
    ap.add_argument("--store-graphs", type=int, default=46080)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["a", "b", "c"], nargs="*")
    args = ap.parse_args(argv)
    print(f"n2g_fast {n2g_fast.__version__}; {os.cpu_count()} CPUs; RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'unset')}; Python {sys.version.split()[0]}")
    only = set(args.only or "abc")
    if "a" in only:
        bench_predict(args, Synth(args.seed))
    if "b" in only:
        bench_pairs(args, Synth(args.seed + 1))
    if "c" in only:
        bench_store(args, Synth(args.seed + 2))


if __name__ == "__main__":
    main()
