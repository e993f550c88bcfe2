"""Python client of the n2g service: `N2GClient` (blocking) and `AsyncN2GClient` (asyncio).

Needs only grpcio, grpcio-health-checking, protobuf, googleapis-common-protos (a busy server's
retry hint) and numpy (no torch, nothing from the server package). Results are the dataclasses of
`n2g.types`, activations numpy arrays; the wire format stays in `n2g.convert`.

    from n2g.client import N2GClient
    with N2GClient("localhost:50051") as c:
        info = c.model_info()
        job = c.start_build(layers=[0], neurons=[1, 2, 3])
        c.wait_job(job.id, progress=print)
        pred = c.predict([(0, 1), (0, 2)], texts=["The cat sat on the mat."])
        pred.values[0]          # [2 neurons, n tokens] for the first text
        c.search([("cat", "activating")]).neurons

Every method is written once (`_Api`): it checks and normalises its arguments and hands them to
the transport - the network (`N2GClient`, `AsyncN2GClient`, whose methods are then coroutines)
or the application layer in this process (`n2g.local.LocalN2GClient`).

Errors are `N2GError` with `.code` (a `grpc.StatusCode`) and `.message`. Calls are retried with
exponential backoff while the server is UNAVAILABLE (starting or restarting), and after the wait a
busy server names (RESOURCE_EXHAUSTED with a RetryInfo), within the call's deadline;
`start_build` sends a client-chosen job id, so its retries never start a job twice.
"""

from __future__ import annotations

import asyncio
import json as _json
import os
import random
import re
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Sequence

import grpc
import numpy as np
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpc_health.v1.health_pb2_grpc import HealthStub

from . import vocab
from .convert import OPS
from .types import (Activations, BuildPlan, Evaluation, ExportedNeuron, Graph, ListResult, GraphSummary,
                    InContextResult, Job, JobEvent, Key, ModelInfo, N2GError, Pair, SearchResult, Similar, TokenizedText)
from .types import *  # noqa: F401,F403 - the result types are part of the client's API
from .v1 import n2g_pb2_grpc as _pbg
from .vocab import DEFAULT_PORT, DEFAULT_TARGET, JOB_FINAL  # noqa: F401 - re-exported

__all__ = [
    "N2GClient", "AsyncN2GClient", "N2GError", "ModelInfo", "Limits", "LayerStatus", "TokenizedText", "Job",
    "JobEvent", "ListResult", "GraphSummary", "GraphNode", "Graph", "Activations", "MethodScore", "NeuronEvaluation",
    "LayerEvaluation", "Evaluation", "SearchResult", "Pair", "Neighbour", "Similar", "ExportedNeuron",
    "InContextNeuron", "InContextResult", "BuildPlan", "parse_neuron", "DEFAULT_TARGET",
]

# A report archive is refused past these (a hostile server could send an endless stream or a zip bomb).
MAX_REPORT_BYTES = 1 << 30
MAX_REPORT_UNPACKED_BYTES = 4 << 30
MAX_REPORT_FILES = 2_000_000  # a page and a drawing a neuron: a whole Llama-3.1-8B (458,752 neurons) fits


def parse_neuron(spec: str | Sequence[int]) -> Key:
    """(layer, neuron) from "L:N", "L/N" or a pair."""
    if isinstance(spec, str):
        # ASCII digits only: int() would also read "١٧" (Arabic-Indic) and "1_7" as 17
        m = re.fullmatch(r"\s*([0-9]+)\s*[:/,]\s*([0-9]+)\s*", spec)
        if m is None:
            raise ValueError(f"bad neuron {spec!r}: write LAYER:NEURON, e.g. 0:17")
        return int(m[1]), int(m[2])
    if isinstance(spec, np.ndarray) and spec.ndim != 1:
        raise ValueError(f"bad neuron {spec!r}: a pair (layer, neuron) or LAYER:NEURON")
    try:
        layer, neuron = spec
    except (TypeError, ValueError):
        raise ValueError(f"bad neuron {spec!r}: a pair (layer, neuron) or LAYER:NEURON") from None
    return _whole(layer, "layer"), _whole(neuron, "neuron")


