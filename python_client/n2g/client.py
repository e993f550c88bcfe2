"""Python client of the n2g service: `N2GClient` (blocking) and `AsyncN2GClient` (asyncio).

Needs only grpcio, protobuf and numpy (no torch, nothing from the server package). Results are
dataclasses, activations numpy arrays; the generated protobuf types stay inside this module.

    from n2g.client import N2GClient
    with N2GClient("localhost:50051") as c:
        info = c.model_info()
        job = c.start_build(layers=[0], neurons=[1, 2, 3])
        c.wait_job(job.id, progress=print)
        pred = c.predict([(0, 1), (0, 2)], texts=["The cat sat on the mat."])
        pred.values[0]          # [2 neurons, n tokens] for the first text
        c.search([("cat", "activating")]).neurons

Errors are `N2GError` with `.code` (a `grpc.StatusCode`) and `.message`. Calls are retried with
exponential backoff while the server is UNAVAILABLE (starting or restarting), within the call's
deadline; `start_build` sends a client-chosen job id, so its retries never start a job twice.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Sequence

import grpc
import numpy as np

from .v1 import n2g_pb2 as _pb
from .v1 import n2g_pb2_grpc as _pbg

__all__ = [
    "N2GClient", "AsyncN2GClient", "N2GError", "ModelInfo", "Limits", "LayerStatus", "TokenizedText", "Job",
    "JobEvent", "GraphSummary", "GraphNode", "Graph", "Activations", "MethodScore", "NeuronEvaluation",
    "LayerEvaluation", "Evaluation", "SearchResult", "Pair", "Neighbour", "Similar", "ExportedNeuron",
    "InContextNeuron", "InContextResult",
    "parse_neuron", "DEFAULT_TARGET",
]

DEFAULT_TARGET = "localhost:50051"
Key = tuple[int, int]
JOB_FINAL = ("succeeded", "failed", "cancelled")


class N2GError(Exception):
    """A failed call: `code` is the gRPC status code, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @property
    def code_name(self) -> str:
        return self.code.name


def _error(e: grpc.RpcError) -> N2GError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    return N2GError(code or grpc.StatusCode.UNKNOWN, details or "")


# ---------------------------------------------------------------------------------------------
# Results

@dataclass(frozen=True)
class Limits:
    max_texts: int
    max_tokens_per_sequence: int
    max_total_tokens: int
    max_neurons: int
    max_neuron_tokens: int
    max_message_bytes: int
    max_build_neurons: int


@dataclass(frozen=True)
class LayerStatus:
    layer: int
    scanned: bool
    neurons_built: int


@dataclass(frozen=True)
class ModelInfo:
    model: str
    loaded: bool
    n_layers: int
    d_mlp: int
    d_vocab: int
    hook: str
    device: str
    workspace: str
    corpus: str
    layers: list[LayerStatus]
    neurons_built: int
    limits: Limits
    server_version: str
    semantics: list[str]
    default_semantics: str


@dataclass(frozen=True)
class TokenizedText:
    token_ids: np.ndarray  # int64 [n_tokens]
    tokens: list[str]


@dataclass(frozen=True)
class Job:
    id: str
    state: str  # queued | running | succeeded | failed | cancelled
    total: int
    done: int
    error: str
    created_at: float
    updated_at: float
    request: dict[str, Any]

    @property
    def finished(self) -> bool:
        return self.state in JOB_FINAL


@dataclass(frozen=True)
class JobEvent:
    job: Job
    stage: str  # state | corpus | scan | fit | done | failed | cancelled
    done: int
    total: int
    message: str
    last_neuron: Key | None
    elapsed_s: float


@dataclass(frozen=True)
class MethodScore:
    method: str
    precision: float
    recall: float
    f1: float


@dataclass(frozen=True)
class GraphSummary:
    key: Key
    max_activation: float
    n_nodes: int
    n_paths: int
    activating: list[str]
    context: list[str]
    job_id: str
    created_at: float
    scores: list[MethodScore]


@dataclass(frozen=True)
class GraphNode:
    label: str
    token_ids: list[int]
    ignore: bool
    importance: float
    activation: float | None
    end: float | None
    children: list["GraphNode"]


@dataclass(frozen=True)
class Graph:
    summary: GraphSummary
    model: str
    hook: str
    roots: list[GraphNode]
    dot: str
    svg: str
    json: str
    stats: dict[str, Any]
    metrics: dict[str, Any]
    examples: dict[str, Any] | None

    @property
    def key(self) -> Key:
        return self.summary.key


