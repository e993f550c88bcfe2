"""The workspace: one directory per (model, corpus), holding an embedded SQLite database.

SQLite (WAL mode) keeps metadata, the corpus windows, the dataset scan, every built neuron (its
graph in n2g_fast's versioned binary form, its examples, stats and evaluation) and the build jobs.
Each neuron is committed in its own transaction as soon as it is built, so a build that is killed
loses nothing and resumes where it stopped. A graph store file (`graphs.n2gs`, n2g_fast's format)
is a derived cache of the graphs table for fast loading of whole models.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

SCHEMA_VERSION = 1
DB_NAME = "n2g.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS windows (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    n INTEGER NOT NULL, length INTEGER NOT NULL, tokens BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS layer_scans (
    layer INTEGER PRIMARY KEY, k INTEGER NOT NULL, d_mlp INTEGER NOT NULL,
    max_activation BLOB NOT NULL, top_window_ids BLOB NOT NULL, top_scores BLOB NOT NULL,
    seconds REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS neurons (
    layer INTEGER NOT NULL, neuron INTEGER NOT NULL,
    max_activation REAL NOT NULL,
    graph BLOB NOT NULL,
    examples TEXT NOT NULL,
    stats TEXT NOT NULL,
    metrics TEXT NOT NULL,
    job_id TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (layer, neuron)
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, request TEXT NOT NULL,
    total INTEGER NOT NULL DEFAULT 0, done INTEGER NOT NULL DEFAULT 0,
    error TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, stalls INTEGER NOT NULL DEFAULT 0,
    start_done INTEGER NOT NULL DEFAULT 0, stage TEXT
);
-- ---- evaluation on ordinary text (evaluate.py, n2g-method.md 8b) ----
-- the held-out sample of window ids that no fit sees, fixed once per workspace
CREATE TABLE IF NOT EXISTS eval_heldout (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    seed INTEGER NOT NULL, requested INTEGER NOT NULL, n_windows INTEGER NOT NULL, ids BLOB NOT NULL
);
-- true (raw) activations of one neuron on those windows, [n_windows, length], BOS included
CREATE TABLE IF NOT EXISTS eval_ordinary_acts (
    layer INTEGER NOT NULL, neuron INTEGER NOT NULL, n_windows INTEGER NOT NULL,
    length INTEGER NOT NULL, dtype TEXT NOT NULL, acts BLOB NOT NULL,
    PRIMARY KEY (layer, neuron)
);
"""

# The job states, defined once (jobqueue, the server and the client map these).
ACTIVE_JOB_STATES = ("queued", "running")
TERMINAL_JOB_STATES = ("succeeded", "failed", "cancelled")
JOB_STATES = ACTIVE_JOB_STATES + TERMINAL_JOB_STATES
MAX_JOB_ID_CHARS = 128
MAX_JOB_REQUEST_BYTES = 64 * 1024
# columns `jobs` gained after the first release: a writer adds them to an older workspace
_JOB_COLUMNS_ADDED = (("attempts", "INTEGER NOT NULL DEFAULT 0"), ("stalls", "INTEGER NOT NULL DEFAULT 0"),
                      ("start_done", "INTEGER NOT NULL DEFAULT 0"), ("stage", "TEXT"))


class WorkspaceError(ValueError):
    """A workspace that cannot be used as asked; the message is one line. `kind` says why:
    missing | mismatch | schema | locked | read_only | unavailable | damaged | damaged_neuron |
    full | busy | conflict | invalid | too_large | non_finite | storage. `details` holds what the
    kind names (locked: holder; damaged_neuron: layer, neuron, reason)."""

    def __init__(self, message: str, kind: str = "invalid", **details: Any):
        super().__init__(message)
        self.kind = kind
        self.details = details


