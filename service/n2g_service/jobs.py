"""The build runner: corpus -> dataset scan -> per-neuron fit and evaluation -> workspace.

A build is described by a `BuildRequest` and runs as a persisted plan of work units
(`build.plan`): scan shards (a range of corpus windows, every layer still to scan in one forward
pass stopping at the deepest) and fit groups (neurons of one layer, fitted together so their
forward passes are shared). Each unit's result is committed with its `done` mark in one
transaction, so rerunning the same request after a crash or a SIGKILL runs only the units not
done: nothing is lost and nothing is built twice. Shard results are partial top-k per layer,
merged exactly into the layer's scan once every shard is in.

Units run on an executor (`build.executors`): in this process (default) or on Ray actors; the
driver (this module) is the only writer to the workspace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ContextManager, Sequence

import numpy as np

from .build.plan import FitGroup, ScanShard, digest, fit_groups, parse_layers, scan_key, shard_ranges
from .config import EvalConfig, FitConfig, ScanConfig
from .workspace import BuildStore, NeuronRecord, Workspace

EXECUTORS = ("inprocess", "ray")
PRECISIONS = ("float32", "bfloat16", "float16")
# fit sizes on a GPU: many more neurons a group and tokens a forward pass than on a CPU
GPU_GROUP_SIZE = 64
GPU_MAX_GROUP_SIZE = 512
GPU_MAX_BATCH_TOKENS = 1 << 18
GPU_SCAN_BATCH = 256


class BuildCancelled(Exception):
    """Raised inside the runner when the job's cancel event is set."""