@dataclass(frozen=True)
class Activations:
    """Activations of `neurons` on each input sequence: `values[s]` is float32
    [len(neurons), len(token_ids[s])]."""
    neurons: list[Key]
    token_ids: list[np.ndarray]
    tokens: list[list[str]]
    values: list[np.ndarray]
    normalised: bool
    max_activation: np.ndarray
    semantics: str = ""

    def padded(self, fill: float = 0.0) -> np.ndarray:
        """[neuron, sequence, position], `fill` past each sequence's end."""
        t = max((len(s) for s in self.token_ids), default=0)
        out = np.full((len(self.neurons), len(self.values), t), fill, dtype=np.float32)
        for i, v in enumerate(self.values):
            out[:, i, : v.shape[1]] = v
        return out

    def of(self, layer: int, neuron: int) -> list[np.ndarray]:
        """One neuron's activations, one array per sequence."""
        r = self.neurons.index((layer, neuron))
        return [v[r] for v in self.values]


@dataclass(frozen=True)
class NeuronEvaluation:
    key: Key
    scores: list[MethodScore]
    metrics: dict[str, Any]


@dataclass(frozen=True)
class LayerEvaluation:
    layer: int
    n_neurons: int
    scores: list[MethodScore]


@dataclass(frozen=True)
class Evaluation:
    neurons: list[NeuronEvaluation]
    layers: list[LayerEvaluation]
    table: str
    summary: Any


@dataclass(frozen=True)
class SearchResult:
    neurons: list[Key]
    total: int


@dataclass(frozen=True)
class Pair:
    a: Key  # for a subset pair: the neuron with the smaller sets
    b: Key
    kind: str  # similar | subset
    activating_overlap: float
    context_overlap: float


@dataclass(frozen=True)
class Neighbour:
    key: Key
    score: float  # mean of the two overlaps
    activating_overlap: float
    context_overlap: float


@dataclass(frozen=True)
class InContextNeuron:
    key: Key
    shared: list[str]  # labels among both its activating and its context tokens
    fraction: float    # shared / activating labels


@dataclass(frozen=True)
class InContextResult:
    neurons: list[InContextNeuron]  # ranked: most shared labels first
    total: int


@dataclass(frozen=True)
class Similar:
    similar: list[Pair]
    subset: list[Pair]
    neighbours: list[Neighbour]


@dataclass(frozen=True)
class ExportedNeuron:
    key: Key
    graph_json: str
    examples_json: str


# ---------------------------------------------------------------------------------------------
# Requests and conversions (shared by both clients and the command line's local mode)

_STATE = {_pb.JOB_STATE_QUEUED: "queued", _pb.JOB_STATE_RUNNING: "running", _pb.JOB_STATE_SUCCEEDED: "succeeded",
          _pb.JOB_STATE_FAILED: "failed", _pb.JOB_STATE_CANCELLED: "cancelled"}
_STATE_PB = {v: k for k, v in _STATE.items()}
_SEMANTICS = {None: _pb.SEMANTICS_UNSPECIFIED, "": _pb.SEMANTICS_UNSPECIFIED,
              "all_paths_max": _pb.SEMANTICS_ALL_PATHS_MAX, "greedy_deepest": _pb.SEMANTICS_GREEDY_DEEPEST}
_ROLE = {"activating": _pb.ROLE_ACTIVATING, "context": _pb.ROLE_CONTEXT, "either": _pb.ROLE_EITHER}
_KIND = {"similar": _pb.PAIR_KIND_SIMILAR, "subset": _pb.PAIR_KIND_SUBSET}
_KIND_NAME = {_pb.PAIR_KIND_SIMILAR: "similar", _pb.PAIR_KIND_SUBSET: "subset", _pb.PAIR_KIND_UNSPECIFIED: "similar"}


def parse_neuron(spec: str | Sequence[int]) -> Key:
    """(layer, neuron) from "L:N", "L/N" or a pair."""
    if isinstance(spec, str):
        for sep in (":", "/", ","):
            if sep in spec:
                a, b = spec.split(sep, 1)
                return int(a), int(b)
        raise ValueError(f"bad neuron {spec!r}: write LAYER:NEURON, e.g. 0:17")
    layer, neuron = spec
    return int(layer), int(neuron)


def _keys_pb(neurons: Iterable[str | Sequence[int]]) -> list[_pb.NeuronKey]:
    return [_pb.NeuronKey(layer=l, neuron=n) for l, n in map(parse_neuron, neurons)]


def _key(k: _pb.NeuronKey) -> Key:
    return (k.layer, k.neuron)