@dataclass
class NeuronRecord:
    layer: int
    neuron: int
    max_activation: float
    graph_bytes: bytes
    examples: dict[str, Any]
    stats: dict[str, Any]
    metrics: dict[str, Any]
    job_id: str | None = None
    created_at: float = field(default_factory=time.time)

    def graph(self):
        import n2g_fast

        return n2g_fast.NeuronGraph.from_bytes(self.graph_bytes)


@dataclass
class JobRecord:
    id: str
    state: str
    request: dict[str, Any]
    total: int
    done: int
    error: str | None
    created_at: float
    updated_at: float


def _blob(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


class Workspace:
    """Thread-safe access to one workspace directory (one connection per thread)."""

    def __init__(self, path: str | Path, *, create: bool = False,
                 model: str | None = None, corpus: str | None = None, hook: str | None = None):
        self.path = Path(path)
        db = self.path / DB_NAME
        if not db.exists():
            if not create:
                raise WorkspaceError(f"no workspace at {self.path} (no {DB_NAME}); build one first with `n2g build --workspace {self.path}`")
            self.path.mkdir(parents=True, exist_ok=True)
        self._db_path = db
        self._local = threading.local()
        # executescript commits any open transaction first, so the (idempotent) schema runs alone
        self._conn().executescript(_SCHEMA)
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        found = int(self.get_meta("schema_version"))
        if found != SCHEMA_VERSION:
            raise WorkspaceError(f"workspace {self.path} has schema version {found}, this n2g reads {SCHEMA_VERSION}")
        for key, value in (("model", model), ("corpus", corpus), ("hook", hook)):
            if value is None:
                continue
            have = self.get_meta(key)
            if have is None:
                self.set_meta(key, value)
            elif have != value:
                raise WorkspaceError(f"workspace {self.path} was built for {key}={have!r}, not {value!r}; use another --workspace")

    # -- connection handling ------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- metadata -------------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def get_meta_json(self, key: str, default: Any = None) -> Any:
        value = self.get_meta(key)
        return default if value is None else json.loads(value)

    def set_meta_json(self, key: str, value: Any) -> None:
        self.set_meta(key, json.dumps(value, sort_keys=True))

    @property
    def model_name(self) -> str | None:
        return self.get_meta("model")

    @property
    def corpus(self) -> str | None:
        return self.get_meta("corpus")

    @property
    def hook(self) -> str | None:
        return self.get_meta("hook")

    # -- corpus windows -------------------------------------------------------------------------
    def save_windows(self, windows: np.ndarray) -> None:
        w = np.asarray(windows, dtype=np.int32)
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO windows VALUES (0, ?, ?, ?)", (w.shape[0], w.shape[1], _blob(w)))

    def load_windows(self) -> np.ndarray | None:
        row = self._conn().execute("SELECT n, length, tokens FROM windows WHERE id = 0").fetchone()
        if row is None:
            return None
        n, length, blob = row
        return np.frombuffer(blob, dtype=np.int32).reshape(n, length).astype(np.int64)

    # -- dataset scan ---------------------------------------------------------------------------
    def save_layer_scan(self, layer: int, max_activation: np.ndarray, top_window_ids: np.ndarray,
                        top_scores: np.ndarray, seconds: float) -> None:
        ids = np.asarray(top_window_ids, dtype=np.int64)
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO layer_scans VALUES (?, ?, ?, ?, ?, ?, ?)",
                (layer, ids.shape[1], ids.shape[0], _blob(np.asarray(max_activation, np.float32)),
                 _blob(ids), _blob(np.asarray(top_scores, np.float32)), seconds),
            )

    def load_layer_scan(self, layer: int) -> dict[str, Any] | None:
        row = self._conn().execute(
            "SELECT k, d_mlp, max_activation, top_window_ids, top_scores, seconds FROM layer_scans WHERE layer = ?",
            (layer,),
        ).fetchone()
        if row is None:
            return None
        k, d_mlp, amax, ids, scores, seconds = row
        return {
            "layer": layer,
            "max_activation": np.frombuffer(amax, np.float32).copy(),
            "top_window_ids": np.frombuffer(ids, np.int64).reshape(d_mlp, k).copy(),
            "top_scores": np.frombuffer(scores, np.float32).reshape(d_mlp, k).copy(),
            "seconds": seconds,
        }

    def scanned_layers(self) -> list[int]:
        return [r[0] for r in self._conn().execute("SELECT layer FROM layer_scans ORDER BY layer")]

    # -- neurons --------------------------------------------------------------------------------
    def put_neuron(self, rec: NeuronRecord) -> None:
        """Commits one built neuron (one transaction; replaces an earlier build of it)."""
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO neurons VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rec.layer, rec.neuron, rec.max_activation, rec.graph_bytes,
                 json.dumps(rec.examples), json.dumps(rec.stats), json.dumps(rec.metrics),
                 rec.job_id, rec.created_at),
            )
            if rec.job_id is not None:
                c.execute(
                    "UPDATE jobs SET done = done + 1, updated_at = ? WHERE id = ?", (time.time(), rec.job_id)
                )

    def has_neuron(self, layer: int, neuron: int) -> bool:
        return self._conn().execute(
            "SELECT 1 FROM neurons WHERE layer = ? AND neuron = ?", (layer, neuron)
        ).fetchone() is not None

    def built_keys(self, layers: list[int] | None = None) -> list[tuple[int, int]]:
        rows = self._conn().execute("SELECT layer, neuron FROM neurons ORDER BY layer, neuron").fetchall()
        return [(l, n) for l, n in rows if layers is None or l in layers]

    def get_neuron(self, layer: int, neuron: int) -> NeuronRecord | None:
        row = self._conn().execute(
            "SELECT layer, neuron, max_activation, graph, examples, stats, metrics, job_id, created_at "
            "FROM neurons WHERE layer = ? AND neuron = ?",
            (layer, neuron),
        ).fetchone()
        return None if row is None else self._record(row)

    def iter_neurons(self, *, with_examples: bool = True) -> Iterator[NeuronRecord]:
        cols = "examples" if with_examples else "'{}'"
        cur = self._conn().execute(
            f"SELECT layer, neuron, max_activation, graph, {cols}, stats, metrics, job_id, created_at "
            "FROM neurons ORDER BY layer, neuron"
        )
        for row in cur:
            yield self._record(row)

    @staticmethod
    def _record(row) -> NeuronRecord:
        layer, neuron, amax, graph, examples, stats, metrics, job_id, created = row
        return NeuronRecord(layer, neuron, amax, bytes(graph), json.loads(examples), json.loads(stats),
                            json.loads(metrics), job_id, created)

    def graph_bytes(self) -> list[tuple[int, int, bytes]]:
        return [(l, n, bytes(g)) for l, n, g in
                self._conn().execute("SELECT layer, neuron, graph FROM neurons ORDER BY layer, neuron")]

    # -- jobs -----------------------------------------------------------------------------------
    def create_job(self, job_id: str, request: dict[str, Any], total: int) -> JobRecord:
        now = time.time()
        with self.transaction() as c:
            c.execute("INSERT INTO jobs VALUES (?, 'queued', ?, ?, 0, NULL, ?, ?)",
                      (job_id, json.dumps(request, sort_keys=True), total, now, now))
        return self.get_job(job_id)

    def update_job(self, job_id: str, *, state: str | None = None, total: int | None = None,
                   done: int | None = None, error: str | None = None) -> None:
        if state is not None and state not in JOB_STATES:
            raise ValueError(f"unknown job state {state!r}")
        sets, args = ["updated_at = ?"], [time.time()]
        for col, val in (("state", state), ("total", total), ("done", done), ("error", error)):
            if val is not None:
                sets.append(f"{col} = ?")
                args.append(val)
        with self.transaction() as c:
            c.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*args, job_id))

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._conn().execute(
            "SELECT id, state, request, total, done, error, created_at, updated_at FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        return None if row is None else JobRecord(row[0], row[1], json.loads(row[2]), *row[3:])

    def list_jobs(self) -> list[JobRecord]:
        rows = self._conn().execute(
            "SELECT id, state, request, total, done, error, created_at, updated_at FROM jobs ORDER BY created_at"
        ).fetchall()
        return [JobRecord(r[0], r[1], json.loads(r[2]), *r[3:]) for r in rows]

    # -- evaluation on ordinary text (owned by evaluate.py) ---------------------------------------
    def window_count(self) -> int | None:
        """How many corpus windows the workspace holds (None before the corpus is tokenised)."""
        row = self._conn().execute("SELECT n FROM windows WHERE id = 0").fetchone()
        return None if row is None else int(row[0])

    def record_heldout_windows(self, ids: np.ndarray, seed: int, requested: int, n_windows: int) -> dict[str, Any]:
        """Stores the held-out window ids unless some are stored already; returns the stored ones
        (the first record wins, so every reader sees one fixed set)."""
        a = np.asarray(ids, dtype=np.int64)
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO eval_heldout VALUES (0, ?, ?, ?, ?)",
                      (int(seed), int(requested), int(n_windows), _blob(a)))
        return self.load_heldout_windows()  # type: ignore[return-value]

    def load_heldout_windows(self) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT seed, requested, n_windows, ids FROM eval_heldout WHERE id = 0").fetchone()
        if row is None:
            return None
        seed, requested, n_windows, ids = row
        return {"seed": seed, "requested": requested, "n_windows": n_windows,
                "ids": np.frombuffer(ids, np.int64).copy()}

    def save_ordinary_activations(self, layer: int, acts: dict[int, np.ndarray]) -> None:
        """True activations ``{neuron: [n_windows, length]}`` of one layer, in one transaction;
        float16 where every value fits it, else float32."""
        rows = []
        for neuron, a in acts.items():
            a = np.asarray(a, dtype=np.float32)
            if a.ndim != 2:
                raise ValueError("ordinary activations must be [n_windows, length]")
            fits = bool(np.all(np.abs(a) < 60000.0))
            dtype = "float16" if fits else "float32"
            rows.append((int(layer), int(neuron), a.shape[0], a.shape[1], dtype, _blob(a.astype(dtype))))
        with self.transaction() as c:
            c.executemany("INSERT OR REPLACE INTO eval_ordinary_acts VALUES (?, ?, ?, ?, ?, ?)", rows)

    def load_ordinary_activations(self, layer: int, neurons: list[int]) -> dict[int, np.ndarray]:
        """float32 ``{neuron: [n_windows, length]}`` for the neurons that have them stored."""
        out: dict[int, np.ndarray] = {}
        conn = self._conn()
        for n in neurons:
            row = conn.execute(
                "SELECT n_windows, length, dtype, acts FROM eval_ordinary_acts WHERE layer = ? AND neuron = ?",
                (int(layer), int(n)),
            ).fetchone()
            if row is not None:
                nw, length, dtype, blob = row
                out[int(n)] = np.frombuffer(blob, dtype=dtype).reshape(nw, length).astype(np.float32)
        return out


