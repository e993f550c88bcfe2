"""The application layer of n2g: one class, `N2GApp`, with a typed method for every operation.

Below the transports (the gRPC servicer in server.py, `n2g.local.LocalN2GClient` in this process)
and above the pipeline (build jobs, evaluation, the graph store, the workspace). It decides: it
checks every argument against the limits before any work starts, assembles build requests,
batches activation requests, aggregates evaluations, and answers with the plain dataclasses of
`n2g.types`. A failure the caller can fix is an `N2GError` with its status code; the transports
pass it on unchanged (the servicer as the gRPC status, the local client as the exception).

Method names and keyword arguments are those of `n2g.convert.OPS` (and of the clients).
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import os
import logging
import math
import re
import tempfile
import threading
import time
import zipfile
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grpc
import numpy as np

from n2g import types as T
from n2g import vocab
from n2g.layers import MAX_LAYERS
from n2g.types import Key, Limits, N2GError

from .labels import normalise_token
from .workspace import JobRecord, Workspace, WorkspaceError, check_folder

log = logging.getLogger("n2g.app")

C = grpc.StatusCode
REPORT_CHUNK = 1 << 20
# A stream whose reader has taken nothing for this long gives its slot up when another stream
# needs one (its call is cancelled): an unread stream must not hold a slot forever.
STREAM_STALL_S = 10.0
_JOB_ID_RE = re.compile(vocab.JOB_ID_PATTERN)

# Bounds on what one request may set (checked before any work).
MAX_K = 1000                   # top-k examples per neuron in a build
MAX_WINDOW_TOKENS = 4096       # tokens per corpus window
MAX_GROUP_SIZE = 4096          # neurons fitted together
MAX_CONFIG_JSON = 64 << 10     # bytes of a build's or an evaluation's JSON overrides
MAX_NEIGHBOURS = 10_000
MAX_PAIR_BATCH = 100_000
MIN_PAIR_THRESHOLD = vocab.MIN_PAIR_THRESHOLD
HEAVY_SLOTS = 2                # whole-store computations (all pairs) running at once
BYTES_PER_TOKEN = 8            # texts are measured in UTF-8 bytes before they are tokenised
STOP_WAIT_S = 120              # on shutdown, how long the build worker may take to stop


# What each kind of workspace failure is for a caller (WorkspaceError.kind -> status code).
_WORKSPACE_CODES = {"full": C.RESOURCE_EXHAUSTED, "too_large": C.RESOURCE_EXHAUSTED, "locked": C.UNAVAILABLE,
                    "busy": C.UNAVAILABLE, "read_only": C.FAILED_PRECONDITION, "damaged": C.DATA_LOSS,
                    "damaged_neuron": C.DATA_LOSS, "invalid": C.INVALID_ARGUMENT, "non_finite": C.INVALID_ARGUMENT,
                    "conflict": C.ALREADY_EXISTS, "missing": C.NOT_FOUND}


def as_n2g_error(e: Exception) -> N2GError | None:
    """The N2GError a caller sees for `e`, or None for a bug (the transport reports INTERNAL)."""
    if isinstance(e, N2GError):
        return e
    if isinstance(e, WorkspaceError):
        return N2GError(_WORKSPACE_CODES.get(getattr(e, "kind", ""), C.FAILED_PRECONDITION), str(e))
    return None


def invalid(message: str) -> N2GError:
    return N2GError(C.INVALID_ARGUMENT, message)


def too_big(message: str) -> N2GError:
    return N2GError(C.RESOURCE_EXHAUSTED, message)


# How long a client refused for want of a free slot waits before it tries again (the clients do
# so on their own within the call's deadline; N2GError.retry_after)
BUSY_RETRY_S = 1.0


def busy(message: str) -> N2GError:
    """RESOURCE_EXHAUSTED because the server is busy, not because the request is too big: the
    caller may retry after BUSY_RETRY_S."""
    return N2GError(C.RESOURCE_EXHAUSTED, message, retry_after=BUSY_RETRY_S)


def not_found(message: str) -> N2GError:
    return N2GError(C.NOT_FOUND, message)


def _shown(text: str, n: int = 80) -> str:
    """A value quoted in an error message, cut so a huge input never makes a huge message."""
    r = repr(text)
    return r if len(r) <= n else r[: n - 5] + "...'"


class Deadline:
    """When the caller stops waiting: `remaining()` seconds (None = never) and `active()` (false
    once the deadline passed or the caller went away); `cancel()` ends the call."""

    NEVER = 1e7  # seconds; gRPC reports "no deadline" as a huge number

    def __init__(self, remaining: Callable[[], float | None] = lambda: None,
                 active: Callable[[], bool] = lambda: True, cancel: Callable[[], Any] = lambda: None):
        self._remaining = remaining
        self._active = active
        self.cancel = cancel  # ends the call from the server's side (a stalled stream)

    def remaining(self) -> float | None:
        r = self._remaining()
        return None if r is None or r > self.NEVER else r

    @classmethod
    def after(cls, seconds: float | None) -> "Deadline":
        if seconds is None:
            return cls()
        end = time.monotonic() + seconds
        return cls(lambda: end - time.monotonic(), lambda: time.monotonic() < end)

    def active(self) -> bool:
        r = self.remaining()
        return self._active() and (r is None or r > 0)

    def check(self) -> None:
        if not self.active():
            raise N2GError(C.DEADLINE_EXCEEDED, "the request's deadline passed before the server finished")


NO_DEADLINE = Deadline()


# ---------------------------------------------------------------------------------------------
# The model

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

    @property
    def enabled(self) -> bool:
        return self._loader is not None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self):
        if self._model is None:
            if self._loader is None:
                raise N2GError(C.FAILED_PRECONDITION,
                               "no model is loaded here (--no-model): stored graphs only; restart with --model "
                               "to tokenise texts, read true activations or build")
            with self._load_lock:
                if self._model is None:
                    self._model = self._loader()
        return self._model

    def tokenizer(self):
        """The model with a private copy of its tokenizer (call under `tokenizer_lock`)."""
        if self._rpc_model is None:
            import copy
            import dataclasses

            model = self.get()
            model.token_strings()  # fill the cache before copying it along
            self._rpc_model = dataclasses.replace(model, tokenizer=copy.deepcopy(model.tokenizer))
        return self._rpc_model

    @contextmanager
    def forward(self, deadline: Deadline):
        """The model, with the lock held; waits at most until the deadline."""
        model = self.get()
        remaining = deadline.remaining()
        if not self.lock.acquire(timeout=-1 if remaining is None else max(0.0, remaining)):
            raise N2GError(C.DEADLINE_EXCEEDED, "the model stayed busy (a build group or another request) until "
                                                "the request's deadline; retry with a longer deadline")
        try:
            yield model
        finally:
            self.lock.release()


def open_workspace(path: str | Path, *, model: str | None = None, no_model: bool = False, corpus: str | None = None,
                   device: str | None = None, hook: str | None = None, create: bool = False,
                   writer: str | None = None, load_now: bool = False,
                   writes: bool = False) -> tuple[Workspace, ModelHost]:
    """The workspace at `path` and the host of its model (loaded lazily unless `load_now`).

    The model is `model`, else the workspace's, else the default; `create` makes a new workspace
    (recording model, corpus and hook). `no_model` never loads one and only reads, unless `writes`
    (then it takes the writer lock at its first write, e.g. to cancel a job). `writer` (what
    the process does, e.g. "n2g serve") takes the workspace's one writer lock at once, so a second
    writer is refused before it loads anything; otherwise the lock is taken at the first write."""
    from .corpus import canonical_spec
    from .models import load_named_model

    path = Path(path)
    exists = Workspace.exists(path)
    check_folder(path)
    if not exists and (no_model or not create):
        raise WorkspaceError(f"no workspace at {path}; build one first with `n2g build --workspace {path}`")
    mode = "read" if no_model and not writes else ("write" if writer else "auto")
    ws = Workspace(path, mode=mode, purpose=writer) if exists else None
    if no_model:
        return ws, ModelHost(ws.model_name, None)
    name = model or (ws.model_name if ws is not None else None) or vocab.DEFAULT_MODEL
    if ws is not None and ws.model_name and model and model != ws.model_name:
        raise WorkspaceError(f"workspace {path} was built for model={ws.model_name!r}, not {model!r}; "
                             f"use another --workspace")
    corpus = canonical_spec(corpus) if corpus else None
    if ws is None or ws.corpus is None or ws.hook is None:
        # a new workspace records its model, hook and corpus (the hook needs the model loaded)
        loaded = load_named_model(name, device=device, hook=hook)
        if ws is None:
            ws = Workspace(path, create=True, model=name, hook=loaded.hook, corpus=corpus or vocab.DEFAULT_CORPUS,
                           mode=mode, purpose=writer)
        for k, v in (("model", name), ("hook", loaded.hook), ("corpus", corpus or vocab.DEFAULT_CORPUS)):
            if ws.get_meta(k) is None:
                ws.set_meta(k, v)
        host = ModelHost(name, lambda: loaded)
        host.get()
        return ws, host
    if corpus and corpus not in (ws.corpus, canonical_spec(ws.corpus)):
        if ws.window_count() is not None:
            raise WorkspaceError(f"workspace {path} was built for corpus={ws.corpus!r}, not {corpus!r}; "
                                 f"use another --workspace")
        ws.set_meta("corpus", corpus)  # nothing was read from the one recorded (e.g. a first build failed on it)
    ws_hook = ws.hook
    host = ModelHost(name, lambda: load_named_model(name, device=device, hook=hook or ws_hook))
    if load_now:
        host.get()
    return ws, host


# ---------------------------------------------------------------------------------------------
# The application

def _computation(what: str):
    """Runs an N2GApp method in one of its computation slots (RESOURCE_EXHAUSTED when all are taken)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(self, *args, **kwargs):
            with self._computation_slot(what):
                return fn(self, *args, **kwargs)
        return run
    return wrap