def _token_ids_pb(token_ids) -> list[_pb.TokenIds]:
    return [_pb.TokenIds(ids=[int(x) for x in np.asarray(s).ravel()]) for s in (token_ids or [])]


def _enum(mapping: dict, value, what: str):
    if value in mapping:
        return mapping[value]
    if isinstance(value, int):  # raw enum numbers pass through (the server validates them)
        return value
    raise ValueError(f"unknown {what} {value!r}: use one of {sorted(k for k in mapping if k)}")


class _Req:
    """Request builders."""

    @staticmethod
    def tokenize(texts, token_ids, skip_bos):
        return _pb.TokenizeRequest(texts=list(texts or []), token_ids=_token_ids_pb(token_ids), skip_bos=skip_bos)

    @staticmethod
    def start_build(layers, neurons, sample, seed, group_size, k, window_tokens, config, job_id):
        return _pb.StartBuildRequest(
            layers=list(layers), neurons=list(neurons or []), sample=sample or 0, seed=seed,
            group_size=group_size or 0, k=k or 0, window_tokens=window_tokens or 0,
            config_json=json.dumps(config) if config else "", job_id=job_id or uuid.uuid4().hex[:12])

    @staticmethod
    def graph(layer, neuron, structure, dot, svg, json_, examples):
        return _pb.GetGraphRequest(neuron=_pb.NeuronKey(layer=layer, neuron=neuron), include_structure=structure,
                                   include_dot=dot, include_svg=svg, include_json=json_, include_examples=examples)

    @staticmethod
    def predict(neurons, texts, token_ids, semantics, skip_bos):
        return _pb.PredictRequest(neurons=_keys_pb(neurons), texts=list(texts or []),
                                  token_ids=_token_ids_pb(token_ids),
                                  semantics=_enum(_SEMANTICS, semantics, "semantics"), skip_bos=skip_bos)

    @staticmethod
    def activations(neurons, texts, token_ids, normalise, skip_bos):
        return _pb.GetActivationsRequest(neurons=_keys_pb(neurons), texts=list(texts or []),
                                         token_ids=_token_ids_pb(token_ids), normalise=normalise, skip_bos=skip_bos)

    @staticmethod
    def evaluate(neurons, layers, eval_config):
        return _pb.EvaluateRequest(neurons=_keys_pb(neurons or []), layers=list(layers or []),
                                   eval_config_json=json.dumps(eval_config) if eval_config else "")

    @staticmethod
    def search(clauses, limit):
        out = []
        for tok, role in clauses:
            c = _pb.SearchClause(role=_enum(_ROLE, role, "role"))
            if isinstance(tok, (int, np.integer)):
                c.token_id = int(tok)
            else:
                c.label = str(tok)
            out.append(c)
        return _pb.SearchRequest(clauses=out, limit=limit)

    @staticmethod
    def similar(layer, neuron, threshold, k):
        return _pb.FindSimilarRequest(neuron=_pb.NeuronKey(layer=layer, neuron=neuron), threshold=threshold or 0.0,
                                      k=k or 0)

    @staticmethod
    def pairs(kind, threshold, batch_size):
        return _pb.StreamPairsRequest(kind=_enum(_KIND, kind, "pair kind"), threshold=threshold or 0.0,
                                      batch_size=batch_size or 0)

    @staticmethod
    def list_jobs(states):
        return _pb.ListJobsRequest(states=[_enum(_STATE_PB, s, "job state") for s in (states or [])])