# ==== build plans (whole-model builds: service/n2g_service/build/) ===========================
# Owned by the build runner. Tables: the persisted plan of work units, and each scan shard's
# partial top-k per layer until every shard of the layer is in and they are merged into
# layer_scans. A unit's result and its `done` state are committed in one transaction.

_BUILD_SCHEMA = """
CREATE TABLE IF NOT EXISTS build_plans (
    plan_id TEXT PRIMARY KEY, request TEXT NOT NULL, scan_key TEXT NOT NULL,
    fit_planned INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS build_units (
    plan_id TEXT NOT NULL, unit_id TEXT NOT NULL, kind TEXT NOT NULL, seq INTEGER NOT NULL,
    spec TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'todo', attempts INTEGER NOT NULL DEFAULT 0,
    seconds REAL, worker TEXT, finished_at REAL,
    PRIMARY KEY (plan_id, unit_id)
);
CREATE TABLE IF NOT EXISTS scan_partials (
    scan_key TEXT NOT NULL, layer INTEGER NOT NULL, start INTEGER NOT NULL, stop INTEGER NOT NULL,
    k INTEGER NOT NULL, d_mlp INTEGER NOT NULL,
    max_activation BLOB NOT NULL, top_window_ids BLOB NOT NULL, top_scores BLOB NOT NULL,
    seconds REAL NOT NULL,
    PRIMARY KEY (scan_key, layer, start, stop)
);
"""


