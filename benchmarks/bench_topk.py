"""The scan's host-side cost: folding one batch of window maxima into every layer's top-k
(``n2g_fast.TopK.update_window_max``), as the scan does after each forward pass, against reading
the same scores once (numpy's max over the batch: a_max alone, the least any fold must do),
measured in the same run. Checks that the result equals ``TopK.update`` on the same windows.

On a GPU the forward pass is fast, so this fold is what keeps the scan below a bare forward pass.

    .venv/bin/python benchmarks/bench_topk.py [--layers 30] [--neurons 1536] [--batch 256] [--batches 16] [--k 40]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import n2g_fast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--neurons", type=int, default=1536)
    ap.add_argument("--batch", type=int, default=256, help="windows a batch")
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--k", type=int, default=40)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    # activation-like window maxima: mostly small, a heavy tail (so lists keep changing a while)
    data = [rng.gumbel(size=(args.batch, args.neurons)).astype(np.float32) for _ in range(args.batches)]
    acc = [n2g_fast.TopK(args.neurons, args.k) for _ in range(args.layers)]
    times = []
    for b, x in enumerate(data):
        ids = np.arange(b * args.batch, (b + 1) * args.batch, dtype=np.int64)
        t0 = time.perf_counter()
        for a in acc:
            a.update_window_max(x, ids)
        times.append(time.perf_counter() - t0)
    per = float(np.median(times))
    n = args.layers * args.batch * args.neurons
    ref = []
    for x in data:
        t0 = time.perf_counter()
        for _ in range(args.layers):
            np.max(x, axis=0)
        ref.append(time.perf_counter() - t0)
    ref_per = float(np.median(ref))
    print(f"{args.layers} layers x {args.batch} windows x {args.neurons} neurons, k {args.k}, a batch (median of "
          f"{args.batches}):")
    print(f"  update_window_max  {per * 1e3:7.1f} ms  ({per / n * 1e9:.2f} ns a score; first batch {times[0] * 1e3:.1f} ms)")
    print(f"  numpy max (read)   {ref_per * 1e3:7.1f} ms  -> the fold costs {per / ref_per:.1f}x reading the scores once")
    one = n2g_fast.TopK(args.neurons, args.k)
    for b, x in enumerate(data):
        one.update(x[:, None, :], np.arange(b * args.batch, (b + 1) * args.batch, dtype=np.int64))
    same = all(np.array_equal(u, v) for u, v in zip(one.top(), acc[0].top())) and \
        np.array_equal(one.max_activation(), acc[0].max_activation())
    print(f"  same top-k and a_max as TopK.update: {same}")


if __name__ == "__main__":
    main()