@dataclass
class BuildRequest:
    layers: list[int] | str  # layer ids, or a spec: "all", "0-5", "0,2,4-6" (resolved per model)
    neurons: list[int] | None = None  # the same neuron indices in every layer asked
    sample: int | None = None  # or a seeded random sample of live neurons per layer
    seed: int = 0
    group_size: int = 0  # neurons fitted together (shared forward passes); 0: sized to the device (8 on a CPU)
    scan: ScanConfig = field(default_factory=ScanConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # how the plan runs (none of these change a result)
    executor: str = "inprocess"  # inprocess | ray
    ray_address: str | None = None  # None: start a local Ray cluster
    workers: int = 0  # Ray actors (0: one per GPU, else 1; more than the GPUs share them); ignored in-process
    worker_threads: int = 0  # torch threads per CPU actor (0: the CPU count / workers)
    shard_windows: int = 1024  # corpus windows per scan shard
    precision: str = "float32"  # scan forward passes: float32 | bfloat16 | float16 (for GPUs)

    _RUN_DEFAULTS = {"executor": "inprocess", "ray_address": None, "workers": 0, "worker_threads": 0,
                     "shard_windows": 1024, "precision": "float32"}

    def to_dict(self) -> dict[str, Any]:
        d = {
            "layers": self.layers if isinstance(self.layers, str) else list(self.layers),
            "neurons": self.neurons, "sample": self.sample, "seed": self.seed,
            "group_size": self.group_size, "scan": self.scan.to_dict(), "fit": self.fit.to_dict(),
            "eval": self.eval.to_dict(),
        }
        # written only when set, so a request stored before these existed compares equal
        for k, default in self._RUN_DEFAULTS.items():
            if getattr(self, k) != default:
                d[k] = getattr(self, k)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BuildRequest":
        layers = d["layers"]
        return cls(
            layers=layers if isinstance(layers, str) else list(layers), neurons=d.get("neurons"),
            sample=d.get("sample"), seed=d.get("seed", 0),
            group_size=d.get("group_size", 8), scan=ScanConfig.from_dict(d.get("scan", {})),
            fit=FitConfig.from_dict(d.get("fit", {})), eval=EvalConfig.from_dict(d.get("eval", {})),
            **{k: d.get(k, default) for k, default in cls._RUN_DEFAULTS.items()},
        )

    def resolved_layers(self, n_layers: int) -> list[int]:
        return parse_layers(self.layers, n_layers)

    def validate(self, n_layers: int, d_mlp: int) -> None:
        if isinstance(self.layers, (list, tuple)) and not self.layers:
            raise ValueError("no layers asked: give at least one layer")
        self.resolved_layers(n_layers)
        if (self.neurons is None) == (self.sample is None):
            raise ValueError("give either neurons (explicit indices) or sample (a count per layer), not both or neither")
        if self.neurons is not None:
            if not self.neurons:
                raise ValueError("the neuron list is empty")
            for n in self.neurons:
                if not 0 <= n < d_mlp:
                    raise ValueError(f"neuron {n} out of range: layers have neurons 0..{d_mlp - 1}")
        if self.sample is not None and not 1 <= self.sample <= d_mlp:
            raise ValueError(f"sample must be between 1 and {d_mlp}, got {self.sample}")
        if self.group_size < 0:
            raise ValueError("group_size must be at least 1 (or 0: sized to the device)")
        if self.executor not in EXECUTORS:
            raise ValueError(f"unknown executor {self.executor!r}; use one of {list(EXECUTORS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; use one of {list(PRECISIONS)}")
        if self.shard_windows < 1:
            raise ValueError("shard_windows must be at least 1")
        if self.workers < 0 or self.worker_threads < 0:
            raise ValueError("workers and worker_threads must be >= 0 (0 = automatic)")


PARTIAL_EVENT_EVERY_S = 1.0  # the most often a scan unit reports its progress before its commit


@dataclass
class BuildEvent:
    """One progress event; `stage` is corpus | scan | merge | fit | done (of vocab.BUILD_STAGES).
    `done`/`total` count the stage's items (windows for the scan, neurons for the fit); `eta_s` is the stage's
    remaining time at this run's rate (None until measurable). ``partial``: progress inside a
    unit that is not committed yet (a kill now loses it; a resumed build scans it again)."""
    stage: str
    done: int
    total: int
    message: str = ""
    layer: int | None = None
    neuron: int | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    partial: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def plan_neurons(req: BuildRequest, max_activation: dict[int, np.ndarray]) -> list[tuple[int, int]]:
    """The (layer, neuron) keys a request covers. A sample draws among live neurons only
    (a_max > 0): a neuron that never fires on the corpus has nothing for a graph to explain."""
    keys: list[tuple[int, int]] = []
    for layer in sorted(max_activation):
        if req.neurons is not None:
            keys.extend((layer, n) for n in sorted(set(req.neurons)))
            continue
        live = np.flatnonzero(max_activation[layer] > 0)
        rng = np.random.default_rng([req.seed, layer])
        chosen = rng.choice(live, size=min(req.sample, live.size), replace=False)
        keys.extend((layer, int(n)) for n in sorted(chosen))
    return keys


def record_model_meta(ws: Workspace, model) -> None:
    """Stores what model-free readers (the report, a server without a model) need: n_layers,
    d_mlp, d_vocab, n_ctx and (once) the vocabulary's token strings."""
    for k, v in (("n_layers", model.n_layers), ("d_mlp", model.d_mlp), ("d_vocab", model.d_vocab),
                 ("n_ctx", model.n_ctx or 0)):
        if ws.get_meta(k) != str(v):
            ws.set_meta(k, str(v))
    if ws.get_meta("token_strings") is None:
        ws.set_meta("token_strings", json.dumps(model.token_strings()))


def make_corpus_windows(ws: Workspace, model, cfg: ScanConfig) -> np.ndarray:
    """The workspace's windows, or (without writing them) the corpus tokenised into windows."""
    from .corpus import load_texts, make_windows

    windows = ws.load_windows()
    if windows is not None:
        if windows.shape[1] != cfg.window_tokens:
            raise ValueError(
                f"workspace {ws.path} holds windows of {windows.shape[1]} tokens, the request asks for "
                f"{cfg.window_tokens}; use another workspace")
        return windows
    return make_windows(model, load_texts(ws.corpus), cfg.window_tokens)


def ensure_windows(ws: Workspace, model, cfg: ScanConfig, progress: Callable[[BuildEvent], None]) -> np.ndarray:
    if ws.load_windows() is None:
        progress(BuildEvent("corpus", 0, 1, f"tokenising corpus {ws.corpus!r}"))
    windows = make_corpus_windows(ws, model, cfg)
    if ws.load_windows() is None:
        ws.save_windows(windows)
        progress(BuildEvent("corpus", 1, 1, f"{windows.shape[0]} windows of {windows.shape[1]} tokens"))
    return windows


def heldout_window_ids(ws: Workspace, req: BuildRequest) -> np.ndarray:
    """Window ids the scan leaves out of every top-k: the evaluation's held-out ordinary text
    (fixed for the workspace at its first use)."""
    try:
        from .evaluate import heldout_window_ids as held
    except ImportError:  # an evaluation without held-out text
        return np.zeros(0, np.int64)
    return np.unique(np.asarray(held(ws, req.eval), dtype=np.int64))


def device_sizes(model_dims: dict[str, int], device: str, free_bytes: int | None, req: BuildRequest) -> dict[str, int]:
    """Work sizes for a device: neurons a fit group, tokens a fit forward pass, windows a scan
    batch. On a CPU the request's. On a GPU the fit's batches take about a quarter of the free
    memory (activations of one layer at a time: no gradients), groups grow so their passes stay
    full, and scan batches grow to 256 windows; an explicit group_size is kept."""
    if not device.startswith("cuda"):
        return {"group_size": req.group_size or 8, "batch_tokens": req.fit.batch_tokens,
                "scan_batch": req.scan.batch_size}
    d_model, d_mlp = model_dims.get("d_model", 1024), model_dims.get("d_mlp", 4096)
    heads, t = model_dims.get("n_heads", 16), req.scan.window_tokens
    per_token = 4 * (16 * d_model + 4 * d_mlp + 2 * heads * t)  # float32 bytes alive a token
    free = free_bytes if free_bytes else 16 * 2**30
    batch_tokens = int(min(max(free // 4 // per_token, req.fit.batch_tokens), GPU_MAX_BATCH_TOKENS))
    # a neuron's fit runs about 40 windows of examples per stage: enough neurons to fill a pass
    group = req.group_size or int(min(max(batch_tokens // (40 * t), GPU_GROUP_SIZE), GPU_MAX_GROUP_SIZE))
    return {"group_size": group, "batch_tokens": batch_tokens, "scan_batch": max(req.scan.batch_size, GPU_SCAN_BATCH)}


def model_dims(model) -> dict[str, int]:
    cfg = model.bridge.cfg
    return {k: int(getattr(cfg, k)) for k in ("d_model", "d_mlp", "n_heads") if getattr(cfg, k, None)}


def resolve_fit_sizes(req: BuildRequest, device: str) -> tuple[int, int]:
    """(neurons a fit group, tokens a forward pass) on ``device`` (see :func:`device_sizes`)."""
    s = device_sizes({}, device, None, req)
    return s["group_size"], s["batch_tokens"]


def _examples(tokens: np.ndarray, acts: np.ndarray) -> list[dict[str, Any]]:
    return [{"token_ids": t.tolist(), "activations": [round(float(x), 6) for x in a]} for t, a in zip(tokens, acts)]


def compute_group(model, layer: int, neurons: list[int], windows: np.ndarray, max_activation: list[float],
                  top_window_ids: list[list[int]], req: BuildRequest, job_id: str | None,
                  heldout: np.ndarray | None = None) -> list[NeuronRecord]:
    """Fits and evaluates a group of neurons of one layer from their scan rows (a_max and top
    window ids, one per neuron); returns the records without committing them. ``heldout``: the
    windows no fit may learn from (the evaluation's ordinary text)."""
    from .activations import shared_activations

    # the fit asks for the true activations of the training windows again: read them back
    with shared_activations():
        return _compute_group(model, layer, neurons, windows, max_activation, top_window_ids, req, job_id, heldout)


def _compute_group(model, layer, neurons, windows, max_activation, top_window_ids, req, job_id, heldout):
    from .activations import ActivationRunner, forward_tokens
    from .evaluate import evaluate_neuron, split_train_test
    from .fit import fit_neurons

    t0 = time.perf_counter()
    tokens0 = forward_tokens()[0]
    amax = {n: float(a) for n, a in zip(neurons, max_activation)}
    ex_tokens: dict[int, np.ndarray] = {}
    for n, ids in zip(neurons, top_window_ids):
        ids = np.asarray(ids, dtype=np.int64)
        ex_tokens[n] = windows[ids[ids >= 0][: min(req.scan.k, 2 * req.eval.n_train)]]  # the paper's windows
    # True activations of every neuron on its examples: one runner for the group, so windows that
    # several neurons share run once and the passes are full.
    seqs = [t for n in neurons for t in ex_tokens[n]]
    owners = [n for n in neurons for _ in ex_tokens[n]]
    acts = iter(ActivationRunner(model, layer, req.fit.batch_tokens).run(seqs, owners))
    # a neuron that never fires on the corpus (a_max <= 0) has nothing for a graph to explain: it
    # gets an empty graph and its raw activations (no fires), not a fit
    live = [n for n in neurons if amax[n] > 0]
    scale = {n: amax[n] if amax[n] > 0 else 1.0 for n in neurons}
    ex_acts = {n: np.array([next(acts) for _ in ex_tokens[n]], dtype=np.float32).reshape(ex_tokens[n].shape) / scale[n]
               for n in neurons}
    splits = {n: split_train_test(len(ex_tokens[n]), req.eval.n_train, req.eval.seed, layer, n) for n in neurons}
    train = {n: [ex_tokens[n][i] for i in splits[n][0]] for n in neurons}
    tops = {n: np.asarray(ids, dtype=np.int64) for n, ids in zip(neurons, top_window_ids)}
    extra = None
    with contextlib.suppress(ImportError):
        from .fit import training_pool

        # the paper's train + test windows are the first 2 x n_train ranks; further ranks (a scan
        # with k above that) are extra training windows for a fit method that learns from more
        n_paper = {n: int((tops[n] >= 0).sum().clip(max=min(req.scan.k, 2 * req.eval.n_train))) for n in neurons}
        extra = training_pool(windows, tops, neurons, min(n_paper.values()),
                              {n: tops[n][: n_paper[n]][splits[n][1]].tolist() for n in neurons},
                              heldout if heldout is not None else ())
    fitted = {}
    if live:
        train_live, amax_live = {n: train[n] for n in live}, {n: amax[n] for n in live}
        fitted = (fit_neurons(model, layer, live, train_live, amax_live, req.fit, extra=extra) if extra is not None
                  else fit_neurons(model, layer, live, train_live, amax_live, req.fit))
    seconds = (time.perf_counter() - t0) / len(neurons)
    fit_tokens = (forward_tokens()[0] - tokens0) / len(neurons)
    records = []
    for n in neurons:
        tr, te = splits[n]
        result = fitted[n] if n in fitted else _dead_result(model, layer, n, amax[n])
        train_pairs = [(ex_tokens[n][i], ex_acts[n][i]) for i in tr] + [(t, a) for _, t, a in result.extra_train]
        test_pairs = [(ex_tokens[n][i], ex_acts[n][i]) for i in te]
        metrics = evaluate_neuron(result.graph, train_pairs, test_pairs, req.eval)
        stats = dict(result.stats)
        stats["seconds_per_neuron_in_group"] = seconds
        stats["fit_tokens"] = fit_tokens  # forward-pass tokens a neuron of the group cost
        examples = {
            "layer": layer, "neuron": n, "max_activation": amax[n],
            # + the windows the fit learnt from beyond them: the baselines are fitted on the same
            "train": _examples(ex_tokens[n][tr], ex_acts[n][tr])
            + _examples([t for _, t, _ in result.extra_train], [a for _, _, a in result.extra_train]),
            "test": _examples(ex_tokens[n][te], ex_acts[n][te]),
        }
        records.append(NeuronRecord(layer, n, amax[n], result.graph.to_bytes(), examples, stats, metrics, job_id))
    return records


def _dead_result(model, layer: int, neuron: int, amax: float):
    import n2g_fast

    from .fit import FitResult

    graph = n2g_fast.NeuronGraph(model.name, layer, neuron, model.hook, amax)
    graph.finalize()
    return FitResult(graph, {"dead": True, "n_paths": 0, "n_nodes": 0})


def build_group(ws: Workspace, model, layer: int, neurons: list[int], windows: np.ndarray,
                scan: dict[str, Any], req: BuildRequest, job_id: str | None) -> list[NeuronRecord]:
    """Fits, evaluates and commits a group of neurons of one layer (outside any plan)."""
    records = compute_group(model, layer, neurons, windows, [float(scan["max_activation"][n]) for n in neurons],
                            [scan["top_window_ids"][n][:req.scan.k].tolist() for n in neurons], req, job_id)
    for rec in records:
        ws.put_neuron(rec)
    return records


class _Rate:
    """Items a second in this run, for a stage's ETA."""

    def __init__(self, done: int) -> None:
        self.t0, self.done0 = time.perf_counter(), done

    def eta(self, done: int, total: int) -> float | None:
        dt, dn = time.perf_counter() - self.t0, done - self.done0
        return None if dn <= 0 or dt <= 0 else (total - done) * dt / dn


def make_executor(req: BuildRequest, model, model_lock: ContextManager | None = None):
    from .build.executors import InProcessExecutor, RayExecutor, model_spec

    if req.executor == "ray":
        return RayExecutor(model_spec(model), address=req.ray_address, workers=req.workers,
                           threads=req.worker_threads)
    return InProcessExecutor(model, model_lock)


def _device_memory(req: BuildRequest, model, get_executor) -> tuple[str, int | None]:
    """(device the units run on, its free bytes or None)."""
    if req.executor == "ray":
        ex = get_executor()
        return ex.device, ex.free_device_bytes()
    if model.device.type == "cuda":
        import torch

        return "cuda", int(torch.cuda.mem_get_info(model.device)[0])
    return str(model.device), None


def _scan_identity(req: BuildRequest, windows: np.ndarray, excluded: np.ndarray) -> str:
    return scan_key(windows.shape[0], windows.shape[1], req.scan.k, excluded)


def _stored_scans(ws: Workspace, layers: list[int], windows: np.ndarray, excluded: np.ndarray) -> dict[int, dict]:
    """The stored scans of ``layers`` made on these windows with these excluded, whatever their k
    (a_max does not depend on k; the best k' < k windows of a k-scan are the k'-scan's, exactly)."""
    keys = ws.get_meta_json("scan_keys", {}) or {}
    out = {}
    for l in layers:
        s = ws.load_layer_scan(l)
        if s is None:
            continue
        own = scan_key(windows.shape[0], windows.shape[1], s["top_window_ids"].shape[1], excluded)
        if keys.get(str(l), own) == own:
            out[l] = s
    return out


def _layers_to_scan(stored: dict[int, dict], layers: list[int], k: int) -> list[int]:
    """Layers with no usable stored scan (`_stored_scans`), or one of fewer than k windows a
    neuron (a larger k serves)."""
    return [l for l in layers if l not in stored or stored[l]["top_window_ids"].shape[1] < k]


def keys_known_before_scan(req: BuildRequest, layers: list[int], stored: dict[int, dict]) -> list[tuple[int, int]]:
    """The keys of a request known without scanning: its explicit neurons, or its sample on the
    layers a usable stored scan covers. Their fit settings are checked before any scan runs."""
    if req.neurons is not None:
        return plan_neurons(req, dict.fromkeys(layers))  # (explicit neurons need no a_max)
    return plan_neurons(req, {l: s["max_activation"] for l, s in stored.items()})


class BuiltWithOtherSettings(ValueError):
    """A build asks other fit settings for a neuron the workspace already holds a graph of."""


# Fit settings that change how a fit runs, not the graph it makes (sized to the device per build)
_RUN_ONLY_FIT_SETTINGS = ("batch_tokens",)


def check_built_settings(ws, keys: Sequence[tuple[int, int]], fit: FitConfig) -> None:
    """A build keeps the graphs already built among ``keys``: raises ValueError when one was built
    with other fit settings (e.g. --method paper, then calibrated), which would otherwise be kept
    silently beside the new ones."""
    def result_settings(d: dict[str, Any]) -> dict[str, Any]:
        try:  # older records: fill the fields added since with their defaults
            d = FitConfig.from_dict(d).to_dict()
        except (ValueError, TypeError):
            pass
        return {k: v for k, v in d.items() if k not in _RUN_ONLY_FIT_SETTINGS}

    want = result_settings(fit.to_dict())
    for text, built in sorted(ws.fit_settings(keys).items(), key=lambda kv: min(kv[1])):
        stored = json.loads(text) if text else None
        if not isinstance(stored, dict):  # a record from before settings were recorded
            continue
        got = result_settings(stored)
        if got != want:
            layer, neuron = min(built)
            diff = [k for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
            shown = ", ".join(f"{k}={got.get(k)!r} (now {want.get(k)!r})" for k in diff[:4])
            more = f" (and {len(built) - 1} more)" if len(built) > 1 else ""
            raise BuiltWithOtherSettings(f"neuron {layer}:{neuron}{more} was built with other fit settings: {shown}"
                             f"{' ...' if len(diff) > 4 else ''}. A workspace keeps one graph a neuron: build these "
                             f"settings in another workspace, or leave the built neurons out")


def run_build(ws: Workspace, model, req: BuildRequest, *, job_id: str | None = None,
              progress: Callable[[BuildEvent], None] | None = None,
              cancel: threading.Event | None = None,
              model_lock: ContextManager | None = None,
              executor=None) -> list[tuple[int, int]]:
    """Runs (or resumes) a build; returns the keys it covers. Raises BuildCancelled if cancelled.

    `model_lock` (e.g. the server's model lock) is held around each piece of in-process model
    work (corpus windows, one scan shard, one neuron group) and released between them, so other
    users of the model interleave with a long build. `executor` overrides the request's (an
    executor passed in is left open, so several builds can share one Ray cluster)."""
    from .build.executors import Unit
    from .scan import LayerScan, merge_partials

    progress = progress or (lambda e: None)
    lock = model_lock if model_lock is not None else contextlib.nullcontext()
    req.validate(model.n_layers, model.d_mlp)
    layers = req.resolved_layers(model.n_layers)
    start = time.perf_counter()
    with lock:
        windows = ensure_windows(ws, model, req.scan, progress)
    excluded = heldout_window_ids(ws, req)
    store = BuildStore(ws)
    key = _scan_identity(req, windows, excluded)
    plan_id = digest({"request": {k: v for k, v in req.to_dict().items() if k in ("neurons", "sample", "seed", "group_size")},
                      "layers": layers, "shard_windows": req.shard_windows, "scan": key})
    store.ensure_plan(plan_id, req.to_dict(), key)
    own_executor = executor is None
    ex = None

    def get_executor():
        nonlocal ex
        if ex is None:
            ex = executor if executor is not None else make_executor(req, model, model_lock)
        return ex

    def on_start(unit: Unit, worker: str) -> None:
        store.mark_started(plan_id, unit.unit_id, worker)

    stored = _stored_scans(ws, layers, windows, excluded)
    # a built neuron with other fit settings refuses the build before hours of scanning, not after
    check_built_settings(ws, keys_known_before_scan(req, layers, stored), req.fit)
    try:
        # -- scan shards ------------------------------------------------------------------------
        missing = _layers_to_scan(stored, layers, req.scan.k)
        scan_cfg = req.scan
        if missing and (req.executor == "ray" or model.device.type == "cuda"):
            scan_cfg = dataclasses.replace(req.scan, batch_size=device_sizes(
                {}, *_device_memory(req, model, get_executor), req)["scan_batch"])
        ranges = shard_ranges(windows.shape[0], req.shard_windows)
        if missing:
            have = {l: store.partial_ranges(key, l) for l in missing}
            shards = [ScanShard(a, b, tuple(l for l in missing if (a, b) not in have[l])) for a, b in ranges]
            store.add_units(plan_id, "scan", [(s.unit_id, s.to_dict()) for s in shards])
            todo = [s for s in shards if s.layers]
            total_w = windows.shape[0]
            done_w = total_w - sum(s.stop - s.start for s in todo)
            rate = _Rate(done_w)
            progress(BuildEvent("scan", done_w, total_w, f"{len(todo)} of {len(shards)} shards to scan for layers "
                                f"{missing[0]}..{missing[-1]}", elapsed_s=time.perf_counter() - start))
            units = [Unit(s.unit_id, "scan", {"start": s.start, "stop": s.stop, "layers": list(s.layers),
                                              "scan": scan_cfg.to_dict(), "precision": req.precision,
                                              "exclude": excluded[(excluded >= s.start) & (excluded < s.stop)]})
                     for s in todo]
            if units:
                last = [0.0]

                def in_shard(unit: Unit, done: int, total: int) -> None:
                    now = time.perf_counter()
                    if now - last[0] < PARTIAL_EVENT_EVERY_S or total <= 0:
                        return
                    last[0] = now
                    p = unit.payload
                    d = done_w + (p["stop"] - p["start"]) * done // total
                    progress(BuildEvent("scan", d, total_w, f"shard {unit.unit_id}", elapsed_s=now - start,
                                        eta_s=rate.eta(d, total_w), partial=True))

                for r in get_executor().run(units, windows, cancel=cancel, on_start=on_start, on_progress=in_shard):
                    p = r.unit.payload
                    store.commit_scan_unit(plan_id, r.unit.unit_id, key, p["start"], p["stop"], r.value,
                                           r.seconds, r.worker)
                    done_w += p["stop"] - p["start"]
                    progress(BuildEvent("scan", done_w, total_w, f"shard {r.unit.unit_id}",
                                        elapsed_s=time.perf_counter() - start, eta_s=rate.eta(done_w, total_w)))
            for l in missing:  # every shard of the layer is in: merge it into the layer's scan
                parts = {(p["start"], p["stop"]): p for p in store.load_partials(key, l)}
                lost = [r for r in ranges if r not in parts]
                if lost:
                    raise RuntimeError(f"layer {l}: scan shards {lost[:3]} have no stored result")
                merged = merge_partials([LayerScan(l, parts[r]["max_activation"], parts[r]["top_window_ids"],
                                                   parts[r]["top_scores"], parts[r]["seconds"]) for r in ranges], req.scan.k)
                ws.save_layer_scan(l, merged.max_activation, merged.top_window_ids, merged.top_scores, merged.seconds)
                scan_keys = ws.get_meta_json("scan_keys", {}) or {}
                scan_keys[str(l)] = key
                ws.set_meta_json("scan_keys", scan_keys)
                store.delete_partials(key, l)
            progress(BuildEvent("merge", len(missing), len(missing), f"layers {missing} scanned",
                                elapsed_s=time.perf_counter() - start))
        for l in set(layers) - set(missing):  # partials left by a run killed after its merge
            if store.partial_ranges(key, l):
                store.delete_partials(key, l)
        scans = {l: stored[l] if l not in missing else ws.load_layer_scan(l) for l in layers}

        # -- fit groups -------------------------------------------------------------------------
        keys = plan_neurons(req, {l: s["max_activation"] for l, s in scans.items()})
        check_built_settings(ws, keys, req.fit)
        sizes: dict[str, int] = {}
        if not store.fit_planned(plan_id) or any(u.state != "done" for u in store.units(plan_id, "fit")):
            # (a Ray cluster is started only when there is work for it)
            sizes = device_sizes(model_dims(model), *_device_memory(req, model, get_executor), req)
        if not store.fit_planned(plan_id):
            built = set(ws.built_keys())
            groups = fit_groups([k for k in keys if k not in built], sizes["group_size"])
            store.add_units(plan_id, "fit", [(g.unit_id, g.to_dict()) for g in groups], fit_planned=True)
        fit_units = [u for u in store.units(plan_id, "fit") if u.state != "done"]
        fit_req = dataclasses.replace(req, fit=dataclasses.replace(req.fit, batch_tokens=sizes.get(
            "batch_tokens", req.fit.batch_tokens)))
        done = already = store.count_built(keys)
        if job_id is not None:
            ws.update_job(job_id, state="running", total=len(keys), done=done)
        rate = _Rate(done)
        progress(BuildEvent("fit", done, len(keys), f"{len(keys) - done} neurons to build in {len(fit_units)} groups",
                            elapsed_s=time.perf_counter() - start))
        built = set(ws.built_keys())
        units = []
        for u in fit_units:
            g = FitGroup.from_dict(u.spec)
            neurons = [n for n in g.neurons if (g.layer, n) not in built]  # built since by another job
            if not neurons:
                store.mark_done(plan_id, u.unit_id)
                continue
            s = scans[g.layer]
            units.append(Unit(u.unit_id, "fit", {
                "layer": g.layer, "neurons": neurons, "request": fit_req.to_dict(), "job_id": job_id,
                "max_activation": [float(s["max_activation"][n]) for n in neurons],
                "top_window_ids": [s["top_window_ids"][n][:req.scan.k].tolist() for n in neurons],
                "heldout": excluded}))
        if units:
            for r in get_executor().run(units, windows, cancel=cancel, on_start=on_start):
                store.commit_fit_unit(plan_id, r.unit.unit_id, r.value, r.seconds, r.worker)
                done = store.count_built(keys)
                p = r.unit.payload
                progress(BuildEvent("fit", done, len(keys), f"layer {p['layer']}: built {p['neurons']}", p["layer"],
                                    p["neurons"][-1], elapsed_s=time.perf_counter() - start,
                                    eta_s=rate.eta(done, len(keys))))
    finally:
        if own_executor and ex is not None:
            ex.close()
    progress(BuildEvent("done", done, len(keys), f"build finished: {done - already} built now, {already} before",
                        elapsed_s=time.perf_counter() - start))
    return keys
