"""The build runner: corpus -> dataset scan -> per-neuron fit and evaluation -> workspace.

A build is described by a `BuildRequest` and runs as a persisted plan of work units
(`build.plan`): scan shards (a range of corpus windows, every layer still to scan in one forward
pass stopping at the deepest) and fit groups (neurons of one layer, fitted together so their
forward passes are shared). Each unit's result is committed with its `done` mark in one
transaction, so rerunning the same request after a crash or a SIGKILL runs only the units not
done: nothing is lost and nothing is built twice. Shard results are partial top-k per layer,
merged exactly into the layer's scan once every shard is in.

Units run on an executor (`executors`): in this process (default) or on Ray actors, each fit
group through `compute.compute_group`; the driver (this module) is the only writer to the
workspace. What is asked (`BuildRequest`) and the progress events live in `request`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from typing import Any, Callable, ContextManager, Sequence

import numpy as np

from ..config import FitConfig, ScanConfig
from ..workspace import BuildStore, Workspace
from .plan import FitGroup, ScanShard, digest, fit_groups, scan_key, shard_ranges
from .request import BuildEvent, BuildRequest, device_sizes, model_dims, plan_neurons

PARTIAL_EVENT_EVERY_S = 1.0  # the most often a scan unit reports its progress before its commit


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
    from ..corpus import load_texts, make_windows

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
        from ..evaluate import heldout_window_ids as held
    except ImportError:  # an evaluation without held-out text
        return np.zeros(0, np.int64)
    return np.unique(np.asarray(held(ws, req.eval), dtype=np.int64))


class _Rate:
    """Items a second in this run, for a stage's ETA."""

    def __init__(self, done: int) -> None:
        self.t0, self.done0 = time.perf_counter(), done

    def eta(self, done: int, total: int) -> float | None:
        dt, dn = time.perf_counter() - self.t0, done - self.done0
        return None if dn <= 0 or dt <= 0 else (total - done) * dt / dn


def make_executor(req: BuildRequest, model, model_lock: ContextManager | None = None):
    from .executors import InProcessExecutor, RayExecutor, model_spec

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
    from .executors import Unit
    from ..scan import LayerScan, merge_partials

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