class N2GApp:
    """Every n2g operation over one workspace and at most one model."""

    def __init__(self, ws: Workspace, host: ModelHost, limits: Limits = Limits(), *, max_streams: int = 8,
                 max_computations: int = 16, ray_address: str | None = None, trusted_caller: bool = True):
        from .graphs import GraphIndex
        from .jobqueue import JobQueue

        self.ws = ws
        self.host = host
        self.limits = limits
        # The Ray cluster a build with executor "ray" joins when its request names none (None: a
        # local one). Only a trusted caller (this process's operator: the local CLI) may name
        # another, or a fill-mask model to load (fit.mlm_name): a server that joined a cluster or
        # loaded a model a client names would run code the client chose.
        self.ray_address = ray_address
        self.trusted_caller = trusted_caller
        self.graphs = GraphIndex(ws)
        self.jobs = JobQueue(ws, host.get, host.lock, on_commit=self.graphs.invalidate,
                             check_request=self._check_stored_request)
        self._report_lock = threading.Lock()
        self._submit_lock = threading.Lock()  # a job id is looked up and stored as one step
        self._shape: tuple[int, int, int] | None = None
        # Long-lived streams (watching a job, pairs, export, report) each hold a server thread:
        # past this many at once, new ones are refused so short calls always find a thread.
        self._streams = threading.BoundedSemaphore(max_streams)
        self.max_streams = max_streams
        self.stream_stall_s = STREAM_STALL_S
        self._open_streams: dict[int, _OpenStream] = {}
        self._open_lock = threading.RLock()  # re-entrant: a stream finalised by the GC under it releases
        # True activations (forward passes, one at a time on the model) and evaluations hold a
        # server thread for seconds to minutes: past this many at once, new ones are refused, so
        # that a flood of them cannot queue the short calls behind it. Predictions are bounded by
        # the limits' cost and take milliseconds: they queue.
        self._computations = threading.BoundedSemaphore(max_computations)
        self.max_computations = max_computations
        # Whole-store work (all pairs) runs in its own threads so that a request stops waiting at
        # its deadline, and at most HEAVY_SLOTS of them run at once.
        self._heavy = futures.ThreadPoolExecutor(HEAVY_SLOTS, thread_name_prefix="n2g-heavy")
        self._heavy_slots = threading.BoundedSemaphore(HEAVY_SLOTS)

    def start_jobs(self, resume: bool = True) -> list[str]:
        """Starts the build worker (the workspace's writer, with a model). Unfinished jobs are
        resumed (`resume`) or failed as interrupted; a stored job that cannot run fails once with
        its reason. Returns the ids resumed."""
        if not self.host.enabled:
            return []
        self.jobs.start()
        return self.jobs.resume_pending(resume=resume)

    def close(self) -> None:
        """Stops cleanly: the build worker stops at its next forward pass (the groups it committed
        stay; the job is queued again and resumes at the next start) before the workspace closes."""
        self.jobs.stop()
        if not self.jobs.join(STOP_WAIT_S):
            log.warning("the build worker did not stop within %d s", STOP_WAIT_S)
        self._heavy.shutdown(wait=False, cancel_futures=True)
        self.ws.close()

    def check_workspace(self) -> None:
        """DATA_LOSS once the workspace's database was removed or replaced under this process: its
        answers would come from the old file and its writes would be lost."""
        if self.ws.replaced():
            raise N2GError(C.DATA_LOSS, f"workspace {self.ws.path}: its database was removed or replaced "
                                        "while this process had it open; restart the server (or the command) "
                                        "to use what is there now")

    # The entry points of every transport (the servicer, the in-process client): one API call by
    # its operation name (n2g.convert.OPS), with the checks every call gets.
    def call(self, name: str, args: dict[str, Any], deadline: Deadline) -> Any:
        self.check_workspace()
        deadline.check()
        return getattr(self, name)(**args, deadline=deadline)

    def stream(self, name: str, args: dict[str, Any], deadline: Deadline) -> Iterator[Any]:
        self.check_workspace()
        yield from getattr(self, name)(**args, deadline=deadline)

    def _heavy_call(self, fn: Callable[[], Any], deadline: Deadline, what: str) -> Any:
        """`fn()` on a heavy-work thread; DEADLINE_EXCEEDED when the caller's deadline passes
        first (the thread finishes on its own), RESOURCE_EXHAUSTED when every slot is busy."""
        if not self._heavy_slots.acquire(blocking=False):
            raise busy(f"{HEAVY_SLOTS} whole-store computations are running already ({what} is one); retry "
                       f"shortly")
        future = self._heavy.submit(fn)
        future.add_done_callback(lambda _: self._heavy_slots.release())
        try:
            return future.result(timeout=deadline.remaining())
        except futures.TimeoutError:
            raise N2GError(C.DEADLINE_EXCEEDED, f"{what} did not finish before the request's deadline; give a "
                                                f"longer deadline or a higher threshold") from None

    @staticmethod
    @contextmanager
    def _slot(slots: threading.BoundedSemaphore, refusal: str, free_one: Callable[[], bool] = lambda: False):
        """Holds one of ``slots`` for the call; RESOURCE_EXHAUSTED saying ``refusal`` when none is
        free, unless ``free_one()`` frees one (it says whether it tried; a slot has 2 s to come)."""
        if not slots.acquire(blocking=False):
            if not (free_one() and slots.acquire(timeout=2.0)):
                raise busy(refusal)
        try:
            yield
        finally:
            slots.release()

    def _streamed(self, what: str, deadline: Deadline, items: Callable[[], Iterator[Any]]) -> Iterator[Any]:
        """Yields ``items()`` while holding a stream slot. When none is free, the stream whose
        reader has stalled longest (>= STREAM_STALL_S at one message) is cancelled for this one.
        ``items()`` ends only when it has sent everything; where its deadline stops it first it
        raises (``deadline.check()``), so a stream cut short never ends as if complete (a remote
        caller hears so from gRPC anyway; an in-process one only from here)."""
        refusal = f"{self.max_streams} streams are open on this server already ({what} is one); retry when one ends"
        with self._slot(self._streams, refusal, self._cancel_stalled_stream):
            entry = _OpenStream(what, deadline.cancel)
            with self._open_lock:
                self._open_streams[id(entry)] = entry
            try:
                for item in items():
                    entry.waiting_since = time.monotonic()
                    yield item
                    entry.waiting_since = None
            finally:
                with self._open_lock:
                    self._open_streams.pop(id(entry), None)

    def _cancel_stalled_stream(self) -> bool:
        now = time.monotonic()
        with self._open_lock:
            stalled = [e for e in self._open_streams.values()
                       if e.waiting_since is not None and now - e.waiting_since >= self.stream_stall_s]
        if not stalled:
            return False
        victim = min(stalled, key=lambda e: e.waiting_since)
        log.warning("cancelling a stream (%s) whose reader took nothing for %.0f s: another stream needs its slot",
                    victim.what, now - victim.waiting_since)
        victim.cancel()
        return True

    def _computation_slot(self, what: str):
        return self._slot(self._computations, f"{self.max_computations} long computations (evaluations, true "
                                              f"activations, build plans, similar neurons) are running on this "
                                              f"server already ({what} is one); retry shortly")

    # -- shape and validation ---------------------------------------------------------------------
    def shape(self) -> tuple[int | None, int | None, int | None]:
        """(n_layers, d_mlp, d_vocab): from the loaded model, else as recorded in the workspace."""
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
        """Writes the model's shape and token strings into the workspace, so that a reader without
        the model can validate requests and show tokens."""
        if self.host.loaded:
            from .build.runner import record_model_meta

            record_model_meta(self.ws, self.host.get())

    def _layer(self, layer: int, what: str = "layer") -> int:
        n_layers, _, _ = self.shape()
        if layer < 0 or (n_layers is not None and layer >= n_layers):
            rng = f"0..{n_layers - 1}" if n_layers is not None else "0 or more"
            raise invalid(f"{what} {layer} out of range: the model has layers {rng}")
        return int(layer)

    def _keys(self, keys: Sequence[Key], *, built: bool, what: str = "neurons") -> list[Key]:
        if not keys:
            raise invalid(f"no {what} given: send at least one (layer, neuron)")
        if self.limits.max_neurons and len(keys) > self.limits.max_neurons:
            raise too_big(f"{len(keys)} neurons in one request; the limit is {self.limits.max_neurons}")
        _, d_mlp, _ = self.shape()
        out: list[Key] = []
        for layer, neuron in keys:
            self._layer(layer)
            if neuron < 0 or (d_mlp is not None and neuron >= d_mlp):
                rng = f"0..{d_mlp - 1}" if d_mlp is not None else "0 or more"
                raise invalid(f"neuron {neuron} (layer {layer}) out of range: layers have neurons {rng}")
            out.append((int(layer), int(neuron)))
        if len(set(out)) != len(out):
            raise invalid("the same neuron is asked twice; list each neuron once")
        if built:
            have = self.graphs.keys()
            missing = [k for k in out if k not in have]
            if missing:
                for k in missing[:5]:  # a damaged row is DATA_LOSS with its reason, not "not built"
                    self.ws.get_neuron(*k)
                shown = ", ".join(f"{l}:{n}" for l, n in missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise not_found(f"no graph built for {len(missing)} neuron(s): {shown}; build them first "
                                f"(StartBuild, `n2g build`)")
        return out

    def _built_key(self, layer: int | None, neuron: int | None) -> Key:
        if layer is None or neuron is None:
            raise invalid("no neuron given: set neuron {layer, neuron}")
        return self._keys([(layer, neuron)], built=True, what="neuron")[0]

    @staticmethod
    def _threshold(t: float | None) -> float:
        if t is None or t == 0:
            return vocab.DEFAULT_SIMILARITY_THRESHOLD
        if not math.isfinite(t) or not MIN_PAIR_THRESHOLD <= t <= 1:
            raise invalid(f"threshold {t} out of range: give a value in [{MIN_PAIR_THRESHOLD}, 1] "
                          f"(0 means the default {vocab.DEFAULT_SIMILARITY_THRESHOLD})")
        return float(t)

    @staticmethod
    def _limit(limit: int) -> int:
        if limit < 0:
            raise invalid(f"limit must be positive (0 = all), got {limit}")
        return limit

    def _encode(self, texts: Sequence[str], skip_bos: bool) -> list[list[int]]:
        self.host.get()
        with self.host.tokenizer_lock:
            model = self.host.tokenizer()
            ids = model.encode_batch(list(texts))
            prefix = [] if skip_bos else [int(model.bos_id)]
            return [prefix + list(map(int, x)) for x in ids]

    def _labels(self, seqs: Sequence[Sequence[int]]) -> list[list[str]]:
        if not self.host.enabled:
            return [[] for _ in seqs]
        self.host.get()
        with self.host.tokenizer_lock:
            model = self.host.tokenizer()
            return [model.decode_tokens(s) for s in seqs]

    def _inputs(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]], skip_bos: bool,
                *, labels: bool) -> tuple[list[list[int]], list[list[str]]]:
        """Token-id sequences (and labels) from texts or token ids, within the limits. Texts are
        measured in UTF-8 bytes before they are tokenised (a character may be several tokens: an
        emoji is 2-4 in a byte-level BPE), and labels are made only for sequences within the
        limits, so an oversized request costs little."""
        lim = self.limits
        if texts and token_ids:
            raise invalid("give texts or token_ids, not both")
        n = len(texts) or len(token_ids)
        if n == 0:
            raise invalid("no input: give at least one text or token-id sequence")
        if lim.max_texts and n > lim.max_texts:
            raise too_big(f"{n} sequences in one request; the limit is {lim.max_texts}")
        if texts:
            sizes = [len(t.encode("utf-8", "surrogatepass")) for t in texts]
            if lim.max_tokens_per_sequence and max(sizes) > 2 * BYTES_PER_TOKEN * lim.max_tokens_per_sequence:
                raise too_big(f"a text of {max(sizes)} bytes (UTF-8) is far past the limit of "
                              f"{lim.max_tokens_per_sequence} tokens per sequence")
            if lim.max_total_tokens and sum(sizes) > BYTES_PER_TOKEN * lim.max_total_tokens:
                raise too_big(f"{sum(sizes)} bytes of text (UTF-8) in one request is far past the limit of "
                              f"{lim.max_total_tokens} tokens per request: split it")
            seqs = self._encode(texts, skip_bos)
        else:
            total = sum(len(s) for s in token_ids)
            if lim.max_total_tokens and total > lim.max_total_tokens:
                raise too_big(f"{total} tokens in one request; the limit is {lim.max_total_tokens}")
            _, _, d_vocab = self.shape()
            seqs = []
            for i, ids in enumerate(token_ids):
                bad = [x for x in ids if x < 0 or (d_vocab is not None and x >= d_vocab)]
                if bad:
                    rng = f"0..{d_vocab - 1}" if d_vocab is not None else "0 or more"
                    raise invalid(f"token id {bad[0]} in sequence {i} out of range: the vocabulary has ids {rng}")
                seqs.append([int(x) for x in ids])
        for i, s in enumerate(seqs):
            if not s:
                raise invalid(f"sequence {i} is empty: every text or token-id sequence needs at least one token")
            if lim.max_tokens_per_sequence and len(s) > lim.max_tokens_per_sequence:
                raise too_big(f"sequence {i} has {len(s)} tokens; the limit is {lim.max_tokens_per_sequence} "
                              f"per sequence")
        total = sum(len(s) for s in seqs)
        if lim.max_total_tokens and total > lim.max_total_tokens:
            raise too_big(f"{total} tokens in one request; the limit is {lim.max_total_tokens}")
        return seqs, self._labels(seqs) if labels else [[] for _ in seqs]

    def _cost(self, n_neurons: int, seqs: Sequence[Sequence[int]]) -> None:
        tokens = sum(len(s) for s in seqs)
        cost = n_neurons * tokens
        if self.limits.max_neuron_tokens and cost > self.limits.max_neuron_tokens:
            raise too_big(f"{n_neurons} neurons x {tokens} tokens = {cost} activations; the limit is "
                          f"{self.limits.max_neuron_tokens}: split the request")

    # -- model info and tokens ----------------------------------------------------------------------
    def model_info(self, *, deadline: Deadline = NO_DEADLINE) -> T.ModelInfo:
        from n2g import __version__ as version

        n_layers, d_mlp, d_vocab = self.shape()
        per_layer: dict[int, int] = {}
        for l, _ in self.ws.built_keys():  # damaged rows left out
            per_layer[l] = per_layer.get(l, 0) + 1
        scanned = set(self.ws.scanned_layers())
        layers = [T.LayerStatus(l, l in scanned, per_layer.get(l, 0)) for l in sorted(scanned | set(per_layer))]
        return T.ModelInfo(
            model=self.ws.model_name or (self.host.name or ""), loaded=self.host.loaded, n_layers=n_layers or 0,
            d_mlp=d_mlp or 0, d_vocab=d_vocab or 0, hook=self.ws.hook or "",
            device=str(self.host.get().device) if self.host.loaded else "", workspace=str(self.ws.path.resolve()),
            corpus=self.ws.corpus or "", layers=layers, neurons_built=sum(per_layer.values()), limits=self.limits,
            server_version=version, semantics=list(vocab.SEMANTICS), default_semantics=vocab.DEFAULT_SEMANTICS,
            n_ctx=(self.host.get().n_ctx or 0) if self.host.loaded else int(self.ws.get_meta("n_ctx") or 0))

    def tokenize(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]], skip_bos: bool, *,
                 deadline: Deadline = NO_DEADLINE) -> list[T.TokenizedText]:
        self.host.get()
        seqs, labels = self._inputs(texts, token_ids, skip_bos, labels=True)
        return [T.TokenizedText(np.asarray(s, dtype=np.int64), l) for s, l in zip(seqs, labels)]

    # -- build jobs ---------------------------------------------------------------------------------
    def build_request(self, layers: Sequence[int], layer_spec: str | None, neurons: Sequence[int] | None,
                      sample: int | None, seed: int, group_size: int | None, k: int | None,
                      window_tokens: int | None, config_json: str | None, executor: str | None = None,
                      ray_address: str | None = None, workers: int | None = None, precision: str | None = None,
                      shard_windows: int | None = None, worker_threads: int | None = None):
        """The BuildRequest these arguments describe, checked against the model and the limits."""
        from .config import EvalConfig, FitConfig, ScanConfig
        from .fit import scan_k
        from .build.request import BuildRequest

        model = self.host.get()
        if layers and layer_spec:
            raise invalid("give layers or layer_spec, not both")
        # checked before the list is parsed (several times, one under the model lock): millions of
        # entries of a valid layer took minutes of CPU and gigabytes per request
        if layers is not None and len(layers) > MAX_LAYERS:
            raise too_big(f"layers lists {len(layers)} layers; give each layer once (at most {MAX_LAYERS}), or "
                          f"layer_spec, e.g. all or 0-5")
        if layer_spec is not None and len(layer_spec) > 200:
            raise invalid(f"layer_spec {_shown(layer_spec)} is too long: write e.g. all, 0-5 or 0,2,4-6")
        if workers is not None and not 0 < workers <= 1024:
            raise invalid(f"workers must be between 1 and 1024 (leave it out for one per GPU or CPU), got {workers}")
        if worker_threads is not None and not 0 < worker_threads <= 1024:
            raise invalid(f"worker_threads must be between 1 and 1024 (leave it out for the cores shared evenly), "
                          f"got {worker_threads}")
        if shard_windows is not None and not 0 < shard_windows <= 1 << 20:
            raise invalid(f"shard_windows must be between 1 and {1 << 20} (0 = default), got {shard_windows}")
        if sample is not None and sample < 0:
            raise invalid(f"sample must be positive, got {sample}")
        if seed < 0:
            raise invalid(f"seed must be 0 or more, got {seed}")
        if executor == "ray" and not ray_address:
            ray_address = self.ray_address
        for name, v, hi in (("group_size", group_size, MAX_GROUP_SIZE), ("k", k, MAX_K),
                            ("window_tokens", window_tokens, MAX_WINDOW_TOKENS)):
            if v is not None and not 0 < v <= hi:
                raise invalid(f"{name} must be between 1 and {hi} (0 = default), got {v}")
        if self.limits.max_build_neurons and neurons is not None and len(neurons) > self.limits.max_build_neurons:
            raise too_big(f"{len(neurons)} neurons listed; the limit per job is {self.limits.max_build_neurons}")
        overrides = _config_object(config_json, "config_json", ("scan", "fit", "eval"))
        scan_d = dict(overrides.get("scan") or {})
        if k is not None:
            scan_d["k"] = k
        stored_len = self.ws.window_length()
        if window_tokens is not None:
            if stored_len is not None and window_tokens != stored_len:
                raise invalid(f"this workspace holds corpus windows of {stored_len} tokens, not {window_tokens}; "
                              f"leave window_tokens unset or use another workspace")
            scan_d["window_tokens"] = window_tokens
        elif stored_len is not None:
            scan_d.setdefault("window_tokens", stored_len)
        try:
            run = {k: v for k, v in (("executor", executor), ("ray_address", ray_address), ("workers", workers),
                                     ("worker_threads", worker_threads), ("precision", precision),
                                     ("shard_windows", shard_windows)) if v is not None}
            fit_cfg, eval_cfg = FitConfig.from_dict(overrides.get("fit")), EvalConfig.from_dict(overrides.get("eval"))
            if "k" not in scan_d:  # unless asked, keep as many top windows as the fit learns from
                scan_d["k"] = scan_k(fit_cfg, eval_cfg.n_train, ScanConfig.k)
            req = BuildRequest(
                layers=layer_spec if layer_spec else list(layers), neurons=list(neurons) if neurons else None,
                sample=sample or None, seed=int(seed), group_size=group_size or 0,
                scan=ScanConfig.from_dict(scan_d), fit=fit_cfg, eval=eval_cfg, **run)
            req.validate(model.n_layers, model.d_mlp)
            model.token_id_for(req.fit.mask_token)  # e.g. "id:N" past the vocabulary fails now, not in the job
            if stored_len is not None and req.scan.window_tokens != stored_len:  # asked in config_json
                raise ValueError(f"this workspace holds corpus windows of {stored_len} tokens, not "
                                 f"{req.scan.window_tokens}; leave scan.window_tokens unset or use another workspace")
        except (ValueError, TypeError) as e:
            raise invalid(str(e)) from None
        self._check_operator_settings(req.ray_address, req.fit.mlm_name)
        self._check_bounds(req, model)
        return req

    def _check_operator_settings(self, ray_address: str | None, mlm_name: str | None) -> None:
        """PERMISSION_DENIED for what only this process's operator may choose, unless the caller is
        that operator: a Ray cluster to join other than the operator's, a fill-mask model to load."""
        if self.trusted_caller:
            return
        if ray_address and ray_address != self.ray_address:
            named = f"its operator named ({self.ray_address})" if self.ray_address else "on its own machine"
            raise N2GError(C.PERMISSION_DENIED, f"this server runs Ray builds only on the cluster {named}, not "
                                                f"{_shown(ray_address)}: leave ray_address unset (the operator sets "
                                                f"it with n2g serve --ray-address)")
        if mlm_name:
            raise N2GError(C.PERMISSION_DENIED, "this server loads no model a request names (fit.mlm_name): leave it "
                                                "unset, or build with the mlm proposer locally (n2g build --workspace)")

    def _check_bounds(self, req, model) -> None:
        """Sizes that would exhaust the machine or that the model cannot read, refused before any
        work (also for stored jobs)."""
        if req.scan.k > MAX_K or req.scan.window_tokens > MAX_WINDOW_TOKENS or req.group_size > MAX_GROUP_SIZE:
            raise too_big(f"scan.k must be at most {MAX_K}, scan.window_tokens at most {MAX_WINDOW_TOKENS} and "
                          f"group_size at most {MAX_GROUP_SIZE}")
        if model.n_ctx and req.scan.window_tokens > model.n_ctx:
            raise invalid(f"scan.window_tokens {req.scan.window_tokens} is longer than the model reads (n_ctx "
                          f"{model.n_ctx}): ask at most {model.n_ctx}")
        layers = req.resolved_layers(model.n_layers)
        planned = len(layers) * (len(set(req.neurons)) if req.neurons else req.sample)
        if self.limits.max_build_neurons and planned > self.limits.max_build_neurons:
            raise too_big(f"the build plans {planned} neurons; the limit per job is {self.limits.max_build_neurons}")

    def _check_stored_request(self, request: dict[str, Any]) -> None:
        """For the job queue: raises ValueError when a stored request cannot run here."""
        from .build.request import BuildRequest

        model = self.host.get()
        req = BuildRequest.from_dict(request)
        req.validate(model.n_layers, model.d_mlp)
        try:
            # stored by an older n2g, or under another --ray-address: the same rules as a new request
            self._check_operator_settings(req.ray_address, req.fit.mlm_name)
            self._check_bounds(req, model)
        except N2GError as e:
            raise ValueError(e.message) from None

    def start_build(self, layers: Sequence[int] = (), layer_spec: str | None = None,
                    neurons: Sequence[int] | None = None, sample: int | None = None, seed: int = 0,
                    group_size: int | None = None, k: int | None = None, window_tokens: int | None = None,
                    config_json: str | None = None, executor: str | None = None, ray_address: str | None = None,
                    workers: int | None = None, precision: str | None = None, shard_windows: int | None = None,
                    worker_threads: int | None = None, job_id: str | None = None, *,
                    deadline: Deadline = NO_DEADLINE) -> T.Job:
        from .build.request import new_job_id

        if job_id and not _JOB_ID_RE.fullmatch(job_id):
            raise invalid(f"job_id {_shown(job_id)} is not 1-64 characters of A-Z a-z 0-9 _ -")
        req = self.build_request(layers, layer_spec, neurons, sample, seed, group_size, k, window_tokens,
                                 config_json, executor, ray_address, workers, precision, shard_windows,
                                 worker_threads)
        job_id = job_id or new_job_id()
        with self._submit_lock:  # identical calls at once (a client's retries) get one job
            existing = self.ws.get_job(job_id)
            if existing is not None:
                if existing.request == json.loads(json.dumps(req.to_dict(), sort_keys=True)):
                    return _job(existing)  # a retried call: the same job
                raise invalid(f"job id {job_id!r} already names another build request; pick a new id")
            try:
                return _job(self.jobs.submit(job_id, req.to_dict()))
            except OSError as e:  # e.g. a full disk while storing the job
                raise N2GError(C.UNAVAILABLE, f"could not store the job: {e}") from None

    @_computation("a build plan")  # a plan of many layers takes seconds under the model lock
    def plan_build(self, layers: Sequence[int] = (), layer_spec: str | None = None,
                   neurons: Sequence[int] | None = None, sample: int | None = None, seed: int = 0,
                   group_size: int | None = None, k: int | None = None, window_tokens: int | None = None,
                   config_json: str | None = None, executor: str | None = None, ray_address: str | None = None,
                   workers: int | None = None, precision: str | None = None, shard_windows: int | None = None,
                   worker_threads: int | None = None, *, deadline: Deadline = NO_DEADLINE) -> T.BuildPlan:
        """What start_build with these arguments would run, and how long it should take here (a
        short calibration of the forward pass under the model lock). Writes nothing."""
        from .build.summary import plan_summary
        from .corpus import CorpusError
        from .build.runner import BuiltWithOtherSettings

        req = self.build_request(layers, layer_spec, neurons, sample, seed, group_size, k, window_tokens,
                                 config_json, executor, ray_address, workers, precision, shard_windows,
                                 worker_threads)
        with self.host.forward(deadline) as model:
            try:
                s = plan_summary(self.ws, model, req)
            except (FileNotFoundError, CorpusError, BuiltWithOtherSettings) as e:
                # the workspace's corpus is gone or unreadable, or holds these neurons fitted otherwise
                raise N2GError(C.FAILED_PRECONDITION, str(e)) from None
        return T.BuildPlan(list(s.layers), int(s.neurons), int(s.neurons_built), int(s.scan_shards),
                           int(s.scan_tokens), int(s.fit_groups), s.total_seconds, s.format(),
                           json.loads(json.dumps(s.to_dict(), default=float)))

    def _job_record(self, job_id: str) -> JobRecord:
        if not job_id:
            raise invalid("no job_id given")
        if not _JOB_ID_RE.fullmatch(job_id):
            raise not_found(f"no job {_shown(job_id)} in this workspace (job ids are 1-64 characters of "
                            f"A-Z a-z 0-9 _ -)")
        job = self.ws.get_job(job_id)
        if job is None:
            raise not_found(f"no job {job_id!r} in this workspace (ListJobs shows the known ones)")
        return job

    def _orphaned(self, job: JobRecord) -> bool:
        """Whether a job that has not ended has no process to run it: no writer holds the workspace
        (its server or build stopped). Only a reader sees this; a writer resumes such jobs."""
        return (job.state not in vocab.JOB_FINAL and self.jobs.current != job.id
                and self.ws.writer_holder() is None)

    def get_job(self, job_id: str, *, deadline: Deadline = NO_DEADLINE) -> T.Job:
        job = self._job_record(job_id)
        return _job(job, self._orphaned(job))

    def cancel_job(self, job_id: str, *, deadline: Deadline = NO_DEADLINE) -> T.Job:
        job = self._job_record(job_id)
        if job.state in vocab.JOB_FINAL:
            return _job(job)
        return _job(self.jobs.cancel(job.id))

    def list_jobs(self, states: Sequence[str] | None = None, limit: int = 0, *,
                  deadline: Deadline = NO_DEADLINE) -> T.ListResult:
        """Jobs (in `states`), oldest first; with `limit`, only the newest that many."""
        for s in states or ():
            if s not in vocab.JOB_STATES:
                raise invalid(f"unknown job state {s!r}: use one of {', '.join(vocab.JOB_STATES)}")
        self._limit(limit)
        states = sorted(set(states)) if states else None
        jobs = self.ws.list_jobs(states, limit=limit or None)
        total = self.ws.count_jobs(states) if limit else len(jobs)
        return T.ListResult([_job(j, self._orphaned(j)) for j in jobs], total)

    def watch_job(self, job_id: str, *, deadline: Deadline = NO_DEADLINE) -> Iterator[T.JobEvent]:
        """The job as it stands, then its progress events, ending with the one that finishes it."""
        job = self._job_record(job_id)
        yield from self._streamed("watching a job", deadline, lambda: self._watch(job, deadline))

    def _watch(self, job: JobRecord, deadline: Deadline) -> Iterator[T.JobEvent]:
        import queue as _queue

        q = self.jobs.subscribe(job.id)
        try:
            job = self.ws.get_job(job.id)
            yield T.JobEvent(_job(job, self._orphaned(job)), "state", job.done, job.total, job.state, None, 0.0)
            if job.state in vocab.JOB_FINAL:
                return
            last_done = job.done
            orphan_said = False
            while deadline.active():
                try:
                    up = q.get(timeout=0.5)
                except _queue.Empty:
                    # nothing from this process's runner: the job may run in another process (a
                    # local build) or have ended; follow it in the table
                    now = self.ws.get_job(job.id)
                    if now.state in vocab.JOB_FINAL:
                        yield T.JobEvent(_job(now), "done" if now.state == "succeeded" else now.state, now.done,
                                         now.total, now.error or now.state, None, 0.0)
                        return
                    if now.done != last_done:
                        last_done = now.done
                        yield T.JobEvent(_job(now), "fit", now.done, now.total,
                                         f"{now.done}/{now.total} neurons committed", None, 0.0)
                    # no writer anywhere (its server or build died): say so once, rather than look
                    # like a job that is merely slow; it resumes when a writer opens the workspace
                    orphaned = self._orphaned(now)
                    if orphaned and not orphan_said:
                        yield T.JobEvent(_job(now, True), "state", now.done, now.total,
                                         "no process is running this job (its server or build stopped): it resumes "
                                         "when `n2g serve` with the model opens the workspace", None, 0.0)
                    orphan_said = orphaned
                    continue
                last_done = up.job.done
                b = up.event
                last = (b.layer, b.neuron) if b.layer is not None and b.neuron is not None else None
                yield T.JobEvent(_job(up.job), b.stage, b.done, b.total, b.message, last, b.elapsed_s,
                                 getattr(b, "eta_s", None))
                if up.final:
                    return
            deadline.check()  # the job goes on past the caller's deadline: the watch was cut short
        finally:
            self.jobs.unsubscribe(job.id, q)

    # -- graphs -------------------------------------------------------------------------------------
    def _summary(self, rec) -> T.GraphSummary:
        info = self.graphs.info((rec.layer, rec.neuron))
        return T.GraphSummary((rec.layer, rec.neuron), rec.max_activation, info.n_nodes, info.n_paths,
                              info.activating, info.context, rec.job_id or "", rec.created_at,
                              method_scores(rec.metrics))

    def list_graphs(self, layers: Sequence[int] | None = None, limit: int = 0, offset: int = 0, *,
                    deadline: Deadline = NO_DEADLINE) -> T.ListResult:
        wanted = {self._layer(l) for l in layers or ()}
        self._limit(limit)
        if offset < 0:
            raise invalid(f"offset must be 0 or more, got {offset}")
        recs = self.ws.iter_neurons(with_examples=False, with_stats=False, layers=wanted or None)
        shown = []
        for r in itertools.islice(recs, offset, offset + limit if limit else None):
            deadline.check()  # a caller that gave up does not keep a thread busy listing a whole model
            shown.append(self._summary(r))
        paged = limit or offset
        total = len(self.ws.built_keys(sorted(wanted) if wanted else None)) if paged else len(shown)
        return T.ListResult(shown, total)

    def graph(self, layer: int | None, neuron: int | None, structure: bool = False, dot: bool = False,
              svg: bool = False, json: bool = False, examples: bool = False, *,
              deadline: Deadline = NO_DEADLINE) -> T.Graph:
        key = self._built_key(layer, neuron)
        rec = self.ws.get_neuron(*key)
        if rec is None:
            raise not_found(f"no graph built for neuron {key[0]}:{key[1]}")
        graph = rec.graph()
        doc = graph.to_json() if (json or structure) else ""
        roots = [_node(n) for n in _json_loads(doc).get("roots", [])] if structure else []
        return T.Graph(self._summary(rec), graph.model, graph.hook, roots, graph.to_dot() if dot else "",
                       graph.to_svg() if svg else "", doc if json else "", rec.stats, rec.metrics,
                       rec.examples if examples else None)

    # -- activations --------------------------------------------------------------------------------
    def predict(self, neurons: Sequence[Key], texts: Sequence[str] = (), token_ids: Sequence[Sequence[int]] = (),
                semantics: str | None = None, skip_bos: bool = False, *,
                deadline: Deadline = NO_DEADLINE) -> T.Activations:
        semantics = semantics or vocab.DEFAULT_SEMANTICS
        if semantics not in vocab.SEMANTICS:
            raise invalid(f"unknown semantics {_shown(semantics)}: use one of {', '.join(vocab.SEMANTICS)}")
        keys = self._keys(neurons, built=True)
        seqs, labels = self._inputs(texts, token_ids, skip_bos, labels=self.host.enabled)
        self._cost(len(keys), seqs)
        deadline.check()
        values = self.graphs.predict(keys, seqs, semantics)
        amax = np.asarray(self.graphs.max_activations(keys), dtype=np.float32)
        return T.Activations(keys, [np.asarray(s, np.int64) for s in seqs], labels, values, True, amax, semantics)

    @_computation("a true-activation request")
    def activations(self, neurons: Sequence[Key], texts: Sequence[str] = (),
                    token_ids: Sequence[Sequence[int]] = (), normalise: bool = True, skip_bos: bool = False, *,
                    deadline: Deadline = NO_DEADLINE) -> T.Activations:
        from .activations import ActivationRunner

        n_ctx = self.host.get().n_ctx
        keys = self._keys(neurons, built=False)
        seqs, labels = self._inputs(texts, token_ids, skip_bos, labels=True)
        self._cost(len(keys), seqs)
        longest = max(range(len(seqs)), key=lambda i: len(seqs[i]))
        if n_ctx and len(seqs[longest]) > n_ctx:
            raise invalid(f"sequence {longest} is {len(seqs[longest])} tokens long; the model reads at most {n_ctx} "
                          f"(n_ctx): cut it or split it")
        scan_max = np.array([self._scan_max(l, n) for l, n in keys], dtype=np.float32)
        if normalise and np.isnan(scan_max).any():
            l, n = keys[int(np.flatnonzero(np.isnan(scan_max))[0])]
            raise invalid(f"layer {l} is not scanned in this workspace, so a_max of neuron {l}:{n} is unknown; "
                          f"ask normalise=false or build a neuron of layer {l} first")
        # a neuron that never fired on the corpus (a dead GELU/ReLU unit) has a_max <= 0: dividing by
        # it gave inf, NaN or sign-flipped values without a word
        if normalise and (scan_max <= 0).any():
            j = int(np.flatnonzero(scan_max <= 0)[0])
            raise invalid(f"neuron {keys[j][0]}:{keys[j][1]} never fires on this workspace's corpus (a_max "
                          f"{scan_max[j]:g}), so its normalised activations are undefined; ask normalise=false")
        out = [np.zeros((len(keys), len(s)), np.float32) for s in seqs]
        with self.host.forward(deadline) as model:
            for layer in sorted({l for l, _ in keys}):
                deadline.check()
                rows = [j for j, (l, _) in enumerate(keys) if l == layer]
                # every (sequence, neuron) job of the layer; the runner runs each sequence once
                jobs = [(i, r) for i in range(len(seqs)) for r in rows]
                got = ActivationRunner(model, layer).run([seqs[i] for i, _ in jobs], [keys[r][1] for _, r in jobs])
                for (i, r), v in zip(jobs, got):
                    out[i][r] = v
        if normalise:
            out = [o / scan_max[:, None] for o in out]
        amax = scan_max if normalise else np.nan_to_num(scan_max, nan=0.0)
        return T.Activations(keys, [np.asarray(s, np.int64) for s in seqs], labels, out, bool(normalise), amax)

    def _scan_max(self, layer: int, neuron: int) -> float:
        scan = self.graphs.scan_max(layer)
        return float(scan[neuron]) if scan is not None else float("nan")

    # -- evaluation ---------------------------------------------------------------------------------
    @_computation("an evaluation")
    def evaluate(self, neurons: Sequence[Key] | None = None, layers: Sequence[int] | None = None,
                 eval_config_json: str | None = None, test_sets: bool = False, compute_heldout: bool = False, *,
                 deadline: Deadline = NO_DEADLINE) -> T.Evaluation:
        """Per-neuron and per-layer scores of every method: the stored ones, or recomputed from the
        stored examples with `eval_config_json`'s settings. `test_sets` adds every method on the
        three test sets (paper, ordinary text, detection) with intervals and paired comparisons;
        `compute_heldout` first computes, with the model, the held-out activations not stored."""
        from . import evaluate as ev
        from .config import EvalConfig

        if neurons and layers:
            raise invalid("give neurons or layers, not both")
        if neurons:
            keys = self._keys(neurons, built=True)
        else:
            wanted = {self._layer(l) for l in layers or ()}
            keys = [k for k in sorted(self.graphs.keys()) if not wanted or k[0] in wanted]
            if not keys:
                where = f" in layers {sorted(wanted)}" if wanted else ""
                raise not_found(f"no neurons built{where}: nothing to evaluate")
        cfg = None
        if eval_config_json:
            asked = _config_object(eval_config_json, "eval_config_json", None)
            try:
                cfg = EvalConfig.from_dict(asked)
            except (ValueError, TypeError) as e:
                raise invalid(f"eval_config_json: {e}") from None
            # the held-out sample is fixed once recorded (builds left it out of their scans): a
            # different one asked is refused, not silently replaced by the recorded one
            rec = self.ws.load_heldout_windows() if {"ordinary_windows", "heldout_seed"} & set(asked) else None
            if rec is not None and (cfg.ordinary_windows, cfg.heldout_seed) != (rec["requested"], rec["seed"]):
                raise invalid(f"this workspace's held-out sample is fixed at ordinary_windows={rec['requested']}, "
                              f"heldout_seed={rec['seed']} (its builds left those windows out): leave both unset, "
                              f"or use another workspace for another sample")
        wanted_keys = set(keys)
        recs = {(r.layer, r.neuron): r for r in self.ws.iter_neurons(with_examples=cfg is not None, with_stats=False,
                                                                     layers={k[0] for k in wanted_keys})
                if (r.layer, r.neuron) in wanted_keys}
        rows, per_neuron = [], []
        for key in keys:
            deadline.check()
            rec = recs.get(key)
            if rec is None:  # damaged or deleted since listed
                continue
            metrics = rec.metrics
            if cfg is not None:
                metrics = ev.evaluate_neuron(rec.graph(), _pairs(rec.examples["train"]), _pairs(rec.examples["test"]),
                                             cfg)
            rows.append({"layer": key[0], "neuron": key[1], "metrics": metrics})
            per_neuron.append(T.NeuronEvaluation(key, method_scores(metrics), metrics))
        summary = ev.summarise(rows)
        layers_out = []
        for layer in sorted({k[0] for k in keys}):
            per = [n for n in per_neuron if n.key[0] == layer]
            methods = sorted({s.method for n in per for s in n.scores})
            scores = []
            for m in methods:
                vals = [s for n in per for s in n.scores if s.method == m]
                scores.append(T.MethodScore(m, float(np.mean([v.precision for v in vals])),
                                            float(np.mean([v.recall for v in vals])),
                                            float(np.mean([v.f1 for v in vals]))))
            layers_out.append(T.LayerEvaluation(layer, len(per), scores))
        report, details = "", None
        if test_sets or compute_heldout:
            model = self.host.get() if compute_heldout else None
            # stops between neurons once the caller has gone (its slot is then free for others)
            full = ev.evaluate_workspace(self.ws, model, [n.key for n in per_neuron], cfg or EvalConfig(),
                                         lambda _: deadline.check(),
                                         model_lock=self.host.lock if model is not None else None)
            report, details = ev.format_report(full), full.to_dict()
        return T.Evaluation(per_neuron, layers_out, ev.format_table(summary), summary, report, details)

    # -- search and similarity ----------------------------------------------------------------------
    def search(self, clauses: Sequence[tuple[int | str, str | None]], limit: int = 0, *,
               deadline: Deadline = NO_DEADLINE) -> T.SearchResult:
        if not clauses:
            raise invalid("no clauses: give at least one (token, role) clause")
        self._limit(limit)
        _, _, d_vocab = self.shape()
        checked: list[tuple[int | str, str]] = []
        for i, (tok, role) in enumerate(clauses):
            role = role or vocab.DEFAULT_ROLE
            if role not in vocab.ROLES:
                raise invalid(f"clause {i}: unknown role {_shown(role)}: use one of {', '.join(vocab.ROLES)}")
            if isinstance(tok, str):
                if not tok:
                    raise invalid(f"clause {i}: empty token label")
                tok = normalise_token(tok)  # " The" finds the graphs' label "the", as its tokens do
            elif tok < 0 or (d_vocab is not None and tok >= d_vocab):
                rng = f"0..{d_vocab - 1}" if d_vocab is not None else "0 or more"
                raise invalid(f"clause {i}: token id {tok} out of range: the vocabulary has ids {rng}")
            checked.append((tok, role))
        try:
            found = self.graphs.search(checked)
        except WorkspaceError:
            raise  # a damaged workspace is the server's trouble (DATA_LOSS ...), not the request's
        except ValueError as e:
            raise invalid(str(e)) from None
        return T.SearchResult(found[:limit] if limit else found, len(found))

    def in_context_neurons(self, limit: int = 0, *, deadline: Deadline = NO_DEADLINE) -> T.InContextResult:
        self._limit(limit)
        found = self.graphs.in_context_neurons()
        shown = found[:limit] if limit else found
        return T.InContextResult(shown, len(found))

    @_computation("finding similar neurons")  # waits on a heavy-work thread: it holds an RPC thread as long
    def similar(self, layer: int | None, neuron: int | None, threshold: float | None = None, k: int | None = None,
                *, deadline: Deadline = NO_DEADLINE) -> T.Similar:
        key = self._built_key(layer, neuron)
        threshold = self._threshold(threshold)
        if k is not None and not 0 < k <= MAX_NEIGHBOURS:
            raise invalid(f"k must be between 1 and {MAX_NEIGHBOURS} (0 = {vocab.DEFAULT_NEIGHBOURS}), got {k}")
        found = self._heavy_call(lambda: {kind: self.graphs.pairs(kind, threshold) for kind in vocab.PAIR_KINDS},
                                 deadline, "finding similar pairs")
        pairs = {kind: [p for p in found[kind] if key in (p.a, p.b)] for kind in vocab.PAIR_KINDS}
        deadline.check()
        return T.Similar(pairs["similar"], pairs["subset"], self.graphs.neighbours(key, k or vocab.DEFAULT_NEIGHBOURS))

    def pairs(self, kind: str | None = None, threshold: float | None = None, batch_size: int | None = None, *,
              deadline: Deadline = NO_DEADLINE) -> Iterator[list[T.Pair]]:
        """Every pair of `kind` among the built graphs, in batches of `batch_size`."""
        kind = kind or vocab.DEFAULT_PAIR_KIND
        if kind not in vocab.PAIR_KINDS:
            raise invalid(f"unknown pair kind {_shown(kind)}: use one of {', '.join(vocab.PAIR_KINDS)}")
        threshold = self._threshold(threshold)
        if batch_size is not None and not 0 < batch_size <= MAX_PAIR_BATCH:
            raise invalid(f"batch_size must be between 1 and {MAX_PAIR_BATCH} (0 = {vocab.DEFAULT_PAIR_BATCH}), "
                          f"got {batch_size}")
        size = batch_size or vocab.DEFAULT_PAIR_BATCH

        def batches():
            found = self._heavy_call(lambda: self.graphs.pairs(kind, threshold), deadline, "finding pairs")
            for i in range(0, len(found), size):
                deadline.check()
                yield found[i: i + size]
        yield from self._streamed("streaming pairs", deadline, batches)

    # -- export and report --------------------------------------------------------------------------
    def export(self, layers: Sequence[int] | None = None, examples: bool = True, *,
               deadline: Deadline = NO_DEADLINE) -> Iterator[T.ExportedNeuron]:
        wanted = {self._layer(l) for l in layers or ()}

        def neurons():
            for rec in self.ws.iter_neurons(with_examples=examples):
                if wanted and rec.layer not in wanted:
                    continue
                deadline.check()
                self.check_workspace()  # replaced mid-export: stop rather than go on from the old file
                yield T.ExportedNeuron((rec.layer, rec.neuron), rec.graph().to_json(),
                                       json.dumps(rec.examples) if examples else "")
        yield from self._streamed("an export", deadline, neurons)

    def report(self, layers: Sequence[int] | None = None, *,
               deadline: Deadline = NO_DEADLINE) -> Iterator[T.ReportChunk]:
        wanted = sorted({self._layer(l) for l in layers or ()}) or None
        if not any(wanted is None or k[0] in wanted for k in self.graphs.keys()):
            raise not_found("no neurons built in this workspace" + (f" in layers {wanted}" if wanted else "")
                            + ": nothing to report")
        # pieces that fit the server's message limit, leaving room for the other fields
        limit = self.limits.max_message_bytes
        chunk = max(1024, min(REPORT_CHUNK, limit - 1024)) if limit else REPORT_CHUNK

        def pieces():
            # one report at a time; a caller that has gone while it waited builds none (it would
            # hold a stream slot for the whole build of a report nobody reads)
            while not self._report_lock.acquire(timeout=0.25):
                deadline.check()
            try:
                deadline.check()
                data = report_zip(self.ws.path, wanted)
            finally:
                self._report_lock.release()
            for i in range(0, max(len(data), 1), chunk):
                deadline.check()
                yield T.ReportChunk(data[i: i + chunk], len(data), "n2g-report.zip")
        yield from self._streamed("a report", deadline, pieces)