def _whole(x: Any, what: str) -> int:
    """`x` as an int if it is a whole number (numpy's too); a float, a bool or a string is refused,
    not truncated or read as 0/1 (34.9 was neuron 34, True layer 1)."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise ValueError(f"{what} {x!r} is not a whole number")
    return int(x)


def _items(value: Any, what: str) -> list:
    """A list from a list, a tuple, a numpy array or any other iterable; None is empty. (numpy
    arrays have no truth value, so `value or []` failed on them.)"""
    if value is None:
        return []
    if isinstance(value, np.ndarray) and value.ndim == 0:
        raise ValueError(f"{what} is a 0-d array: give a list")
    return list(value)


def _keys(neurons: Iterable[str | Sequence[int]] | None) -> list[Key]:
    return [parse_neuron(n) for n in _items(neurons, "neurons")]


def _texts(texts: str | Iterable[str] | None) -> list[str]:
    """A single string is one text (not one text a character)."""
    texts = [texts] if isinstance(texts, str) else _items(texts, "texts")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"texts[{i}] is {type(t).__name__}, not str")
    return texts


def _layers(layers: Iterable[int] | int | str | None) -> list[int] | None:
    """A layer filter: layer numbers, one number, or a spec in the build's grammar ("0-3",
    "0,2", "all" = no filter; n2g.layers)."""
    if isinstance(layers, str):
        from .layers import layer_filter

        return layer_filter(layers)
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        layers = [layers]
    return [_whole(l, "layer") for l in _items(layers, "layers")] or None


def _checked_text(args: dict[str, Any]) -> dict[str, Any]:
    """`args` if every string in it can travel (UTF-8); else INVALID_ARGUMENT naming the string.
    Python strings may hold lone surrogates (from surrogateescape, JSON "\\ud800", a cut UTF-16
    pair), which protobuf cannot encode; the local client refuses them the same way."""
    def bad(v: Any, where: str) -> str | None:
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"{where} holds a lone surrogate U+{ord(v[e.start]):04X} at character {e.start}"
        elif isinstance(v, dict):
            return next((r for k, x in v.items() for r in [bad(k, where) or bad(x, f"{where}[{k!r}]")] if r), None)
        elif isinstance(v, (list, tuple)):
            return next((r for i, x in enumerate(v) for r in [bad(x, f"{where}[{i}]")] if r), None)
        return None

    for name, value in args.items():
        problem = bad(value, name)
        if problem:
            raise N2GError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{problem}: not valid Unicode text; decode the bytes it came from as UTF-8 first")
    return args


def _request(op, args: dict[str, Any]):
    """The request message of `op`: a string protobuf cannot carry, or a number past its field
    (a token id past int64, a neuron past int32), is INVALID_ARGUMENT as the server would say."""
    try:
        return op.request(**_checked_text(args))
    except (ValueError, TypeError, OverflowError) as e:
        raise N2GError(grpc.StatusCode.INVALID_ARGUMENT, f"{op.rpc}: {e}") from None


def _budget(timeout: float | None) -> float | None:
    """A deadline in seconds: None or infinity is none; zero, negative or NaN is refused."""
    if timeout is None or timeout == float("inf"):
        return None
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds (None or inf: none), got {timeout!r}")
    return float(timeout)


def _seqs(token_ids) -> list[list[int]]:
    """Token-id sequences: a list of 1-D sequences, or a 2-D array (a sequence a row). Ids must be
    whole numbers; a float id or a nested row is refused, not truncated or flattened."""
    if isinstance(token_ids, np.ndarray) and token_ids.ndim == 1:
        raise ValueError("token_ids is one 1-D array: give a list of sequences (e.g. [ids]) or a 2-D array")
    out = []
    for i, s in enumerate(_items(token_ids, "token_ids")):
        a = np.asarray(s)
        whole = a.size == 0 or np.issubdtype(a.dtype, np.integer) or (  # ints past int64 are objects
            a.dtype == object and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in a.flat))
        if a.ndim != 1:
            raise ValueError(f"token_ids[{i}] must be a 1-D sequence of token ids, got shape {a.shape}")
        if not whole:
            raise ValueError(f"token_ids[{i}] must hold whole numbers (token ids), got {a.dtype} values")
        out.append([int(x) for x in a.tolist()])
    return out


def _choice(value: str | None, names: Sequence[str], what: str) -> str | None:
    if value is None or value == "" or value in names:
        return value or None
    raise ValueError(f"unknown {what} {value!r}: use one of {', '.join(names)}")


def _build_args(layers, neurons, sample, seed, group_size, k, window_tokens, config, executor, ray_address,
                workers, worker_threads, precision, shard_windows) -> dict[str, Any]:
    spec = layers if isinstance(layers, str) else None
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        layers = [layers]  # one layer, as the listings take it
    # whole numbers, as everywhere else: int() built neuron 1 for 1.7 and layer 1 for True, and a
    # numpy array of neurons had no truth value
    neurons = [_whole(n, "neuron") for n in _items(neurons, "neurons")]
    counts = dict(sample=sample, group_size=group_size, k=k, window_tokens=window_tokens, workers=workers,
                  worker_threads=worker_threads, shard_windows=shard_windows)
    return dict(layers=[] if spec else [_whole(l, "layer") for l in _items(layers, "layers")], layer_spec=spec,
                neurons=neurons or None, seed=_whole(seed, "seed"),
                **{name: None if v is None else _whole(v, name) for name, v in counts.items()},
                config_json=_json.dumps(config) if config else None, executor=executor, ray_address=ray_address,
                precision=precision)


def _error(e: grpc.RpcError) -> N2GError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    return N2GError(code or grpc.StatusCode.UNKNOWN, details or "", retry_after=_retry_after(e))


def _retry_after(e: grpc.RpcError) -> float | None:
    """The delay (seconds) of the google.rpc.RetryInfo the server sent with an error: it was busy,
    the same call may succeed after that long. None when it sent none."""
    try:
        metadata = e.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - an error raised before any call had metadata
        return None
    for key, value in metadata:
        if key != "grpc-status-details-bin":
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # noqa: BLE001 - not ours to judge: no retry hint
            return None
        for detail in status.details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                return max(0.0, info.retry_delay.ToNanoseconds() / 1e9)
    return None


def _watch_cut(e: N2GError, last: JobEvent | None, rewatch: bool) -> Job | None:
    """What `wait_job` does when a watch ends in `e`: the job, if its end was heard before (whatever
    cut the stream after it); None to watch again, when `rewatch` (a server reached before, which
    went away: UNAVAILABLE, CANCELLED); else `e` is raised."""
    if last is not None and last.job.finished:
        return last.job
    if rewatch and e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return None
    raise e


def _health_check(channel, service: str, timeout: float):
    """grpc.health.v1's Check on `channel` (sync: the reply; aio: an awaitable of it)."""
    return HealthStub(channel).Check(HealthCheckRequest(service=service), timeout=timeout)


