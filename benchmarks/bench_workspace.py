"""How interactive a built workspace is over gRPC (not a test): the whole-model calls a user makes.

Serves the workspace with a real `n2g serve --no-model` process (or uses --server) and times,
through the Python client, each call a lab makes on a whole model's graphs: listing, search for
common labels, the in-context list, every similar and subset pair, one neuron's pairs and
neighbours, a drawing, predictions over many neurons, and the report. The first call of a kind
(which loads the graph store into the server) is shown apart from the median of --repeats more.

    python benchmarks/bench_workspace.py --workspace workspaces/all64
    python benchmarks/bench_workspace.py --server HOST:PORT [--token T]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "python_client"), str(REPO / "benchmarks")]

from _server import served  # noqa: E402
from n2g.client import N2GClient  # noqa: E402

COMMON_LABELS = [" the", ".", ",", " and", " of", "\n", " to", " a"]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, help="serve this workspace (--no-model) for the run")
    p.add_argument("--server", default=None, help="HOST:PORT of a running server")
    p.add_argument("--token", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--predict-neurons", type=int, default=64, help="neurons a Predict call asks for")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True, help="time the report too")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if (args.workspace is None) == (args.server is None):
        p.error("give --workspace or --server")

    rows: list[dict] = []

    def row(name: str, first: float | None, again: list[float], what: str) -> None:
        r = {"call": name, "first_s": first, "median_s": statistics.median(again) if again else None, "result": what}
        rows.append(r)
        if not args.json:
            f = f"{first * 1e3:>10.1f} ms" if first is not None else " " * 13
            m = f"{r['median_s'] * 1e3:>10.1f} ms" if again else " " * 13
            print(f"{name:<34} first {f}   again (median of {len(again)}) {m}   {what}", flush=True)

    def measure(name: str, fn, describe) -> object:
        first, out = timed(fn)
        again = [timed(fn)[0] for _ in range(args.repeats)]
        row(name, first, again, describe(out))
        return out

    with contextlib.ExitStack() as stack:
        address = args.server or stack.enter_context(served(args.workspace))
        c = stack.enter_context(N2GClient(address, token=args.token))
        t_ready, _ = timed(lambda: c.wait_ready(300))
        row("server ready", t_ready, [], f"{address}")
        graphs = measure("list graphs", c.list_graphs, lambda g: f"{len(g)} graphs")
        keys = [g.key for g in graphs]
        if not keys:
            print("no graphs built in this workspace", file=sys.stderr)
            return 2
        layers = sorted({k[0] for k in keys})
        info = c.model_info()
        if not args.json:
            print(f"# {len(keys)} graphs over {len(layers)} layers ({layers[0]}-{layers[-1]}) of {info.model}",
                  flush=True)
        for label in COMMON_LABELS[:3]:
            measure(f"search {label!r} activating", lambda label=label: c.search([(label, "activating")]),
                    lambda r: f"{r.total} neurons")
        measure(f"search {COMMON_LABELS[0]!r} and {COMMON_LABELS[3]!r} either",
                lambda: c.search([(COMMON_LABELS[0], "either"), (COMMON_LABELS[3], "either")]),
                lambda r: f"{r.total} neurons")
        measure("in-context list", c.in_context_neurons, lambda r: f"{r.total} neurons")
        for kind in ("similar", "subset"):
            measure(f"all {kind} pairs", lambda kind=kind: list(c.pairs(kind)), lambda r: f"{len(r)} pairs")
        rng = random.Random(0)
        one = rng.choice(keys)
        measure(f"similar to {one[0]}:{one[1]}", lambda: c.similar(*one),
                lambda r: f"{len(r.similar)} similar, {len(r.subset)} subset, {len(r.neighbours)} neighbours")
        measure(f"drawing of {one[0]}:{one[1]} (svg)", lambda: c.graph(*one, svg=True),
                lambda g: f"{len(g.svg):,} bytes")
        d_vocab = info.d_vocab or 1000
        seqs = [[rng.randrange(d_vocab) for _ in range(64)] for _ in range(4)]
        some = rng.sample(keys, min(args.predict_neurons, len(keys)))
        measure(f"predict {len(some)} neurons x 4 x 64 tokens", lambda: c.predict(some, token_ids=seqs),
                lambda a: f"{len(a.neurons)} neurons")
        measure(f"predict all {len(keys)} neurons x 1 x 64", lambda: c.predict(keys, token_ids=seqs[:1]),
                lambda a: f"{len(a.neurons)} neurons")
        if args.report:
            t, data = timed(lambda: c.report(timeout=1800))
            row("report (zip)", t, [], f"{len(data):,} bytes")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