class _Conv:
    """Response converters (protobuf -> dataclasses)."""

    @staticmethod
    def model_info(r) -> ModelInfo:
        lim = r.limits
        return ModelInfo(
            model=r.model, loaded=r.loaded, n_layers=r.n_layers, d_mlp=r.d_mlp, d_vocab=r.d_vocab, hook=r.hook,
            device=r.device, workspace=r.workspace, corpus=r.corpus,
            layers=[LayerStatus(x.layer, x.scanned, x.neurons_built) for x in r.layers],
            neurons_built=r.neurons_built,
            limits=Limits(lim.max_texts, lim.max_tokens_per_sequence, lim.max_total_tokens, lim.max_neurons,
                          lim.max_neuron_tokens, lim.max_message_bytes, lim.max_build_neurons),
            server_version=r.server_version, semantics=list(r.semantics), default_semantics=r.default_semantics)

    @staticmethod
    def tokenize(r) -> list[TokenizedText]:
        return [TokenizedText(np.asarray(s.token_ids, dtype=np.int64), list(s.tokens)) for s in r.sequences]

    @staticmethod
    def job(r) -> Job:
        return Job(r.id, _STATE.get(r.state, "unknown"), r.total, r.done, r.error, r.created_at, r.updated_at,
                   json.loads(r.request_json) if r.request_json else {})

    @staticmethod
    def jobs(r) -> list[Job]:
        return [_Conv.job(j) for j in r.jobs]

    @staticmethod
    def job_event(r) -> JobEvent:
        return JobEvent(_Conv.job(r.job), r.stage, r.done, r.total, r.message,
                        _key(r.last_neuron) if r.HasField("last_neuron") else None, r.elapsed_s)

    @staticmethod
    def scores(rs) -> list[MethodScore]:
        return [MethodScore(s.method, s.precision, s.recall, s.f1) for s in rs]

    @staticmethod
    def summary(s) -> GraphSummary:
        return GraphSummary(_key(s.key), s.max_activation, s.n_nodes, s.n_paths, list(s.activating),
                            list(s.context), s.job_id, s.created_at, _Conv.scores(s.scores))

    @staticmethod
    def summaries(r) -> list[GraphSummary]:
        return [_Conv.summary(s) for s in r.graphs]

    @staticmethod
    def node(n) -> GraphNode:
        return GraphNode(n.label, list(n.token_ids), n.ignore, n.importance,
                         n.activation if n.HasField("activation") else None, n.end if n.HasField("end") else None,
                         [_Conv.node(c) for c in n.children])

    @staticmethod
    def graph(r) -> Graph:
        return Graph(_Conv.summary(r.summary), r.model, r.hook, [_Conv.node(n) for n in r.roots], r.dot, r.svg,
                     r.json, json.loads(r.stats_json or "{}"), json.loads(r.metrics_json or "{}"),
                     json.loads(r.examples_json) if r.examples_json else None)

    @staticmethod
    def activations(r) -> Activations:
        n = len(r.neurons)
        ids, toks, vals = [], [], []
        for s in r.sequences:
            t = np.asarray(s.token_ids, dtype=np.int64)
            ids.append(t)
            toks.append(list(s.tokens))
            vals.append(np.asarray(s.activations, dtype=np.float32).reshape(n, len(t)))
        return Activations([_key(k) for k in r.neurons], ids, toks, vals, r.normalised,
                           np.asarray(r.max_activation, dtype=np.float32), r.semantics)

    @staticmethod
    def evaluation(r) -> Evaluation:
        return Evaluation(
            [NeuronEvaluation(_key(n.key), _Conv.scores(n.scores), json.loads(n.metrics_json or "{}"))
             for n in r.neurons],
            [LayerEvaluation(l.layer, l.n_neurons, _Conv.scores(l.scores)) for l in r.layers],
            r.table, json.loads(r.summary_json) if r.summary_json else None)

    @staticmethod
    def search(r) -> SearchResult:
        return SearchResult([_key(k) for k in r.neurons], r.total)

    @staticmethod
    def pair(p) -> Pair:
        return Pair(_key(p.a), _key(p.b), _KIND_NAME.get(p.kind, "similar"), p.activating_overlap, p.context_overlap)

    @staticmethod
    def similar(r) -> Similar:
        return Similar([_Conv.pair(p) for p in r.similar], [_Conv.pair(p) for p in r.subset],
                       [Neighbour(_key(n.key), n.score, n.activating_overlap, n.context_overlap)
                        for n in r.neighbours])

    @staticmethod
    def in_context(r) -> InContextResult:
        return InContextResult([InContextNeuron(_key(n.key), list(n.shared), n.fraction) for n in r.neurons], r.total)

    @staticmethod
    def exported(r) -> ExportedNeuron:
        return ExportedNeuron(_key(r.key), r.graph_json, r.examples_json)


# grpc.health.v1 by hand (two one-field messages), so the client needs no grpcio-health-checking.
_HEALTH_METHOD = "/grpc.health.v1.Health/Check"
_HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _health_request(service: str) -> bytes:
    data = service.encode()
    if not data:
        return b""
    out, n = bytearray(b"\x0a"), len(data)
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            break
    return bytes(out) + data


def _health_status(data: bytes) -> str:
    if len(data) >= 2 and data[0] == 0x08:
        return _HEALTH_STATUS.get(data[1], "UNKNOWN")
    return "UNKNOWN"


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
    return grpc.ssl_channel_credentials(root_certificates=roots)


def _delays(retries: int, backoff: float, max_backoff: float) -> Iterator[float]:
    d = backoff
    for _ in range(retries):
        yield d * (0.5 + random.random())  # jitter: 50%..150%
        d = min(d * 2, max_backoff)


# ---------------------------------------------------------------------------------------------
# The blocking client

