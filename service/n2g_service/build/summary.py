"""The dry run: what a build request plans (units, tokens, layers) and how long it should take
here, from a short calibration of the forward pass on this machine. Writes nothing."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

@dataclass
class PlanSummary:
    layers: list[int]
    n_windows: int  # corpus windows
    excluded_windows: int  # held out from the scan (the evaluation's ordinary text)
    window_tokens: int
    layers_to_scan: list[int]
    scan_shards: int  # shards still to scan
    scan_tokens: int  # tokens still to run through the scan's forward pass
    deepest_layer: int | None  # where the scan's forward pass stops
    neurons: int  # neurons the request covers (a sample: at most this many, live ones only)
    neurons_built: int
    fit_groups: int  # groups still to fit
    group_size: int
    method: str = "calibrated"  # the fit method
    # calibration (None without it)
    forward_tokens_per_s: dict[int, float] = field(default_factory=dict)  # by depth
    scan_seconds: float | None = None
    fit_seconds_per_neuron: dict[int, float] = field(default_factory=dict)
    fit_seconds: float | None = None
    total_seconds: float | None = None
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        def hms(s: float | None) -> str:
            if s is None:
                return "?"
            s = int(round(s))
            return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"

        lines = [
            f"layers        {_span(self.layers)} ({len(self.layers)})",
            f"corpus        {self.n_windows} windows x {self.window_tokens} tokens "
            f"({self.excluded_windows} held out of the scan)",
            f"scan          {self.scan_shards} shards, {self.scan_tokens:,} tokens, layers {_span(self.layers_to_scan)}"
            + (f", forward pass to layer {self.deepest_layer}" if self.deepest_layer is not None else "")
            + f"  ~{hms(self.scan_seconds)}",
            f"fit           {self.neurons - self.neurons_built} of {self.neurons} neurons to build in "
            f"{self.fit_groups} groups of {self.group_size}, {self.method} fit  ~{hms(self.fit_seconds)}",
        ]
        if self.forward_tokens_per_s:
            lines.append("forward       " + ", ".join(f"layer {l}: {v:,.0f} tok/s"
                                                       for l, v in sorted(self.forward_tokens_per_s.items())))
        lines.append(f"total         ~{hms(self.total_seconds)} on {self.device}")
        return "\n".join(lines)


def _span(layers: list[int]) -> str:
    if not layers:
        return "-"
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def _forward_rate(model, windows: np.ndarray, layer: int, repeats: int = 2) -> float:
    """Tokens/s of a bare forward pass to ``layer`` (best of ``repeats`` after a warm-up)."""
    import torch

    from ..activations import forward_to_layer

    toks = torch.from_numpy(np.ascontiguousarray(windows))
    forward_to_layer(model, toks, layer)
    best = float("inf")
    for _ in range(repeats):
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        forward_to_layer(model, toks, layer)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return toks.numel() / best


def _fit_tokens_by_layer(ws, method, layers: list[int]) -> dict[int, float]:
    """Forward tokens a neuron's fit costs with ``method`` (a FitMethod) at each of ``layers``:
    the median over the workspace's neurons of that layer built with it, else over those of the
    nearest layer that has some (the cost grows with depth: the paper fit's from ~1,500 tokens at
    layer 0 to ~9,000 at layer 13 of SmolLM2), else the method's figure."""
    recorded: dict[int, list[float]] = {}
    for layer, m, tokens in ws.fit_costs():
        if tokens and (m or "paper") == method.name:
            recorded.setdefault(layer, []).append(tokens)
    median = {l: float(np.median(v)) for l, v in recorded.items()}
    if not median:
        return {l: float(method.fit_tokens_per_neuron) for l in layers}
    return {l: median[min(median, key=lambda r: (abs(r - l), -r))] for l in layers}  # a tie: the deeper


