"""The build runner: corpus -> dataset scan -> per-neuron fit and evaluation -> workspace.

A build is described by a `BuildRequest`. `run_build` is resumable by construction: it skips
every neuron already committed to the workspace, and commits each neuron as soon as it is built,
so re-running the same request after a crash (or a SIGKILL) finishes the job with nothing lost or
built twice. Neurons of one layer are fitted in groups so their forward passes are shared.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ContextManager

import numpy as np

from .config import EvalConfig, FitConfig, ScanConfig
from .workspace import NeuronRecord, Workspace


class BuildCancelled(Exception):
    """Raised inside the runner when the job's cancel event is set."""


@dataclass
class BuildRequest:
    layers: list[int]
    neurons: list[int] | None = None  # the same neuron indices in every layer asked
    sample: int | None = None  # or a seeded random sample of live neurons per layer
    seed: int = 0
    group_size: int = 8  # neurons fitted together (shared forward passes)
    scan: ScanConfig = field(default_factory=ScanConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers), "neurons": self.neurons, "sample": self.sample, "seed": self.seed,
            "group_size": self.group_size, "scan": self.scan.to_dict(), "fit": self.fit.to_dict(),
            "eval": self.eval.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BuildRequest":
        return cls(
            layers=list(d["layers"]), neurons=d.get("neurons"), sample=d.get("sample"), seed=d.get("seed", 0),
            group_size=d.get("group_size", 8), scan=ScanConfig.from_dict(d.get("scan", {})),
            fit=FitConfig.from_dict(d.get("fit", {})), eval=EvalConfig.from_dict(d.get("eval", {})),
        )

    def validate(self, n_layers: int, d_mlp: int) -> None:
        if not self.layers:
            raise ValueError("no layers asked: give at least one layer")
        for layer in self.layers:
            if not 0 <= layer < n_layers:
                raise ValueError(f"layer {layer} out of range: the model has layers 0..{n_layers - 1}")
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
        if self.group_size < 1:
            raise ValueError("group_size must be at least 1")


@dataclass
class BuildEvent:
    """One progress event; `stage` is corpus | scan | fit | done."""
    stage: str
    done: int
    total: int
    message: str = ""
    layer: int | None = None
    neuron: int | None = None
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def plan_neurons(req: BuildRequest, max_activation: dict[int, np.ndarray]) -> list[tuple[int, int]]:
    """The (layer, neuron) keys a request covers. A sample draws among live neurons only
    (a_max > 0): a neuron that never fires on the corpus has nothing for a graph to explain."""
    keys: list[tuple[int, int]] = []
    for layer in sorted(set(req.layers)):
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
    d_mlp, d_vocab and (once) the vocabulary's token strings."""
    for k, v in (("n_layers", model.n_layers), ("d_mlp", model.d_mlp), ("d_vocab", model.d_vocab)):
        if ws.get_meta(k) != str(v):
            ws.set_meta(k, str(v))
    if ws.get_meta("token_strings") is None:
        ws.set_meta("token_strings", json.dumps(model.token_strings()))


def ensure_windows(ws: Workspace, model, cfg: ScanConfig, progress: Callable[[BuildEvent], None]) -> np.ndarray:
    from .corpus import load_texts, make_windows

    windows = ws.load_windows()
    if windows is not None:
        if windows.shape[1] != cfg.window_tokens:
            raise ValueError(
                f"workspace {ws.path} holds windows of {windows.shape[1]} tokens, the request asks for "
                f"{cfg.window_tokens}; use another workspace")
        return windows
    progress(BuildEvent("corpus", 0, 1, f"tokenising corpus {ws.corpus!r}"))
    windows = make_windows(model, load_texts(ws.corpus), cfg.window_tokens)
    ws.save_windows(windows)
    progress(BuildEvent("corpus", 1, 1, f"{windows.shape[0]} windows of {windows.shape[1]} tokens"))
    return windows


def ensure_scans(ws: Workspace, model, windows: np.ndarray, layers: list[int], cfg: ScanConfig,
                 progress: Callable[[BuildEvent], None]) -> dict[int, dict[str, Any]]:
    from .scan import scan_layers

    scans = {l: ws.load_layer_scan(l) for l in layers}
    stale = [l for l, s in scans.items() if s is not None and s["top_window_ids"].shape[1] < cfg.k]
    missing = sorted(l for l, s in scans.items() if s is None) + stale
    if missing:
        progress(BuildEvent("scan", 0, len(missing), f"scanning {windows.shape[0]} windows for layers {missing}"))
        t0 = time.perf_counter()
        result = scan_layers(model, windows, missing, cfg)
        seconds = time.perf_counter() - t0
        for layer, s in result.items():
            ws.save_layer_scan(layer, s.max_activation, s.top_window_ids, s.top_scores, seconds)
            scans[layer] = ws.load_layer_scan(layer)
        progress(BuildEvent("scan", len(missing), len(missing), f"scan took {seconds:.1f} s"))
    return scans


