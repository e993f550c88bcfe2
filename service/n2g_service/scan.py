"""Dataset scan (n2g-method.md section 1): top-k windows and a_max for every neuron of the layers
asked, with one forward pass per batch of windows (stopping after the deepest layer asked).

The per-neuron top-k accumulation runs in Rust (``n2g_fast.TopK``), fed one float32
``[batch, tokens, d_mlp]`` array per layer per batch. The BOS position of every window is masked
out: it is not text, and in many models every neuron takes an outlying value there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from .activations import layer_activations
from .config import ScanConfig
from .models import LoadedModel


@dataclass
class LayerScan:
    """Result of the scan for one layer."""

    layer: int
    max_activation: np.ndarray  # float32 [d_mlp]; -inf for a neuron that saw no token
    top_window_ids: np.ndarray  # int64 [d_mlp, k]; best first; -1 pads
    top_scores: np.ndarray  # float32 [d_mlp, k]; a window's score = its max activation; -inf pads


def scan_layers(
    model: LoadedModel,
    windows: np.ndarray,
    layers: Iterable[int],
    cfg: ScanConfig = ScanConfig(),
    progress: bool = True,
) -> dict[int, LayerScan]:
    """Scans ``windows`` (int64 [n, T], each starting with BOS) for every neuron of ``layers``."""
    import n2g_fast
    from tqdm.auto import tqdm

    layers = sorted({int(l) for l in layers})
    for l in layers:
        model.hook_name(l)  # validates the range
    windows = np.asarray(windows, dtype=np.int64)
    if windows.ndim != 2:
        raise ValueError("windows must be a 2-D int64 array [n_windows, tokens]")
    n, t = windows.shape
    acc = {l: n2g_fast.TopK(model.d_mlp, cfg.k) for l in layers}
    mask_full = np.ones((cfg.batch_size, t), dtype=bool)
    mask_full[:, 0] = False  # BOS
    bar = tqdm(total=n, desc=f"scan layers {layers[0]}..{layers[-1]}" if layers else "scan",
               unit="win", disable=not progress or not layers)
    for start in range(0, n if layers else 0, cfg.batch_size):
        batch = windows[start : start + cfg.batch_size]
        b = batch.shape[0]
        acts = layer_activations(model, torch.from_numpy(batch), layers)
        ids = np.arange(start, start + b, dtype=np.int64)
        for l in layers:
            a = np.ascontiguousarray(acts[l].cpu().numpy(), dtype=np.float32)
            acc[l].update(a, ids, np.ascontiguousarray(mask_full[:b]))
        bar.update(b)
    bar.close()
    out = {}
    for l in layers:
        top_ids, top_scores = acc[l].top()
        out[l] = LayerScan(
            layer=l,
            max_activation=np.asarray(acc[l].max_activation(), dtype=np.float32),
            top_window_ids=np.asarray(top_ids, dtype=np.int64),
            top_scores=np.asarray(top_scores, dtype=np.float32),
        )
    return out
