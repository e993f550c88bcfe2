"""The `n2g` command line.

Every operation works against a server (`--server HOST:PORT`, or $N2G_SERVER) or locally on a
workspace directory (`--workspace DIR`). Remote commands need only the client library and tqdm
(progress bars); local commands and `serve` import the service lazily, so `n2g --help` never loads torch.
Output is a human-readable table by default, JSON with `--json`.

    n2g serve --workspace W [--model M | --no-model] [--port P] [--token T] [--tls-cert C --tls-key K]
    n2g info | build | jobs | graph | predict | activations | tokenize | search | similar | eval
        | export | report   (each with --server HOST:PORT or --workspace DIR)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from . import vocab
from .vocab import DEFAULT_MODEL

# gRPC's C core logs to stderr on its own (a line per failed TLS handshake, a port in use...,
# before the command's own one-line error about it); read at its first import, so set before any.
# GRPC_VERBOSITY=ERROR (or DEBUG) in the environment shows them.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")


class CliError(Exception):
    """A usage error: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Output helpers

# Characters a terminal acts on rather than shows: controls (ESC starts sequences that set the
# title, clear the screen, ...; newline and tab excepted), line separators and bidi controls.
_TERMINAL_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)] if c not in (0x09, 0x0a)}
_TERMINAL_CONTROLS.update({c: f"\\u{c:04x}" for c in (0x061c, 0x200e, 0x200f, 0x2028, 0x2029, *range(0x202a, 0x202f),
                                                       *range(0x2066, 0x206a))})


# The same characters as JSON escapes, for JSON text that holds them raw (n2g_fast's graph JSON
# escapes only C0 controls): _printable's "\x85" in a string is no JSON.
_JSON_CONTROLS = {c: f"\\u{c:04x}" for c in _TERMINAL_CONTROLS}


def _printable(text: Any) -> str:
    """`text` safe to print: strings from a workspace or a server (model and corpus names, error
    messages, job messages) may hold terminal controls."""
    return str(text).translate(_TERMINAL_CONTROLS)


def print(*parts: Any, **kw: Any) -> None:  # noqa: A001 - every line this command prints is shown safely
    import builtins

    builtins.print(*(_printable(p) for p in parts), **kw)


def _plain(obj: Any) -> Any:
    """JSON-ready copy of dataclasses, numpy arrays and tuples."""
    import numpy as np

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    return obj


def _print_json(obj: Any) -> None:
    print(json.dumps(_plain(obj), indent=2, sort_keys=True))


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _tok(s: str) -> str:
    return repr(s)[1:-1] if s else "''"


def _key(k) -> str:
    return f"{k[0]}:{k[1]}"


def _short(items: Sequence[str], n: int = 6) -> str:
    shown = ", ".join(_tok(x) for x in items[:n])
    return shown + (f" (+{len(items) - n})" if len(items) > n else "")


# ---------------------------------------------------------------------------------------------
# Connection: a server or a local workspace

def _add_conn(p: argparse.ArgumentParser, *, workspace_required: bool = False) -> None:
    g = p.add_argument_group("where")
    g.add_argument("--server", default=None, help="HOST:PORT of an n2g server (default $N2G_SERVER)")
    p.set_defaults(server_from_env=not workspace_required)
    g.add_argument("--workspace", type=Path, default=None, help="work locally on this workspace directory")
    g.add_argument("--token", default=None, help="bearer token for the server (default $N2G_TOKEN)")
    g.add_argument("--tls", action="store_true", help="connect with TLS (system root certificates)")
    g.add_argument("--tls-ca", type=Path, default=None, help="connect with TLS, trusting this CA/certificate (PEM)")
    g.add_argument("--tls-server-name", default=None, help="expected server name in its certificate")
    g.add_argument("--timeout", type=float, default=120.0, help="deadline of each call in seconds (default 120)")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")


def _client(args, *, needs_model: bool = True, create: bool = False, writes: bool = False):
    """The client every command uses: over the network (--server) or on a local workspace
    (--workspace), the same API and the same application layer below either."""
    if args.server:
        from .client import N2GClient

        try:
            return N2GClient(args.server, token=args.token, tls=args.tls, root_certificates=args.tls_ca,
                             tls_server_name=args.tls_server_name, timeout=args.timeout)
        except (ValueError, OSError) as e:
            raise CliError(str(e)) from None
    if args.workspace is None:
        raise CliError("give --server HOST:PORT (or set N2G_SERVER) or --workspace DIR")
    from .local import LocalN2GClient

    return LocalN2GClient(args.workspace, model=getattr(args, "model", None), corpus=getattr(args, "corpus", None),
                          no_model=not needs_model, create=create, device=getattr(args, "device", None),
                          timeout=args.timeout, writes=writes)