def _health_status(reply) -> str:
    return HealthCheckResponse.ServingStatus.Name(reply.status)


def _channel_args(max_message_bytes: int, tls_server_name: str | None) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [("grpc.max_receive_message_length", max_message_bytes),
                                   ("grpc.max_send_message_length", max_message_bytes),
                                   ("grpc.enable_retries", 0)]
    if tls_server_name:
        opts.append(("grpc.ssl_target_name_override", tls_server_name))
    return opts


def _credentials(tls: bool, root_certificates: bytes | str | os.PathLike | None):
    if not tls and root_certificates is None:
        return None
    roots = root_certificates
    if isinstance(roots, (str, os.PathLike)):
        roots = Path(roots).read_bytes()
    if roots is not None and b"-----BEGIN CERTIFICATE-----" not in roots:
        # gRPC would take it and fail every handshake later, with a log line per try
        where = f" {root_certificates}" if isinstance(root_certificates, (str, os.PathLike)) else "s"
        raise ValueError(f"the root certificate{where} given for TLS holds no PEM certificate "
                         "('-----BEGIN CERTIFICATE-----')")
    return grpc.ssl_channel_credentials(root_certificates=roots)


def _delays(retries: int, backoff: float, max_backoff: float) -> Iterator[float]:
    d = backoff
    for _ in range(retries):
        yield d * (0.5 + random.random())  # jitter: 50%..150%
        d = min(d * 2, max_backoff)


_MIN_TRY_S = 0.1  # the least time left after a wait that is worth another try


class _Retry:
    """When a failed call is tried again. UNAVAILABLE (the server starting or restarting): after
    a jittered, doubling backoff, `retries` times. RESOURCE_EXHAUSTED with a RetryInfo (the server
    busy, not the request too big): after the delay it asked for, jittered up to twice that, so
    refused clients do not come back together; as often as the deadline allows (without one,
    `retries` times). Never past the deadline; any other error is final."""

    def __init__(self, client: "_ClientBase | _Api", deadline: float | None, now: Callable[[], float], *,
                 unavailable: bool = True):
        # unavailable=False: busy refusals only (the local client: its UNAVAILABLE is a workspace
        # another process writes, which no backoff of seconds waits out)
        self.delays = _delays(client.retries if unavailable else 0, client.backoff, client.max_backoff)
        # busy refusals: bounded by the deadline, else by `retries`; retries=0 turns both off
        self.busy_left = client.retries if deadline is None or client.retries <= 0 else None
        self.min_wait = max(client.backoff, 0.01)
        self.deadline = deadline
        self.now = now

    def delay(self, e: grpc.RpcError | N2GError) -> float | None:
        """Seconds to wait before the next try, or None to give up with `e`."""
        if isinstance(e, N2GError):  # the local client's: the application's own error
            code, after = e.code, e.retry_after
        else:
            code = e.code() if hasattr(e, "code") else None
            after = _retry_after(e) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
        if code == grpc.StatusCode.UNAVAILABLE:
            d = next(self.delays, None)
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and after is not None:
            if self.busy_left is not None:
                if self.busy_left <= 0:
                    return None
                self.busy_left -= 1
            # never sooner than the client's own backoff: a hint of 0 must not make a busy loop
            base = max(after, self.min_wait)
            d = base * (1.0 + random.random())
            if self.deadline is not None:  # the jitter shrinks to what the deadline leaves room for
                room = self.deadline - self.now() - _MIN_TRY_S
                if room >= base:
                    d = min(d, room)
        else:
            return None
        # a try that would start with next to nothing left ends DEADLINE_EXCEEDED, which says less
        # than the error in hand (a busy server's refusal carries when to come back)
        if d is None or (self.deadline is not None and self.deadline - self.now() < d + _MIN_TRY_S):
            return None
        return d

    def remaining(self) -> float | None:
        """What is left of the deadline for the next try (None: no deadline)."""
        return None if self.deadline is None else max(self.deadline - self.now(), 1e-3)


# ---------------------------------------------------------------------------------------------
# The API, written once