def _examples(tokens: np.ndarray, acts: np.ndarray) -> list[dict[str, Any]]:
    return [{"token_ids": t.tolist(), "activations": [round(float(x), 6) for x in a]} for t, a in zip(tokens, acts)]


def build_group(ws: Workspace, model, layer: int, neurons: list[int], windows: np.ndarray,
                scan: dict[str, Any], req: BuildRequest, job_id: str | None) -> list[NeuronRecord]:
    """Fits and evaluates a group of neurons of one layer, committing each as it is done."""
    from .activations import ActivationRunner
    from .evaluate import evaluate_neuron, split_train_test
    from .fit import fit_neurons

    t0 = time.perf_counter()
    amax = {n: float(scan["max_activation"][n]) for n in neurons}
    ex_tokens: dict[int, np.ndarray] = {}
    for n in neurons:
        ids = scan["top_window_ids"][n]
        ex_tokens[n] = windows[ids[ids >= 0][: req.scan.k]]
    # True activations of every neuron on its examples: one runner for the group, so windows that
    # several neurons share run once and the passes are full.
    seqs = [t for n in neurons for t in ex_tokens[n]]
    owners = [n for n in neurons for _ in ex_tokens[n]]
    acts = iter(ActivationRunner(model, layer, req.fit.batch_tokens).run(seqs, owners))
    ex_acts = {n: np.array([next(acts) for _ in ex_tokens[n]], dtype=np.float32).reshape(ex_tokens[n].shape) / amax[n]
               for n in neurons}
    splits = {n: split_train_test(len(ex_tokens[n]), req.eval.n_train, req.eval.seed, layer, n) for n in neurons}
    train = {n: [ex_tokens[n][i] for i in splits[n][0]] for n in neurons}
    fitted = fit_neurons(model, layer, neurons, train, amax, req.fit)
    seconds = (time.perf_counter() - t0) / len(neurons)
    records = []
    for n in neurons:
        tr, te = splits[n]
        train_pairs = [(ex_tokens[n][i], ex_acts[n][i]) for i in tr]
        test_pairs = [(ex_tokens[n][i], ex_acts[n][i]) for i in te]
        result = fitted[n]
        metrics = evaluate_neuron(result.graph, train_pairs, test_pairs, req.eval)
        stats = dict(result.stats)
        stats["seconds_per_neuron_in_group"] = seconds
        examples = {
            "layer": layer, "neuron": n, "max_activation": amax[n],
            "train": _examples(ex_tokens[n][tr], ex_acts[n][tr]),
            "test": _examples(ex_tokens[n][te], ex_acts[n][te]),
        }
        rec = NeuronRecord(layer, n, amax[n], result.graph.to_bytes(), examples, stats, metrics, job_id)
        ws.put_neuron(rec)
        records.append(rec)
    return records


def run_build(ws: Workspace, model, req: BuildRequest, *, job_id: str | None = None,
              progress: Callable[[BuildEvent], None] | None = None,
              cancel: threading.Event | None = None,
              model_lock: ContextManager | None = None) -> list[tuple[int, int]]:
    """Runs (or resumes) a build; returns the keys it covers. Raises BuildCancelled if cancelled.

    `model_lock` (e.g. the server's model lock) is held around each piece of model work (corpus
    windows, the scan, one neuron group) and released between groups, so other users of the model
    interleave with a long build."""
    progress = progress or (lambda e: None)
    lock = model_lock if model_lock is not None else contextlib.nullcontext()
    req.validate(model.n_layers, model.d_mlp)
    start = time.perf_counter()
    with lock:
        windows = ensure_windows(ws, model, req.scan, progress)
    with lock:
        scans = ensure_scans(ws, model, windows, sorted(set(req.layers)), req.scan, progress)
    keys = plan_neurons(req, {l: s["max_activation"] for l, s in scans.items()})
    todo = [k for k in keys if not ws.has_neuron(*k)]
    done = len(keys) - len(todo)
    if job_id is not None:
        ws.update_job(job_id, state="running", total=len(keys), done=done)
    progress(BuildEvent("fit", done, len(keys), f"{len(todo)} neurons to build", elapsed_s=time.perf_counter() - start))
    for layer in sorted({l for l, _ in todo}):
        layer_todo = [n for l, n in todo if l == layer]
        for i in range(0, len(layer_todo), req.group_size):
            if cancel is not None and cancel.is_set():
                raise BuildCancelled()
            group = layer_todo[i: i + req.group_size]
            with lock:
                build_group(ws, model, layer, group, windows, scans[layer], req, job_id)
            done += len(group)
            progress(BuildEvent("fit", done, len(keys), f"layer {layer}: built {group}", layer, group[-1],
                                elapsed_s=time.perf_counter() - start))
    progress(BuildEvent("done", done, len(keys), "build finished", elapsed_s=time.perf_counter() - start))
    return keys
