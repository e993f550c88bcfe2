"""Synthetic whole-model workspace (SmolLM2-135M shape: 30 layers x 1536 neurons) for the scale probe.

Modelled on real default-fit rows (any built SmolLM2 workspace, --like): a graph holds
~2,000 depth-1 graded token paths (END < 0.5) plus tens of firing paths (activating token +
0-4 context tokens, some IGNORE, END >= 0.5); ~15% of neurons are small (150-450 graded paths).
Examples: `--windows` train windows (real fit: ~350) + 10 test windows of 64 tokens with
activations, zlib JSON as the Workspace stores them; stats ~6 KB like a real paper fit; metrics
for the four methods. Labels/ids come from the real SmolLM2 vocabulary (token_strings of table9),
normalised as the fit does. Corpus windows are copied from --like; every layer gets a scan.

Rows go in through Workspace.neuron_row's format but are written with executemany in batches
(put_neuron per row would pay a transaction and a JSON+zlib of the examples each).

    python benchmarks/make_whole_model_ws.py OUT_DIR --like W [--neurons 46080] [--windows 300] [--seed 0]

W: a workspace built with the default fit on SmolLM2 and the fortunes corpus (e.g. `make demo`'s
workspaces/demo), for its vocabulary and corpus windows. 46,080 neurons: about 10 minutes and
7 GB on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
import zlib
from pathlib import Path

import numpy as np

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
N_LAYERS, D_MLP, WINDOW = 30, 1536, 64


def normalise_token(token: str) -> str:
    out = token.lower() if len(token) > 1 and token.istitle() else token
    if len(out) > 1 and any(c.isalpha() for c in out):
        out = out.strip()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--like", type=Path, required=True, help="a built SmolLM2 workspace (vocabulary, corpus windows)")
    ap.add_argument("--neurons", type=int, default=N_LAYERS * D_MLP)
    ap.add_argument("--windows", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=15 * 60, help="stop adding neurons after this many s")
    args = ap.parse_args()
    import n2g_fast
    from n2g_service.workspace import Workspace

    t_start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    src = sqlite3.connect(f"file:{args.like / 'n2g.sqlite'}?mode=ro", uri=True)
    meta = dict(src.execute("SELECT key, value FROM meta"))
    vocab = json.loads(meta["token_strings"])
    V = len(vocab)
    win = src.execute("SELECT n, length, tokens FROM windows WHERE id = 0").fetchone()
    windows = np.frombuffer(win[2], np.int32).reshape(win[0], win[1])

    # labels and their id sets, as the fit groups them
    by_label: dict[str, list[int]] = {}
    for i, t in enumerate(vocab):
        by_label.setdefault(normalise_token(t), []).append(i)
    label_of = [normalise_token(t) for t in vocab]
    # token frequency in the real corpus windows (+1 smoothing), so common tokens are common here too
    freq = np.bincount(windows.ravel(), minlength=V).astype(np.float64) + 0.05
    p_tok = freq / freq.sum()
    p_act = freq ** 0.6
    p_act /= p_act.sum()

    logp_tok, logp_act = np.log(p_tok), np.log(p_act)
    top_tokens = np.argsort(-freq)[:40]
    cdf_tok = np.cumsum(p_tok)
    cdf_tok[-1] = 1.0

    pre = {lab: '{"label": ' + json.dumps(lab) + ', "token_ids": ' + json.dumps(ids) +
           ', "ignore": false, "importance": 1.0, "activation": ' for lab, ids in by_label.items()}

    def topk_sample(logp, k):  # k distinct ids drawn with probabilities p (Gumbel top-k)
        keys = logp + rng.gumbel(size=V)
        return np.argpartition(-keys, k)[:k]

    ws = Workspace(args.out, create=True, model=MODEL, corpus="fortunes", hook="mlp.hook_post")
    for k in ("n_layers", "d_mlp", "d_vocab", "token_strings"):
        ws.set_meta(k, meta[k])
    ws.save_windows(windows)
    for layer in range(N_LAYERS):
        amax = rng.uniform(0.5, 4.0, D_MLP).astype(np.float32)
        ids = np.sort(rng.choice(len(windows), (D_MLP, 40)), axis=1)
        scores = np.sort(rng.uniform(0.1, 1.0, (D_MLP, 40)).astype(np.float32), axis=1)[:, ::-1] * amax[:, None]
        scores[:, 0] = amax
        ws.save_layer_scan(layer, amax, ids, scores, 1.0 + layer)
    ws.create_job("synthetic", {"layers": list(range(N_LAYERS))}, args.neurons)
    ws.update_job("synthetic", state="succeeded", done=args.neurons)

    # pools of stats/metrics templates (real stats are ~6.6 KB of arrays)
    def node(label, ids, imp, act, end, children):
        return {"label": label, "token_ids": ids, "ignore": False, "importance": imp, "activation": act,
                "end": end, "children": children}

    IGN = {"label": "<IGNORE>", "token_ids": [], "ignore": True, "importance": 0.0, "activation": None,
           "end": None, "children": []}

    def make_graph(layer, neuron, amax):
        small = rng.random() < 0.15
        n_graded = int(rng.integers(150, 450) if small else rng.integers(1800, 2150))
        n_act = int(min(150, max(1, rng.lognormal(2.6, 0.9))))
        act_ids = topk_sample(logp_act, n_act)
        act_labels = list(dict.fromkeys(label_of[i] for i in act_ids))
        single = rng.random() < 0.03  # single-token detectors (one frequent token, no context): pairs exist
        if single:
            act_labels = [label_of[int(top_tokens[rng.integers(len(top_tokens))])]]
        graded_ids = topk_sample(logp_tok, n_graded)
        taken = set(act_labels)
        labs = sorted({label_of[i] for i in graded_ids} - taken)
        ends = np.round(rng.uniform(-0.25, 0.45, len(labs)), 6).tolist()
        roots = ",".join(f'{pre[lab]}{e}, "end": {e}, "children": []}}' for lab, e in zip(labs, ends))
        head = json.dumps({"schema": "n2g.graph/v1", "model": MODEL, "layer": layer, "neuron": neuron,
                           "hook": "mlp.hook_post", "max_activation": amax})
        g = n2g_fast.NeuronGraph.from_json(head[:-1] + ', "roots": [' + roots + "]}")
        for lab in act_labels:  # firing paths: the activating token alone, and 1-3 context paths
            a = float(rng.uniform(0.5, 1.0))
            if single or rng.random() < 0.5:
                g.add_path((lab, by_label[lab], a), [], a)
            for _ in range(0 if single else int(rng.integers(1, 4))):
                depth = int(rng.integers(1, 5))
                ctx = []
                for d in range(depth):
                    if rng.random() < 0.2 and d < depth - 1:
                        ctx.append(None)
                    else:
                        cl = label_of[int(np.searchsorted(cdf_tok, rng.random()))]
                        ctx.append((cl, by_label[cl], float(rng.uniform(0.5, 1))))
                g.add_path((lab, by_label[lab], a), ctx, float(rng.uniform(0.5, 1.0)))
        g.finalize()
        return g

    # example bodies: a pool of pre-serialised train/test lists (sampled real windows)
    n_pool = 24
    bodies = []
    for _ in range(n_pool):
        sel = rng.choice(len(windows), args.windows + 10, replace=False)
        exs = []
        for w in sel:
            a = np.clip(rng.normal(0.05, 0.15, WINDOW), -0.17, 1.0)
            a[rng.integers(1, WINDOW)] = rng.uniform(0.5, 1.0)
            exs.append({"token_ids": windows[w].tolist(), "activations": np.round(a, 6).tolist()})
        text = '{"train": ' + json.dumps(exs[:args.windows]) + ', "test": ' + json.dumps(exs[args.windows:])
        co = zlib.compressobj(6)
        bodies.append((co, co.compress(text.encode()), len(text)))

    def make_stats(g):
        n_ex = 30
        return {"n_examples": n_ex, "n_paths": g.n_paths, "n_paths_added": int(rng.integers(10, 60)),
                "n_nodes": g.n_nodes, "n_important": rng.integers(0, 4, n_ex).tolist(),
                "n_augmented_positive": 0, "n_augmented_negative": 0,
                "augmented_by_proposer": {"model": {"positive": 0, "negative": 0},
                                          "embedding": {"positive": 0, "negative": 0}},
                "prune_lengths": rng.integers(0, 8, n_ex).tolist(), "pruned_tokens": rng.integers(2, 8, n_ex).tolist(),
                "scale_factors": np.round(rng.uniform(1, 1.45, n_ex), 6).tolist(),
                "trajectories": [[[int(j), round(float(v), 6)] for j, v in zip([0, 1, 2, 3, int(rng.integers(4, 63))],
                                                                                np.sort(rng.uniform(0.4, 1, 5)))]
                                 for _ in range(n_ex)],
                "method": "paper", "fit_config": {"activation_threshold": 0.5, "n_train": 30},
                "seconds": float(rng.uniform(0.5, 3)), "forward_passes_shared": 1000, "fit_tokens": 123456.0}

    def make_metrics():
        out = {}
        for m, d in (("n2g_all_paths_max", 0), ("n2g_greedy_deepest", 0.02), ("token_lookup", 0.1), ("ngram_lookup", 0.3)):
            p, r = float(rng.uniform(0.3, 1)), float(rng.uniform(0.2, 1))
            f1 = 2 * p * r / (p + r)
            tp = int(rng.integers(0, 10))
            out[m] = {"precision": p, "recall": r, "f1": max(0.0, f1 - d), "n_fires": 10, "n_predicted": tp,
                      "tp": tp, "fp": 0, "fn": 10 - tp}
        return out

    conn = ws._conn()
    sql = ("INSERT OR REPLACE INTO neurons (layer, neuron, max_activation, graph, examples, stats, metrics, job_id, "
           "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
    keys = [(l, n) for l in range(N_LAYERS) for n in range(D_MLP)][: args.neurons]
    batch, made, t0 = [], 0, time.perf_counter()
    raw_ex = zex = 0
    stopped_early = False
    for layer, neuron in keys:
        amax = float(rng.uniform(0.5, 4.0))
        g = make_graph(layer, neuron, amax)
        co, head, n_text = bodies[int(rng.integers(n_pool))]
        tail = f', "layer": {layer}, "neuron": {neuron}, "max_activation": {amax}}}'.encode()
        c2 = co.copy()
        packed = head + c2.compress(tail) + c2.flush()
        raw_ex += n_text + len(tail)
        zex += len(packed)
        row = (layer, neuron, amax, g.to_bytes(), packed, json.dumps(make_stats(g)), json.dumps(make_metrics()),
               "synthetic", time.time())
        batch.append(row)
        made += 1
        if len(batch) == 500:
            with ws.transaction() as c:
                c.executemany(sql, batch)
            batch = []
            el = time.perf_counter() - t0
            print(f"{made} neurons in {el:.0f} s ({1e3 * el / made:.1f} ms each); examples {raw_ex / made / 1e3:.0f} KB "
                  f"-> {zex / made / 1e3:.0f} KB", flush=True)
            if time.perf_counter() - t_start > args.time_limit:
                stopped_early = True
                break
    if batch:
        with ws.transaction() as c:
            c.executemany(sql, batch)
    ws.update_job("synthetic", total=made, done=made)
    print(f"DONE {made} neurons ({'stopped at the time limit' if stopped_early else 'all'}) in "
          f"{time.perf_counter() - t_start:.0f} s", flush=True)
    ws.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
