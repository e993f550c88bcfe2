"""The gRPC server of n2g (package n2g.v1, proto/n2g/v1/n2g.proto).

Layering: this module (the servicer) -> jobqueue/jobs (builds) -> the pipeline -> workspace, and
-> graphs (the model-free graph store). It holds one model instance (or none, `--no-model`) whose
use is serialised by one lock, since two requests running forward passes at once would mix their
hooks. Builds run in a background thread that takes the lock one neuron group at a time; requests
that need no model (predict on token ids, search, similar, graphs, evaluate) never take it.

Every RPC validates its input and answers with a status code and a message saying what to fix
(see the header of the .proto). Any other exception inside one request becomes INTERNAL with the
exception's name and message; the server keeps serving.
"""

from __future__ import annotations

import functools
import hmac
import io
import ipaddress
import json
import logging
import math
import re
import signal
import tempfile
import threading
import time
import zipfile
from concurrent import futures
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from n2g.v1 import n2g_pb2 as pb

from .graphs import DEFAULT_SEMANTICS, SEMANTICS, GraphIndex, Key
from .jobs import record_model_meta
from .workspace import JobRecord, Workspace, WorkspaceError

log = logging.getLogger("n2g.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["N2G"].full_name  # "n2g.v1.N2G"
_SERVICE = pb.DESCRIPTOR.services_by_name["N2G"]
DEFAULT_PORT = 50051
DEFAULT_THRESHOLD = 0.9  # the paper's similarity threshold
REPORT_CHUNK = 1 << 20
C = grpc.StatusCode

_STATES = {pb.JOB_STATE_QUEUED: "queued", pb.JOB_STATE_RUNNING: "running", pb.JOB_STATE_SUCCEEDED: "succeeded",
           pb.JOB_STATE_FAILED: "failed", pb.JOB_STATE_CANCELLED: "cancelled"}
_STATE_PB = {v: k for k, v in _STATES.items()}
_SEMANTICS_PB = {pb.SEMANTICS_UNSPECIFIED: DEFAULT_SEMANTICS, pb.SEMANTICS_ALL_PATHS_MAX: "all_paths_max",
                 pb.SEMANTICS_GREEDY_DEEPEST: "greedy_deepest"}
_ROLES_PB = {pb.ROLE_UNSPECIFIED: "either", pb.ROLE_ACTIVATING: "activating", pb.ROLE_CONTEXT: "context",
             pb.ROLE_EITHER: "either"}
_KINDS_PB = {pb.PAIR_KIND_UNSPECIFIED: "similar", pb.PAIR_KIND_SIMILAR: "similar", pb.PAIR_KIND_SUBSET: "subset"}
_KIND_TO_PB = {"similar": pb.PAIR_KIND_SIMILAR, "subset": pb.PAIR_KIND_SUBSET}
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# ---------------------------------------------------------------------------------------------
# Configuration

@dataclass(frozen=True)
class ServerLimits:
    """Request-size limits (0 = none). Each one past its bound is RESOURCE_EXHAUSTED."""
    max_texts: int = 1024
    max_tokens_per_sequence: int = 4096
    max_total_tokens: int = 262_144
    max_neurons: int = 65_536
    max_neuron_tokens: int = 8_000_000  # 32 MB of float32 activations back
    max_message_bytes: int = 64 << 20
    max_build_neurons: int = 100_000

    def to_pb(self) -> pb.Limits:
        return pb.Limits(**asdict(self))


class Fail(Exception):
    """An expected failure of one request: becomes the status `code` with `message`."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> Fail:
    return Fail(C.INVALID_ARGUMENT, message)


def too_big(message: str) -> Fail:
    return Fail(C.RESOURCE_EXHAUSTED, message)


def load_named_model(name: str, device: str | None = None, hook: str | None = None):
    """Loads a model by name; `native:<seed>` (or `native:<seed>:<layers>:<d_mlp>`) is a small
    random TransformerLens-native model with a word tokenizer, for tests."""
    from . import models

    if name.startswith("native:"):
        parts = name.split(":")[1:]
        try:
            nums = [int(p) for p in parts if p != ""]
        except ValueError:
            raise ValueError(f"bad native model name {name!r}: use native:<seed>[:<n_layers>:<d_mlp>]") from None
        kw: dict[str, Any] = {"seed": nums[0] if nums else 0}
        if len(nums) >= 2:
            kw["n_layers"] = nums[1]
        if len(nums) >= 3:
            kw["d_mlp"] = nums[2]
        return models.native_random_model(device=device or "cpu", hook=hook, **kw)
    return models.load_model(name, device=device, hook=hook)


# ---------------------------------------------------------------------------------------------
# The model and its lock

class ModelHost:
    """The one model instance. `lock` serialises every use of the model's forward pass (hooks must
    not interleave). Requests tokenise with their own copy of the tokenizer (`tokenizer()`, used
    under `tokenizer_lock`: fast tokenizers are not re-entrant), so they never touch the one a
    build is using and never wait for a build group."""

    def __init__(self, name: str | None, loader: Callable[[], Any] | None):
        self.name = name
        self._loader = loader
        self._model = None
        self._rpc_model = None
        self.lock = threading.Lock()
        self.tokenizer_lock = threading.Lock()
        self._load_lock = threading.Lock()

    def tokenizer(self):
        """The model with a private copy of its tokenizer, for encoding and decoding in requests
        (call under `tokenizer_lock`)."""
        if self._rpc_model is None:
            import copy
            import dataclasses

            model = self.get()
            model.token_strings()  # fill the cache before copying it along
            self._rpc_model = dataclasses.replace(model, tokenizer=copy.deepcopy(model.tokenizer))
        return self._rpc_model

    @property
    def enabled(self) -> bool:
        return self._loader is not None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self):
        if self._model is None:
            if self._loader is None:
                raise Fail(C.FAILED_PRECONDITION,
                           "this server runs without a model (--no-model): it serves stored graphs only; "
                           "restart it with --model to tokenise texts, read true activations or build")
            with self._load_lock:
                if self._model is None:
                    self._model = self._loader()
        return self._model

    @contextmanager
    def forward(self, context):
        """The model, with the lock held; waits at most until the request's deadline."""
        model = self.get()
        remaining = context.time_remaining() if context is not None else None
        timeout = -1 if remaining is None else max(0.0, remaining)
        if not self.lock.acquire(timeout=timeout):
            raise Fail(C.DEADLINE_EXCEEDED, "the model stayed busy (a build group or another request) "
                                            "until the request's deadline; retry with a longer deadline")
        try:
            yield model
        finally:
            self.lock.release()