def plan_summary(ws, model, req, *, calibrate: bool = True, calibration_windows: int = 16) -> PlanSummary:
    """The plan of ``req`` on workspace ``ws`` (what is left to do) and, with ``calibrate``, a
    time estimate from bare forward passes of ``calibration_windows`` windows at a few depths on
    this machine (seconds). Writes nothing to the workspace."""
    from ..fit import fit_method
    from ..workspace import BuildStore
    from .plan import fit_groups, shard_ranges
    from .request import resolve_fit_sizes
    from .runner import (_layers_to_scan, _scan_identity, _stored_scans, check_built_settings,
                         keys_known_before_scan, make_corpus_windows)

    req.validate(model.n_layers, model.d_mlp)
    layers = req.resolved_layers(model.n_layers)
    windows = make_corpus_windows(ws, model, req.scan)
    try:
        from ..evaluate import heldout_window_ids

        rec = ws.load_heldout_windows()  # the recorded set, else the one a build would record
        excluded = rec["ids"] if rec is not None else heldout_window_ids(int(windows.shape[0]), req.eval)
    except ImportError:
        excluded = np.zeros(0, np.int64)
    excluded = np.asarray(excluded, np.int64)
    key = _scan_identity(req, windows, excluded)
    store = BuildStore(ws, create=False)
    stored = _stored_scans(ws, layers, windows, excluded)
    check_built_settings(ws, keys_known_before_scan(req, layers, stored), req.fit)
    missing = _layers_to_scan(stored, layers, req.scan.k)
    shards, scan_windows = 0, 0
    for a, b in shard_ranges(windows.shape[0], req.shard_windows):
        todo = [l for l in missing if (a, b) not in store.partial_ranges(key, l)]
        if todo:
            shards += 1
            scan_windows += (b - a) - int(((excluded >= a) & (excluded < b)).sum())
    group_size, _ = resolve_fit_sizes(req, str(model.device))
    per_layer = len(set(req.neurons)) if req.neurons is not None else req.sample
    keys = [(l, n) for l in layers for n in (sorted(set(req.neurons)) if req.neurons is not None else [])]
    built = set(ws.built_keys())
    if req.neurons is not None:
        todo_keys = [k for k in keys if k not in built]
        n_built = len(keys) - len(todo_keys)
        n_groups = len(fit_groups(todo_keys, group_size))
        todo_per_layer = {l: sum(1 for k in todo_keys if k[0] == l) for l in layers}
    else:  # which neurons a sample takes is known after the scan: count per layer
        todo_per_layer = {l: per_layer - min(per_layer, sum(1 for k in built if k[0] == l)) for l in layers}
        n_built = per_layer * len(layers) - sum(todo_per_layer.values())
        n_groups = sum(-(-todo // group_size) for todo in todo_per_layer.values())
    s = PlanSummary(layers=layers, n_windows=int(windows.shape[0]), excluded_windows=int(excluded.size),
                    window_tokens=int(windows.shape[1]), layers_to_scan=missing, scan_shards=shards,
                    scan_tokens=int(scan_windows * windows.shape[1]),
                    deepest_layer=max(missing) if missing else None, neurons=per_layer * len(layers),
                    neurons_built=n_built, fit_groups=n_groups, group_size=group_size, method=req.fit.method,
                    device=str(model.device))
    if not calibrate:
        return s
    calib = windows[: max(1, min(calibration_windows, windows.shape[0]))]
    depths = sorted({layers[0], layers[len(layers) // 2], layers[-1], *([max(missing)] if missing else [])})
    rates = {l: _forward_rate(model, calib, l) for l in depths}
    s.forward_tokens_per_s = rates

    def rate_at(l: int) -> float:  # forward time grows about linearly with depth: interpolate
        xs = sorted(rates)
        return float(np.interp(l, xs, [rates[x] for x in xs]))

    s.scan_seconds = s.scan_tokens / rate_at(s.deepest_layer) if missing else 0.0
    method = fit_method(req.fit.method)
    fit_tokens = _fit_tokens_by_layer(ws, method, layers)
    s.fit_seconds_per_neuron = {l: fit_tokens[l] / rate_at(l) for l in layers}
    # passes the method runs once a layer (per process: a resumed build runs them again)
    once = method.layer_tokens(req.fit, model.d_vocab)
    s.fit_seconds = sum(todo_per_layer[l] * s.fit_seconds_per_neuron[l] + (once / rate_at(l) if todo_per_layer[l] else 0.0)
                        for l in layers)
    s.total_seconds = s.scan_seconds + s.fit_seconds
    return s
