"""The build plan: layer specs, scan shards and fit groups, and the exact merge of shard top-k.

A whole-model build is split into work units, each committed to the workspace when it finishes:

- a *scan shard* is a range of corpus windows ``[start, stop)`` scanned for every layer still to
  scan, in one forward pass per batch that stops at the deepest of them; its result is one partial
  top-k per layer;
- a *fit group* is a few neurons of one layer, fitted and evaluated together (shared forward
  passes); its neurons are committed in one transaction.

A plan is identified by the parts of the request that shape it, so rerunning the same request
finds the same plan and runs only the units not yet done.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from n2g.layers import MAX_LAYERS, parse_layers  # noqa: F401 - one grammar for clients and server


@dataclass(frozen=True)
class ScanShard:
    """Windows ``[start, stop)`` of the corpus, scanned for ``layers``."""

    start: int
    stop: int
    layers: tuple[int, ...]

    @property
    def unit_id(self) -> str:
        return f"scan:{self.start}-{self.stop}"

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "stop": self.stop, "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScanShard":
        return cls(int(d["start"]), int(d["stop"]), tuple(int(l) for l in d["layers"]))


@dataclass(frozen=True)
class FitGroup:
    """Neurons of one layer fitted together."""

    layer: int
    neurons: tuple[int, ...]

    @property
    def unit_id(self) -> str:
        return f"fit:{self.layer}:{self.neurons[0]}-{self.neurons[-1]}:{len(self.neurons)}"

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "neurons": list(self.neurons)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FitGroup":
        return cls(int(d["layer"]), tuple(int(n) for n in d["neurons"]))


def shard_ranges(n_windows: int, shard_windows: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``shard_windows`` windows covering ``0..n_windows``."""
    if shard_windows < 1:
        raise ValueError("shard_windows must be >= 1")
    return [(s, min(s + shard_windows, n_windows)) for s in range(0, n_windows, shard_windows)]


def fit_groups(keys: Sequence[tuple[int, int]], group_size: int) -> list[FitGroup]:
    """Groups of at most ``group_size`` neurons of one layer, in (layer, neuron) order."""
    by_layer: dict[int, list[int]] = {}
    for l, n in sorted(set(keys)):
        by_layer.setdefault(l, []).append(n)
    return [FitGroup(l, tuple(ns[i: i + group_size])) for l, ns in sorted(by_layer.items())
            for i in range(0, len(ns), group_size)]


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able value (plan and scan identities)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def scan_key(n_windows: int, window_tokens: int, k: int, excluded: np.ndarray) -> str:
    """Identity of a scan's partial results: same windows, same k, same excluded windows."""
    ex = np.unique(np.asarray(excluded, dtype=np.int64))
    return digest({"n": int(n_windows), "t": int(window_tokens), "k": int(k),
                   "excluded": hashlib.sha1(ex.tobytes()).hexdigest()})


@dataclass
class PartialTopK:
    """One shard's (or a merged) top-k of one layer."""

    max_activation: np.ndarray  # float32 [d_mlp]; -inf where no token was seen
    top_window_ids: np.ndarray  # int64 [d_mlp, k]; -1 pads
    top_scores: np.ndarray  # float32 [d_mlp, k]; -inf pads
    seconds: float = 0.0


def merge_topk_reference(parts: Sequence[PartialTopK], k: int) -> PartialTopK:
    """Merges partial top-k results with numpy: best score first, ties to the lower window id
    (the order a single pass over the windows in id order keeps). The reference the Rust merge is
    checked against; also used where ``n2g_fast.TopK.merge`` is not available."""
    if not parts:
        raise ValueError("nothing to merge")
    ids = np.concatenate([p.top_window_ids for p in parts], axis=1)
    scores = np.concatenate([p.top_scores for p in parts], axis=1).astype(np.float32)
    d = ids.shape[0]
    # pads (-1) sort last: give them -inf and the largest id
    key_ids = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    key_scores = np.where(ids < 0, -np.inf, scores)
    out_ids = np.full((d, k), -1, np.int64)
    out_scores = np.full((d, k), -np.inf, np.float32)
    for n in range(d):
        order = np.lexsort((key_ids[n], -key_scores[n]))[:k]
        keep = order[ids[n, order] >= 0]
        out_ids[n, : keep.size] = ids[n, keep]
        out_scores[n, : keep.size] = scores[n, keep]
    amax = np.max(np.stack([p.max_activation for p in parts]), axis=0).astype(np.float32)
    return PartialTopK(amax, out_ids, out_scores, sum(p.seconds for p in parts))