# ---------------------------------------------------------------------------------------------
# Request guards

class _BadRequest:
    """Stands for a request whose bytes did not parse as the method's message."""

    def __init__(self, type_name: str, error: Exception):
        self.message = f"the request is not a valid {type_name}: {error}"


def _safe_deserializer(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except Exception as e:  # noqa: BLE001 - any decode failure is the client's
            return _BadRequest(cls.DESCRIPTOR.full_name, e)
    return parse


def _internal(name: str, e: Exception) -> str:
    log.exception("internal error in %s", name)
    return f"internal error in {name}: {type(e).__name__}: {e}"


def _unary(name: str, fn):
    @functools.wraps(fn)
    def handler(request, context):
        try:
            if isinstance(request, _BadRequest):
                raise invalid(request.message)
            _check_deadline(context)
            return fn(request, context)
        except Fail as e:
            context.abort(e.code, e.message)
        except Exception as e:  # noqa: BLE001 - never let one request take the server down
            context.abort(C.INTERNAL, _internal(name, e))
    return handler


def _stream(name: str, fn):
    @functools.wraps(fn)
    def handler(request, context):
        try:
            if isinstance(request, _BadRequest):
                raise invalid(request.message)
            _check_deadline(context)
            yield from fn(request, context)
        except Fail as e:
            context.abort(e.code, e.message)
        except Exception as e:  # noqa: BLE001
            context.abort(C.INTERNAL, _internal(name, e))
    return handler


def _check_deadline(context) -> None:
    if context is None:
        return
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise Fail(C.DEADLINE_EXCEEDED, "the request's deadline passed before the server finished")


class _AuthInterceptor(grpc.ServerInterceptor):
    """Checks `authorization: Bearer <token>` on every RPC but grpc.health.v1.Health."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    @staticmethod
    def _deny(message: str):
        def abort(request, context):
            context.abort(C.UNAUTHENTICATED, message)
        return grpc.unary_unary_rpc_method_handler(abort)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(handler_call_details)
        got = None
        for k, v in handler_call_details.invocation_metadata or ():
            if k == "authorization":
                got = v if isinstance(v, str) else v.decode("utf-8", "replace")
        if got is None:
            return self._deny("missing credentials: this server wants metadata 'authorization: Bearer <token>' "
                              "(n2g --token / N2G_TOKEN)")
        if not hmac.compare_digest(got.encode(), self._expected):
            return self._deny("invalid bearer token")
        return continuation(handler_call_details)


# ---------------------------------------------------------------------------------------------
# Conversions

def _job_pb(job: JobRecord | None) -> pb.Job:
    if job is None:
        return pb.Job()
    return pb.Job(id=job.id, state=_STATE_PB.get(job.state, pb.JOB_STATE_UNSPECIFIED), total=job.total,
                  done=job.done, error=job.error or "", created_at=job.created_at, updated_at=job.updated_at,
                  request_json=json.dumps(job.request, sort_keys=True))


def _key_pb(key: Key) -> pb.NeuronKey:
    return pb.NeuronKey(layer=int(key[0]), neuron=int(key[1]))


def _node_pb(node: dict[str, Any]) -> pb.GraphNode:
    out = pb.GraphNode(label=node.get("label", ""), token_ids=node.get("token_ids", []),
                       ignore=bool(node.get("ignore", False)), importance=float(node.get("importance") or 0.0),
                       children=[_node_pb(c) for c in node.get("children", [])])
    if node.get("activation") is not None:
        out.activation = float(node["activation"])
    if node.get("end") is not None:
        out.end = float(node["end"])
    return out


def method_scores(metrics: dict[str, Any]) -> list[pb.MethodScore]:
    """Every {precision, recall, f1} entry of a stored metrics object, by method name."""
    out = []
    for method, value in sorted((metrics or {}).items()):
        if isinstance(value, dict) and {"precision", "recall", "f1"} <= set(value):
            out.append(pb.MethodScore(method=method, precision=float(value["precision"]),
                                      recall=float(value["recall"]), f1=float(value["f1"])))
    return out


# ---------------------------------------------------------------------------------------------
# The servicer

class N2GServicer:
    """The n2g.v1.N2G service over one workspace and at most one model."""

    def __init__(self, ws: Workspace, host: ModelHost, limits: ServerLimits = ServerLimits(),
                 *, graphs: GraphIndex | None = None):
        from .jobqueue import JobQueue

        self.ws = ws
        self.host = host
        self.limits = limits
        self.graphs = graphs or GraphIndex(ws)
        self.jobs = JobQueue(ws, host.get, host.lock, on_commit=self.graphs.invalidate)
        self._report_lock = threading.Lock()
        self._shape: tuple[int, int, int] | None = None

    # -- shape and validation helpers ---------------------------------------------------------
    def shape(self) -> tuple[int | None, int | None, int | None]:
        """(n_layers, d_mlp, d_vocab): from the loaded model, else as recorded in the workspace
        (cached once known: a workspace belongs to one model)."""
        if self._shape is not None:
            return self._shape
        if self.host.loaded:
            m = self.host.get()
            self._shape = (m.n_layers, m.d_mlp, m.d_vocab)
            return self._shape
        vals = []
        for k in ("n_layers", "d_mlp", "d_vocab"):
            v = self.ws.get_meta(k)
            vals.append(int(v) if v is not None else None)
        if None not in vals:
            self._shape = tuple(vals)  # type: ignore[assignment]
        return tuple(vals)  # type: ignore[return-value]

    def record_shape(self) -> None:
        """Writes the model's shape (and its token strings, which the report shows) into the
        workspace, so that a server without the model can validate requests against them."""
        if self.host.loaded:
            record_model_meta(self.ws, self.host.get())

    def _layer(self, layer: int, what: str = "layer") -> int:
        n_layers, _, _ = self.shape()
        if layer < 0 or (n_layers is not None and layer >= n_layers):
            rng = f"0..{n_layers - 1}" if n_layers is not None else "0 or more"
            raise invalid(f"{what} {layer} out of range: the model has layers {rng}")
        return int(layer)

    def _keys(self, neurons: Sequence[pb.NeuronKey], *, built: bool, what: str = "neurons") -> list[Key]:
        if not neurons:
            raise invalid(f"no {what} given: send at least one (layer, neuron)")
        if self.limits.max_neurons and len(neurons) > self.limits.max_neurons:
            raise too_big(f"{len(neurons)} neurons in one request; the limit is {self.limits.max_neurons}")
        _, d_mlp, _ = self.shape()
        keys: list[Key] = []
        for k in neurons:
            self._layer(k.layer)
            if k.neuron < 0 or (d_mlp is not None and k.neuron >= d_mlp):
                rng = f"0..{d_mlp - 1}" if d_mlp is not None else "0 or more"
                raise invalid(f"neuron {k.neuron} (layer {k.layer}) out of range: layers have neurons {rng}")
            keys.append((int(k.layer), int(k.neuron)))
        if len(set(keys)) != len(keys):
            raise invalid("the same neuron is asked twice; list each neuron once")
        if built:
            have = self.graphs.keys()
            missing = [k for k in keys if k not in have]
            if missing:
                shown = ", ".join(f"{l}:{n}" for l, n in missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise Fail(C.NOT_FOUND, f"no graph built for {len(missing)} neuron(s): {shown}; "
                                        f"build them first (StartBuild, `n2g build`)")
        return keys

    def _built_key(self, k: pb.NeuronKey) -> Key:
        return self._keys([k], built=True, what="neuron")[0]

    def _threshold(self, t: float) -> float:
        if t == 0:
            return DEFAULT_THRESHOLD
        if not math.isfinite(t) or not 0 < t <= 1:
            raise invalid(f"threshold {t} out of range: give a value in (0, 1] (0 means the default 0.9)")
        return float(t)

    def _encode(self, texts: Sequence[str], skip_bos: bool) -> tuple[list[list[int]], list[list[str]]]:
        self.host.get()
        with self.host.tokenizer_lock:
            model = self.host.tokenizer()
            ids = model.encode_batch(list(texts))
            prefix = [] if skip_bos else [int(model.bos_id)]
            ids = [prefix + list(map(int, x)) for x in ids]
            labels = [model.decode_tokens(x) for x in ids]
        return ids, labels

    def _labels(self, seqs: Sequence[Sequence[int]]) -> list[list[str]]:
        if not self.host.enabled:
            return [[] for _ in seqs]
        self.host.get()
        with self.host.tokenizer_lock:
            model = self.host.tokenizer()
            return [model.decode_tokens(s) for s in seqs]

    def _inputs(self, texts: Sequence[str], token_ids: Sequence[pb.TokenIds], skip_bos: bool,
                *, labels: bool) -> tuple[list[list[int]], list[list[str]]]:
        """Token-id sequences (and labels) from texts or token ids, validated against the limits."""
        if texts and token_ids:
            raise invalid("give texts or token_ids, not both")
        n = len(texts) or len(token_ids)
        if n == 0:
            raise invalid("no input: give at least one text or token-id sequence")
        if self.limits.max_texts and n > self.limits.max_texts:
            raise too_big(f"{n} sequences in one request; the limit is {self.limits.max_texts}")
        if texts:
            longest = max(len(t) for t in texts)
            if self.limits.max_tokens_per_sequence and longest > 16 * self.limits.max_tokens_per_sequence:
                raise too_big(f"a text of {longest} characters is far past the limit of "
                              f"{self.limits.max_tokens_per_sequence} tokens per sequence")
            seqs, labs = self._encode(texts, skip_bos)
        else:
            _, _, d_vocab = self.shape()
            seqs = []
            for i, t in enumerate(token_ids):
                ids = list(t.ids)
                bad = [x for x in ids if x < 0 or (d_vocab is not None and x >= d_vocab)]
                if bad:
                    rng = f"0..{d_vocab - 1}" if d_vocab is not None else "0 or more"
                    raise invalid(f"token id {bad[0]} in sequence {i} out of range: the vocabulary has ids {rng}")
                seqs.append(ids)
            labs = self._labels(seqs) if labels else [[] for _ in seqs]
        for i, s in enumerate(seqs):
            if not s:
                raise invalid(f"sequence {i} is empty: every text or token-id sequence needs at least one token")
            if self.limits.max_tokens_per_sequence and len(s) > self.limits.max_tokens_per_sequence:
                raise too_big(f"sequence {i} has {len(s)} tokens; the limit is "
                              f"{self.limits.max_tokens_per_sequence} per sequence")
        total = sum(len(s) for s in seqs)
        if self.limits.max_total_tokens and total > self.limits.max_total_tokens:
            raise too_big(f"{total} tokens in one request; the limit is {self.limits.max_total_tokens}")
        return seqs, labs

    def _cost(self, n_neurons: int, seqs: Sequence[Sequence[int]]) -> None:
        cost = n_neurons * sum(len(s) for s in seqs)
        if self.limits.max_neuron_tokens and cost > self.limits.max_neuron_tokens:
            raise too_big(f"{n_neurons} neurons x {sum(len(s) for s in seqs)} tokens = {cost} activations; "
                          f"the limit is {self.limits.max_neuron_tokens}: split the request")

    @staticmethod
    def _response(keys: Sequence[Key], seqs, labels, values: Sequence[np.ndarray], *, normalised: bool,
                  amax: Sequence[float], semantics: str = "") -> pb.ActivationsResponse:
        resp = pb.ActivationsResponse(neurons=[_key_pb(k) for k in keys], normalised=normalised,
                                      max_activation=[float(a) for a in amax], semantics=semantics)
        for s, lab, v in zip(seqs, labels, values):
            seq = resp.sequences.add()
            seq.token_ids.extend(s)
            seq.tokens.extend(lab)
            seq.activations.extend(np.ascontiguousarray(v, dtype=np.float32).ravel().tolist())
        return resp

    # -- model info and tokens ------------------------------------------------------------------
    def GetModelInfo(self, request, context):
        n_layers, d_mlp, d_vocab = self.shape()
        built = self.ws.built_keys()
        per_layer: dict[int, int] = {}
        for l, _ in built:
            per_layer[l] = per_layer.get(l, 0) + 1
        scanned = set(self.ws.scanned_layers())
        layers = [pb.LayerStatus(layer=l, scanned=l in scanned, neurons_built=per_layer.get(l, 0))
                  for l in sorted(scanned | set(per_layer))]
        from n2g import __version__ as version

        device = ""
        if self.host.loaded:
            device = str(self.host.get().device)
        return pb.ModelInfo(
            model=self.ws.model_name or (self.host.name or ""), loaded=self.host.loaded,
            n_layers=n_layers or 0, d_mlp=d_mlp or 0, d_vocab=d_vocab or 0, hook=self.ws.hook or "",
            device=device, workspace=str(self.ws.path.resolve()), corpus=self.ws.corpus or "", layers=layers,
            neurons_built=len(built), limits=self.limits.to_pb(), server_version=version,
            semantics=list(SEMANTICS), default_semantics=DEFAULT_SEMANTICS)

    def Tokenize(self, request, context):
        self.host.get()
        seqs, labels = self._inputs(request.texts, request.token_ids, request.skip_bos, labels=True)
        return pb.TokenizeResponse(sequences=[pb.Sequence(token_ids=s, tokens=l) for s, l in zip(seqs, labels)])

    # -- jobs -----------------------------------------------------------------------------------
    def StartBuild(self, request, context):
        from .config import EvalConfig, FitConfig, ScanConfig
        from .jobs import BuildRequest, new_job_id

        model = self.host.get()
        if request.job_id and not _JOB_ID_RE.match(request.job_id):
            raise invalid(f"job_id {request.job_id!r} is not 1-64 characters of A-Z a-z 0-9 _ -")
        if request.sample < 0:
            raise invalid(f"sample must be positive, got {request.sample}")
        if request.group_size < 0 or request.k < 0 or request.window_tokens < 0:
            raise invalid("group_size, k and window_tokens must be positive (0 = default)")
        overrides: dict[str, Any] = {}
        if request.config_json:
            try:
                overrides = json.loads(request.config_json)
            except json.JSONDecodeError as e:
                raise invalid(f"config_json is not valid JSON: {e}") from None
            if not isinstance(overrides, dict) or set(overrides) - {"scan", "fit", "eval"}:
                raise invalid('config_json must be an object with keys among "scan", "fit", "eval"')
        scan_d = dict(overrides.get("scan") or {})
        if request.k:
            scan_d["k"] = request.k
        stored_len = self._stored_window_tokens()
        if request.window_tokens:
            if stored_len is not None and request.window_tokens != stored_len:
                raise invalid(f"this workspace holds corpus windows of {stored_len} tokens, not "
                              f"{request.window_tokens}; leave window_tokens 0 or use another workspace")
            scan_d["window_tokens"] = request.window_tokens
        elif stored_len is not None:
            scan_d.setdefault("window_tokens", stored_len)
        try:
            req = BuildRequest(
                layers=list(request.layers), neurons=list(request.neurons) or None,
                sample=request.sample or None, seed=int(request.seed), group_size=request.group_size or 8,
                scan=ScanConfig.from_dict(scan_d), fit=FitConfig.from_dict(overrides.get("fit")),
                eval=EvalConfig.from_dict(overrides.get("eval")))
            req.validate(model.n_layers, model.d_mlp)
        except (ValueError, TypeError) as e:
            raise invalid(str(e)) from None
        planned = len(set(req.layers)) * (len(set(req.neurons)) if req.neurons else req.sample)
        if self.limits.max_build_neurons and planned > self.limits.max_build_neurons:
            raise too_big(f"the build plans {planned} neurons; the limit per job is {self.limits.max_build_neurons}")
        job_id = request.job_id or new_job_id()
        existing = self.ws.get_job(job_id)
        if existing is not None:
            if existing.request == json.loads(json.dumps(req.to_dict(), sort_keys=True)):
                return _job_pb(existing)
            raise invalid(f"job id {job_id!r} already names another build request; pick a new id")
        return _job_pb(self.jobs.submit(job_id, req.to_dict()))

    def _stored_window_tokens(self) -> int | None:
        row = self.ws._conn().execute("SELECT length FROM windows WHERE id = 0").fetchone()
        return None if row is None else int(row[0])

    def _job(self, job_id: str) -> JobRecord:
        if not job_id:
            raise invalid("no job_id given")
        job = self.ws.get_job(job_id)
        if job is None:
            raise Fail(C.NOT_FOUND, f"no job {job_id!r} in this workspace (ListJobs shows the known ones)")
        return job

    def GetJob(self, request, context):
        return _job_pb(self._job(request.job_id))

    def CancelJob(self, request, context):
        job = self._job(request.job_id)
        if job.state in ("succeeded", "failed", "cancelled"):
            return _job_pb(job)
        return _job_pb(self.jobs.cancel(job.id))

    def ListJobs(self, request, context):
        states = set()
        for s in request.states:
            if s not in _STATES:
                raise invalid(f"unknown job state {s}")
            states.add(_STATES[s])
        return pb.ListJobsResponse(jobs=[_job_pb(j) for j in self.ws.list_jobs() if not states or j.state in states])

    def WatchJob(self, request, context) -> Iterator[pb.JobEvent]:
        job = self._job(request.job_id)
        q = self.jobs.subscribe(job.id)
        try:
            job = self.ws.get_job(job.id)
            yield pb.JobEvent(job=_job_pb(job), stage="state", done=job.done, total=job.total, message=job.state)
            if job.state in ("succeeded", "failed", "cancelled"):
                return
            import queue as _queue

            last_done = job.done
            while context.is_active():
                try:
                    up = q.get(timeout=0.5)
                except _queue.Empty:
                    # no event from this process's runner: the job may run in another process
                    # (a local build) or may have ended; follow it in the table
                    now = self.ws.get_job(job.id)
                    if now.state in ("succeeded", "failed", "cancelled"):
                        yield pb.JobEvent(job=_job_pb(now), stage="done" if now.state == "succeeded" else now.state,
                                          done=now.done, total=now.total, message=now.error or now.state)
                        return
                    if now.done != last_done:
                        last_done = now.done
                        yield pb.JobEvent(job=_job_pb(now), stage="fit", done=now.done, total=now.total,
                                          message=f"{now.done}/{now.total} neurons committed")
                    continue
                last_done = up.job.done
                b = up.event
                ev = pb.JobEvent(job=_job_pb(up.job), stage=b.stage, done=b.done, total=b.total,
                                 message=b.message, elapsed_s=b.elapsed_s)
                if b.layer is not None and b.neuron is not None:
                    ev.last_neuron.CopyFrom(pb.NeuronKey(layer=b.layer, neuron=b.neuron))
                yield ev
                if up.final:
                    return
        finally:
            self.jobs.unsubscribe(job.id, q)

    # -- graphs ---------------------------------------------------------------------------------
    def _summary(self, rec) -> pb.GraphSummary:
        info = self.graphs.info((rec.layer, rec.neuron))
        return pb.GraphSummary(
            key=_key_pb((rec.layer, rec.neuron)), max_activation=rec.max_activation,
            n_nodes=info.n_nodes, n_paths=info.n_paths, activating=info.activating, context=info.context,
            job_id=rec.job_id or "", created_at=rec.created_at, scores=method_scores(rec.metrics))

    def ListGraphs(self, request, context):
        layers = {self._layer(l) for l in request.layers}
        if request.limit < 0:
            raise invalid(f"limit must be positive (0 = all), got {request.limit}")
        recs = [r for r in self.ws.iter_neurons(with_examples=False) if not layers or r.layer in layers]
        shown = recs[: request.limit] if request.limit else recs
        return pb.ListGraphsResponse(graphs=[self._summary(r) for r in shown], total=len(recs))

    def GetGraph(self, request, context):
        import n2g_fast

        if not request.HasField("neuron"):
            raise invalid("no neuron given: set neuron {layer, neuron}")
        key = self._built_key(request.neuron)
        rec = self.ws.get_neuron(*key)
        if rec is None:
            raise Fail(C.NOT_FOUND, f"no graph built for neuron {key[0]}:{key[1]}")
        graph = n2g_fast.NeuronGraph.from_bytes(rec.graph_bytes)
        out = pb.Graph(summary=self._summary(rec), model=graph.model, hook=graph.hook,
                       stats_json=json.dumps(rec.stats, sort_keys=True),
                       metrics_json=json.dumps(rec.metrics, sort_keys=True))
        if request.include_json or request.include_structure:
            doc = graph.to_json()
            if request.include_json:
                out.json = doc
            if request.include_structure:
                out.roots.extend(_node_pb(n) for n in json.loads(doc).get("roots", []))
        if request.include_dot:
            out.dot = graph.to_dot()
        if request.include_svg:
            out.svg = graph.to_svg()
        if request.include_examples:
            out.examples_json = json.dumps(rec.examples)
        return out

    # -- activations ----------------------------------------------------------------------------
    def Predict(self, request, context):
        if request.semantics not in _SEMANTICS_PB:
            raise invalid(f"unknown semantics {request.semantics}: use ALL_PATHS_MAX or GREEDY_DEEPEST")
        semantics = _SEMANTICS_PB[request.semantics]
        keys = self._keys(request.neurons, built=True)
        seqs, labels = self._inputs(request.texts, request.token_ids, request.skip_bos, labels=self.host.enabled)
        self._cost(len(keys), seqs)
        _check_deadline(context)
        values = self.graphs.predict(keys, seqs, semantics)
        amax = self.graphs.max_activations(keys)
        return self._response(keys, seqs, labels, values, normalised=True, amax=amax, semantics=semantics)

    def GetActivations(self, request, context):
        from .activations import layer_activations

        self.host.get()
        keys = self._keys(request.neurons, built=False)
        seqs, labels = self._inputs(request.texts, request.token_ids, request.skip_bos, labels=True)
        self._cost(len(keys), seqs)
        layers = sorted({l for l, _ in keys})
        amax = np.ones(len(keys), dtype=np.float32)
        if request.normalise:
            for i, (l, n) in enumerate(keys):
                scan = self.graphs.scan_max(l)
                if scan is None:
                    raise invalid(f"layer {l} is not scanned in this workspace, so a_max of neuron {l}:{n} is "
                                  f"unknown; ask normalise=false or build a neuron of layer {l} first")
                amax[i] = scan[n]
        out = [np.zeros((len(keys), len(s)), np.float32) for s in seqs]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        budget = 8192
        with self.host.forward(context) as model:
            start = 0
            while start < len(order):
                _check_deadline(context)
                end = start + 1
                while end < len(order) and (end + 1 - start) * len(seqs[order[end]]) <= budget:
                    end += 1
                chunk = order[start:end]
                t_max = len(seqs[chunk[-1]])
                batch = np.full((len(chunk), t_max), int(model.pad_id), dtype=np.int64)
                for r, i in enumerate(chunk):
                    batch[r, : len(seqs[i])] = seqs[i]
                acts = layer_activations(model, batch, layers)
                for layer in layers:
                    rows = [j for j, (l, _) in enumerate(keys) if l == layer]
                    idx = [keys[j][1] for j in rows]
                    got = acts[layer][:, :, idx].cpu().numpy()  # [chunk, t_max, len(rows)]
                    for r, i in enumerate(chunk):
                        out[i][rows, :] = got[r, : len(seqs[i]), :].T
                start = end
        values = [o / amax[:, None] for o in out] if request.normalise else out
        return self._response(keys, seqs, labels, values, normalised=bool(request.normalise),
                              amax=amax if request.normalise else self._known_amax(keys))

    def _known_amax(self, keys: Sequence[Key]) -> list[float]:
        out = []
        for l, n in keys:
            scan = self.graphs.scan_max(l)
            out.append(float(scan[n]) if scan is not None else 0.0)
        return out

    # -- evaluation -----------------------------------------------------------------------------
    def Evaluate(self, request, context):
        from . import evaluate as ev

        if request.neurons and request.layers:
            raise invalid("give neurons or layers, not both")
        if request.neurons:
            keys = self._keys(request.neurons, built=True)
        else:
            layers = {self._layer(l) for l in request.layers}
            keys = [k for k in sorted(self.graphs.keys()) if not layers or k[0] in layers]
            if not keys:
                where = f" in layers {sorted(layers)}" if layers else ""
                raise Fail(C.NOT_FOUND, f"no neurons built{where}: nothing to evaluate")
        cfg = None
        if request.eval_config_json:
            from .config import EvalConfig

            try:
                cfg = EvalConfig.from_dict(json.loads(request.eval_config_json))
            except (ValueError, TypeError) as e:
                raise invalid(f"eval_config_json: {e}") from None
        rows = []
        resp = pb.EvaluateResponse()
        wanted = set(keys)
        if len(keys) <= 16:
            recs = {k: self.ws.get_neuron(*k) for k in keys}
        else:  # one pass over the table; examples only when recomputing
            recs = {(r.layer, r.neuron): r for r in self.ws.iter_neurons(with_examples=cfg is not None)
                    if (r.layer, r.neuron) in wanted}
        for layer, neuron in keys:
            _check_deadline(context)
            rec = recs[(layer, neuron)]
            metrics = rec.metrics
            if cfg is not None:
                metrics = ev.evaluate_neuron(rec.graph(), _pairs(rec.examples["train"]),
                                             _pairs(rec.examples["test"]), cfg)
            rows.append({"layer": layer, "neuron": neuron, "metrics": metrics})
            resp.neurons.add(key=_key_pb((layer, neuron)), scores=method_scores(metrics),
                             metrics_json=json.dumps(metrics, sort_keys=True))
        summary = ev.summarise(rows)
        resp.table = ev.format_table(summary)
        resp.summary_json = json.dumps(summary, sort_keys=True)
        for layer in sorted({l for l, _ in keys}):
            per = [n for n in resp.neurons if n.key.layer == layer]
            methods = sorted({s.method for n in per for s in n.scores})
            scores = []
            for m in methods:
                vals = [s for n in per for s in n.scores if s.method == m]
                scores.append(pb.MethodScore(method=m, precision=float(np.mean([v.precision for v in vals])),
                                             recall=float(np.mean([v.recall for v in vals])),
                                             f1=float(np.mean([v.f1 for v in vals]))))
            resp.layers.add(layer=layer, n_neurons=len(per), scores=scores)
        return resp

    # -- search and similarity ------------------------------------------------------------------
    def Search(self, request, context):
        if not request.clauses:
            raise invalid("no clauses: give at least one (token, role) clause")
        if request.limit < 0:
            raise invalid(f"limit must be positive (0 = all), got {request.limit}")
        _, _, d_vocab = self.shape()
        clauses: list[tuple[int | str, str]] = []
        for i, c in enumerate(request.clauses):
            if c.role not in _ROLES_PB:
                raise invalid(f"clause {i}: unknown role {c.role}: use ACTIVATING, CONTEXT or EITHER")
            which = c.WhichOneof("token")
            if which is None:
                raise invalid(f"clause {i} has no token: set label or token_id")
            if which == "label":
                if not c.label:
                    raise invalid(f"clause {i}: empty token label")
                tok: int | str = c.label
            else:
                if c.token_id < 0 or (d_vocab is not None and c.token_id >= d_vocab):
                    rng = f"0..{d_vocab - 1}" if d_vocab is not None else "0 or more"
                    raise invalid(f"clause {i}: token id {c.token_id} out of range: the vocabulary has ids {rng}")
                tok = int(c.token_id)
            clauses.append((tok, _ROLES_PB[c.role]))
        try:
            found = self.graphs.search(clauses)
        except ValueError as e:
            raise invalid(str(e)) from None
        shown = found[: request.limit] if request.limit else found
        return pb.SearchResponse(neurons=[_key_pb(k) for k in shown], total=len(found))

    def ListInContextNeurons(self, request, context):
        if request.limit < 0:
            raise invalid(f"limit must be positive (0 = all), got {request.limit}")
        found = self.graphs.in_context_neurons()
        shown = found[: request.limit] if request.limit else found
        return pb.ListInContextNeuronsResponse(
            neurons=[pb.InContextNeuron(key=_key_pb(x.key), shared=x.shared, fraction=x.fraction) for x in shown],
            total=len(found))

    @staticmethod
    def _pair_pb(p) -> pb.Pair:
        return pb.Pair(a=_key_pb(p.a), b=_key_pb(p.b), kind=_KIND_TO_PB[p.kind],
                       activating_overlap=p.activating_overlap, context_overlap=p.context_overlap)

    def FindSimilar(self, request, context):
        if not request.HasField("neuron"):
            raise invalid("no neuron given: set neuron {layer, neuron}")
        key = self._built_key(request.neuron)
        threshold = self._threshold(request.threshold)
        if request.k < 0 or request.k > 10_000:
            raise invalid(f"k must be between 1 and 10000 (0 = 10), got {request.k}")
        k = request.k or 10
        resp = pb.FindSimilarResponse()
        for kind, field in (("similar", resp.similar), ("subset", resp.subset)):
            field.extend(self._pair_pb(p) for p in self.graphs.pairs(kind, threshold) if key in (p.a, p.b))
        resp.neighbours.extend(pb.Neighbour(key=_key_pb(n.key), score=n.score, activating_overlap=n.activating_overlap,
                                            context_overlap=n.context_overlap) for n in self.graphs.neighbours(key, k))
        return resp

    def StreamPairs(self, request, context):
        if request.kind not in _KINDS_PB:
            raise invalid(f"unknown pair kind {request.kind}: use SIMILAR or SUBSET")
        threshold = self._threshold(request.threshold)
        if request.batch_size < 0 or request.batch_size > 100_000:
            raise invalid(f"batch_size must be between 1 and 100000 (0 = 1000), got {request.batch_size}")
        size = request.batch_size or 1000
        pairs = self.graphs.pairs(_KINDS_PB[request.kind], threshold)
        for i in range(0, len(pairs), size):
            if not context.is_active():
                return
            yield pb.PairBatch(pairs=[self._pair_pb(p) for p in pairs[i: i + size]])

    # -- export and report ----------------------------------------------------------------------
    def ExportGraphs(self, request, context):
        import n2g_fast

        layers = {self._layer(l) for l in request.layers}
        for rec in self.ws.iter_neurons(with_examples=request.include_examples):
            if layers and rec.layer not in layers:
                continue
            if not context.is_active():
                return
            yield pb.ExportedNeuron(key=_key_pb((rec.layer, rec.neuron)),
                                    graph_json=n2g_fast.NeuronGraph.from_bytes(rec.graph_bytes).to_json(),
                                    examples_json=json.dumps(rec.examples) if request.include_examples else "")

    def GetReport(self, request, context):
        if not self.graphs.keys():
            raise Fail(C.NOT_FOUND, "no neurons built in this workspace: nothing to report")
        with self._report_lock:
            data = report_zip(self.ws.path)
        for i in range(0, max(len(data), 1), REPORT_CHUNK):
            if not context.is_active():
                return
            yield pb.ReportChunk(data=data[i: i + REPORT_CHUNK], total_bytes=len(data), filename="n2g-report.zip")


def _pairs(examples: list[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.asarray(e["token_ids"], np.int64), np.asarray(e["activations"], np.float32)) for e in examples]


def report_zip(workspace_path: str | Path) -> bytes:
    """The workspace's report (n2g_service.report.write_report) as a zip archive in memory."""
    from .report import write_report

    with tempfile.TemporaryDirectory(prefix="n2g-report-") as tmp:
        out = Path(tmp) / "report"
        write_report(Path(workspace_path), out)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(out.rglob("*")):
                if f.is_file():
                    zf.write(f, f.relative_to(out).as_posix())
        return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Wiring

def local_handlers(servicer: N2GServicer) -> dict[str, tuple[Callable, bool]]:
    """{method name: (guarded handler, server-streaming)}: what the gRPC server runs for each RPC,
    callable in-process with a request message and a context (the command line's local mode)."""
    out = {}
    for m in _SERVICE.methods:
        fn = getattr(servicer, m.name)
        out[m.name] = ((_stream if m.server_streaming else _unary)(m.name, fn), bool(m.server_streaming))
    return out


def _handlers(servicer: N2GServicer) -> grpc.GenericRpcHandler:
    """The service's method handlers, with parse-safe deserializers and the error guards."""
    handlers = {}
    guarded = local_handlers(servicer)
    for m in _SERVICE.methods:
        req_cls = getattr(pb, m.input_type.name)
        resp_cls = getattr(pb, m.output_type.name)
        fn, streaming = guarded[m.name]
        make = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(fn, request_deserializer=_safe_deserializer(req_cls),
                                response_serializer=resp_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class RunningServer:
    """A started server: `port` is the bound port; `stop()` shuts it down."""
    server: grpc.Server
    servicer: N2GServicer
    health: health.HealthServicer
    port: int
    address: str

    def stop(self, grace: float | None = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.servicer.jobs.stop()
        self.server.stop(grace).wait()

    def wait(self) -> None:
        self.server.wait_for_termination()


def serve(workspace: str | Path, model: str | None = None, *, no_model: bool = False, corpus: str | None = None,
          host: str = "127.0.0.1", port: int = DEFAULT_PORT, device: str | None = None, hook: str | None = None,
          token: str | None = None, tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
          limits: ServerLimits = ServerLimits(), max_workers: int = 32, resume: bool = True,
          block: bool = True) -> RunningServer:
    """Starts the n2g server. `block=True` waits until SIGINT/SIGTERM; `block=False` returns the
    running server (tests, embedding)."""
    from .corpus import DEFAULT_CORPUS
    from .models import DEFAULT_MODEL

    ws_path = Path(workspace)
    exists = (ws_path / "n2g.sqlite").exists()
    if no_model:
        if not exists:
            raise WorkspaceError(f"no workspace at {ws_path}: a --no-model server serves an existing workspace")
        ws = Workspace(ws_path)
        host_model = ModelHost(ws.model_name, None)
    else:
        ws_model = Workspace(ws_path).model_name if exists else None
        name = model or ws_model or DEFAULT_MODEL
        t0 = time.perf_counter()
        loaded = load_named_model(name, device=device, hook=hook)
        ws = Workspace(ws_path, create=True, model=name, hook=loaded.hook,
                       corpus=corpus or (None if exists else DEFAULT_CORPUS))
        if ws.corpus is None:
            ws.set_meta("corpus", corpus or DEFAULT_CORPUS)
        host_model = ModelHost(name, lambda: loaded)
        host_model.get()
        log.info("model %s loaded on %s in %.1f s (%d layers x %d neurons, hook %s)", name, loaded.device,
                 time.perf_counter() - t0, loaded.n_layers, loaded.d_mlp, loaded.hook)
    servicer = N2GServicer(ws, host_model, limits)
    servicer.record_shape()

    interceptors = [_AuthInterceptor(token)] if token else []
    opts = [("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
            ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="n2g-rpc"),
                         interceptors=interceptors, options=opts)
    server.add_generic_rpc_handlers((_handlers(servicer),))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    try:
        if tls_cert or tls_key:
            if not (tls_cert and tls_key):
                raise ValueError("TLS needs both --tls-cert and --tls-key")
            creds = grpc.ssl_server_credentials([(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as e:  # grpc reports a failed bind this way
        raise OSError(f"could not listen on {address} ({e}); is the port in use?") from None
    if not bound:
        raise OSError(f"could not listen on {address}; is the port in use?")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    log.info("workspace %s: model %s, corpus %s, %d graphs", ws.path, ws.model_name, ws.corpus, len(servicer.graphs))
    if not host_model.enabled:
        log.warning("running WITHOUT a model (--no-model): graph RPCs only; Tokenize, GetActivations, StartBuild "
                    "and Predict on texts answer FAILED_PRECONDITION")
    log.log(logging.INFO if token else logging.WARNING,
            "auth: %s", "bearer token required on every RPC but health" if token
            else "OFF (no --token): any client that can connect may call every RPC")
    log.log(logging.INFO if tls_cert else logging.WARNING, "TLS: %s",
            f"ON (certificate {tls_cert})" if tls_cert else "OFF (plain-text connections)")
    if not _is_loopback(host) and not token:
        log.warning("listening on %s (not localhost) with no auth token: anyone on the network can use it", host)
    actual = f"{host}:{bound}" if ":" not in host else f"[{host}]:{bound}"
    log.info("listening on %s (max %d concurrent RPC threads)", actual, max_workers)

    if host_model.enabled:
        servicer.jobs.start()
        if resume:
            resumed = servicer.jobs.resume_pending()
            if resumed:
                log.info("resuming %d unfinished job(s): %s", len(resumed), ", ".join(resumed))
    running = RunningServer(server, servicer, health_servicer, bound, actual)
    if block:
        stop = threading.Event()

        def on_signal(signum, frame):
            log.info("signal %d: shutting down", signum)
            stop.set()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop.wait(1.0):
            pass
        running.stop()
    return running
