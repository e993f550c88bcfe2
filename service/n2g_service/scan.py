"""Dataset scan (n2g-method.md section 1): top-k windows and a_max for every neuron of the layers
asked, with one forward pass per batch of windows (stopping after the deepest layer asked).

A window's score for a neuron is its maximum activation over the window's tokens, the BOS
position left out (it is not text, and in many models every neuron takes an outlying value
there). That maximum is taken on the model's device inside the layer's hook, so only a
``[batch, d_mlp]`` array per layer leaves the device (not ``[batch, tokens, d_mlp]``); the
per-neuron top-k over windows runs in Rust (``n2g_fast.TopK``), which keeps ties in window order.

A scan can cover a subset of the corpus (``window_ids``: a shard of a whole-model build) and leave
windows out (``exclude``: the held-out text of the evaluation): partial results of disjoint shards
merge exactly into the single-pass result (:func:`merge_partials`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .activations import layer_reductions
from .config import ScanConfig
from .models import LoadedModel

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LayerScan:
    """Result of the scan for one layer (also a shard's partial result)."""

    layer: int
    max_activation: np.ndarray  # float32 [d_mlp]; -inf for a neuron that saw no token
    top_window_ids: np.ndarray  # int64 [d_mlp, k]; best first; -1 pads
    top_scores: np.ndarray  # float32 [d_mlp, k]; a window's score = its max activation; -inf pads
    seconds: float = 0.0


def _window_max(act: torch.Tensor) -> torch.Tensor:
    # [batch, tokens, d_mlp] -> [batch, d_mlp], BOS left out; float32 for the exact top-k
    return act.detach()[:, 1:, :].amax(dim=1).float()


def scan_layers(
    model: LoadedModel,
    windows: np.ndarray,
    layers: Iterable[int],
    cfg: ScanConfig = ScanConfig(),
    progress: bool = True,
    *,
    window_ids: Sequence[int] | np.ndarray | None = None,
    exclude: Iterable[int] | np.ndarray | None = None,
    precision: str = "float32",
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[int, LayerScan]:
    """Scans ``windows`` (int64 [n, T], each starting with BOS) for every neuron of ``layers``.

    ``window_ids`` (default ``0..n-1``) are the ids the windows go by in the result (a shard
    passes its own rows with their corpus ids); windows whose id is in ``exclude`` are not run
    and never appear in the top-k nor in a_max. ``precision`` ("float32", "bfloat16",
    "float16") runs the forward pass under autocast; scores are compared in float32.
    ``on_batch(done, n)`` is called after each batch with the windows scanned so far (of ``n``
    run); an exception it raises stops the scan.
    """
    import n2g_fast
    from tqdm.auto import tqdm

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {sorted(PRECISIONS)}")
    layers = sorted({int(l) for l in layers})
    for l in layers:
        model.hook_name(l)  # validates the range
    windows = np.asarray(windows, dtype=np.int64)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError("windows must be a 2-D int64 array [n_windows, tokens >= 2]")
    ids = np.arange(windows.shape[0], dtype=np.int64) if window_ids is None else np.asarray(window_ids, np.int64)
    if ids.shape != (windows.shape[0],):
        raise ValueError(f"window_ids must give one id per window ({windows.shape[0]}), got shape {ids.shape}")
    if exclude is not None:
        keep = ~np.isin(ids, np.asarray(list(exclude) if not isinstance(exclude, np.ndarray) else exclude, np.int64))
        windows, ids = windows[keep], ids[keep]
    n = windows.shape[0]
    acc = {l: n2g_fast.TopK(model.d_mlp, cfg.k) for l in layers}
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc=f"scan layers {layers[0]}..{layers[-1]}" if layers else "scan",
               unit="win", disable=not progress or not layers)
    for start in range(0, n if layers else 0, cfg.batch_size):
        batch = windows[start: start + cfg.batch_size]
        scores = layer_reductions(model, torch.from_numpy(batch), layers, _window_max, PRECISIONS[precision])
        batch_ids = np.ascontiguousarray(ids[start: start + batch.shape[0]])
        host = torch.stack([scores[l] for l in layers]).cpu().numpy()  # one device->host copy a batch
        for i, l in enumerate(layers):
            if hasattr(acc[l], "update_window_max"):
                acc[l].update_window_max(np.ascontiguousarray(host[i]), batch_ids)
            else:  # an older extension: one "token" a window, its max
                acc[l].update(np.ascontiguousarray(host[i][:, None, :]), batch_ids)
        bar.update(batch.shape[0])
        if on_batch is not None:
            on_batch(start + batch.shape[0], n)
    bar.close()
    seconds = time.perf_counter() - t0
    out = {}
    for l in layers:
        top_ids, top_scores = acc[l].top()
        out[l] = LayerScan(
            layer=l,
            max_activation=np.asarray(acc[l].max_activation(), dtype=np.float32),
            top_window_ids=np.asarray(top_ids, dtype=np.int64),
            top_scores=np.asarray(top_scores, dtype=np.float32),
            seconds=seconds,
        )
    return out


def merge_partials(parts: Sequence[LayerScan], k: int) -> LayerScan:
    """Merges the scans of disjoint sets of windows of one layer into the scan of their union,
    exactly as one pass over all of them would give it (ties to the lower window id)."""
    import n2g_fast

    if not parts:
        raise ValueError("nothing to merge")
    # n2g_fast.TopK.merge: bit-exact with a single pass (the tests check it against a numpy merge)
    acc = n2g_fast.TopK(int(parts[0].max_activation.shape[0]), k)
    for p in parts:
        acc.merge(n2g_fast.TopK.from_arrays(np.ascontiguousarray(p.top_window_ids, np.int64),
                                            np.ascontiguousarray(p.top_scores, np.float32),
                                            np.ascontiguousarray(p.max_activation, np.float32)))
    ids, scores = acc.top()
    return LayerScan(parts[0].layer, np.asarray(acc.max_activation(), np.float32), np.asarray(ids, np.int64),
                     np.asarray(scores, np.float32), sum(p.seconds for p in parts))


def compare_precision(model: LoadedModel, windows: np.ndarray, layers: Iterable[int], precision: str,
                      cfg: ScanConfig = ScanConfig()) -> dict[str, float]:
    """Scans ``windows`` in ``precision`` and in float32 and says how far apart they are: the
    largest a_max error relative to the layer's largest a_max, and the share of each neuron's
    float32 top-k windows that the reduced precision also finds (mean over neurons), plus both
    scans' seconds."""
    ref = scan_layers(model, windows, layers, cfg, progress=False)
    got = scan_layers(model, windows, layers, cfg, progress=False, precision=precision)
    err, overlap = 0.0, []
    for l, r in ref.items():
        g = got[l]
        finite = np.isfinite(r.max_activation)
        scale = float(np.abs(r.max_activation[finite]).max()) if finite.any() else 1.0
        err = max(err, float(np.abs(g.max_activation[finite] - r.max_activation[finite]).max()) / max(scale, 1e-12))
        for a, b in zip(r.top_window_ids, g.top_window_ids):
            a, b = set(a[a >= 0].tolist()), set(b[b >= 0].tolist())
            overlap.append(len(a & b) / max(len(a), 1))
    return {"max_rel_amax_error": err, "topk_overlap": float(np.mean(overlap)),
            "seconds_float32": sum(s.seconds for s in ref.values()) / max(len(ref), 1),
            "seconds": sum(s.seconds for s in got.values()) / max(len(got), 1)}
