"""The model-free graph layer: a workspace's graphs held in one `n2g_fast.GraphStore`.

The server (and the command line's local mode) answer predict, search, similar-pair and render
requests from here, with no model loaded. The store follows the workspace's neurons table: a
cheap `COUNT(*)/MAX(created_at)` query, run at most once per `refresh_interval` seconds unless
`invalidate()` was called (the server's job runner calls it after every neuron group), tells
whether neurons were committed (here or by another process); only those are read and added to the
store (`GraphStore.add` replaces a graph of the same key). The store's own read/write lock lets
queries run in parallel and makes an update wait only for the queries in flight.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .workspace import Workspace

log = logging.getLogger("n2g.graphs")

from n2g.types import InContextNeuron, Key, Neighbour, Pair  # noqa: E402 - the API's result types
from n2g.vocab import DEFAULT_SEMANTICS, ROLES, SEMANTICS  # noqa: E402,F401


@dataclass(frozen=True)
class GraphInfo:
    """What a listing shows of one graph, computed once when it enters the store."""
    n_nodes: int
    n_paths: int
    activating: list[str]
    context: list[str]
    max_activation: float
    created_at: float


class GraphIndex:
    """Thread-safe view of a workspace's graphs that follows the workspace."""

    def __init__(self, ws: Workspace, *, refresh_interval: float = 1.0):
        import n2g_fast

        self.ws = ws
        self.refresh_interval = refresh_interval
        self._store = n2g_fast.GraphStore()
        self._info: dict[Key, GraphInfo] = {}
        self._keys: frozenset[Key] = frozenset()
        self._scan_max: dict[int, tuple[float, np.ndarray]] = {}
        self._version: tuple | None = None
        self._checked_at = 0.0
        self._dirty = True
        self._lock = threading.Lock()  # one update at a time

    # -- freshness ------------------------------------------------------------------------------
    def invalidate(self) -> None:
        """Marks the store stale: the next read checks the workspace at once."""
        self._dirty = True

    def _db_version(self) -> tuple:
        return self.ws.neurons_version()

    def _fresh(self):
        # The fast path only while no update runs: a reader during one waits for it, or it would
        # answer from the graphs before it (e.g. an evaluation right after a build's last commit).
        if not self._dirty and time.monotonic() - self._checked_at < self.refresh_interval and not self._lock.locked():
            return self._store
        with self._lock:
            if not self._dirty and time.monotonic() - self._checked_at < self.refresh_interval:
                return self._store
            self._dirty = False
            version = self._db_version()
            if version != self._version:
                self._update(version)
            # from the end of the check: a check slower than the interval must not run on every read
            self._checked_at = time.monotonic()
            return self._store

    def _update(self, version: tuple) -> None:
        """Adds the neurons new or rebuilt since the last update, drops deleted ones."""
        import n2g_fast

        t0 = time.perf_counter()
        live = self.ws.neuron_times()
        changed = [k for k, c in live.items() if k not in self._info or self._info[k].created_at != c]
        info = dict(self._info)
        for k in set(info) - set(live):
            self._store.remove(k)
            info.pop(k)
        for l, n, created, amax, blob in self.ws.graph_rows(changed):
            try:
                g = n2g_fast.NeuronGraph.from_bytes(bytes(blob))
            except ValueError as e:  # a damaged blob: skipped (Workspace.damaged() reports it), not fatal
                log.warning("graph %d:%d is damaged and skipped: %s", l, n, e)
                continue
            if (g.layer, g.neuron) != (l, n):
                log.warning("graph stored as %d:%d belongs to %d:%d: skipped", l, n, g.layer, g.neuron)
                continue
            self._store.add(g)
            info[(l, n)] = GraphInfo(g.n_nodes, g.n_paths, g.activating_labels(), g.context_labels(),
                                     float(amax), float(created))
        self._info, self._keys, self._version = info, frozenset(info), version
        if changed:
            log.info("graph store: %d graphs (%d added) in %.2f s", len(info), len(changed), time.perf_counter() - t0)

    # -- queries --------------------------------------------------------------------------------
    def keys(self) -> frozenset[Key]:
        self._fresh()
        return self._keys

    def has(self, key: Key) -> bool:
        return tuple(key) in self.keys()

    def __len__(self) -> int:
        return len(self.keys())

    def info(self, key: Key) -> GraphInfo:
        """Listing facts of a graph (reloads at once if the key is newer than the store)."""
        self._fresh()
        key = tuple(key)
        if key not in self._info:
            self.invalidate()
            self._fresh()
        return self._info[key]

    def max_activations(self, keys: Sequence[Key]) -> list[float]:
        self._fresh()
        return [self._info[tuple(k)].max_activation for k in keys]

    def scan_max(self, layer: int) -> np.ndarray | None:
        """a_max of every neuron of `layer` from the dataset scan, or None if not scanned (cached
        until the scan is rewritten)."""
        version = self.ws.layer_scan_version(layer)
        if version is None:
            return None
        cached = self._scan_max.get(layer)
        if cached is None or cached[0] != version:
            cached = (version, self.ws.load_layer_scan(layer)["max_activation"])
            self._scan_max[layer] = cached
        return cached[1]

    def predict(self, keys: Sequence[Key], sequences: Sequence[Sequence[int]],
                semantics: str = DEFAULT_SEMANTICS) -> list[np.ndarray]:
        """One float32 array [len(keys), len(sequence)] of predicted normalised activations per
        sequence. Sequences of different lengths are right-padded into one batch: a prediction
        at position i reads tokens 0..i only, so padding after a sequence never changes it."""
        store = self._fresh()
        lengths = [len(s) for s in sequences]
        batch = np.zeros((len(sequences), max(lengths)), dtype=np.int64)
        for i, s in enumerate(sequences):
            batch[i, : len(s)] = s
        out = store.predict([tuple(k) for k in keys], batch, semantics)  # [neuron, sequence, position]
        return [np.ascontiguousarray(out[:, i, :t]) for i, t in enumerate(lengths)]

    def search(self, clauses: Sequence[tuple[int | str, str]]) -> list[Key]:
        return [tuple(k) for k in self._fresh().search(list(clauses))]

    def in_context_neurons(self) -> list[InContextNeuron]:
        return [InContextNeuron(tuple(k), list(shared), float(frac))
                for k, shared, frac in self._fresh().in_context_neurons()]

    def pairs(self, kind: str, threshold: float) -> list[Pair]:
        store = self._fresh()
        raw = store.similar_pairs(threshold) if kind == "similar" else store.subset_pairs(threshold)
        return [Pair(tuple(a), tuple(b), kind, float(ao), float(co)) for a, b, ao, co in raw]

    def neighbours(self, key: Key, k: int) -> list[Neighbour]:
        return [Neighbour(tuple(o), float(s), float(ao), float(co))
                for o, s, ao, co in self._fresh().neighbours(tuple(key), k)]
