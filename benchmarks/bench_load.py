"""Load benchmark of the n2g server's Predict RPC (not a test).

N concurrent clients (each its own channel, all in one asyncio loop) call Predict back to back for
a fixed duration; prints requests/s, p50/p99 latency and errors per client count, and the slowest
health check made twice a second meanwhile (the server must stay available under load).

    python benchmarks/bench_load.py                       # builds a small native workspace, serves it
    python benchmarks/bench_load.py --workspace W         # serves W (--no-model) on a free port
    python benchmarks/bench_load.py --server HOST:PORT    # an already running server
    options: --clients 1 8 64 --duration 60 --neurons 8 --sequences 4 --tokens 64 --token T

With --evaluations N it runs N concurrent Evaluate calls (every built graph on the three test sets)
instead, and prints how many answered or were refused and the slowest of the short calls (a
search) made meanwhile: long computations beyond half the server's threads are refused, so short
calls do not queue behind them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "python_client")]

from n2g.client import AsyncN2GClient, N2GClient, N2GError  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from _server import env as _env, served  # noqa: E402


def _native_workspace(root: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from n2g_servers import write_corpus

    ws = root / "ws"
    corpus = write_corpus(root / "corpus.jsonl")
    print("building a native workspace (16 neurons) ...", file=sys.stderr)
    p = subprocess.run([sys.executable, "-m", "n2g.cli", "build", "--workspace", str(ws), "--model", "native:0",
                        "--corpus", str(corpus), "--layers", "0", "1", "--sample", "8", "--window-tokens", "32",
                        "--device", "cpu"], env=_env(), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"building the benchmark workspace failed:\n{p.stdout}\n{p.stderr}")
    return ws


async def _client_loop(address: str, token: str | None, stop_at: float, make_request, lat: list, errors: Counter,
                       timeout: float) -> None:
    async with AsyncN2GClient(address, token=token, timeout=timeout, retries=0) as c:
        while time.perf_counter() < stop_at:
            neurons, seqs = make_request()
            t0 = time.perf_counter()
            try:
                await c.predict(neurons, token_ids=seqs)
                lat.append(time.perf_counter() - t0)
            except N2GError as e:
                errors[e.code.name] += 1


async def _health_loop(address: str, stop_at: float, lat: list, errors: Counter) -> None:
    async with AsyncN2GClient(address, retries=0) as c:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                status = await c.health(timeout=10)
                lat.append(time.perf_counter() - t0)
                if status != "SERVING":
                    errors[f"health {status}"] += 1
            except N2GError as e:
                errors[f"health {e.code.name}"] += 1
            await asyncio.sleep(0.5)


async def _run(address: str, token: str | None, n_clients: int, duration: float, make_request,
               timeout: float) -> dict:
    lat: list[float] = []
    health_lat: list[float] = []
    errors: Counter = Counter()
    t0 = time.perf_counter()
    stop_at = t0 + duration
    await asyncio.gather(_health_loop(address, stop_at, health_lat, errors),
                         *(_client_loop(address, token, stop_at, make_request, lat, errors, timeout)
                           for _ in range(n_clients)))
    wall = time.perf_counter() - t0
    a = np.asarray(lat) * 1000 if lat else np.zeros(1)
    return {"clients": n_clients, "requests": len(lat), "seconds": round(wall, 1),
            "rps": round(len(lat) / wall, 1), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "errors": sum(errors.values()),
            "error_codes": dict(errors), "health_checks": len(health_lat),
            "health_max_ms": round(max(health_lat, default=float("nan")) * 1000, 2)}


def _evaluation_flood(address: str, token: str | None, n: int, as_json: bool, retry: bool = False) -> int:
    """n concurrent Evaluate calls (all graphs, three test sets); a search every 0.5 s meanwhile.
    ``retry``: the evaluating clients retry the busy refusals (RetryInfo) as the client library
    does by default, so every evaluation should end answered; else each is tried once."""
    import threading

    outcome: Counter = Counter()
    t_all = time.perf_counter()
    with N2GClient(address, token=token, timeout=600, retries=5 if retry else 0) as c:
        t0 = time.perf_counter()
        c.evaluate(test_sets=True)
        one = time.perf_counter() - t0

        def evaluate():
            try:
                c.evaluate(test_sets=True)
                outcome["answered"] += 1
            except N2GError as e:
                outcome[e.code.name] += 1

        threads = [threading.Thread(target=evaluate) for _ in range(n)]
        for t in threads:
            t.start()
        short = []
        while any(t.is_alive() for t in threads):
            t0 = time.perf_counter()
            c.search([(1, "either")])
            short.append(time.perf_counter() - t0)
            time.sleep(0.5)
        for t in threads:
            t.join()
    row = {"evaluations": n, "retry": retry, "one_evaluation_s": round(one, 2), "outcome": dict(outcome),
           "all_s": round(time.perf_counter() - t_all, 1),
           "searches": len(short), "search_max_ms": round(max(short, default=float("nan")) * 1000, 1)}
    print(json.dumps(row, indent=2) if as_json else
          f"{n} concurrent evaluations{' retrying when busy' if retry else ''} (one alone "
          f"{row['one_evaluation_s']} s): {dict(outcome)} in {row['all_s']} s; "
          f"slowest of {len(short)} searches meanwhile {row['search_max_ms']} ms", flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default=None, help="HOST:PORT of a running server")
    p.add_argument("--workspace", type=Path, default=None, help="serve this workspace (--no-model) for the run")
    p.add_argument("--token", default=None)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--duration", type=float, default=60.0, help="seconds per client count (default 60)")
    p.add_argument("--neurons", type=int, default=8, help="neurons per request")
    p.add_argument("--sequences", type=int, default=4, help="token sequences per request")
    p.add_argument("--tokens", type=int, default=64, help="tokens per sequence")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per request (s)")
    p.add_argument("--max-workers", type=int, default=32, help="server threads when this script starts it")
    p.add_argument("--evaluations", type=int, default=0,
                   help="instead: this many concurrent Evaluate calls, and short calls meanwhile")
    p.add_argument("--retry", action="store_true",
                   help="with --evaluations: the clients retry busy refusals (the client library's default)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    tmp = None
    stack = contextlib.ExitStack()
    address = args.server
    if address is None:
        ws = args.workspace
        if ws is None:
            tmp = tempfile.TemporaryDirectory(prefix="n2g-bench-")
            ws = _native_workspace(Path(tmp.name))
        address = stack.enter_context(served(ws, "--max-workers", str(args.max_workers)))
    try:
        with N2GClient(address, token=args.token) as c:
            c.wait_ready(120)
            info = c.model_info()
            keys = [g.key for g in c.list_graphs()]
        if not keys:
            print("the server has no graphs built", file=sys.stderr)
            return 2
        if args.evaluations:
            return _evaluation_flood(address, args.token, args.evaluations, args.json, args.retry)
        d_vocab = info.d_vocab or 1000
        rng = random.Random(0)

        def make_request():
            neurons = rng.sample(keys, min(args.neurons, len(keys)))
            seqs = [[1] + [rng.randrange(d_vocab) for _ in range(args.tokens - 1)] for _ in range(args.sequences)]
            return neurons, seqs

        print(f"server {address}: {len(keys)} graphs; request = {min(args.neurons, len(keys))} neurons x "
              f"{args.sequences} sequences x {args.tokens} tokens; {args.duration:g} s per run", file=sys.stderr)
        rows = []
        for n in args.clients:
            row = asyncio.run(_run(address, args.token, n, args.duration, make_request, args.timeout))
            rows.append(row)
            if not args.json:
                print(f"{n:>4} clients: {row['requests']:>7} requests  {row['rps']:>8.1f} req/s  "
                      f"p50 {row['p50_ms']:>8.2f} ms  p99 {row['p99_ms']:>8.2f} ms  errors {row['errors']}"
                      + (f" {row['error_codes']}" if row["errors"] else "")
                      + f"  health max {row['health_max_ms']:.1f} ms ({row['health_checks']} checks)", flush=True)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"failed calls: {sum(r['errors'] for r in rows) or 'none'}", flush=True)
        return 0 if all(r["errors"] == 0 for r in rows) else 1
    finally:
        stack.close()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