def _neurons(specs: Sequence[str]) -> list[tuple[int, int]]:
    from .client import parse_neuron

    try:
        return [parse_neuron(s) for s in specs]
    except ValueError as e:
        raise CliError(str(e)) from None


def _token_lists(specs: Sequence[str]) -> list[list[int]]:
    out = []
    for s in specs:
        try:
            out.append([int(x) for x in s.replace(",", " ").split()])
        except ValueError:
            raise CliError(f"bad --tokens {s!r}: give token ids separated by spaces or commas") from None
    return out


# ---------------------------------------------------------------------------------------------
# serve

def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC server on a workspace")
    p.add_argument("--workspace", required=True, type=Path, help="workspace directory (created if missing)")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--model", default=None, help=f"model name (default: the workspace's, else {DEFAULT_MODEL}); "
                                                 "native:<seed> is a small random model for tests")
    m.add_argument("--no-model", action="store_true", help="serve stored graphs only; no model is loaded")
    p.add_argument("--corpus", default=None, help="corpus of a new workspace (default fortunes)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, localhost only)")
    p.add_argument("--port", type=int, default=vocab.DEFAULT_PORT,
                   help=f"port (default {vocab.DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--hook", default=None, help="neuron hook (default mlp.hook_post; SoLU models mlp.hook_mid)")
    p.add_argument("--token", default=None,
                   help="require 'authorization: Bearer TOKEN' on every RPC but health (default $N2G_TOKEN; off)")
    p.add_argument("--tls-cert", type=Path, default=None, help="server certificate (PEM) to serve TLS")
    p.add_argument("--tls-key", type=Path, default=None, help="private key (PEM) of --tls-cert")
    p.add_argument("--allow-remote-without-token", action="store_true",
                   help="allow --host beyond loopback with no --token (only on a trusted network)")
    p.add_argument("--max-workers", type=int, default=32,
                   help="concurrent RPC threads (default 32); at most half run true activations or "
                        "evaluations at once")
    p.add_argument("--max-streams", type=int, default=None,
                   help="open streams (watch, pairs, export, report) at once (default max-workers / 4)")
    p.add_argument("--no-resume", action="store_true", help="do not resume unfinished jobs at start")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster that builds with --executor ray join (default: a local one); "
                        "clients cannot name another")
    from .types import Limits

    lim = p.add_argument_group("request limits (0 = none)")
    for f in dataclasses.fields(Limits):
        lim.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default, help=f"default {f.default}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _cmd_serve(args) -> int:
    import signal

    # a stop asked while the service is still importing ends cleanly; serve() installs its own
    # handlers once it starts (they stop the start-up or the server just as cleanly)
    previous = {sig: signal.signal(sig, lambda signum, frame: sys.exit(0)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve(args)
    finally:  # main() run in-process (tests, embedding) leaves the caller's handlers as they were
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(args) -> int:
    import logging

    from n2g_service.server import serve

    from .types import Limits

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
    token = args.token if args.token is not None else os.environ.get("N2G_TOKEN")
    try:  # serve() checks the options (token, TLS files, port, threads) before it loads anything
        serve(args.workspace, args.model, no_model=args.no_model, corpus=args.corpus, host=args.host, port=args.port,
              device=args.device, hook=args.hook, token=token, tls_cert=args.tls_cert, tls_key=args.tls_key,
              limits=limits, max_workers=args.max_workers, max_streams=args.max_streams, resume=not args.no_resume,
              allow_remote_without_token=args.allow_remote_without_token, ray_address=args.ray_address, block=True)
    except (OSError, ValueError) as e:
        raise CliError(str(e)) from None
    return 0


# ---------------------------------------------------------------------------------------------
# info, tokenize

def _cmd_info(args) -> int:
    with _client(args, needs_model=False) as c:
        info = c.model_info()
    if args.json:
        _print_json(info)
        return 0
    print(f"model      {info.model} ({'loaded on ' + info.device if info.loaded else 'not loaded'})")
    print(f"shape      {info.n_layers} layers x {info.d_mlp} neurons, vocabulary {info.d_vocab}, context "
          f"{info.n_ctx or '?'} tokens, hook {info.hook}")
    print(f"workspace  {info.workspace} (corpus {info.corpus})")
    print(f"built      {info.neurons_built} neurons")
    if info.layers:
        print(_table([(l.layer, "yes" if l.scanned else "no", l.neurons_built) for l in info.layers],
                     ["layer", "scanned", "built"]))
    return 0


def _cmd_tokenize(args) -> int:
    with _client(args) as c:
        out = c.tokenize(args.texts, skip_bos=args.skip_bos)
    if args.json:
        _print_json(out)
        return 0
    for text, t in zip(args.texts, out):
        print(f"{text!r}: {len(t.token_ids)} tokens")
        print(_table([(i, int(tid), _tok(lab)) for i, (tid, lab) in enumerate(zip(t.token_ids, t.tokens))],
                     ["pos", "id", "token"]))
    return 0


# ---------------------------------------------------------------------------------------------
# build and jobs

def _add_build(sub) -> None:
    p = sub.add_parser("build", help="scan the corpus and build (and evaluate) neuron graphs")
    _add_conn(p)
    p.add_argument("--model", default=None, help=f"local: model name (default {DEFAULT_MODEL}, offline)")
    p.add_argument("--corpus", default=None,
                   help="local: 'fortunes' (default), a .txt/.jsonl file or directory, or hf:<dataset>")
    p.add_argument("--layers", nargs="+", required=True,
                   help="layers to build: numbers, a range (0-5), or all")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--neurons", type=int, nargs="+", help="neuron indices (in every layer asked)")
    g.add_argument("--sample", type=int, help="a seeded random sample of this many live neurons per layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-size", type=int, default=None,
                   help="neurons fitted together (shared forward passes); default: sized to the device (8 on a CPU)")
    p.add_argument("--device", default=None, help="local: cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--k", type=int, default=None,
                   help="top-k examples per neuron (default: what the fit method needs, 40 for the default fit, 20 for paper)")
    p.add_argument("--window-tokens", type=int, default=None, help="tokens per corpus window (default 64)")
    p.add_argument("--config", default=None, help='JSON config overrides, e.g. \'{"fit": {"n_substitutes": 3}}\'')
    p.add_argument("--method", default=None, help="fit method: paper (the paper's N2G) or calibrated "
                                                  "(learns from more windows); default: the server's")
    run = p.add_argument_group("how the build runs (results are the same)")
    run.add_argument("--executor", choices=("inprocess", "ray"), default=None, help="default inprocess")
    run.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local cluster)")
    run.add_argument("--workers", type=int, default=None,
                     help="Ray actors (default: one per GPU, else 1; more than the GPUs share them evenly)")
    run.add_argument("--worker-threads", type=int, default=None,
                     help="torch threads per CPU actor (default: the CPU count / workers)")
    run.add_argument("--precision", choices=("float32", "bfloat16", "float16"), default=None,
                     help="scan forward passes (GPU; default float32)")
    run.add_argument("--shard-windows", type=int, default=None, help="corpus windows per scan shard (default 1024)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (units, tokens, layers) and a time estimate; build nothing")
    p.add_argument("--detach", action="store_true", help="remote: start the job and print its id, do not watch")
    p.add_argument("--job-id", default=None, help="name the job (default: a new random id)")


# Stages with a countable amount of work, each drawn as its own bar (with tqdm's ETA).
_BAR_UNITS = {"scan": ("scanning the corpus", "window"), "merge": ("merging scan shards", "layer"),
              "fit": ("building neurons", "neuron")}


def _progress_printer(json_mode: bool):
    """A JobEvent callback drawing one progress bar per stage (or JSON lines with --json)."""
    bars: dict[str, Any] = {}
    shown_states: set[str] = set()

    def on_event(ev) -> None:
        if json_mode:
            print(json.dumps(_plain(ev)), flush=True)
            return
        if ev.stage == "state":  # each (re)opened watch starts with the job's state: say each once
            if ev.message in shown_states:
                return
            shown_states.add(ev.message)
        if ev.stage in _BAR_UNITS and ev.total:
            bar = bars.get(ev.stage)
            if bar is None:
                from tqdm import tqdm

                for other in bars.values():  # the previous stage is over
                    other.close()
                desc, unit = _BAR_UNITS[ev.stage]
                bar = bars[ev.stage] = tqdm(total=ev.total, initial=ev.done, desc=desc, unit=unit, file=sys.stderr)
            bar.total = ev.total
            bar.n = ev.done
            bar.set_postfix_str(_printable(ev.message)[-40:], refresh=False)  # drawn once, below
            bar.refresh()
        elif ev.stage in ("corpus", "state") or (ev.stage in _BAR_UNITS and ev.message):
            print(f"[{ev.stage}] {ev.message}", file=sys.stderr)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    on_event.close = close  # type: ignore[attr-defined]
    return on_event


def _cmd_build(args) -> int:
    """Local (--workspace) and remote (--server) builds are the same calls: start the job, watch it."""
    if args.detach and args.server is None:
        raise CliError("--detach needs --server: a local build runs in this process")
    config = _config(args.config) or {}
    if args.method:
        config.setdefault("fit", {})["method"] = args.method
    kw = dict(sample=args.sample, seed=args.seed, group_size=args.group_size, k=args.k,
              window_tokens=args.window_tokens, config=config or None, executor=args.executor,
              ray_address=args.ray_address, workers=args.workers, worker_threads=args.worker_threads,
              precision=args.precision,
              shard_windows=args.shard_windows)
    layers = _layers(args.layers)
    if args.sample is not None and args.sample < 1:
        raise CliError(f"--sample must be at least 1 (neurons a layer), got {args.sample}")
    # a dry run writes nothing: on an existing workspace it is a reader, so it also answers while
    # a build is writing there ("how long is left?")
    reader = False
    if args.dry_run and args.workspace is not None:
        from n2g_service.workspace import Workspace

        reader = Workspace.exists(args.workspace)
        if not reader and not getattr(args, "_scratch", False):
            # plan on a scratch workspace, removed after: nothing is left behind
            import shutil
            import tempfile

            scratch = tempfile.mkdtemp(prefix="n2g-plan-")
            try:
                return _cmd_build(argparse.Namespace(**{**vars(args), "workspace": Path(scratch) / "ws",
                                                        "_scratch": True}))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    with _client(args, create=not reader) as c:
        if args.dry_run:
            plan = c.plan_build(layers, args.neurons, **kw)
            _print_json(plan) if args.json else print(plan.summary)
            return 0
        job = c.start_build(layers, args.neurons, job_id=args.job_id, **kw)
        if args.detach:
            _print_json(job) if args.json else print(job.id)
            return 0
        print(f"job {job.id} {job.state}", file=sys.stderr)
        printer = _progress_printer(args.json)
        last: list = []

        def on_event(ev) -> None:
            printer(ev)
            last[:] = [ev]
        try:
            job = c.wait_job(job.id, progress=on_event)
        except KeyboardInterrupt:
            if args.server is None:  # the build runs in this process: it stops with it, as the user asked
                c.cancel_job(job.id)
                print(f"\ninterrupted: job {job.id} cancelled; what it committed is kept, and the same command "
                      "builds the rest", file=sys.stderr)
            raise
        finally:
            printer.close()
    if job.state != "succeeded":
        print(f"error: job {job.id} {job.state}: {job.error}", file=sys.stderr)
        return 1
    if not args.json:  # with --json, the last line is the final event (it holds the job)
        said = last[0].message.removeprefix("build finished: ") if last and last[0].stage == "done" else ""
        print(f"job {job.id}: {job.total} neurons in {args.workspace or args.server}" + (f" ({said})" if said else ""))
    return 0


def _layers(specs: Sequence[str]) -> list[int] | str:
    """Layer numbers, or one spec string ("all", "0-5", "0,2,4-6") for the server to resolve
    (ASCII digits only: int() would take "0_1", "+1" and other scripts' digits)."""
    if all(s.isascii() and s.isdigit() for s in specs):
        return [int(x) for x in specs]
    return ",".join(specs)


def _layer_filter(specs: Sequence[str] | None) -> list[int] | None:
    """A listing's --layers (the build's grammar: numbers, ranges, lists; all = no filter)."""
    from .layers import layer_filter

    try:
        return layer_filter(specs)
    except ValueError as e:
        raise CliError(f"--layers: {e}") from None


def _config(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f"--config is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CliError('--config must be a JSON object, e.g. \'{"fit": {"n_substitutes": 3}}\'')
    return config


def _add_jobs(sub) -> None:
    p = sub.add_parser("jobs", help="list, show, watch or cancel build jobs")
    p.add_argument("action", nargs="?", default="list", choices=["list", "show", "watch", "cancel"])
    p.add_argument("job_id", nargs="?", help="job id (show, watch, cancel)")
    p.add_argument("--state", nargs="+", default=None, choices=vocab.JOB_STATES, help="list: only these states")
    p.add_argument("--limit", type=int, default=0, help="list: only the newest N (default all)")
    _add_conn(p)


def _job_row(j) -> tuple:
    import datetime

    when = datetime.datetime.fromtimestamp(j.created_at).strftime("%Y-%m-%d %H:%M:%S")
    req = j.request
    what = f"layers {req.get('layers')} " + (f"neurons {req['neurons']}" if req.get("neurons")
                                             else f"sample {req.get('sample')}")
    state = f"{j.state} (no process runs it)" if j.orphaned else j.state
    return (j.id, state, f"{j.done}/{j.total}", when, what, j.error or "")


_ORPHAN_HINT = ("a job no process runs is resumed by `n2g serve` with the model when it opens the workspace; "
                "running the same `n2g build` again builds the rest in a new job; "
                "`n2g jobs cancel ID --workspace W` drops it")


def _print_jobs(jobs) -> None:
    print(_table([_job_row(j) for j in jobs], ["id", "state", "done", "created", "request", "error"])
          if jobs else "no jobs")
    if any(j.orphaned for j in jobs):
        print(_ORPHAN_HINT)


class _NoRunner(Exception):
    """A watched job that no process runs (ends `n2g jobs watch`, which would otherwise wait for
    a writer to open the workspace)."""

    def __init__(self, job) -> None:
        super().__init__(job.id)
        self.job = job


def _cmd_jobs(args) -> int:
    if args.action != "list" and not args.job_id:
        raise CliError(f"jobs {args.action} needs a job id")
    with _client(args, needs_model=False, writes=args.action == "cancel") as c:
        if args.action == "list":
            jobs = c.list_jobs(args.state, limit=args.limit)
            if args.json:
                _print_json(list(jobs))
            else:
                _print_jobs(jobs)
                if jobs.total > len(jobs):
                    print(f"(the newest {len(jobs)} of {jobs.total})")
            return 0
        if args.action == "show":
            job = c.get_job(args.job_id)
        elif args.action == "cancel":
            from .client import N2GError

            try:
                before = c.get_job(args.job_id)
                job = c.cancel_job(args.job_id)
                if before.finished:
                    print(f"job {args.job_id} had already ended ({before.state}): nothing to cancel", file=sys.stderr)
            except N2GError as e:  # a server (or a build) writes the workspace: the cancel goes through it
                if args.workspace is None or e.code.name != "UNAVAILABLE":
                    raise
                raise CliError(f"{e.message}. To cancel a job a running server holds, ask it: "
                               f"n2g jobs cancel {args.job_id} --server HOST:PORT") from None
        else:
            printer = _progress_printer(args.json)

            def watch(ev) -> None:
                printer(ev)
                if ev.job.orphaned:  # nothing will change until a writer opens the workspace
                    raise _NoRunner(ev.job)
            try:
                job = c.wait_job(args.job_id, progress=watch)
            except _NoRunner as e:
                job = e.job
            finally:
                printer.close()
    if args.json:
        _print_json(job)
    else:
        _print_jobs([job])
    return 1 if args.action == "watch" and job.orphaned else 0


# ---------------------------------------------------------------------------------------------
# graphs

def _add_graph(sub) -> None:
    p = sub.add_parser("graph", help="show a neuron's graph (or list graphs); write its SVG/DOT/JSON")
    p.add_argument("layer", type=int, nargs="?", help="layer (omit both to list graphs)")
    p.add_argument("neuron", type=int, nargs="?", help="neuron")
    p.add_argument("--svg", type=Path, default=None, help="write the rendered graph here")
    p.add_argument("--dot", type=Path, default=None, help="write the Graphviz DOT here")
    p.add_argument("--json-out", type=Path, default=None, help="write the n2g.graph/v1 JSON here")
    p.add_argument("--layers", nargs="+", default=None, help="listing: only these layers (0 2, 0-5, all)")
    p.add_argument("--limit", type=int, default=0, help="listing: at most this many")
    p.add_argument("--offset", type=int, default=0, help="listing: after skipping this many (pages of --limit)")
    _add_conn(p)


def _scores_text(scores) -> str:
    return "  ".join(f"{s.method}: P {s.precision:.2f} R {s.recall:.2f} F1 {s.f1:.2f}" for s in scores)


def _cmd_graph(args) -> int:
    if (args.layer is None) != (args.neuron is None):
        raise CliError("give both LAYER and NEURON (or neither, to list the graphs)")
    with _client(args, needs_model=False) as c:
        if args.layer is None:
            graphs = c.list_graphs(_layer_filter(args.layers), limit=args.limit, offset=args.offset)
            if args.json:
                _print_json(graphs)
            else:
                f1 = lambda g: next((s.f1 for s in g.scores if s.method.startswith("n2g")), float("nan"))  # noqa: E731
                print(_table([(_key(g.key), g.max_activation, g.n_nodes, g.n_paths, f1(g), _short(g.activating, 4),
                               _short(g.context, 4)) for g in graphs],
                             ["neuron", "a_max", "nodes", "paths", "f1", "activating", "context"])
                      if graphs else "no graphs built" if not args.offset else "no graphs past that offset")
                if graphs.total > len(graphs):
                    print(f"({len(graphs)} from number {args.offset + 1} of {graphs.total}; --offset {args.offset + len(graphs)} "
                          f"for the next)" if graphs else f"({graphs.total} graphs)")
            return 0
        g = c.graph(args.layer, args.neuron, svg=args.svg is not None, dot=args.dot is not None,
                    json=args.json_out is not None or args.json)
    from .client import write_file

    for path, text in ((args.svg, g.svg), (args.dot, g.dot), (args.json_out, g.json)):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file(path, text)
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(g.json.translate(_JSON_CONTROLS))  # (print's own escapes would make it no JSON)
        return 0
    s = g.summary
    print(f"neuron {_key(s.key)} of {g.model} ({g.hook}), a_max {s.max_activation:.4f}")
    print(f"  {s.n_nodes} nodes, {s.n_paths} paths, built by job {s.job_id or '(local)'}")
    print(f"  activating: {_short(s.activating, 12)}")
    print(f"  context:    {_short(s.context, 12)}")
    if s.scores:
        print(f"  scores:     {_scores_text(s.scores)}")
    return 0


# ---------------------------------------------------------------------------------------------
# predict, activations

def _add_inputs(p) -> None:
    p.add_argument("--neurons", nargs="+", required=True, metavar="L:N", help="neurons, e.g. 0:17 3:5")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", action="append", dest="texts", help="a text (repeatable)")
    g.add_argument("--tokens", action="append", dest="tokens", metavar="IDS",
                   help="token ids separated by spaces or commas (repeatable)")
    p.add_argument("--skip-bos", action="store_true", help="texts: do not prepend BOS")


def _print_activations(act, args, title: str) -> None:
    if args.json:
        _print_json({"neurons": act.neurons, "normalised": act.normalised, "semantics": act.semantics,
                     "max_activation": act.max_activation,
                     "sequences": [{"token_ids": t, "tokens": lab, "activations": v}
                                   for t, lab, v in zip(act.token_ids, act.tokens, act.values)]})
        return
    for i, (ids, labels, vals) in enumerate(zip(act.token_ids, act.tokens, act.values)):
        print(f"{title} sequence {i} ({len(ids)} tokens{', normalised' if act.normalised else ''}"
              f"{', ' + act.semantics if act.semantics else ''})")
        rows = [(p, int(ids[p]), _tok(labels[p]) if labels else "", *[float(vals[r, p]) for r in range(len(act.neurons))])
                for p in range(len(ids))]
        print(_table(rows, ["pos", "id", "token", *[_key(k) for k in act.neurons]]))


def _cmd_predict(args) -> int:
    neurons = _neurons(args.neurons)
    with _client(args, needs_model=bool(args.texts)) as c:
        act = c.predict(neurons, args.texts, token_ids=_token_lists(args.tokens or []) or None,
                        semantics=args.semantics, skip_bos=args.skip_bos)
    _print_activations(act, args, "predicted")
    return 0


def _cmd_activations(args) -> int:
    neurons = _neurons(args.neurons)
    with _client(args) as c:
        act = c.activations(neurons, args.texts, token_ids=_token_lists(args.tokens or []) or None,
                            normalise=not args.raw, skip_bos=args.skip_bos)
    _print_activations(act, args, "true")
    return 0


# ---------------------------------------------------------------------------------------------
# search, similar

def _clause_token(s: str) -> int | str:
    if s.startswith("id:"):
        try:
            return int(s[3:])
        except ValueError:
            raise CliError(f"bad token {s!r}: id:<integer>") from None
    return s


def _cmd_search(args) -> int:
    clauses = [(_clause_token(t), role) for role, toks in (("activating", args.activating),
                                                          ("context", args.context), ("either", args.either))
               for t in (toks or [])]
    with _client(args, needs_model=False) as c:
        if args.in_context:
            if clauses:
                raise CliError("--in-context takes no token clauses")
            res = c.in_context_neurons(limit=args.limit)
            if args.json:
                _print_json(res)
            else:
                print(f"{res.total} in-context neuron(s)")
                if res.neurons:
                    print(_table([(_key(n.key), len(n.shared), n.fraction, _short(n.shared)) for n in res.neurons],
                                 ["neuron", "shared", "fraction", "labels"]))
            return 0
        else:
            if not clauses:
                raise CliError("give at least one of --activating, --context, --either (or --in-context)")
            res = c.search(clauses, limit=args.limit)
    if args.json:
        _print_json(res)
        return 0
    shown = f"{len(res.neurons)} of {res.total}" if res.total != len(res.neurons) else str(res.total)
    print(f"{shown} neuron(s)")
    for k in res.neurons:
        print(f"  {_key(k)}")
    return 0


def _pair_rows(pairs) -> list[tuple]:
    return [(_key(p.a), _key(p.b), p.kind, p.activating_overlap, p.context_overlap) for p in pairs]


def _cmd_similar(args) -> int:
    with _client(args, needs_model=False) as c:
        if args.all:
            if args.layer is not None:
                raise CliError("--all takes no LAYER NEURON")
            pairs = list(c.pairs(args.kind, threshold=args.threshold))
            if args.json:
                _print_json(pairs)
            else:
                print(f"{len(pairs)} {args.kind} pair(s) at threshold {args.threshold or vocab.DEFAULT_SIMILARITY_THRESHOLD}")
                if pairs:
                    print(_table(_pair_rows(pairs), ["a", "b", "kind", "activating", "context"]))
            return 0
        if args.layer is None or args.neuron is None:
            raise CliError("give LAYER NEURON, or --all for every pair")
        res = c.similar(args.layer, args.neuron, threshold=args.threshold, k=args.k)
    if args.json:
        _print_json(res)
        return 0
    pairs = res.similar + res.subset
    print(f"neuron {args.layer}:{args.neuron}: {len(res.similar)} similar, {len(res.subset)} subset pair(s)")
    if pairs:
        print(_table(_pair_rows(pairs), ["a", "b", "kind", "activating", "context"]))
    if res.neighbours:
        print("nearest neighbours:")
        print(_table([(_key(n.key), n.score, n.activating_overlap, n.context_overlap) for n in res.neighbours],
                     ["neuron", "score", "activating", "context"]))
    return 0


# ---------------------------------------------------------------------------------------------
# eval, export, report

def _cmd_eval(args) -> int:
    with _client(args, needs_model=args.compute) as c:
        ev = c.evaluate(_neurons(args.neurons) if args.neurons else None, layers=_layer_filter(args.layers),
                        test_sets=not args.paper_only, compute_heldout=args.compute)
        info = c.model_info() if not args.json else None
    if args.json:
        print(json.dumps(ev.summary if args.paper_only else {"paper": ev.summary, "test_sets": ev.details},
                         indent=2, sort_keys=True))
        return 0
    print(f"model {info.model}, corpus {info.corpus}, hook {info.hook}")
    print(ev.table)
    if ev.report:
        print()
        print(ev.report)
    return 0


def _cmd_export(args) -> int:
    with _client(args, needs_model=False) as c:
        bar = None
        if not args.json and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(desc="exporting", unit="neuron", file=sys.stderr)
        try:
            n = c.export_to(args.out, _layer_filter(args.layers),
                            progress=(lambda key: bar.update()) if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
    if args.json:
        _print_json({"exported": n, "out": str(args.out)})
    else:
        print(f"exported {n} neurons to {args.out}")
    return 0


def _cmd_report(args) -> int:
    if args.zip is not None and (not args.zip.name or args.zip.is_dir()):
        raise CliError(f"--zip needs the path of a file to write, got {str(args.zip)!r}")
    with _client(args, needs_model=False) as c:
        index = c.report_to(args.out, _layer_filter(args.layers), zip_path=args.zip)
    if args.json:
        _print_json({"index": str(index)})
    else:
        print(f"report written to {index}")
    return 0


# ---------------------------------------------------------------------------------------------
# parser

def _version() -> str:
    """This n2g and its Rust extension (a stale `maturin develop` shows here first)."""
    from . import __version__

    try:
        import n2g_fast

        fast = n2g_fast.__version__
    except ImportError:
        fast = "not installed"
    return f"n2g {__version__} (n2g_fast {fast})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="n2g", description="Neuron to Graph: build, evaluate and serve neuron graphs")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    p = sub.add_parser("info", help="the model, its shape, and what the workspace holds")
    _add_conn(p)
    _add_build(sub)
    _add_jobs(sub)
    _add_graph(sub)
    p = sub.add_parser("predict", help="predicted activations of built neurons (from their graphs)")
    _add_inputs(p)
    p.add_argument("--semantics", choices=vocab.SEMANTICS, default=None)
    _add_conn(p)
    p = sub.add_parser("activations", help="the model's true activations")
    _add_inputs(p)
    p.add_argument("--raw", action="store_true", help="raw activations (default: divided by a_max)")
    p.add_argument("--device", default=None, help="local: cpu, cuda, ...")
    _add_conn(p)
    p = sub.add_parser("tokenize", help="token ids and labels of texts")
    p.add_argument("texts", nargs="+")
    p.add_argument("--skip-bos", action="store_true")
    p.add_argument("--device", default=None, help="local: cpu, cuda, ...")
    _add_conn(p)
    p = sub.add_parser("search", help="neurons whose graph matches every (token, role) clause")
    p.add_argument("--activating", nargs="+", metavar="TOKEN",
                   help="activating tokens (label or token text, normalised as graphs store them: \" The\" finds \"the\"; or id:N)")
    p.add_argument("--context", nargs="+", metavar="TOKEN", help="context tokens")
    p.add_argument("--either", nargs="+", metavar="TOKEN", help="tokens in either role")
    p.add_argument("--in-context", action="store_true",
                   help="neurons with a token among both their activating and context tokens")
    p.add_argument("--limit", type=int, default=0)
    _add_conn(p)
    p = sub.add_parser("similar", help="a neuron's similar/subset pairs and neighbours, or all pairs")
    p.add_argument("layer", type=int, nargs="?")
    p.add_argument("neuron", type=int, nargs="?")
    p.add_argument("--all", action="store_true", help="every pair of the workspace")
    p.add_argument("--kind", choices=vocab.PAIR_KINDS, default=vocab.DEFAULT_PAIR_KIND, help="--all: which pairs")
    p.add_argument("--threshold", type=float, default=None, help=f"overlap threshold, {vocab.MIN_PAIR_THRESHOLD} to 1 "
                                                                  f"(default {vocab.DEFAULT_SIMILARITY_THRESHOLD})")
    p.add_argument("--k", type=int, default=None, help=f"nearest neighbours to show (default {vocab.DEFAULT_NEIGHBOURS})")
    _add_conn(p)
    p = sub.add_parser("eval", help="scores per layer: the paper's table, then every method on ordinary text and "
                                    "detection with 95%% intervals and paired differences")
    p.add_argument("--layers", nargs="+", default=None, help="only these layers: numbers, a range (0-5), or all")
    p.add_argument("--neurons", nargs="+", default=None, metavar="L:N")
    p.add_argument("--paper-only", action="store_true", help="only the paper protocol's table")
    p.add_argument("--compute", action="store_true",
                   help="compute the held-out activations not stored yet (loads the model; stored for next time)")
    p.add_argument("--device", default=None, help="local --compute: cpu, cuda, ...")
    _add_conn(p)
    p = sub.add_parser("export", help="write graphs/L_N.json and examples/L_N.json for every built neuron")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--layers", nargs="+", default=None, help="only these layers: numbers, a range (0-5), or all")
    _add_conn(p)
    p = sub.add_parser("report", help="write the workspace's HTML report")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--layers", nargs="+", default=None,
                   help="only these layers (0 2, 0-5; default all): a whole model's report a few layers at a time")
    p.add_argument("--zip", type=Path, default=None, help="also keep the zip archive here")
    _add_conn(p)
    return parser


COMMANDS = {
    "serve": _cmd_serve, "info": _cmd_info, "build": _cmd_build, "jobs": _cmd_jobs, "graph": _cmd_graph,
    "predict": _cmd_predict, "activations": _cmd_activations, "tokenize": _cmd_tokenize, "search": _cmd_search,
    "similar": _cmd_similar, "eval": _cmd_eval, "export": _cmd_export, "report": _cmd_report,
}


def _connection_hint(args, e) -> str:
    """What to check when no connection to --server could be made (gRPC's message names none),
    or when a call ran past its deadline (gRPC's says only "Deadline Exceeded")."""
    if e.code.name == "DEADLINE_EXCEEDED":
        return (f" (the call took longer than --timeout {getattr(args, 'timeout', None):g} s: give a larger --timeout, "
                "or ask for less, e.g. --limit or --layers)") if getattr(args, "timeout", None) else ""
    if e.code.name != "UNAVAILABLE" or not getattr(args, "server", None):
        return ""
    if not any(w in e.message for w in ("failed to connect", "Connection refused", "Socket closed",
                                        "handshake", "Connection reset")):
        return ""
    if (getattr(args, "tls", False) or getattr(args, "tls_ca", None)) and any(
            w in e.message for w in ("handshake", "CERTIFICATE", "SSL", "ssl", "Hostname", "verif")):
        return (" (the TLS handshake failed: trust the server's certificate with --tls-ca CERT, give the name it "
                "holds with --tls-server-name if that is not the host, and check the server runs with --tls-cert)")
    from .client import with_default_port

    return (f" (is an n2g server running at {with_default_port(args.server)}? `n2g serve` listens on port "
            f"{vocab.DEFAULT_PORT} of "
            f"127.0.0.1 by default; a server started with --tls-cert needs --tls)")


def _where(args) -> None:
    """--server or --workspace as given; $N2G_SERVER stands for --server when neither is (an
    explicit --workspace wins over the environment, both given explicitly are refused)."""
    if getattr(args, "server", None) and getattr(args, "workspace", None) is not None:
        raise CliError("give --server or --workspace, not both")
    if getattr(args, "server_from_env", False) and args.server is None and args.workspace is None:
        args.server = os.environ.get("N2G_SERVER", "").strip() or None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _where(args)
        return COMMANDS[args.command](args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`n2g ... | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error at exit)
        return 141
    except Exception as e:  # a clear one-line error for the known failure kinds
        from .client import N2GError

        if isinstance(e, N2GError):
            print(f"error: {e.code.name}: {e.message}{_connection_hint(args, e)}", file=sys.stderr)
            return 1
        if type(e).__name__ == "WorkspaceError":
            print(f"error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, ValueError):  # a bad argument caught before any call
            print(f"error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, OSError):  # an output path that is a folder, a full disk, ...
            where = f"{e.filename}: " if e.filename else ""
            print(f"error: {where}{e.strerror or e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