class _ClientBase:
    """Settings and channel shared by the blocking and the asyncio client. `target` is host:port;
    `token` sends `authorization: Bearer <token>` (default: $N2G_TOKEN); `tls=True` or
    `root_certificates` (PEM bytes or a path) use TLS; `timeout` is the default deadline of a
    unary call in seconds; `retries`/`backoff` govern retrying while the server is UNAVAILABLE."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | os.PathLike | None = None, tls_server_name: str | None = None,
                 timeout: float = 60.0, retries: int = 5, backoff: float = 0.1, max_backoff: float = 2.0,
                 max_message_bytes: int = 64 << 20):
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        token = token if token is not None else os.environ.get("N2G_TOKEN") or None
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


class N2GClient(_ClientBase):
    """Blocking client (see `_ClientBase` for the connection options)."""

    # -- plumbing -------------------------------------------------------------------------------
    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> "N2GClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unary(self, method: str, request, timeout: float | None = None):
        budget = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        delays = _delays(self.retries, self.backoff, self.max_backoff)
        while True:
            remaining = deadline - time.monotonic()
            try:
                return getattr(self._stub, method)(request, timeout=max(remaining, 1e-3), metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    d = next(delays, None)
                    if d is not None and deadline - time.monotonic() > d:
                        time.sleep(d)
                        continue
                raise _error(e) from None

    def _stream(self, method: str, request, timeout: float | None = None) -> Iterator:
        """A server stream; retried on UNAVAILABLE only before its first message."""
        delays = _delays(self.retries, self.backoff, self.max_backoff)
        while True:
            call = getattr(self._stub, method)(request, timeout=timeout, metadata=self._metadata)
            started = False
            try:
                for item in call:
                    started = True
                    yield item
                return
            except grpc.RpcError as e:
                if not started and e.code() == grpc.StatusCode.UNAVAILABLE:
                    d = next(delays, None)
                    if d is not None:
                        time.sleep(d)
                        continue
                raise _error(e) from None
            finally:
                call.cancel()

    # -- health ---------------------------------------------------------------------------------
    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """grpc.health.v1 status of `service` ("" = the server): SERVING, NOT_SERVING, ..."""
        fn = self._channel.unary_unary(_HEALTH_METHOD, request_serializer=None, response_deserializer=None)
        try:
            return _health_status(fn(_health_request(service), timeout=timeout))
        except grpc.RpcError as e:
            raise _error(e) from None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Waits until the server answers health checks with SERVING."""
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

    # -- model ----------------------------------------------------------------------------------
    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return _Conv.model_info(self._unary("GetModelInfo", _pb.GetModelInfoRequest(), timeout))

    def tokenize(self, texts: Sequence[str] | None = None, *, token_ids=None, skip_bos: bool = False,
                 timeout: float | None = None) -> list[TokenizedText]:
        return _Conv.tokenize(self._unary("Tokenize", _Req.tokenize(texts, token_ids, skip_bos), timeout))

    # -- jobs -----------------------------------------------------------------------------------
    def start_build(self, layers: Sequence[int], neurons: Sequence[int] | None = None, *, sample: int | None = None,
                    seed: int = 0, group_size: int | None = None, k: int | None = None,
                    window_tokens: int | None = None, config: dict[str, Any] | None = None,
                    job_id: str | None = None, timeout: float | None = None) -> Job:
        req = _Req.start_build(layers, neurons, sample, seed, group_size, k, window_tokens, config, job_id)
        return _Conv.job(self._unary("StartBuild", req, timeout))

    def get_job(self, job_id: str, *, timeout: float | None = None) -> Job:
        return _Conv.job(self._unary("GetJob", _pb.GetJobRequest(job_id=job_id), timeout))

    def cancel_job(self, job_id: str, *, timeout: float | None = None) -> Job:
        return _Conv.job(self._unary("CancelJob", _pb.CancelJobRequest(job_id=job_id), timeout))

    def list_jobs(self, states: Sequence[str] | None = None, *, timeout: float | None = None) -> list[Job]:
        return _Conv.jobs(self._unary("ListJobs", _Req.list_jobs(states), timeout))

    def watch_job(self, job_id: str, *, timeout: float | None = None) -> Iterator[JobEvent]:
        """Progress events of a job, ending with the event that finishes it."""
        for ev in self._stream("WatchJob", _pb.WatchJobRequest(job_id=job_id), timeout):
            yield _Conv.job_event(ev)

    def wait_job(self, job_id: str, progress: Callable[[JobEvent], None] | None = None, *,
                 timeout: float | None = None, reconnect: bool = True) -> Job:
        """Watches a job until it finishes and returns it. With `reconnect`, a server that goes
        away (restart) is waited for and watched again, within `timeout` (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                left = None if deadline is None else max(1e-3, deadline - time.monotonic())
                last = None
                for ev in self.watch_job(job_id, timeout=left):
                    last = ev
                    if progress is not None:
                        progress(ev)
                if last is not None and last.job.finished:
                    return last.job
            except N2GError as e:
                if not reconnect or e.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise
            if deadline is not None and time.monotonic() >= deadline:
                raise N2GError(grpc.StatusCode.DEADLINE_EXCEEDED, f"job {job_id} not finished after {timeout} s")
            time.sleep(0.2)

    # -- graphs ---------------------------------------------------------------------------------
    def list_graphs(self, layers: Sequence[int] | None = None, *, limit: int = 0,
                    timeout: float | None = None) -> list[GraphSummary]:
        return _Conv.summaries(self._unary("ListGraphs", _pb.ListGraphsRequest(layers=list(layers or []), limit=limit),
                                           timeout))

    def graph(self, layer: int, neuron: int, *, structure: bool = False, dot: bool = False, svg: bool = False,
              json: bool = False, examples: bool = False, timeout: float | None = None) -> Graph:
        req = _Req.graph(layer, neuron, structure, dot, svg, json, examples)
        return _Conv.graph(self._unary("GetGraph", req, timeout))

    # -- activations ----------------------------------------------------------------------------
    def predict(self, neurons: Sequence, texts: Sequence[str] | None = None, *, token_ids=None,
                semantics: str | None = None, skip_bos: bool = False, timeout: float | None = None) -> Activations:
        """Predicted normalised activations of built neurons (from their graphs)."""
        req = _Req.predict(neurons, texts, token_ids, semantics, skip_bos)
        return _Conv.activations(self._unary("Predict", req, timeout))

    def activations(self, neurons: Sequence, texts: Sequence[str] | None = None, *, token_ids=None,
                    normalise: bool = True, skip_bos: bool = False, timeout: float | None = None) -> Activations:
        """The model's true activations (normalised by a_max unless `normalise=False`)."""
        req = _Req.activations(neurons, texts, token_ids, normalise, skip_bos)
        return _Conv.activations(self._unary("GetActivations", req, timeout))

    # -- evaluation, search, similarity ---------------------------------------------------------
    def evaluate(self, neurons: Sequence | None = None, *, layers: Sequence[int] | None = None,
                 eval_config: dict[str, Any] | None = None, timeout: float | None = None) -> Evaluation:
        return _Conv.evaluation(self._unary("Evaluate", _Req.evaluate(neurons, layers, eval_config), timeout))

    def search(self, clauses: Sequence[tuple[str | int, str]], *, limit: int = 0,
               timeout: float | None = None) -> SearchResult:
        """Neurons matching every (token, role) clause; token is a label or a token id, role
        activating | context | either."""
        return _Conv.search(self._unary("Search", _Req.search(clauses, limit), timeout))

    def in_context_neurons(self, *, limit: int = 0, timeout: float | None = None) -> InContextResult:
        """Neurons with a token among both their activating and context tokens (ranked)."""
        return _Conv.in_context(self._unary("ListInContextNeurons", _pb.ListInContextNeuronsRequest(limit=limit),
                                            timeout))

    def similar(self, layer: int, neuron: int, *, threshold: float | None = None, k: int | None = None,
                timeout: float | None = None) -> Similar:
        return _Conv.similar(self._unary("FindSimilar", _Req.similar(layer, neuron, threshold, k), timeout))

    def pairs(self, kind: str = "similar", *, threshold: float | None = None, batch_size: int | None = None,
              timeout: float | None = None) -> Iterator[Pair]:
        """Every similar (or subset) pair of built graphs, streamed."""
        for batch in self._stream("StreamPairs", _Req.pairs(kind, threshold, batch_size), timeout):
            for p in batch.pairs:
                yield _Conv.pair(p)

    # -- export and report ----------------------------------------------------------------------
    def export(self, layers: Sequence[int] | None = None, *, examples: bool = True,
               timeout: float | None = None) -> Iterator[ExportedNeuron]:
        req = _pb.ExportGraphsRequest(layers=list(layers or []), include_examples=examples)
        for r in self._stream("ExportGraphs", req, timeout):
            yield _Conv.exported(r)

    def export_to(self, out_dir: str | os.PathLike, layers: Sequence[int] | None = None, *,
                  timeout: float | None = None) -> int:
        """Writes out_dir/graphs/L_N.json and out_dir/examples/L_N.json; returns the count."""
        return _write_export(self.export(layers, examples=True, timeout=timeout), out_dir)

    def report(self, *, timeout: float | None = None) -> bytes:
        """The workspace's report as zip bytes."""
        return b"".join(c.data for c in self._stream("GetReport", _pb.GetReportRequest(), timeout))

    def report_to(self, out_dir: str | os.PathLike, *, timeout: float | None = None) -> Path:
        """Fetches the report and unpacks it into out_dir; returns out_dir/index.html."""
        return _unzip(self.report(timeout=timeout), out_dir)


