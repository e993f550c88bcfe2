"""The build plan: scan shards and fit groups (layer specs: `n2g.layers`; shard top-k merge:
`scan.merge_partials`).

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