class _Api:
    """Every n2g call. Subclasses supply the transport: `_call(name, args, timeout)` returns the
    result of the operation `name` (n2g.convert.OPS), `_stream_call` an iterator of its items."""

    timeout: float | None
    closed = False

    def _open(self, args: dict[str, Any]) -> dict[str, Any]:
        """`args`, if this client is still open (every client says the same after close())."""
        if self.closed:
            raise N2GError(grpc.StatusCode.FAILED_PRECONDITION, "this client is closed: open a new one")
        return args

    def _call(self, name: str, args: dict[str, Any], timeout: float | None):
        raise NotImplementedError

    def _stream_call(self, name: str, args: dict[str, Any], timeout: float | None):
        raise NotImplementedError

    # -- model ----------------------------------------------------------------------------------
    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return self._call("model_info", {}, timeout)

    def tokenize(self, texts: Sequence[str] | None = None, *, token_ids=None, skip_bos: bool = False,
                 timeout: float | None = None) -> list[TokenizedText]:
        return self._call("tokenize", dict(texts=_texts(texts), token_ids=_seqs(token_ids), skip_bos=skip_bos),
                          timeout)

    # -- jobs -----------------------------------------------------------------------------------
    def start_build(self, layers: Sequence[int] | str, neurons: Sequence[int] | None = None, *,
                    sample: int | None = None, seed: int = 0, group_size: int | None = None, k: int | None = None,
                    window_tokens: int | None = None, config: dict[str, Any] | None = None,
                    executor: str | None = None, ray_address: str | None = None, workers: int | None = None,
                    worker_threads: int | None = None, precision: str | None = None,
                    shard_windows: int | None = None, job_id: str | None = None,
                    timeout: float | None = None) -> Job:
        """Queues a build of `neurons` (or a seeded `sample` of live neurons) in each of `layers`
        (a list, or a spec: "all", "0-5", "0,2,4-6"). `config` overrides the scan/fit/eval
        settings ({"fit": {"method": "paper"}, ...}); `executor` ("inprocess" or "ray"),
        `ray_address`, `workers`, `precision` and `shard_windows` say how the plan runs."""
        args = _build_args(layers, neurons, sample, seed, group_size, k, window_tokens, config, executor,
                           ray_address, workers, worker_threads, precision, shard_windows)
        return self._call("start_build", dict(args, job_id=job_id or uuid.uuid4().hex[:12]), timeout)

    def plan_build(self, layers: Sequence[int] | str, neurons: Sequence[int] | None = None, *,
                   sample: int | None = None, seed: int = 0, group_size: int | None = None, k: int | None = None,
                   window_tokens: int | None = None, config: dict[str, Any] | None = None,
                   executor: str | None = None, ray_address: str | None = None, workers: int | None = None,
                   worker_threads: int | None = None, precision: str | None = None,
                   shard_windows: int | None = None, timeout: float | None = None) -> BuildPlan:
        """A dry run of `start_build` with the same arguments: the plan and a time estimate."""
        args = _build_args(layers, neurons, sample, seed, group_size, k, window_tokens, config, executor,
                           ray_address, workers, worker_threads, precision, shard_windows)
        return self._call("plan_build", args, timeout)

    def get_job(self, job_id: str, *, timeout: float | None = None) -> Job:
        return self._call("get_job", dict(job_id=job_id), timeout)

    def cancel_job(self, job_id: str, *, timeout: float | None = None) -> Job:
        return self._call("cancel_job", dict(job_id=job_id), timeout)

    def list_jobs(self, states: Sequence[str] | None = None, *, limit: int = 0,
                  timeout: float | None = None) -> ListResult:
        """Jobs (in `states`), oldest first; with `limit`, the newest that many (`.total`: all)."""
        for s in states or ():
            _choice(s, vocab.JOB_STATES, "job state")
        return self._call("list_jobs", dict(states=list(states) if states else None, limit=limit), timeout)

    def watch_job(self, job_id: str, *, timeout: float | None = None) -> Iterator[JobEvent]:
        """Progress events of a job, ending with the event that finishes it."""
        return self._stream_call("watch_job", dict(job_id=job_id), timeout)

    def wait_job(self, job_id: str, progress: Callable[[JobEvent], None] | None = None, *,
                 timeout: float | None = None, reconnect: bool = True) -> Job:
        """Watches a job until it finishes and returns it. With `reconnect`, a server that goes
        away (restart) once the watch has begun is waited for and watched again, within `timeout`
        (None: no limit); a server never reached is an error (after the client's usual retries)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        reached = False
        while True:
            last = None
            try:
                left = None if deadline is None else max(1e-3, deadline - time.monotonic())
                for ev in self.watch_job(job_id, timeout=left):
                    last, reached = ev, True
                    if progress is not None:
                        progress(ev)
                if last is not None and last.job.finished:
                    return last.job
            except N2GError as e:
                ended = _watch_cut(e, last, reached and reconnect)
                if ended is not None:
                    return ended
            if deadline is not None and time.monotonic() >= deadline:
                raise N2GError(grpc.StatusCode.DEADLINE_EXCEEDED, f"job {job_id} not finished after {timeout} s")
            time.sleep(0.2)

    # -- graphs ---------------------------------------------------------------------------------
    def list_graphs(self, layers: Sequence[int] | None = None, *, limit: int = 0, offset: int = 0,
                    timeout: float | None = None) -> ListResult:
        """Summaries of the built graphs in (layer, neuron) order: `limit` of them after `offset`
        (pages of a whole model); `.total` counts them all."""
        return self._call("list_graphs", dict(layers=_layers(layers), limit=limit, offset=offset), timeout)

    def graph(self, layer: int, neuron: int, *, structure: bool = False, dot: bool = False, svg: bool = False,
              json: bool = False, examples: bool = False, timeout: float | None = None) -> Graph:
        """One graph; `structure`, `dot`, `svg`, `json` and `examples` add those parts."""
        return self._call("graph", dict(layer=_whole(layer, "layer"), neuron=_whole(neuron, "neuron"),
                                        structure=structure, dot=dot, svg=svg, json=json, examples=examples), timeout)

    # -- activations ----------------------------------------------------------------------------
    def predict(self, neurons: Sequence, texts: Sequence[str] | None = None, *, token_ids=None,
                semantics: str | None = None, skip_bos: bool = False, timeout: float | None = None) -> Activations:
        """Predicted normalised activations of built neurons (from their graphs)."""
        return self._call("predict", dict(neurons=_keys(neurons), texts=_texts(texts), token_ids=_seqs(token_ids),
                                          semantics=_choice(semantics, vocab.SEMANTICS, "semantics"),
                                          skip_bos=skip_bos), timeout)

    def activations(self, neurons: Sequence, texts: Sequence[str] | None = None, *, token_ids=None,
                    normalise: bool = True, skip_bos: bool = False, timeout: float | None = None) -> Activations:
        """The model's true activations (normalised by a_max unless `normalise=False`)."""
        return self._call("activations", dict(neurons=_keys(neurons), texts=_texts(texts),
                                              token_ids=_seqs(token_ids), normalise=normalise, skip_bos=skip_bos),
                          timeout)

    # -- evaluation, search, similarity ---------------------------------------------------------
    def evaluate(self, neurons: Sequence | None = None, *, layers: Sequence[int] | None = None,
                 eval_config: dict[str, Any] | None = None, test_sets: bool = False, compute_heldout: bool = False,
                 timeout: float | None = None) -> Evaluation:
        """Per-neuron and per-layer scores of every method. `test_sets` adds the ordinary-text and
        detection test sets with intervals and paired comparisons (`Evaluation.report`,
        `.details`); `compute_heldout` first computes missing true activations on the held-out
        windows (needs the model)."""
        return self._call("evaluate", dict(neurons=_keys(neurons) or None, layers=_layers(layers),
                                           eval_config_json=_json.dumps(eval_config) if eval_config else None,
                                           test_sets=test_sets or compute_heldout, compute_heldout=compute_heldout),
                          timeout)

    def search(self, clauses: Sequence[tuple[str | int, str]], *, limit: int = 0,
               timeout: float | None = None) -> SearchResult:
        """Neurons matching every (token, role) clause; token is a label or a token id, role
        activating | context | either."""
        if isinstance(clauses, (str, bytes)):  # read as clauses, its letters failed to unpack
            raise ValueError(f"clauses {clauses!r} is one string: give (token, role) pairs, e.g. [({clauses!r}, "
                             f"'either')]")
        out = []
        for i, c in enumerate(_items(clauses, "clauses")):
            if isinstance(c, (str, bytes)) or not isinstance(c, (Sequence, np.ndarray)) or len(c) != 2:
                raise ValueError(f"clause {i} {c!r} is not a (token, role) pair, e.g. (' love', 'activating')")
            t, r = c
            out.append((int(t) if isinstance(t, (int, np.integer)) and not isinstance(t, bool) else str(t),
                        _choice(r, vocab.ROLES, "role")))
        return self._call("search", dict(clauses=out, limit=limit), timeout)

    def in_context_neurons(self, *, limit: int = 0, timeout: float | None = None) -> InContextResult:
        """Neurons with a token among both their activating and context tokens (ranked)."""
        return self._call("in_context_neurons", dict(limit=limit), timeout)

    def similar(self, layer: int, neuron: int, *, threshold: float | None = None, k: int | None = None,
                timeout: float | None = None) -> Similar:
        return self._call("similar", dict(layer=_whole(layer, "layer"), neuron=_whole(neuron, "neuron"),
                                          threshold=threshold or None,
                                          k=k or None), timeout)

    def pairs(self, kind: str = vocab.DEFAULT_PAIR_KIND, *, threshold: float | None = None,
              batch_size: int | None = None, timeout: float | None = None) -> Iterator[Pair]:
        """Every similar (or subset) pair of built graphs, streamed."""
        return self._stream_call("pairs", dict(kind=_choice(kind, vocab.PAIR_KINDS, "pair kind"),
                                               threshold=threshold or None, batch_size=batch_size or None), timeout)

    # -- export and report ----------------------------------------------------------------------
    def export(self, layers: Sequence[int] | None = None, *, examples: bool = True,
               timeout: float | None = None) -> Iterator[ExportedNeuron]:
        return self._stream_call("export", dict(layers=_layers(layers), examples=examples), timeout)

    def export_to(self, out_dir: str | os.PathLike, layers: Sequence[int] | None = None, *,
                  timeout: float | None = None, progress: Callable[[Key], None] | None = None) -> int:
        """Writes out_dir/graphs/L_N.json and out_dir/examples/L_N.json, then out_dir/export.json
        (the count: an export without it is not complete); returns the count. ``progress`` is
        called with each neuron's key as it is written."""
        writer = _ExportWriter(out_dir)
        for e in self.export(layers, examples=True, timeout=timeout):
            writer.write(e)
            if progress is not None:
                progress(e.key)
        return writer.finish()

    def report(self, layers: Sequence[int] | None = None, *, timeout: float | None = None) -> bytes:
        """The workspace's report (of `layers` only, if given) as zip bytes (at most
        MAX_REPORT_BYTES: a whole model's report is best made a few layers at a time)."""
        sink = _ReportSink()
        for chunk in self._stream_call("report", dict(layers=_layers(layers)), timeout):
            sink.add(chunk.data)
        return sink.bytes()

    def report_to(self, out_dir: str | os.PathLike, layers: Sequence[int] | None = None, *,
                  timeout: float | None = None, zip_path: str | os.PathLike | None = None) -> Path:
        """Fetches the report and unpacks it into out_dir (keeping the archive at ``zip_path`` too,
        if given); returns out_dir/index.html."""
        return _unpack_report(self.report(layers, timeout=timeout), out_dir, zip_path)