# ---------------------------------------------------------------------------------------------
# Helpers

class _OpenStream:
    """A stream holding a slot: what it is, how to cancel its call, and since when it has waited
    for its reader to take a message (None while it is producing)."""

    __slots__ = ("what", "cancel", "waiting_since")

    def __init__(self, what: str, cancel: Callable[[], Any]):
        self.what, self.cancel, self.waiting_since = what, cancel, None


def _json_loads(doc: str) -> Any:
    return json.loads(doc) if doc else {}


def _config_object(text: str | None, what: str, keys: tuple[str, ...] | None) -> dict[str, Any]:
    """A JSON object of settings (size- and depth-bounded); with `keys`, an object of objects."""
    if not text:
        return {}
    if len(text) > MAX_CONFIG_JSON:
        raise too_big(f"{what} has {len(text)} bytes; the limit is {MAX_CONFIG_JSON}")
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise invalid(f"{what} is not valid JSON (or nests too deep): {str(e)[:200]}") from None
    if not isinstance(value, dict):
        raise invalid(f"{what} must be a JSON object")
    if keys is not None:
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise invalid(f"{what}: unknown key(s) {unknown}; use keys among {', '.join(keys)}")
        for k, v in value.items():
            if v is not None and not isinstance(v, dict):
                raise invalid(f'{what}: "{k}" must be an object of settings, e.g. {{"{k}": {{...}}}}')
    return value