@dataclass
class UnitRecord:
    plan_id: str
    unit_id: str
    kind: str  # scan | fit
    seq: int
    spec: dict[str, Any]
    state: str  # todo | done
    attempts: int
    seconds: float | None
    worker: str | None
    finished_at: float | None


class BuildStore:
    """Plans, units and scan partials of whole-model builds, in the workspace's database."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        ws._conn().executescript(_BUILD_SCHEMA)

    # -- plans and units ------------------------------------------------------------------------
    def ensure_plan(self, plan_id: str, request: dict[str, Any], scan_key: str) -> bool:
        """Creates the plan if new; returns True if it already existed."""
        with self.ws.transaction() as c:
            row = c.execute("SELECT 1 FROM build_plans WHERE plan_id = ?", (plan_id,)).fetchone()
            if row is None:
                c.execute("INSERT INTO build_plans VALUES (?, ?, ?, 0, ?)",
                          (plan_id, json.dumps(request, sort_keys=True), scan_key, time.time()))
        return row is not None

    def add_units(self, plan_id: str, kind: str, units: list[tuple[str, dict[str, Any]]],
                  *, fit_planned: bool = False) -> None:
        """Adds units (unit_id, spec) to a plan (ignoring ids already there), in one transaction;
        with ``fit_planned`` also records that the plan's fit groups are now all planned."""
        with self.ws.transaction() as c:
            base = c.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM build_units WHERE plan_id = ?",
                             (plan_id,)).fetchone()[0]
            c.executemany(
                "INSERT OR IGNORE INTO build_units (plan_id, unit_id, kind, seq, spec) VALUES (?, ?, ?, ?, ?)",
                [(plan_id, uid, kind, base + i, json.dumps(spec, sort_keys=True)) for i, (uid, spec) in enumerate(units)])
            if fit_planned:
                c.execute("UPDATE build_plans SET fit_planned = 1 WHERE plan_id = ?", (plan_id,))

    def fit_planned(self, plan_id: str) -> bool:
        row = self.ws._conn().execute("SELECT fit_planned FROM build_plans WHERE plan_id = ?", (plan_id,)).fetchone()
        return bool(row and row[0])

    def units(self, plan_id: str, kind: str | None = None) -> list[UnitRecord]:
        sql = ("SELECT plan_id, unit_id, kind, seq, spec, state, attempts, seconds, worker, finished_at "
               "FROM build_units WHERE plan_id = ?")
        args: list[Any] = [plan_id]
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        rows = self.ws._conn().execute(sql + " ORDER BY seq", args).fetchall()
        return [UnitRecord(r[0], r[1], r[2], r[3], json.loads(r[4]), *r[5:]) for r in rows]

    def mark_started(self, plan_id: str, unit_id: str, worker: str) -> None:
        with self.ws.transaction() as c:
            c.execute("UPDATE build_units SET attempts = attempts + 1, worker = ? WHERE plan_id = ? AND unit_id = ?",
                      (worker, plan_id, unit_id))

    @staticmethod
    def _finish(c: sqlite3.Connection, plan_id: str, unit_id: str, seconds: float, worker: str | None) -> None:
        c.execute("UPDATE build_units SET state = 'done', seconds = ?, worker = COALESCE(?, worker), finished_at = ? "
                  "WHERE plan_id = ? AND unit_id = ?", (seconds, worker, time.time(), plan_id, unit_id))

    def mark_done(self, plan_id: str, unit_id: str, seconds: float = 0.0, worker: str | None = None) -> None:
        with self.ws.transaction() as c:
            self._finish(c, plan_id, unit_id, seconds, worker)

    # -- scan shards ----------------------------------------------------------------------------
    def commit_scan_unit(self, plan_id: str, unit_id: str, key: str, start: int, stop: int,
                         partials: dict[int, Any], seconds: float, worker: str | None = None) -> None:
        """Stores a shard's partial top-k of every layer (objects with max_activation,
        top_window_ids, top_scores) and marks the unit done, in one transaction."""
        with self.ws.transaction() as c:
            for layer, p in partials.items():
                ids = np.asarray(p.top_window_ids, dtype=np.int64)
                c.execute("INSERT OR REPLACE INTO scan_partials VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          (key, int(layer), int(start), int(stop), ids.shape[1], ids.shape[0],
                           _blob(np.asarray(p.max_activation, np.float32)), _blob(ids),
                           _blob(np.asarray(p.top_scores, np.float32)), float(seconds)))
            self._finish(c, plan_id, unit_id, seconds, worker)

    def partial_ranges(self, key: str, layer: int) -> set[tuple[int, int]]:
        rows = self.ws._conn().execute(
            "SELECT start, stop FROM scan_partials WHERE scan_key = ? AND layer = ?", (key, layer)).fetchall()
        return {(int(a), int(b)) for a, b in rows}

    def load_partials(self, key: str, layer: int) -> list[dict[str, Any]]:
        rows = self.ws._conn().execute(
            "SELECT start, stop, k, d_mlp, max_activation, top_window_ids, top_scores, seconds FROM scan_partials "
            "WHERE scan_key = ? AND layer = ? ORDER BY start", (key, layer)).fetchall()
        return [{"start": a, "stop": b,
                 "max_activation": np.frombuffer(amax, np.float32).copy(),
                 "top_window_ids": np.frombuffer(ids, np.int64).reshape(d, k).copy(),
                 "top_scores": np.frombuffer(sc, np.float32).reshape(d, k).copy(), "seconds": s}
                for a, b, k, d, amax, ids, sc, s in rows]

    def delete_partials(self, key: str, layer: int) -> None:
        with self.ws.transaction() as c:
            c.execute("DELETE FROM scan_partials WHERE scan_key = ? AND layer = ?", (key, layer))

    # -- fit groups -----------------------------------------------------------------------------
    def commit_fit_unit(self, plan_id: str, unit_id: str, records: list[NeuronRecord], seconds: float,
                        worker: str | None = None) -> None:
        """Commits every neuron of a fit group and marks the unit done, in one transaction (the
        group is built whole or not at all); counts the neurons into their job's `done`."""
        with self.ws.transaction() as c:
            for rec in records:
                c.execute(
                    "INSERT OR REPLACE INTO neurons (layer, neuron, max_activation, graph, examples, stats, metrics, "
                    "job_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (rec.layer, rec.neuron, rec.max_activation, rec.graph_bytes, json.dumps(rec.examples),
                     json.dumps(rec.stats), json.dumps(rec.metrics), rec.job_id, rec.created_at))
            jobs: dict[str, int] = {}
            for rec in records:
                if rec.job_id is not None:
                    jobs[rec.job_id] = jobs.get(rec.job_id, 0) + 1
            for job_id, n in jobs.items():
                c.execute("UPDATE jobs SET done = done + ?, updated_at = ? WHERE id = ?", (n, time.time(), job_id))
            self._finish(c, plan_id, unit_id, seconds, worker)

    def count_built(self, keys: list[tuple[int, int]]) -> int:
        """How many of ``keys`` have a committed neuron."""
        have = set(self.ws.built_keys())
        return sum(1 for k in keys if k in have)