def _write_export(items: Iterable[ExportedNeuron], out_dir) -> int:
    out = Path(out_dir)
    (out / "graphs").mkdir(parents=True, exist_ok=True)
    (out / "examples").mkdir(parents=True, exist_ok=True)
    n = 0
    for e in items:
        name = f"{e.key[0]}_{e.key[1]}.json"
        (out / "graphs" / name).write_text(e.graph_json)
        if e.examples_json:
            (out / "examples" / name).write_text(e.examples_json)
        n += 1
    return n


def _unzip(data: bytes, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for name in zf.namelist():
            target = (out / name).resolve()
            if not str(target).startswith(str(out.resolve())):
                raise ValueError(f"unsafe path in report archive: {name}")
        zf.extractall(out)
    return out / "index.html"


# ---------------------------------------------------------------------------------------------
# The asyncio client

class AsyncN2GClient(_ClientBase):
    """asyncio client with the same methods as `N2GClient` (coroutines; streams are async
    iterators). Create and use it inside a running event loop."""

    @staticmethod
    def _channels():
        return grpc.aio

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncN2GClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _unary(self, method: str, request, timeout: float | None = None):
        budget = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        delays = _delays(self.retries, self.backoff, self.max_backoff)
        while True:
            remaining = deadline - loop.time()
            try:
                return await getattr(self._stub, method)(request, timeout=max(remaining, 1e-3),
                                                         metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    d = next(delays, None)
                    if d is not None and deadline - loop.time() > d:
                        await asyncio.sleep(d)
                        continue
                raise _error(e) from None

    async def _stream(self, method: str, request, timeout: float | None = None) -> AsyncIterator:
        delays = _delays(self.retries, self.backoff, self.max_backoff)
        while True:
            call = getattr(self._stub, method)(request, timeout=timeout, metadata=self._metadata)
            started = False
            try:
                async for item in call:
                    started = True
                    yield item
                return
            except grpc.RpcError as e:
                if not started and e.code() == grpc.StatusCode.UNAVAILABLE:
                    d = next(delays, None)
                    if d is not None:
                        await asyncio.sleep(d)
                        continue
                raise _error(e) from None
            finally:
                call.cancel()

    async def health(self, service: str = "", timeout: float = 5.0) -> str:
        fn = self._channel.unary_unary(_HEALTH_METHOD, request_serializer=None, response_deserializer=None)
        try:
            return _health_status(await fn(_health_request(service), timeout=timeout))
        except grpc.RpcError as e:
            raise _error(e) from None

    async def wait_ready(self, timeout: float = 60.0) -> None:
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

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return _Conv.model_info(await self._unary("GetModelInfo", _pb.GetModelInfoRequest(), timeout))

    async def tokenize(self, texts: Sequence[str] | None = None, *, token_ids=None, skip_bos: bool = False,
                       timeout: float | None = None) -> list[TokenizedText]:
        return _Conv.tokenize(await self._unary("Tokenize", _Req.tokenize(texts, token_ids, skip_bos), timeout))

    async def start_build(self, layers: Sequence[int], neurons: Sequence[int] | None = None, *,
                          sample: int | None = None, seed: int = 0, group_size: int | None = None,
                          k: int | None = None, window_tokens: int | None = None,
                          config: dict[str, Any] | None = None, job_id: str | None = None,
                          timeout: float | None = None) -> Job:
        req = _Req.start_build(layers, neurons, sample, seed, group_size, k, window_tokens, config, job_id)
        return _Conv.job(await self._unary("StartBuild", req, timeout))

    async def get_job(self, job_id: str, *, timeout: float | None = None) -> Job:
        return _Conv.job(await self._unary("GetJob", _pb.GetJobRequest(job_id=job_id), timeout))

    async def cancel_job(self, job_id: str, *, timeout: float | None = None) -> Job:
        return _Conv.job(await self._unary("CancelJob", _pb.CancelJobRequest(job_id=job_id), timeout))

    async def list_jobs(self, states: Sequence[str] | None = None, *, timeout: float | None = None) -> list[Job]:
        return _Conv.jobs(await self._unary("ListJobs", _Req.list_jobs(states), timeout))

    async def watch_job(self, job_id: str, *, timeout: float | None = None) -> AsyncIterator[JobEvent]:
        async for ev in self._stream("WatchJob", _pb.WatchJobRequest(job_id=job_id), timeout):
            yield _Conv.job_event(ev)

    async def wait_job(self, job_id: str, progress: Callable[[JobEvent], None] | None = None, *,
                       timeout: float | None = None, reconnect: bool = True) -> Job:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            try:
                left = None if deadline is None else max(1e-3, deadline - loop.time())
                last = None
                async for ev in self.watch_job(job_id, timeout=left):
                    last = ev
                    if progress is not None:
                        progress(ev)
                if last is not None and last.job.finished:
                    return last.job
            except N2GError as e:
                if not reconnect or e.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise
            if deadline is not None and loop.time() >= deadline:
                raise N2GError(grpc.StatusCode.DEADLINE_EXCEEDED, f"job {job_id} not finished after {timeout} s")
            await asyncio.sleep(0.2)

    async def list_graphs(self, layers: Sequence[int] | None = None, *, limit: int = 0,
                          timeout: float | None = None) -> list[GraphSummary]:
        req = _pb.ListGraphsRequest(layers=list(layers or []), limit=limit)
        return _Conv.summaries(await self._unary("ListGraphs", req, timeout))

    async def graph(self, layer: int, neuron: int, *, structure: bool = False, dot: bool = False,
                    svg: bool = False, json: bool = False, examples: bool = False,
                    timeout: float | None = None) -> Graph:
        req = _Req.graph(layer, neuron, structure, dot, svg, json, examples)
        return _Conv.graph(await self._unary("GetGraph", req, timeout))

    async def predict(self, neurons: Sequence, texts: Sequence[str] | None = None, *, token_ids=None,
                      semantics: str | None = None, skip_bos: bool = False,
                      timeout: float | None = None) -> Activations:
        req = _Req.predict(neurons, texts, token_ids, semantics, skip_bos)
        return _Conv.activations(await self._unary("Predict", req, timeout))

    async def activations(self, neurons: Sequence, texts: Sequence[str] | None = None, *, token_ids=None,
                          normalise: bool = True, skip_bos: bool = False,
                          timeout: float | None = None) -> Activations:
        req = _Req.activations(neurons, texts, token_ids, normalise, skip_bos)
        return _Conv.activations(await self._unary("GetActivations", req, timeout))

    async def evaluate(self, neurons: Sequence | None = None, *, layers: Sequence[int] | None = None,
                       eval_config: dict[str, Any] | None = None, timeout: float | None = None) -> Evaluation:
        return _Conv.evaluation(await self._unary("Evaluate", _Req.evaluate(neurons, layers, eval_config), timeout))

    async def search(self, clauses: Sequence[tuple[str | int, str]], *, limit: int = 0,
                     timeout: float | None = None) -> SearchResult:
        return _Conv.search(await self._unary("Search", _Req.search(clauses, limit), timeout))

    async def in_context_neurons(self, *, limit: int = 0, timeout: float | None = None) -> InContextResult:
        req = _pb.ListInContextNeuronsRequest(limit=limit)
        return _Conv.in_context(await self._unary("ListInContextNeurons", req, timeout))

    async def similar(self, layer: int, neuron: int, *, threshold: float | None = None, k: int | None = None,
                      timeout: float | None = None) -> Similar:
        return _Conv.similar(await self._unary("FindSimilar", _Req.similar(layer, neuron, threshold, k), timeout))

    async def pairs(self, kind: str = "similar", *, threshold: float | None = None,
                    batch_size: int | None = None, timeout: float | None = None) -> AsyncIterator[Pair]:
        async for batch in self._stream("StreamPairs", _Req.pairs(kind, threshold, batch_size), timeout):
            for p in batch.pairs:
                yield _Conv.pair(p)

    async def export(self, layers: Sequence[int] | None = None, *, examples: bool = True,
                     timeout: float | None = None) -> AsyncIterator[ExportedNeuron]:
        req = _pb.ExportGraphsRequest(layers=list(layers or []), include_examples=examples)
        async for r in self._stream("ExportGraphs", req, timeout):
            yield _Conv.exported(r)

    async def report(self, *, timeout: float | None = None) -> bytes:
        chunks = [c.data async for c in self._stream("GetReport", _pb.GetReportRequest(), timeout)]
        return b"".join(chunks)