def method_scores(metrics: dict[str, Any]) -> list[T.MethodScore]:
    """Every {precision, recall, f1} entry of a stored metrics object, by method id."""
    out = []
    for method, value in sorted((metrics or {}).items()):
        if isinstance(value, dict) and {"precision", "recall", "f1"} <= set(value):
            out.append(T.MethodScore(method, float(value["precision"]), float(value["recall"]), float(value["f1"])))
    return out


def _job(job: JobRecord, orphaned: bool = False) -> T.Job:
    return T.Job(job.id, job.state, job.total, job.done, job.error or "", job.created_at, job.updated_at,
                 job.request, orphaned)


def _node(node: dict[str, Any]) -> T.GraphNode:
    return T.GraphNode(node.get("label", ""), list(node.get("token_ids", [])), bool(node.get("ignore", False)),
                       float(node.get("importance") or 0.0),
                       float(node["activation"]) if node.get("activation") is not None else None,
                       float(node["end"]) if node.get("end") is not None else None,
                       [_node(c) for c in node.get("children", [])])


def _pairs(examples: list[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.asarray(e["token_ids"], np.int64), np.asarray(e["activations"], np.float32)) for e in examples]


def report_zip(workspace_path: str | Path, layers: Sequence[int] | None = None) -> bytes:
    """The workspace's report (n2g_service.report.write_report) as a zip archive in memory. The
    pages are written to a temporary folder under the system's temporary directory, removed
    even if writing fails; one a killed process left behind is removed by the next report."""
    from .report import write_report

    _remove_stale_report_dirs()
    with tempfile.TemporaryDirectory(prefix=f"n2g-report-{os.getpid()}-") as tmp:
        out = Path(tmp) / "report"
        write_report(Path(workspace_path), out, layers=layers)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(out.rglob("*")):
                if f.is_file():
                    zf.write(f, f.relative_to(out).as_posix())
        return buf.getvalue()


def _remove_stale_report_dirs() -> None:
    """Removes report folders whose process is gone (killed while writing a report)."""
    import shutil

    for d in Path(tempfile.gettempdir()).glob("n2g-report-*-*"):
        try:
            pid = int(d.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:  # another user's live process
            pass
