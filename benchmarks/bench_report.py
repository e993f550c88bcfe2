"""Times `n2g_service.report.write_report` on a workspace of synthetic neurons (issue 5).

Synthetic data, made here: a 5,000-token vocabulary of word-like strings (with spaces, newlines,
tabs and non-ASCII mixed in), per neuron a graph of 6-30 random paths (1-4 context tokens, some
IGNOREs) built with n2g_fast.NeuronGraph, 10 train + 10 test examples of 64 tokens each with
activations, four evaluation methods' metrics and three activation trajectories; token strings are
stored once in the workspace (meta `token_strings`), as a build is asked to do.

    python benchmarks/bench_report.py [--neurons 1000] [--layers 4] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _sub in ("service", "python_client"):  # as an installed checkout's .pth does
    if str(ROOT / _sub) not in sys.path:
        sys.path.insert(0, str(ROOT / _sub))


def make_workspace(path: Path, n_neurons: int, n_layers: int, seed: int = 0, window: int = 64,
                   vocab_size: int = 5000):
    import n2g_fast
    from n2g_service.workspace import NeuronRecord, Workspace

    rng = np.random.default_rng(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "qu", "ü", "é", "ß"]
    vocab = [" " * int(rng.random() < 0.5) + "".join(rng.choice(syll, rng.integers(1, 4))) for _ in range(vocab_size)]
    vocab[:6] = ["\n", "\t", " ", ".", ",", "<b>&amp;</b>"]
    ws = Workspace(path, create=True, model="synthetic/bench", corpus="synthetic", hook="mlp.hook_post")
    ws.set_meta("token_strings", json.dumps(vocab))
    ws.create_job("bench", {"layers": list(range(n_layers)), "sample": n_neurons // n_layers}, n_neurons)
    ws.update_job("bench", state="succeeded")
    zipf = 1.0 / np.arange(1, vocab_size + 1) ** 1.1
    zipf /= zipf.sum()
    per_layer = n_neurons // n_layers + 1
    made = 0
    for layer in range(n_layers):
        for neuron in range(per_layer):
            if made == n_neurons:
                break
            g = n2g_fast.NeuronGraph("synthetic/bench", layer, neuron, "mlp.hook_post", 3.0)
            acts_tok = rng.choice(vocab_size, rng.integers(1, 6), p=zipf)
            for _ in range(rng.integers(6, 31)):
                a = int(rng.choice(acts_tok))
                ctx = []
                for _ in range(rng.integers(0, 5)):
                    if rng.random() < 0.25:
                        ctx.append(None)
                    else:
                        c = int(rng.choice(vocab_size, p=zipf))
                        ctx.append((vocab[c], [c], float(rng.uniform(0.75, 1))))
                end = float(rng.uniform(0.5, 1))
                g.add_path((vocab[a], [a], end), ctx, end)
            g.finalize()
            seqs = rng.choice(vocab_size, (20, window), p=zipf)
            seqs[:, rng.integers(1, window, 20)] = int(acts_tok[0])
            preds = g.predict(seqs)
            exs = [{"token_ids": s.tolist(),
                    "activations": np.clip(p * rng.uniform(0.8, 1.1) + rng.normal(0, 0.03, window), -0.1, 1).round(4).tolist()}
                   for s, p in zip(seqs, preds)]
            f1 = float(rng.uniform(0.2, 0.9))
            metrics = {m: {"precision": f1, "recall": min(1.0, f1 + d), "f1": max(0.0, f1 - d)}
                       for m, d in (("n2g_all_paths_max", 0), ("n2g_greedy_deepest", 0.03),
                                    ("token_lookup", 0.1), ("ngram_lookup", 0.3))}
            trajs = [{"context_tokens": list(range(0, 20, 2)),
                      "activations": (1 - np.exp(-np.arange(0, 20, 2) / (2 + 2 * layer))).round(3).tolist()}
                     for _ in range(3)]
            ws.put_neuron(NeuronRecord(layer, neuron, 3.0, g.to_bytes(), {"train": exs[:10], "test": exs[10:]},
                                       {"n_paths": g.n_paths, "trajectories": trajs}, metrics))
            made += 1
    return ws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--neurons", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--keep", type=Path, default=None, help="write the report here and keep it")
    args = ap.parse_args()
    from n2g_service.report import write_report

    tmp = Path(tempfile.mkdtemp(prefix="n2g-bench-report-"))
    try:
        t0 = time.perf_counter()
        make_workspace(tmp / "ws", args.neurons, args.layers)
        t_ws = time.perf_counter() - t0
        out = args.keep or (tmp / "report")
        t0, c0 = time.perf_counter(), time.process_time()
        index = write_report(tmp / "ws", out, use_model_tokenizer=False)
        t_report, c_report = time.perf_counter() - t0, time.process_time() - c0
        files = [p for p in out.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        print(f"synthetic workspace: {args.neurons} neurons in {args.layers} layers, made in {t_ws:.1f} s")
        print(f"write_report: {t_report:.2f} s wall ({c_report:.2f} s CPU) for {args.neurons} neurons "
              f"({1000 * t_report / max(args.neurons, 1):.2f} ms a neuron); "
              f"{len(files)} files, {size / 2**20:.1f} MiB; index {index}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
