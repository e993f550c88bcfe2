"""The model-free graph layer: a workspace's graphs held in one `n2g_fast.GraphStore`.

The server (and the command line's local mode) answer predict, search, similar-pair and render
requests from here, with no model loaded. The store is rebuilt from the workspace's neurons table
when that table changes (a build committed neurons, here or in another process): the check is a
cheap `COUNT(*)/MAX(created_at)` query, run at most once per `refresh_interval` seconds unless
`invalidate()` was called (the server's job runner calls it after every neuron group).

Reads never block on a refresh in progress: the old store keeps answering until the new one is
swapped in (one reference assignment).
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

SEMANTICS = ("all_paths_max", "greedy_deepest")
DEFAULT_SEMANTICS = "all_paths_max"
ROLES = ("activating", "context", "either")
STORE_FILE = "graphs.n2gs"

Key = tuple[int, int]


@dataclass(frozen=True)
class GraphInfo:
    """What a listing shows of one graph, computed once when the store loads."""
    n_nodes: int
    n_paths: int
    activating: list[str]
    context: list[str]
    max_activation: float


@dataclass(frozen=True)
class PairResult:
    """One similar or subset pair; for a subset pair `a` is the neuron with the smaller sets."""
    a: Key
    b: Key
    kind: str  # "similar" | "subset"
    activating_overlap: float
    context_overlap: float


class GraphIndex:
    """Thread-safe, self-refreshing view of a workspace's graphs."""

    def __init__(self, ws: Workspace, *, refresh_interval: float = 1.0):
        self.ws = ws
        self.refresh_interval = refresh_interval
        self._store = None
        self._keys: frozenset[Key] = frozenset()
        self._info: dict[Key, GraphInfo] = {}
        self._graphs: dict[Key, tuple[float, object]] = {}  # key -> (created_at, NeuronGraph)
        self._scan_max: dict[int, tuple[float, np.ndarray]] = {}
        self._version: tuple | None = None
        self._checked_at = 0.0
        self._reloaded_at = 0.0
        self._reload_seconds = 0.0
        self._dirty = True
        self._urgent = True
        self._lock = threading.Lock()  # one refresh at a time

    # -- freshness ------------------------------------------------------------------------------
    def invalidate(self, urgent: bool = False) -> None:
        """Marks the store stale. The next read re-checks the workspace; a reload then waits until
        twice the last reload's duration has passed since it (so that a long build, committing
        group after group, never spends more than a third of a core on reloads) unless `urgent`."""
        self._dirty = True
        if urgent:
            self._urgent = True

    def _db_version(self) -> tuple:
        # the workspace's own connection of this thread (a cheap aggregate over the neurons table)
        row = self.ws._conn().execute("SELECT COUNT(*), COALESCE(MAX(created_at), 0) FROM neurons").fetchone()
        return (int(row[0]), float(row[1]))

    def _stale(self, now: float) -> bool:
        if self._store is None or self._urgent:
            return True
        if not self._dirty and now - self._checked_at < self.refresh_interval:
            return False
        return now - self._reloaded_at >= 2 * self._reload_seconds

    def _fresh(self):
        if not self._stale(time.monotonic()):
            return self._store
        with self._lock:
            now = time.monotonic()
            if not self._stale(now):
                return self._store
            self._dirty = self._urgent = False
            self._checked_at = now
            version = self._db_version()
            if self._store is None or version != self._version:
                self._reload(version)
            return self._store

    def _reload(self, version: tuple) -> None:
        """A new store from every graph; only neurons new or rebuilt since the last load are read
        and parsed again. Readers keep the old store until the new one is swapped in."""
        import n2g_fast

        t0 = time.perf_counter()
        conn = self.ws._conn()
        rows = conn.execute("SELECT layer, neuron, created_at, max_activation FROM neurons").fetchall()
        changed = [(l, n) for l, n, created, _ in rows if self._graphs.get((l, n), (None,))[0] != created]
        graphs = {k: v for k, v in self._graphs.items()}
        info = dict(self._info)
        live = {(l, n) for l, n, _, _ in rows}
        for k in set(graphs) - live:
            graphs.pop(k)
            info.pop(k, None)
        for l, n in changed:
            row = conn.execute("SELECT created_at, max_activation, graph FROM neurons WHERE layer = ? AND neuron = ?",
                               (l, n)).fetchone()
            if row is None:
                continue
            g = n2g_fast.NeuronGraph.from_bytes(bytes(row[2]))
            graphs[(l, n)] = (row[0], g)
            info[(l, n)] = GraphInfo(g.n_nodes, g.n_paths, g.activating_labels(), g.context_labels(), float(row[1]))
        store = n2g_fast.GraphStore()
        for k in sorted(graphs):
            store.add(graphs[k][1])
        self._store, self._graphs, self._info, self._keys, self._version = (
            store, graphs, info, frozenset(graphs), version)
        self._reloaded_at = time.monotonic()
        self._reload_seconds = time.perf_counter() - t0
        log.info("graph store: %d graphs (%d read) in %.2f s", len(graphs), len(changed), self._reload_seconds)

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
            self.invalidate(urgent=True)
            self._fresh()
        return self._info[key]

    def max_activations(self, keys: Sequence[Key]) -> list[float]:
        self._fresh()
        return [self._info[tuple(k)].max_activation for k in keys]

    def scan_max(self, layer: int) -> np.ndarray | None:
        """a_max of every neuron of `layer` from the dataset scan, or None if not scanned (cached
        until the scan is rewritten)."""
        row = self.ws._conn().execute("SELECT seconds FROM layer_scans WHERE layer = ?", (layer,)).fetchone()
        if row is None:
            return None
        cached = self._scan_max.get(layer)
        if cached is None or cached[0] != row[0]:
            cached = (row[0], self.ws.load_layer_scan(layer)["max_activation"])
            self._scan_max[layer] = cached
        return cached[1]

    def predict(self, keys: Sequence[Key], sequences: Sequence[Sequence[int]] | Sequence[np.ndarray],
                semantics: str = DEFAULT_SEMANTICS) -> np.ndarray:
        """[neuron, sequence, position] predicted normalised activations, zero-padded past each
        sequence's end."""
        store = self._fresh()
        seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
        return np.asarray(store.predict([tuple(k) for k in keys], seqs, semantics))

    def search(self, clauses: Sequence[tuple[int | str, str]]) -> list[Key]:
        return sorted(tuple(k) for k in self._fresh().search(list(clauses)))

    def in_context_neurons(self) -> list[Key]:
        return sorted(tuple(k) for k in self._fresh().in_context_neurons())

    def pairs(self, kind: str, threshold: float) -> list[PairResult]:
        store = self._fresh()
        raw = store.similar_pairs(threshold) if kind == "similar" else store.subset_pairs(threshold)
        return [PairResult(tuple(a), tuple(b), kind, float(ao), float(co)) for a, b, ao, co in raw]

    def neighbours(self, key: Key, k: int) -> list[tuple[Key, float]]:
        return [(tuple(other), float(score)) for other, score in self._fresh().neighbours(tuple(key), k)]