def write_file(path: str | os.PathLike, data: bytes | str | Iterable[bytes]) -> None:
    """Writes ``path`` whole or not at all (a temporary file beside it, then renamed over it), so
    a process killed meanwhile, or a full disk, never leaves a cut-off file that looks complete.
    ``data`` may be pieces (an iterable of bytes), written as they come."""
    import threading

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    pieces = [data.encode()] if isinstance(data, str) else [data] if isinstance(data, (bytes, bytearray)) else data
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory", str(path))
        with open(tmp, "wb") as f:
            for piece in pieces:
                f.write(piece)
        os.replace(tmp, path)
    except OSError as e:  # named by the file asked for, not the temporary one
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only disk refuses even that (EROFS): the error to show is `e`
            pass
        raise type(e)(e.errno, e.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _ExportWriter:
    """Writes an export: DIR/graphs/L_N.json, DIR/examples/L_N.json, each file whole, and last
    DIR/export.json listing them, so a folder without it is an export cut short."""

    def __init__(self, out_dir) -> None:
        self.out = Path(out_dir)
        self.count = 0
        self.keys: list[list[int]] = []
        self._started = False

    def _start(self) -> None:
        """Makes the folders at the first answer, so a refused export leaves nothing behind."""
        if not self._started:
            (self.out / "graphs").mkdir(parents=True, exist_ok=True)
            (self.out / "examples").mkdir(parents=True, exist_ok=True)
            (self.out / "export.json").unlink(missing_ok=True)  # until this export finishes
            self._started = True

    def write(self, e: ExportedNeuron) -> None:
        self._start()
        name = f"{int(e.key[0])}_{int(e.key[1])}.json"
        write_file(self.out / "graphs" / name, e.graph_json)
        if e.examples_json:
            write_file(self.out / "examples" / name, e.examples_json)
        self.count += 1
        self.keys.append([int(e.key[0]), int(e.key[1])])

    def finish(self) -> int:
        self._start()
        # an earlier export into this folder (other layers, neurons built since removed) leaves
        # L_N.json files this one did not write: removed, so the folder holds what export.json lists
        written = {f"{l}_{n}.json" for l, n in self.keys}
        for folder in ("graphs", "examples"):
            for path in (self.out / folder).glob("*_*.json"):
                if re.fullmatch(r"\d+_\d+\.json", path.name) and path.name not in written:
                    path.unlink(missing_ok=True)
        write_file(self.out / "export.json", _json.dumps({"neurons": self.count, "keys": self.keys}))
        return self.count


class _ReportSink:
    """Collects a streamed report, refusing one past MAX_REPORT_BYTES as it arrives."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._n = 0

    def add(self, data: bytes) -> None:
        self._n += len(data)
        if self._n > MAX_REPORT_BYTES:
            raise N2GError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"the report archive passed {MAX_REPORT_BYTES} bytes; refusing the rest")
        self._parts.append(data)

    def bytes(self) -> bytes:
        return b"".join(self._parts)


def _zip_entries(data: bytes) -> int | None:
    """The entry count a zip archive's end-of-central-directory record states (ZIP64 too), or
    None when there is none to read (zipfile then says what is wrong)."""
    import struct

    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 22 - 0xFFFF))
    if end < 0 or end + 22 > len(data):
        return None
    entries = struct.unpack_from("<H", data, end + 10)[0]
    if entries == 0xFFFF and end >= 20 and data[end - 20:end - 16] == b"PK\x06\x07":  # ZIP64
        at = struct.unpack_from("<Q", data, end - 12)[0]
        if data[at:at + 4] == b"PK\x06\x06" and at + 40 <= len(data):
            entries = struct.unpack_from("<Q", data, at + 32)[0]
    return entries


def _unpack_report(data: bytes, out_dir, zip_path) -> Path:
    """The report's archive kept at ``zip_path`` (if given) and unpacked into out_dir."""
    if zip_path is not None:
        Path(zip_path).parent.mkdir(parents=True, exist_ok=True)
        write_file(zip_path, data)
    return _unzip(data, out_dir)


def _unzip(data: bytes, out_dir) -> Path:
    """Unpacks a report archive into out_dir, refusing paths outside it and archives that unpack
    past MAX_REPORT_UNPACKED_BYTES (sizes are checked as bytes are written, not trusted from the
    archive's directory). Each file is written whole and index.html last (removed first), so a
    report cut short has no front page."""
    import io

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    written = 0

    def blocks(src) -> Iterator[bytes]:  # the archive's bytes as unpacked, counted across its files
        nonlocal written
        while block := src.read(1 << 20):
            written += len(block)
            if written > MAX_REPORT_UNPACKED_BYTES:
                raise ValueError(f"report archive unpacks past {MAX_REPORT_UNPACKED_BYTES} bytes; refused")
            yield block

    def count(entries: int | None) -> None:
        if entries is not None and entries > MAX_REPORT_FILES:
            raise ValueError(f"report archive holds {entries} files, past {MAX_REPORT_FILES}; refused")

    # ~93 bytes of archive an empty file: the count is read from the archive's end record before
    # zipfile parses its directory (11 M entries would take gigabytes there), and checked again after
    count(_zip_entries(data))
    (out / "index.html").unlink(missing_ok=True)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        count(len(zf.infolist()))
        front = root / "index.html"
        infos = sorted(zf.infolist(), key=lambda i: (root / i.filename).resolve() == front)  # ./index.html too
        for info in infos:
            if not (root / info.filename).resolve().is_relative_to(root):
                raise ValueError(f"unsafe path in report archive: {info.filename}")
        for info in infos:
            target = (root / info.filename).resolve()
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src:
                write_file(target, blocks(src))
    return out / "index.html"


# ---------------------------------------------------------------------------------------------
# Network transports

_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")


def with_default_port(target: str) -> str:
    """``target`` with n2g's port when it names a host alone (gRPC would use 443): "localhost"
    -> "localhost:50051", "[::1]" -> "[::1]:50051"; URIs and host:port stay as they are."""
    t = target.strip()
    if not t or t.startswith(_SCHEMES) or "://" in t:
        return target
    if t.endswith(":"):  # "host:" names no port either
        t = t[:-1]
    if t.startswith("["):
        return t if "]:" in t else f"{t}:{DEFAULT_PORT}"
    return f"{t}:{DEFAULT_PORT}" if ":" not in t else t


class _ClientBase:
    """Settings and channel shared by the blocking and the asyncio client. `target` is host:port;
    `token` sends `authorization: Bearer <token>` (default: $N2G_TOKEN); `tls=True` or
    `root_certificates` (PEM bytes or a path) use TLS; `timeout` is the default deadline of a
    unary call in seconds; `retries`/`backoff` govern retrying while the server is UNAVAILABLE."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | os.PathLike | None = None, tls_server_name: str | None = None,
                 timeout: float = 60.0, retries: int = 5, backoff: float = 0.1, max_backoff: float = 2.0,
                 max_message_bytes: int = 64 << 20):
        self.target = target = with_default_port(target)
        self.timeout = _budget(timeout)
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        if token is None:
            token = os.environ.get("N2G_TOKEN")
        if token is not None and not token.strip():
            raise ValueError("an empty auth token was given: pass a real token or none at all")
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        creds = _credentials(tls, root_certificates)
        opts = _channel_args(max_message_bytes, tls_server_name)
        channels = self._channels()
        self._channel = (channels.insecure_channel(target, options=opts) if creds is None
                         else channels.secure_channel(target, creds, options=opts))
        self._stub = _pbg.N2GStub(self._channel)

    @staticmethod
    def _channels():
        """The module that opens this client's channels (grpc or grpc.aio)."""
        return grpc


class N2GClient(_ClientBase, _Api):
    """Blocking client (see `_ClientBase` for the connection options)."""

    def close(self) -> None:
        self.closed = True
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> "N2GClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, name: str, args: dict[str, Any], timeout: float | None):
        op = OPS[name]
        return op.result(self._unary(op.rpc, _request(op, self._open(args)), timeout))

    def _stream_call(self, name: str, args: dict[str, Any], timeout: float | None) -> Iterator:
        op = OPS[name]
        for msg in self._stream(op.rpc, _request(op, self._open(args)), timeout):
            item = op.result(msg)
            if isinstance(item, list):
                yield from item
            else:
                yield item

    def _unary(self, method: str, request, timeout: float | None = None):
        budget = self.timeout if timeout is None else _budget(timeout)
        retry = _Retry(self, None if budget is None else time.monotonic() + budget, time.monotonic)
        while True:
            try:
                return getattr(self._stub, method)(request, timeout=retry.remaining(), metadata=self._metadata)
            except grpc.RpcError as e:
                d = retry.delay(e)
                if d is None:
                    raise _error(e) from None
                time.sleep(d)

    def _stream(self, method: str, request, timeout: float | None = None) -> Iterator:
        """A server stream; retried (as `_Retry` says) only before its first message."""
        timeout = _budget(timeout)
        retry = _Retry(self, None if timeout is None else time.monotonic() + timeout, time.monotonic)
        while True:
            call = getattr(self._stub, method)(request, timeout=retry.remaining(), metadata=self._metadata)
            started = False
            try:
                for item in call:
                    started = True
                    yield item
                return
            except grpc.RpcError as e:
                d = None if started else retry.delay(e)
                if d is None:
                    raise _error(e) from None
                time.sleep(d)
            finally:
                call.cancel()

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """grpc.health.v1 status of `service` ("" = the server): SERVING, NOT_SERVING, ..."""
        self._open({})  # gRPC crashes the process (SIGSEGV) on a health check over a closed channel
        try:
            return _health_status(_health_check(self._channel, service, timeout))
        except grpc.RpcError as e:
            raise _error(e) from None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Waits until the server answers health checks with SERVING."""
        self._open({})  # closed: said at once, not as a server never ready
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=max(0.1, min(2.0, deadline - time.monotonic()))) == "SERVING":
                    return
            except N2GError:
                pass
            if time.monotonic() >= deadline:
                raise N2GError(grpc.StatusCode.UNAVAILABLE, f"server at {self.target} not ready after {timeout} s")
            time.sleep(0.1)


class AsyncN2GClient(_ClientBase, _Api):
    """asyncio client with the same methods as `N2GClient` (coroutines; streams are async
    iterators). Create and use it inside a running event loop."""

    @staticmethod
    def _channels():
        return grpc.aio

    async def close(self) -> None:
        self.closed = True
        await self._channel.close()

    async def __aenter__(self) -> "AsyncN2GClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _closed_under(self) -> N2GError | None:
        """The error of a call that close() cut short: grpc.aio cancels every call on the channel,
        and the asyncio.CancelledError it raises would mark the caller's task cancelled (a TaskGroup
        drops it silently). None when the task itself was cancelled (that error is the caller's)."""
        task = asyncio.current_task()
        if not self.closed or (task is not None and task.cancelling()):
            return None
        return N2GError(grpc.StatusCode.FAILED_PRECONDITION, "this client was closed during the call: open a new one")

    async def _call(self, name: str, args: dict[str, Any], timeout: float | None):
        op = OPS[name]
        return op.result(await self._unary(op.rpc, _request(op, self._open(args)), timeout))

    async def _stream_call(self, name: str, args: dict[str, Any], timeout: float | None) -> AsyncIterator:
        op = OPS[name]
        async for msg in self._stream(op.rpc, _request(op, self._open(args)), timeout):
            item = op.result(msg)
            for x in (item if isinstance(item, list) else [item]):
                yield x

    async def _unary(self, method: str, request, timeout: float | None = None):
        budget = self.timeout if timeout is None else _budget(timeout)
        loop = asyncio.get_running_loop()
        retry = _Retry(self, None if budget is None else loop.time() + budget, loop.time)
        while True:
            try:
                return await getattr(self._stub, method)(request, timeout=retry.remaining(), metadata=self._metadata)
            except asyncio.CancelledError:
                if (closed := self._closed_under()) is None:
                    raise
                raise closed from None
            except grpc.RpcError as e:
                d = retry.delay(e)
                if d is None:
                    raise _error(e) from None
                await asyncio.sleep(d)

    async def _stream(self, method: str, request, timeout: float | None = None) -> AsyncIterator:
        loop = asyncio.get_running_loop()
        timeout = _budget(timeout)
        retry = _Retry(self, None if timeout is None else loop.time() + timeout, loop.time)
        while True:
            call = getattr(self._stub, method)(request, timeout=retry.remaining(), metadata=self._metadata)
            started = False
            try:
                async for item in call:
                    started = True
                    yield item
                return
            except asyncio.CancelledError:
                if (closed := self._closed_under()) is None:
                    raise
                raise closed from None
            except grpc.RpcError as e:
                d = None if started else retry.delay(e)
                if d is None:
                    raise _error(e) from None
                await asyncio.sleep(d)
            finally:
                call.cancel()

    async def health(self, service: str = "", timeout: float = 5.0) -> str:
        self._open({})  # gRPC aborts the process on a health check over a closed channel
        try:
            return _health_status(await _health_check(self._channel, service, timeout))
        except grpc.RpcError as e:
            raise _error(e) from None

    async def wait_ready(self, timeout: float = 60.0) -> None:
        self._open({})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                if await self.health(timeout=max(0.1, min(2.0, deadline - loop.time()))) == "SERVING":
                    return
            except N2GError:
                pass
            if loop.time() >= deadline:
                raise N2GError(grpc.StatusCode.UNAVAILABLE, f"server at {self.target} not ready after {timeout} s")
            await asyncio.sleep(0.1)

    # The calls that combine others are coroutines here (the rest come from _Api unchanged).
    async def wait_job(self, job_id: str, progress: Callable[[JobEvent], None] | None = None, *,
                       timeout: float | None = None, reconnect: bool = True) -> Job:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        reached = False
        while True:
            last = None
            try:
                left = None if deadline is None else max(1e-3, deadline - loop.time())
                async for ev in self.watch_job(job_id, timeout=left):
                    last, reached = ev, True
                    if progress is not None:
                        progress(ev)
                if last is not None and last.job.finished:
                    return last.job
            except N2GError as e:
                ended = _watch_cut(e, last, reached and reconnect)
                if ended is not None:
                    return ended
            if deadline is not None and loop.time() >= deadline:
                raise N2GError(grpc.StatusCode.DEADLINE_EXCEEDED, f"job {job_id} not finished after {timeout} s")
            await asyncio.sleep(0.2)

    async def export_to(self, out_dir: str | os.PathLike, layers: Sequence[int] | None = None, *,
                        timeout: float | None = None, progress: Callable[[Key], None] | None = None) -> int:
        writer = _ExportWriter(out_dir)
        async for e in self.export(layers, examples=True, timeout=timeout):
            writer.write(e)
            if progress is not None:
                progress(e.key)
        return writer.finish()

    async def report(self, layers: Sequence[int] | None = None, *, timeout: float | None = None) -> bytes:
        sink = _ReportSink()
        async for chunk in self._stream_call("report", dict(layers=_layers(layers)), timeout):
            sink.add(chunk.data)
        return sink.bytes()

    async def report_to(self, out_dir: str | os.PathLike, layers: Sequence[int] | None = None, *,
                        timeout: float | None = None, zip_path: str | os.PathLike | None = None) -> Path:
        return _unpack_report(await self.report(layers, timeout=timeout), out_dir, zip_path)
