"""The workspace: one directory per (model, corpus), holding an embedded SQLite database.

SQLite (WAL mode) keeps metadata, the corpus windows, the dataset scan, every built neuron (its
graph in n2g_fast's versioned binary form, its examples, stats and evaluation) and the build jobs.
Each neuron is committed in its own transaction as soon as it is built, so a build that is killed
loses nothing and resumes where it stopped.

Reliability (issue 10):
- One writer per workspace: a writer holds an exclusive `flock` on `writer.lock` (the kernel
  drops it when the process dies, SIGKILL included) and writes its pid, host and purpose there,
  so a second writer is refused with a message naming the first. Readers take no lock.
  `mode="write"` takes the lock at open, `mode="read"` never writes, and the default
  `mode="auto"` reads without the lock and takes it at its first write.
- Damaged data: every neuron row is checked when read (its graph blob's header, length, CRC-32
  and (layer, neuron) against the row; strict JSON without NaN); a damaged row is skipped by the
  listings, reported by `damaged()` and refused by `get_neuron`, never failing the whole
  workspace. A damaged, truncated, garbage or 0-byte database file, or one that cannot be
  opened, ends in a one-line WorkspaceError; so does any SQLite error (translated, with a `kind`).
- Nothing non-finite is stored (put_neuron refuses NaN/inf), job ids and stored requests are
  bounded, and a job records its attempts so that a job that kills its process is not resumed
  into a crash loop (see jobqueue.py).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import socket
import sqlite3
import struct
import sys
import threading
import time
import urllib.parse
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator

import numpy as np

from n2g.vocab import JOB_FINAL, JOB_STATES

log = logging.getLogger("n2g.workspace")

# 2: CRC-32 columns on windows, layer_scans and eval_ordinary_acts. This n2g reads version 1 as it
# is and its writers upgrade it; an older n2g refuses version 2 (its inserts would not fit).
SCHEMA_VERSION = 2
READ_SCHEMA_VERSIONS = (1, 2)
DB_NAME = "n2g.sqlite"
LOCK_NAME = "writer.lock"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS windows (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    n INTEGER NOT NULL, length INTEGER NOT NULL, tokens BLOB NOT NULL,
    crc INTEGER  -- CRC-32 of tokens (NULL in rows an older n2g wrote), as in the tables below
);
CREATE TABLE IF NOT EXISTS layer_scans (
    layer INTEGER PRIMARY KEY, k INTEGER NOT NULL, d_mlp INTEGER NOT NULL,
    max_activation BLOB NOT NULL, top_window_ids BLOB NOT NULL, top_scores BLOB NOT NULL,
    seconds REAL NOT NULL,
    crc INTEGER  -- CRC-32 of the three arrays, in that order
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
-- the graph store's freshness check (count, latest commit) and its list of commit times read this
-- index, not the table's rows (~100 KB each with their examples: 5 GB on a whole model)
CREATE INDEX IF NOT EXISTS neurons_by_time ON neurons (created_at, layer, neuron);
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
    crc INTEGER,  -- CRC-32 of acts (NULL in rows an older n2g wrote)
    PRIMARY KEY (layer, neuron)
);
"""

# The job states come from the shared vocabulary (n2g.vocab).
ACTIVE_JOB_STATES = tuple(s for s in JOB_STATES if s not in JOB_FINAL)
TERMINAL_JOB_STATES = JOB_FINAL
MAX_JOB_ID_CHARS = 128
MAX_JOB_REQUEST_BYTES = 64 * 1024
# columns `jobs` gained after the first release: a writer adds them to an older workspace
_JOB_COLUMNS_ADDED = (("attempts", "INTEGER NOT NULL DEFAULT 0"), ("stalls", "INTEGER NOT NULL DEFAULT 0"),
                      ("start_done", "INTEGER NOT NULL DEFAULT 0"), ("stage", "TEXT"))
# Columns added to tables since they were first written (a writer adds what a database lacks)
_COLUMNS_ADDED = {"jobs": _JOB_COLUMNS_ADDED, "eval_ordinary_acts": (("crc", "INTEGER"),),
                  "windows": (("crc", "INTEGER"),), "layer_scans": (("crc", "INTEGER"),)}


def _crc(*blobs: bytes) -> int:
    crc = 0
    for b in blobs:
        crc = zlib.crc32(b, crc)
    return crc


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
    attempts: int = 0  # how many times a runner started it
    stalls: int = 0  # consecutive interrupted attempts that committed no neuron
    start_done: int = 0  # `done` when the last attempt started; -1 once that attempt committed work
    stage: str | None = None  # the build stage it last reported (corpus | scan | fit | ...)
    request_bytes: int = 0  # size of the stored request (a listing may leave the request out)


@dataclass(frozen=True)
class DamagedRow:
    """A neuron row that cannot be served, and why."""
    layer: int
    neuron: int
    reason: str


def _blob(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


# -- checks of stored values ------------------------------------------------------------------
# n2g_fast's binary graph (n2g_fast/src/format.rs): magic "N2GG" | version u16 | flags u16 |
# body_len u32 | crc u32 (CRC-32 of the 12 bytes before it, then the body) | body, where the body
# starts with model str | layer varint | neuron varint. Checking these needs no trie decoding.
_GRAPH_MAGIC = b"N2GG"
_GRAPH_VERSION = 1
_GRAPH_HEADER = 16


def _varint(b: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = b[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def check_graph_blob(blob: Any, layer: int, neuron: int) -> str | None:
    """Why `blob` is not a sound stored graph of neuron (layer, neuron), or None if it is: the
    header, the length, the CRC-32 and the key written in the body are checked (a truncated,
    overwritten or swapped blob is caught)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        return f"the graph is not a blob (found {type(blob).__name__})"
    b = bytes(blob)
    if len(b) < _GRAPH_HEADER:
        return f"the graph blob is truncated ({len(b)} bytes, the header alone is {_GRAPH_HEADER})"
    if b[:4] != _GRAPH_MAGIC:
        return "the graph blob is not n2g graph bytes (wrong magic)"
    version, flags, body_len, crc = struct.unpack_from("<HHII", b, 4)
    if version != _GRAPH_VERSION or flags & ~1:
        return f"the graph blob has format version {version} / flags {flags:#x}; this n2g reads version {_GRAPH_VERSION}"
    if len(b) != _GRAPH_HEADER + body_len:
        what = "truncated" if len(b) < _GRAPH_HEADER + body_len else "followed by extra bytes"
        return f"the graph blob is {what}: its header says {body_len} body bytes, {len(b) - _GRAPH_HEADER} present"
    if zlib.crc32(b[_GRAPH_HEADER:], zlib.crc32(b[:12])) != crc:
        return "the graph blob is corrupt (checksum mismatch)"
    try:
        n, pos = _varint(b, _GRAPH_HEADER)
        got_layer, pos = _varint(b, pos + n)
        got_neuron, _ = _varint(b, pos)
    except (IndexError, ValueError):
        return "the graph blob's body is malformed"
    if (got_layer, got_neuron) != (layer, neuron):
        return f"the graph blob belongs to neuron ({got_layer}, {got_neuron}), not to this row (swapped or misplaced)"
    return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"holds {name}")


def _strict_json(text: Any, what: str) -> dict[str, Any]:
    """A stored JSON object; raises ValueError naming `what` for anything else (bad JSON, NaN or
    infinity, not an object)."""
    if not isinstance(text, str):
        raise ValueError(f"{what} is not text (found {type(text).__name__})")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{what} is not valid JSON ({msg[:120]})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a JSON object")
    return value


# A neuron's examples are stored as zlib-compressed JSON (a BLOB): a calibrated fit keeps ~300
# windows a neuron, 300 KB of JSON, a third of that compressed. Rows written as JSON text (before
# this) read as they are.
EXAMPLES_ZLIB_LEVEL = 6


def _pack_examples(text: str) -> bytes:
    return zlib.compress(text.encode("utf-8"), EXAMPLES_ZLIB_LEVEL)


def _unpack_examples(value: Any) -> Any:
    """The examples' JSON text of a stored value (compressed or text); ValueError if damaged."""
    if isinstance(value, (bytes, memoryview)):
        try:
            return zlib.decompress(bytes(value)).decode("utf-8")
        except (zlib.error, UnicodeDecodeError) as e:
            raise ValueError(f"examples is damaged (not a readable compressed record: {str(e)[:80]})") from None
    return value


def _non_finite_path(value: Any, path: str) -> str | None:
    """Where in a JSON-able value a NaN or an infinity sits (e.g. "stats.loss[3]"), or None."""
    if isinstance(value, float) or isinstance(value, np.floating):
        return None if math.isfinite(value) else path
    if isinstance(value, dict):
        for k, v in value.items():
            found = _non_finite_path(v, f"{path}.{k}")
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _non_finite_path(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _dump_finite(value: Any, what: str, key: tuple[int, int]) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        where = _non_finite_path(value, what) or what
        raise WorkspaceError(
            f"neuron {key} not stored: {where} is NaN or infinite (a neuron whose a_max is not positive "
            "never fires: store it as dead instead)", "non_finite", layer=key[0], neuron=key[1]) from None


_JOB_ID = re.compile(r"[^\x00-\x1f\x7f-\x9f]+")


def validate_job_id(job_id: Any) -> str:
    """A job id as stored: 1..MAX_JOB_ID_CHARS printable characters, no control characters and
    no surrounding blanks. Raises WorkspaceError (kind invalid); the message never echoes a long id."""
    if not isinstance(job_id, str) or not job_id:
        raise WorkspaceError("a job id must be a non-empty string", "invalid")
    if len(job_id) > MAX_JOB_ID_CHARS:
        raise WorkspaceError(f"a job id has at most {MAX_JOB_ID_CHARS} characters (got {len(job_id)})", "invalid")
    if not _JOB_ID.fullmatch(job_id) or not job_id.isprintable() or job_id.strip() != job_id:
        raise WorkspaceError(f"job id {job_id!r} holds control characters or surrounding blanks", "invalid")
    return job_id


# -- the database file ------------------------------------------------------------------------
def _check_db_file(db: Path, where: str) -> None:
    """Refuses a database file that SQLite would open as an empty database or fail on later: 0
    bytes, not SQLite, shorter than its header says (truncated), or unreadable."""
    try:
        size = db.stat().st_size
        with open(db, "rb") as f:
            head = f.read(100)
    except OSError as e:
        raise WorkspaceError(f"workspace {where}: cannot read {DB_NAME} ({e.strerror}); check its permissions",
                             "unavailable") from None
    if size == 0:
        raise WorkspaceError(
            f"workspace {where}: {DB_NAME} is empty (0 bytes): the database was lost or damaged, this is not an "
            "empty workspace; restore it from a backup, or remove the directory to start over", "damaged")
    page_size = int.from_bytes(head[16:18], "big") if len(head) == 100 else 0
    page_size = 65536 if page_size == 1 else page_size
    if len(head) < 100 or head[:16] != b"SQLite format 3\x00" or page_size < 512 or page_size & (page_size - 1):
        raise WorkspaceError(
            f"workspace {where}: {DB_NAME} is not an SQLite database (overwritten or damaged); restore it from a "
            "backup or build into a new workspace", "damaged")
    pages = int.from_bytes(head[28:32], "big")
    if head[24:28] == head[92:96] and pages and size < pages * page_size:  # the header's size is valid
        raise WorkspaceError(
            f"workspace {where}: {DB_NAME} is truncated ({size} bytes, its header says {pages * page_size}); "
            "restore it from a backup or build into a new workspace", "damaged")


def utf8_text(text: object) -> str:
    """``text`` as SQLite and gRPC can carry it: a lone surrogate (how Python holds a file name in
    another encoding) becomes its escape, e.g. "\\udce9"."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def _in(column: str, values: Collection[Any]) -> str:
    """`column IN (?, ...)` for ``values`` (bound as parameters; never empty: SQL has no `IN ()`)."""
    return f"{column} IN ({', '.join('?' * len(values))})"


def _file_id(path: Path) -> tuple[int, int] | None:
    """Which file `path` names now (device, inode), None if none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _translate(e: sqlite3.Error, where: str) -> WorkspaceError:
    """A one-line WorkspaceError for an SQLite error."""
    msg = (str(e).splitlines() or [""])[0] or type(e).__name__
    low = msg.lower()
    if "malformed" in low or "not a database" in low or "corrupt" in low:
        return WorkspaceError(f"workspace {where}: the database is damaged ({msg}); restore {DB_NAME} from a backup "
                              "or build into a new workspace", "damaged")
    if "full" in low:
        return WorkspaceError(f"workspace {where}: no space left to write the database ({msg}); free some disk "
                              "space and retry", "full")
    if "readonly" in low or "read-only" in low:
        return WorkspaceError(f"workspace {where} cannot be written ({msg}): its directory or {DB_NAME} is "
                              "read-only", "read_only")
    if "unable to open" in low or "permission" in low:
        return WorkspaceError(f"workspace {where}: cannot open the database ({msg}); check the permissions of the "
                              f"directory and of {DB_NAME}", "unavailable")
    if "locked" in low or "busy" in low:
        return WorkspaceError(f"workspace {where} is busy ({msg}); retry later", "busy")
    if "i/o" in low:
        return WorkspaceError(f"workspace {where}: disk I/O error on the database ({msg}); the file may be damaged "
                              "or the disk failing", "damaged")
    if "no such table" in low or "no such column" in low:
        return WorkspaceError(f"workspace {where}: the database lacks part of the n2g schema ({msg}): it was "
                              "written by another n2g version, or damaged", "schema")
    if isinstance(e, sqlite3.IntegrityError):
        return WorkspaceError(f"workspace {where}: {msg}", "conflict")
    return WorkspaceError(f"workspace {where}: database error: {msg}", "storage")


class _Cursor(sqlite3.Cursor):
    """Raises a one-line WorkspaceError for every SQLite error (never a bare sqlite3 one)."""

    def execute(self, *args):
        try:
            return super().execute(*args)
        except sqlite3.ProgrammingError:
            raise
        except sqlite3.DatabaseError as e:
            raise _translate(e, self.connection.where) from e

    def executemany(self, *args):
        try:
            return super().executemany(*args)
        except sqlite3.ProgrammingError:
            raise
        except sqlite3.DatabaseError as e:
            raise _translate(e, self.connection.where) from e

    def fetchone(self):
        try:
            return super().fetchone()
        except sqlite3.ProgrammingError:
            raise
        except sqlite3.DatabaseError as e:
            raise _translate(e, self.connection.where) from e

    def fetchall(self):
        try:
            return super().fetchall()
        except sqlite3.ProgrammingError:
            raise
        except sqlite3.DatabaseError as e:
            raise _translate(e, self.connection.where) from e

    def __next__(self):
        try:
            return super().__next__()
        except sqlite3.ProgrammingError:
            raise
        except sqlite3.DatabaseError as e:
            raise _translate(e, self.connection.where) from e


class _Conn(sqlite3.Connection):
    where = ""  # the workspace named in error messages

    def cursor(self, factory=None):  # type: ignore[override]
        return super().cursor(factory or _Cursor)

    def execute(self, *args):  # type: ignore[override]
        return self.cursor().execute(*args)

    def executemany(self, *args):  # type: ignore[override]
        return self.cursor().executemany(*args)

    def executescript(self, script):  # type: ignore[override]
        try:
            return super().executescript(script)
        except sqlite3.ProgrammingError:
            raise
        except sqlite3.DatabaseError as e:
            raise _translate(e, self.where) from e


# -- the writer lock --------------------------------------------------------------------------
def _default_purpose() -> str:
    argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    return " ".join(argv)[:200]


def _describe_holder(info: dict[str, Any]) -> str:
    if not info:
        return "a process that is starting (it has not written its details yet)"
    since = info.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} ({info.get('purpose', '?')}, since {when})"


class _WriterLock:
    """An exclusive flock on the workspace's lock file, held by one open file description: the
    kernel releases it when the process ends however it ends. The holder's details are written
    into the file for the message a refused writer gets."""

    def __init__(self, path: Path, where: str):
        self.path = path
        self.where = where
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def holder(self) -> dict[str, Any]:
        try:
            info = json.loads(self.path.read_text(errors="replace")[:4096] or "{}")
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def acquire(self, purpose: str) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise WorkspaceError(
                f"workspace {self.where} cannot be written ({e.strerror}): a build or a server needs write access to "
                "its directory; readers (eval, export, report, serve --no-model) need none", "read_only") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            info = self.holder()
            raise WorkspaceError(
                f"workspace {self.where} already has a writer: {_describe_holder(info)}; only one build or server "
                "may write a workspace at a time (stop it first; readers such as eval, export, report and serve "
                "--no-model may open it meanwhile)", "locked", holder=info) from None
        self.fd = fd
        self.describe(purpose)

    def describe(self, purpose: str) -> None:
        if self.fd is None:
            return
        info = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose, "since": time.time()}
        data = json.dumps(info).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                os.ftruncate(fd, 0)  # before unlocking: never clobber the next holder's details
            except OSError:
                pass
            os.close(fd)  # closing the last descriptor drops the flock

    def __del__(self) -> None:
        self.release()


def _schema_tables() -> set[str]:
    return set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", _SCHEMA))


def _schema_indexes() -> set[str]:
    return set(re.findall(r"CREATE INDEX IF NOT EXISTS (\w+)", _SCHEMA))


def check_folder(path: Path) -> None:
    """A workspace is a folder: a file there said "no workspace; build one", then "File exists"."""
    if path.exists() and not path.is_dir():
        raise WorkspaceError(f"{path} is a file, not a workspace folder: give a folder (a new one, or one n2g made)",
                             "invalid")


class Workspace:
    """Thread-safe access to one workspace directory (one connection per thread).

    `mode` says how this handle may use the workspace:
    - "write" takes the workspace's writer lock at once (a build, a server with a model): a second
      writer fails here, fast, with WorkspaceError(kind="locked") naming the holder;
    - "read" never writes and takes no lock (eval, export, report, serve --no-model); it also
      opens a workspace on a read-only disk;
    - "auto" (the default, what every caller got before) reads without the lock and takes it at
      its first write (raising kind="locked" there if another writer holds it).
    `purpose` (e.g. "n2g serve on 127.0.0.1:50051") is written into the lock file for that message."""

    def __init__(self, path: str | Path, *, create: bool = False,
                 model: str | None = None, corpus: str | None = None, hook: str | None = None,
                 mode: str = "auto", purpose: str | None = None):
        if mode not in ("auto", "read", "write"):
            raise ValueError(f"mode must be 'auto', 'read' or 'write', not {mode!r}")
        if create and mode == "read":
            raise ValueError("a workspace opened with mode='read' cannot be created")
        self.path = Path(path)
        check_folder(self.path)
        self.mode = mode
        self._purpose = purpose
        self._db_path = self.path / DB_NAME
        self._local = threading.local()
        self._writer = _WriterLock(self.path / LOCK_NAME, str(self.path))
        self._writer_mutex = threading.RLock()
        # (layer, neuron) -> (fingerprint of the row, why it is damaged or None): rows are checked
        # once per version, so listings stay cheap
        self._verdicts: dict[tuple[int, int], tuple[tuple, str | None]] = {}
        self._uri: str | None = None  # set to open a read-only directory immutably
        self._opened_file: tuple[int, int] | None = None  # (device, inode) once open: see replaced()
        self._added_columns = False
        if not self._db_path.exists():
            if not create:
                raise WorkspaceError(f"no workspace at {self.path} (no {DB_NAME}); build one first with "
                                     f"`n2g build --workspace {self.path}`", "missing")
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise WorkspaceError(f"cannot create workspace {self.path} ({e.strerror})", "read_only") from None
        if mode == "write" or not self._db_path.exists():
            self._become_writer(purpose)  # creates the database when it is new
        else:
            _check_db_file(self._db_path, str(self.path))
            if not os.access(self.path, os.W_OK):
                self._open_immutable()
            elif mode == "auto" and not self._schema_complete():
                self._upgrade_schema()
        # the file this handle opened: a database removed or replaced under it is detected (replaced())
        self._opened_file = _file_id(self._db_path)
        try:
            found = self.get_meta("schema_version")
        except WorkspaceError as e:
            if e.kind != "schema":
                raise
            found = None
        if found is None or not found.isdigit():
            raise self._not_a_workspace()
        if int(found) not in READ_SCHEMA_VERSIONS:
            raise WorkspaceError(f"workspace {self.path} has schema version {found}, this n2g reads "
                                 f"{', '.join(map(str, READ_SCHEMA_VERSIONS))}: use the n2g that wrote it", "schema")
        for key, value in (("model", model), ("corpus", corpus), ("hook", hook)):
            if value is None:
                continue
            have = self.get_meta(key)
            if have is None:
                self.set_meta(key, value)
            elif have != value:
                raise WorkspaceError(f"workspace {self.path} was built for {key}={have!r}, not {value!r}; use another "
                                     "--workspace", "mismatch")

    # -- the writer lock ----------------------------------------------------------------------
    def acquire_writer(self, purpose: str | None = None) -> None:
        """Makes this handle the workspace's writer now (or updates the purpose it shows);
        WorkspaceError(kind="locked") if another writer holds the workspace."""
        if self.mode == "read":
            raise WorkspaceError(f"workspace {self.path} is open read-only (mode='read')", "read_only")
        self._become_writer(purpose)

    def release_writer(self) -> None:
        """Gives the writer lock back (a later write in mode auto/write takes it again)."""
        with self._writer_mutex:
            self._writer.release()

    @property
    def is_writer(self) -> bool:
        return self._writer.held

    def replaced(self) -> bool:
        """Whether the database file this handle opened was removed or replaced since: its open
        connections would go on reading the old file and writing where nothing is kept."""
        return self._opened_file is not None and _file_id(self._db_path) != self._opened_file

    def writer_holder(self) -> dict[str, Any] | None:
        """The details (pid, host, purpose, since) of the process holding the writer lock, or
        None when no writer holds it."""
        if self._writer.held:
            return self._writer.holder()
        try:
            fd = os.open(self._writer.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return self._writer.holder()
        finally:
            os.close(fd)
        return None

    def _become_writer(self, purpose: str | None = None) -> None:
        with self._writer_mutex:
            if self._writer.held:
                if purpose:
                    self._writer.describe(purpose)
                return
            if not os.access(self.path, os.W_OK):
                raise WorkspaceError(
                    f"workspace {self.path} cannot be written (its directory is read-only): a build or a server "
                    "needs write access; readers (eval, export, report, serve --no-model) need none", "read_only")
            self._writer.acquire(purpose or self._purpose or _default_purpose())
            try:
                if self._db_path.exists():
                    _check_db_file(self._db_path, str(self.path))
                    self._ensure_schema()
                else:
                    self._create_db()
            except BaseException:
                self._writer.release()
                raise

    # -- the database file and its schema -----------------------------------------------------
    def _create_db(self) -> None:
        """Creates the database under a temporary name and renames it into place, so a process
        killed while creating leaves no half-made (e.g. 0-byte) database behind."""
        tmp = self.path / (DB_NAME + ".new")
        leftovers = [Path(f"{tmp}{s}") for s in ("", "-wal", "-shm", "-journal")]
        for p in leftovers:  # of a creation that was killed (we hold the writer lock)
            p.unlink(missing_ok=True)
        try:
            try:
                conn = sqlite3.connect(tmp, isolation_level=None, factory=_Conn)
            except sqlite3.DatabaseError as e:
                raise _translate(e, str(self.path)) from e
            conn.where = str(self.path)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            finally:
                conn.close()  # the last connection checkpoints and removes the -wal and -shm files
            os.replace(tmp, self._db_path)
        except BaseException:
            for p in leftovers:
                p.unlink(missing_ok=True)
            raise
        self._added_columns = True

    def _ensure_schema(self) -> None:
        """Adds what this n2g's schema has and the database lacks (idempotent; writer only)."""
        conn = self._conn()
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except WorkspaceError as e:
            if e.kind != "schema":
                raise
            row = None
        if row is None:  # never turn some other database into a workspace
            raise self._not_a_workspace()
        conn.execute("PRAGMA journal_mode=WAL")
        # executescript commits any open transaction first, so the (idempotent) schema runs alone
        conn.executescript(_SCHEMA)
        for table, added in _COLUMNS_ADDED.items():
            cols = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
            for name, decl in added:
                if name not in cols:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
        # an older version is upgraded (a newer one is left as it is: the check at open refuses it)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version' AND CAST(value AS INTEGER) < ?",
                     (str(SCHEMA_VERSION), SCHEMA_VERSION))
        self._added_columns = True

    def _not_a_workspace(self) -> WorkspaceError:
        return WorkspaceError(f"workspace {self.path}: {DB_NAME} is an SQLite database but not an n2g workspace (no "
                              "schema version); restore it from a backup or use another --workspace", "schema")

    def _schema_complete(self) -> bool:
        conn = self._conn()
        have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}
        if not (_schema_tables() | _schema_indexes() <= have and self._has_added_columns()):
            return False
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() if "meta" in have else None
        return row is None or not str(row[0]).isdigit() or int(row[0]) >= SCHEMA_VERSION  # (None: refused at open)

    def _has_added_columns(self) -> bool:
        """Whether every added column is there (jobs' and the others': a writer adds them together)."""
        if not self._added_columns:
            self._added_columns = all(
                {name for name, _ in added} <= {r[1] for r in self._conn().execute(f"PRAGMA table_info({table})")}
                for table, added in _COLUMNS_ADDED.items())
        return self._added_columns

    def _upgrade_schema(self) -> None:
        """mode auto, on a workspace written by an older n2g: adds the missing tables under a
        short hold of the writer lock (a writer that holds it does this itself)."""
        try:
            self._become_writer("adding tables of a newer n2g")
        except WorkspaceError as e:
            if e.kind != "locked":
                raise
            return
        self._writer.release()

    def _open_immutable(self) -> None:
        """A directory nobody can write (a read-only disk): SQLite cannot make its -shm file
        there, but nothing can change the database either, so it is opened as immutable."""
        wal = Path(f"{self._db_path}-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise WorkspaceError(
                f"workspace {self.path} is on a read-only directory and holds changes not yet merged into {DB_NAME} "
                f"({wal.name}); open it once where it can be written", "unavailable")
        self._uri = f"file:{urllib.parse.quote(str(self._db_path.resolve()))}?immutable=1"

    # -- connection handling ------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                if self._uri is not None:
                    conn = sqlite3.connect(self._uri, uri=True, timeout=30.0, isolation_level=None,
                                           check_same_thread=False, factory=_Conn)
                else:
                    # mode=rw: a database gone from under this handle is an error here, not a new empty file
                    conn = sqlite3.connect(f"file:{urllib.parse.quote(str(self._db_path))}?mode=rw", uri=True,
                                           timeout=30.0, isolation_level=None, check_same_thread=False, factory=_Conn)
            except sqlite3.DatabaseError as e:
                raise _translate(e, str(self.path)) from e
            conn.where = str(self.path)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            if self.mode == "read" or self._uri is not None:
                conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; takes the writer lock first if this handle does not hold it."""
        if self.mode == "read":
            raise WorkspaceError(f"workspace {self.path} is open read-only (mode='read'): this handle does not write",
                                 "read_only")
        if not self._writer.held:
            self._become_writer()
        conn = self._conn()
        if self.replaced():
            # SQLite would go on writing to the unlinked file and report success: nothing would be kept
            raise WorkspaceError(f"workspace {self.path}: {DB_NAME} was removed or replaced while this process had it "
                                 "open; what it writes now would be lost, so it stops (start it again)", "damaged")
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            try:
                conn.execute("ROLLBACK")
            except WorkspaceError:  # SQLite may have rolled back already (e.g. on a full disk)
                pass
            raise
        else:
            try:
                conn.execute("COMMIT")
            except WorkspaceError:
                try:
                    conn.execute("ROLLBACK")
                except WorkspaceError:
                    pass
                raise

    def close(self) -> None:
        """Closes this thread's connection and gives the writer lock back."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        self.release_writer()

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
        blob = _blob(w)
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO windows (id, n, length, tokens, crc) VALUES (0, ?, ?, ?, ?)",
                      (w.shape[0], w.shape[1], blob, _crc(blob)))

    def _crc_column(self) -> str:
        return "crc" if self._has_added_columns() else "NULL"  # a reader of an older workspace

    def load_windows(self) -> np.ndarray | None:
        row = self._conn().execute(f"SELECT n, length, tokens, {self._crc_column()} FROM windows WHERE id = 0").fetchone()
        if row is None or row[0] == 0:  # none, or none kept by an older n2g from a too short corpus
            return None
        n, length, blob, crc = row
        try:
            if crc is not None and _crc(blob) != crc:
                raise ValueError("checksum mismatch")
            return np.frombuffer(blob, dtype=np.int32).reshape(n, length).astype(np.int64)
        except (TypeError, ValueError):
            raise WorkspaceError(f"workspace {self.path}: the stored corpus windows are damaged (not {n} x {length} "
                                 "tokens, or not the tokens written); build into a new workspace",
                                 "damaged") from None

    # -- dataset scan ---------------------------------------------------------------------------
    def save_layer_scan(self, layer: int, max_activation: np.ndarray, top_window_ids: np.ndarray,
                        top_scores: np.ndarray, seconds: float) -> None:
        ids = np.asarray(top_window_ids, dtype=np.int64)
        blobs = (_blob(np.asarray(max_activation, np.float32)), _blob(ids), _blob(np.asarray(top_scores, np.float32)))
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO layer_scans (layer, k, d_mlp, max_activation, top_window_ids, top_scores, "
                "seconds, crc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (layer, ids.shape[1], ids.shape[0], *blobs, seconds, _crc(*blobs)),
            )

    def load_layer_scan(self, layer: int) -> dict[str, Any] | None:
        row = self._conn().execute(
            f"SELECT k, d_mlp, max_activation, top_window_ids, top_scores, seconds, {self._crc_column()} "
            f"FROM layer_scans WHERE layer = ?", (layer,),
        ).fetchone()
        if row is None:
            return None
        k, d_mlp, amax, ids, scores, seconds, crc = row
        try:
            if crc is not None and _crc(amax, ids, scores) != crc:
                raise ValueError("checksum mismatch")
            return {
                "layer": layer,
                "max_activation": np.frombuffer(amax, np.float32).reshape(d_mlp).copy(),
                "top_window_ids": np.frombuffer(ids, np.int64).reshape(d_mlp, k).copy(),
                "top_scores": np.frombuffer(scores, np.float32).reshape(d_mlp, k).copy(),
                "seconds": seconds,
            }
        except (TypeError, ValueError):
            raise WorkspaceError(f"workspace {self.path}: the stored scan of layer {layer} is damaged (its arrays are "
                                 f"not {d_mlp} x {k}, or not the values written); rebuild the layer in a new workspace",
                                 "damaged") from None

    def scanned_layers(self) -> list[int]:
        return [r[0] for r in self._conn().execute("SELECT layer FROM layer_scans ORDER BY layer")]

    # -- neurons --------------------------------------------------------------------------------
    # A row's fingerprint, its rowid (new at every INSERT OR REPLACE), tells whether it changed
    # since it was last checked; the primary-key index holds it, so a listing reads no row. An
    # edit in place by another tool is caught where the row is read, and by every new handle.
    _FP = "rowid"
    _ROW = ("SELECT layer, neuron, max_activation, graph, {examples}, {stats}, metrics, job_id, created_at, "
            "rowid FROM neurons")

    @classmethod
    def _select(cls, examples: str = "examples", stats: str = "stats") -> str:
        """The neuron-row query (columns as `_decode` reads them), with what to read in place of
        the examples and the stats columns (NULL: not read)."""
        return cls._ROW.format(examples=examples, stats=stats)

    @staticmethod
    def neuron_row(rec: NeuronRecord) -> tuple:
        """The neurons-table row (layer, neuron, max_activation, graph, examples, stats, metrics,
        job_id, created_at) of `rec`; WorkspaceError if it holds a NaN or an infinity (kind
        non_finite) or a graph blob that is not this neuron's (kind invalid). Every writer of
        neuron rows stores what this returns."""
        key = (int(rec.layer), int(rec.neuron))
        amax = float(rec.max_activation)
        if not math.isfinite(amax):
            raise WorkspaceError(f"neuron {key} not stored: max_activation is {amax} (a neuron whose a_max is not "
                                 "positive never fires: store it as dead instead)", "non_finite",
                                 layer=key[0], neuron=key[1])
        problem = check_graph_blob(rec.graph_bytes, *key)
        if problem:
            raise WorkspaceError(f"neuron {key} not stored: {problem}", "invalid", layer=key[0], neuron=key[1])
        return (key[0], key[1], amax, bytes(rec.graph_bytes),
                _pack_examples(_dump_finite(rec.examples, "examples", key)),
                _dump_finite(rec.stats, "stats", key), _dump_finite(rec.metrics, "metrics", key), rec.job_id,
                float(rec.created_at))

    def put_neuron(self, rec: NeuronRecord) -> None:
        """Commits one built neuron (one transaction; replaces an earlier build of it). Refuses
        non-finite values and a graph blob of another neuron (see `neuron_row`)."""
        row = self.neuron_row(rec)
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO neurons (layer, neuron, max_activation, graph, examples, stats, metrics, "
                      "job_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            if rec.job_id is not None:
                c.execute(
                    "UPDATE jobs SET done = done + 1, updated_at = ? WHERE id = ?", (time.time(), rec.job_id)
                )

    @staticmethod
    def _decode(row, with_examples: bool, with_stats: bool = True) -> NeuronRecord:
        """The record of a neuron row; ValueError with the reason if the row is damaged."""
        layer, neuron, amax, graph, examples, stats, metrics, job_id, created = row[:9]
        if not isinstance(amax, (int, float)) or not math.isfinite(amax):
            raise ValueError(f"max_activation is {amax!r}")
        problem = check_graph_blob(graph, layer, neuron)
        if problem:
            raise ValueError(problem)
        st = _strict_json(stats, "stats") if with_stats else {}
        me = _strict_json(metrics, "metrics")
        ex = _strict_json(_unpack_examples(examples), "examples") if with_examples else {}
        return NeuronRecord(layer, neuron, float(amax), bytes(graph), ex, st, me, job_id, created)

    def _note(self, key: tuple[int, int], fp: tuple, reason: str | None) -> None:
        old = self._verdicts.get(key)
        self._verdicts[key] = (fp, reason)
        if reason and old != (fp, reason):
            log.warning("workspace %s: neuron %s is damaged and is not served: %s", self.path, key, reason)

    def _known_damaged(self, key: tuple[int, int], fp: tuple) -> bool:
        v = self._verdicts.get(key)
        return v is not None and v[0] == fp and v[1] is not None

    def _checked(self, fps: dict[tuple[int, int], tuple]) -> None:
        """Checks the rows whose fingerprint changed since their last check: the graph, stats
        and metrics in full; the examples without reading them into Python: compressed ones by
        their zlib header (a damaged body is found where they are read), text ones with SQLite's
        json_valid (NaN is not valid JSON there). Each row version is checked once per handle."""
        stale = [k for k, fp in fps.items() if self._verdicts.get(k, (None,))[0] != fp]
        if not stale:
            return
        conn = self._conn()
        sql = self._select(examples="CASE WHEN typeof(examples) = 'blob' THEN hex(substr(examples, 1, 1)) = '78' "
                                   "ELSE json_valid(examples) END")
        if len(stale) > 64:  # a first listing or a big change: one pass over the table
            wanted = set(stale)
            rows = (r for r in conn.execute(sql) if (r[0], r[1]) in wanted)
        else:
            rows = (r for k in stale for r in conn.execute(sql + " WHERE layer = ? AND neuron = ?", k))
        for row in rows:
            try:
                self._decode(row, with_examples=False)
                reason = None if row[4] else "examples is not valid JSON nor a compressed record"
            except ValueError as e:
                reason = str(e)
            self._note((row[0], row[1]), tuple(row[9:10]), reason)

    def _healthy_keys(self) -> list[tuple[int, int]]:
        rows = self._conn().execute(f"SELECT layer, neuron, {self._FP} FROM neurons ORDER BY layer, neuron").fetchall()
        fps = {(r[0], r[1]): tuple(r[2:]) for r in rows}
        self._checked(fps)
        verdicts = self._verdicts
        if len(verdicts) > len(fps):  # forget rows that are gone
            self._verdicts = verdicts = {k: v for k, v in verdicts.items() if k in fps}
        return [k for k in fps if verdicts.get(k, ((), "unchecked"))[1] is None]

    def has_neuron(self, layer: int, neuron: int) -> bool:
        """Whether the neuron is built and sound (a damaged row counts as not built, so a build
        replaces it)."""
        key = (int(layer), int(neuron))
        row = self._conn().execute(f"SELECT {self._FP} FROM neurons WHERE layer = ? AND neuron = ?", key).fetchone()
        if row is None:
            return False
        self._checked({key: tuple(row)})
        return self._verdicts.get(key, ((), "unchecked"))[1] is None

    def built_keys(self, layers: list[int] | None = None) -> list[tuple[int, int]]:
        """The keys of the sound built neurons (damaged rows are left out: see `damaged()`)."""
        return [k for k in self._healthy_keys() if layers is None or k[0] in layers]

    def get_neuron(self, layer: int, neuron: int) -> NeuronRecord | None:
        """The neuron, None if not built; WorkspaceError(kind="damaged_neuron") if its row is damaged."""
        row = self._conn().execute(self._select() + " WHERE layer = ? AND neuron = ?",
                                   (layer, neuron)).fetchone()
        if row is None:
            return None
        try:
            return self._decode(row, with_examples=True)
        except ValueError as e:
            self._note((row[0], row[1]), tuple(row[9:10]), str(e))
            raise WorkspaceError(f"neuron ({layer}, {neuron}) is damaged in workspace {self.path}: {e}; rebuild it",
                                 "damaged_neuron", layer=layer, neuron=neuron, reason=str(e)) from None

    def iter_neurons(self, *, with_examples: bool = True, with_stats: bool = True,
                     layers: Collection[int] | None = None) -> Iterator[NeuronRecord]:
        """Every sound neuron (of ``layers``, if given), in (layer, neuron) order; damaged rows are
        skipped (and logged). ``with_stats=False`` leaves the fit statistics (the largest JSON
        after the examples) undecoded: a listing of a whole model needs none of them."""
        present = set(self._healthy_keys())  # checks the rows not checked yet, examples included
        sql = self._select("examples" if with_examples else "NULL", "stats" if with_stats else "NULL")
        args: list[int] = []
        where = "(layer, neuron) > (?, ?)"
        if layers is not None:
            args = sorted({int(l) for l in layers})
            where += f" AND {_in('layer', args)}" if args else " AND 0"
        # Read a page at a time, each its own statement: a caller that stops between rows (a slow
        # export stream) must not hold a read transaction, which kept WAL checkpoints from resetting
        # the log (the -wal file grew by all a build wrote meanwhile). Rows added since the start
        # are left out, as one statement would have left them out.
        last = (-1, -1)
        while True:
            rows = self._conn().execute(f"{sql} WHERE {where} ORDER BY layer, neuron LIMIT {self._PAGE}",
                                        [*last, *args]).fetchall()
            for row in rows:
                key, fp = (row[0], row[1]), tuple(row[9:10])
                if key not in present or self._known_damaged(key, fp):
                    continue
                try:
                    rec = self._decode(row, with_examples, with_stats)
                except ValueError as e:
                    self._note(key, fp, str(e))
                    continue
                yield rec
            if len(rows) < self._PAGE:
                return
            last = (rows[-1][0], rows[-1][1])

    _PAGE = 64  # neuron rows a read of iter_neurons (with examples, a few MB)

    def fit_settings(self, keys: Collection[tuple[int, int]]) -> dict[str, list[tuple[int, int]]]:
        """The fit settings the sound built neurons among ``keys`` were built with: each distinct
        stored `fit_config` (JSON text; "" for a record without one) -> its keys. SQLite reads the
        one field, so a whole layer costs neither its graphs nor its statistics in Python."""
        wanted = {(int(l), int(n)) for l, n in keys} & set(self._healthy_keys())
        layers = sorted({l for l, _ in wanted})
        if not layers:
            return {}
        sql = ("SELECT layer, neuron, CASE WHEN json_valid(stats) THEN json_extract(stats, '$.fit_config') END "
               f"FROM neurons WHERE {_in('layer', layers)}")
        out: dict[str, list[tuple[int, int]]] = {}
        for layer, neuron, settings in self._conn().execute(sql, layers):
            if (layer, neuron) in wanted:
                out.setdefault(settings if isinstance(settings, str) else "", []).append((layer, neuron))
        return out

    def graph_bytes(self) -> list[tuple[int, int, bytes]]:
        """(layer, neuron, graph blob) of every sound neuron (as `built_keys`)."""
        self._healthy_keys()
        out = []
        for l, n, g, *fp in self._conn().execute(
                f"SELECT layer, neuron, graph, {self._FP} FROM neurons ORDER BY layer, neuron"):
            if self._known_damaged((l, n), tuple(fp)):
                continue
            problem = check_graph_blob(g, l, n)
            if problem:
                self._note((l, n), tuple(fp), problem)
                continue
            out.append((l, n, bytes(g)))
        return out

    def damaged(self) -> list[DamagedRow]:
        """Checks every neuron row (examples included) and returns the damaged ones with why."""
        out = []
        for row in self._conn().execute(self._select() + " ORDER BY layer, neuron"):
            try:
                self._decode(row, with_examples=True)
            except ValueError as e:
                self._note((row[0], row[1]), tuple(row[9:10]), str(e))
                out.append(DamagedRow(row[0], row[1], str(e)))
        return out

    # -- reads for the application layer and the graph index (lead) -------------------------------
    @staticmethod
    def exists(path: str | Path) -> bool:
        """Whether `path` holds a workspace database (without opening it)."""
        return (Path(path) / DB_NAME).exists()

    def window_length(self) -> int | None:
        """Tokens per corpus window (None before the corpus is tokenised)."""
        row = self._conn().execute("SELECT length FROM windows WHERE id = 0").fetchone()
        return None if row is None else int(row[0])

    def built_counts(self) -> dict[int, int]:
        """{layer: neurons built}."""
        return {int(l): int(n) for l, n in
                self._conn().execute("SELECT layer, COUNT(*) FROM neurons GROUP BY layer ORDER BY layer")}

    def fit_costs(self) -> list[tuple[int, str | None, float | None]]:
        """(layer, fit method, forward tokens the fit cost a neuron) of every built neuron whose
        stats are sound JSON, read by SQLite (no stats decoded in Python: fast on a whole model)."""
        return [(int(l), m, None if t is None else float(t)) for l, m, t in self._conn().execute(
            "SELECT layer, json_extract(stats, '$.method'), json_extract(stats, '$.fit_tokens') FROM neurons "
            "WHERE json_valid(stats)")]

    def neurons_version(self) -> tuple[int, float]:
        """A cheap fingerprint of the neurons table: (count, latest commit time)."""
        row = self._conn().execute("SELECT COUNT(*), COALESCE(MAX(created_at), 0) FROM neurons").fetchone()
        return (int(row[0]), float(row[1]))

    def neuron_times(self) -> dict[tuple[int, int], float]:
        """{(layer, neuron): commit time} of every built neuron."""
        return {(l, n): c for l, n, c in self._conn().execute("SELECT layer, neuron, created_at FROM neurons")}

    def graph_rows(self, keys: list[tuple[int, int]]) -> Iterator[tuple[int, int, float, float, bytes]]:
        """(layer, neuron, created_at, max_activation, graph blob) of `keys` (one pass over the
        table when many are asked)."""
        sql = "SELECT layer, neuron, created_at, max_activation, graph FROM neurons"
        if len(keys) > 64:
            wanted = set(keys)
            rows = (r for r in self._conn().execute(sql) if (r[0], r[1]) in wanted)
        else:
            rows = (r for l, n in keys for r in self._conn().execute(sql + " WHERE layer = ? AND neuron = ?", (l, n)))
        for r in rows:  # a damaged blob is skipped (damaged() reports it), never fails the whole load
            if check_graph_blob(r[4], r[0], r[1]) is None:
                yield r

    def layer_scan_version(self, layer: int) -> float | None:
        """Changes whenever the layer's scan is rewritten (None: not scanned)."""
        row = self._conn().execute("SELECT seconds FROM layer_scans WHERE layer = ?", (layer,)).fetchone()
        return None if row is None else float(row[0])

    def meta_items(self) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self._conn().execute("SELECT key, value FROM meta ORDER BY key")]

    # -- jobs -----------------------------------------------------------------------------------
    def _job_sql(self, with_request: bool = True) -> str:
        extra = "attempts, stalls, start_done, stage" if self._has_added_columns() else "0, 0, 0, NULL"
        # a request stored before requests were bounded is left out rather than loaded
        req = f"CASE WHEN length(request) <= {MAX_JOB_REQUEST_BYTES} THEN request END" if with_request else "NULL"
        return (f"SELECT id, state, {req}, total, done, error, created_at, updated_at, {extra}, length(request) "
                "FROM jobs")

    @staticmethod
    def _job_record(row) -> JobRecord:
        request: Any = {}
        if row[2] is not None:
            try:
                request = json.loads(row[2])
            except ValueError:  # a damaged request: the job queue fails the job with that reason
                request = {}
        if not isinstance(request, dict):
            request = {}
        return JobRecord(row[0], row[1], request, *row[3:12], request_bytes=int(row[12] or 0))

    def create_job(self, job_id: str, request: dict[str, Any], total: int) -> JobRecord:
        """Stores a new queued job. WorkspaceError: a bad id (kind invalid), a request that is
        not finite JSON (invalid) or over MAX_JOB_REQUEST_BYTES (too_large), a taken id (conflict)."""
        validate_job_id(job_id)
        try:
            text = json.dumps(request, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise WorkspaceError(f"job {job_id}: the request cannot be stored ({e})", "invalid") from None
        size = len(text.encode())
        if size > MAX_JOB_REQUEST_BYTES:
            raise WorkspaceError(f"the build request is {size} bytes as stored; the limit is {MAX_JOB_REQUEST_BYTES} "
                                 "bytes (ask for fewer neurons per job, or a sample)", "too_large",
                                 size=size, limit=MAX_JOB_REQUEST_BYTES)
        now = time.time()
        with self.transaction() as c:
            if c.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None:
                raise WorkspaceError(f"job id {job_id!r} is taken in workspace {self.path}", "conflict")
            c.execute("INSERT INTO jobs (id, state, request, total, done, error, created_at, updated_at) "
                      "VALUES (?, 'queued', ?, ?, 0, NULL, ?, ?)", (job_id, text, total, now, now))
        return self.get_job(job_id)

    def update_job(self, job_id: str, *, state: str | None = None, total: int | None = None,
                   done: int | None = None, error: str | None = None, stage: str | None = None,
                   stalls: int | None = None, only_if: Collection[str] | None = None) -> bool:
        """Sets the given fields; with `only_if`, only while the job is in one of those states (one
        statement, so a job that just ended is not changed). Whether the job was changed."""
        if state is not None and state not in JOB_STATES:
            raise ValueError(f"unknown job state {state!r}")
        sets, args = ["updated_at = ?"], [time.time()]
        for col, val in (("state", state), ("total", total), ("done", done), ("error", error), ("stage", stage),
                         ("stalls", stalls)):
            if val is not None:
                sets.append(f"{col} = ?")
                args.append(val)
        where = f" AND {_in('state', only_if)}" if only_if else ""
        with self.transaction() as c:
            cur = c.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?{where}", (*args, job_id, *(only_if or ())))
            return cur.rowcount > 0

    def start_job(self, job_id: str) -> JobRecord | None:
        """Marks a queued (or resumed) job running and counts the attempt: `start_done` keeps
        `done` at the start, so a later start can tell whether this attempt committed anything."""
        with self.transaction() as c:
            c.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1, start_done = done, stage = 'start', "
                      "updated_at = ? WHERE id = ? AND state IN ('queued', 'running')", (time.time(), job_id))
        return self.get_job(job_id)

    def mark_job_progress(self, job_id: str) -> None:
        """Records that the running attempt committed work (a scan shard, a neuron group), so an
        interruption from now on is not a stall: `start_done` = -1 means exactly that."""
        with self.transaction() as c:
            c.execute("UPDATE jobs SET start_done = -1, stalls = 0, updated_at = ? WHERE id = ?", (time.time(), job_id))

    def get_job(self, job_id: str) -> JobRecord | None:
        try:
            validate_job_id(job_id)
        except WorkspaceError:
            return None  # no such id can be stored
        row = self._conn().execute(self._job_sql() + " WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._job_record(row)

    def list_jobs(self, states: list[str] | tuple[str, ...] | None = None, *, limit: int | None = None,
                  with_request: bool = True) -> list[JobRecord]:
        """Jobs in creation order, optionally only those in `states`, only the latest `limit`,
        and without their requests (`request` = {}; `request_bytes` still says their size)."""
        where, args = self._job_states(states)
        sql = self._job_sql(with_request) + where + " ORDER BY created_at DESC, rowid DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(max(0, int(limit)))
        rows = self._conn().execute(sql, args).fetchall()
        return [self._job_record(r) for r in reversed(rows)]

    def count_jobs(self, states: list[str] | tuple[str, ...] | None = None) -> int:
        """How many jobs `list_jobs(states)` lists."""
        where, args = self._job_states(states)
        return int(self._conn().execute("SELECT COUNT(*) FROM jobs" + where, args).fetchone()[0])

    @staticmethod
    def _job_states(states: list[str] | tuple[str, ...] | None) -> tuple[str, list[Any]]:
        if not states:
            return "", []
        bad = [s for s in states if s not in JOB_STATES]
        if bad:
            raise WorkspaceError(f"unknown job state {bad[0]!r}: one of {', '.join(JOB_STATES)}", "invalid")
        return f" WHERE {_in('state', states)}", list(states)

    # -- evaluation on ordinary text (owned by evaluate.py) ---------------------------------------
    def window_count(self) -> int | None:
        """How many corpus windows the workspace holds (None before the corpus is tokenised)."""
        row = self._conn().execute("SELECT n FROM windows WHERE id = 0").fetchone()
        return None if row is None or not row[0] else int(row[0])

    def record_heldout_windows(self, ids: np.ndarray, seed: int, requested: int, n_windows: int) -> dict[str, Any]:
        """Stores the held-out window ids unless some are stored already; returns the stored ones
        (the first record wins, so every reader sees one fixed set)."""
        a = np.asarray(ids, dtype=np.int64)
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO eval_heldout VALUES (0, ?, ?, ?, ?)",
                      (int(seed), int(requested), int(n_windows), _blob(a)))
        return self.load_heldout_windows()  # type: ignore[return-value]

    def _has_eval_table(self, name: str) -> bool:
        # a reader (mode "read") of a workspace written before these tables existed finds none
        return self._conn().execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                    (name,)).fetchone() is not None

    def load_heldout_windows(self) -> dict[str, Any] | None:
        if not self._has_eval_table("eval_heldout"):
            return None
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
            blob = _blob(a.astype(dtype))
            rows.append((int(layer), int(neuron), a.shape[0], a.shape[1], dtype, blob, _crc(blob)))
        with self.transaction() as c:
            c.executemany("INSERT OR REPLACE INTO eval_ordinary_acts (layer, neuron, n_windows, length, dtype, acts, "
                          "crc) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def load_ordinary_activations(self, layer: int, neurons: list[int]) -> dict[int, np.ndarray]:
        """float32 ``{neuron: [n_windows, length]}`` for the neurons that have them stored, sound:
        a row whose checksum, size or values are wrong is logged and left out, as if missing (an
        evaluation with the model computes it again and replaces it)."""
        out: dict[int, np.ndarray] = {}
        if not self._has_eval_table("eval_ordinary_acts"):
            return out
        conn = self._conn()
        for n in neurons:
            row = conn.execute(
                f"SELECT n_windows, length, dtype, acts, {self._crc_column()} FROM eval_ordinary_acts WHERE layer = ? AND neuron = ?",
                (int(layer), int(n)),
            ).fetchone()
            if row is None:
                continue
            nw, length, dtype, blob, crc = row
            why = None
            if dtype not in ("float16", "float32") or not isinstance(blob, bytes):
                why = f"dtype {dtype!r}"
            elif len(blob) != nw * length * np.dtype(dtype).itemsize:
                why = f"{len(blob)} bytes for [{nw}, {length}] {dtype}"
            elif crc is not None and _crc(blob) != crc:
                why = "checksum mismatch"
            else:
                a = np.frombuffer(blob, dtype=dtype).reshape(nw, length).astype(np.float32)
                if not np.isfinite(a).all():
                    why = "NaN or infinite values"
            if why is not None:
                log.warning("workspace %s: the stored true activations of neuron %d:%d on the held-out windows are "
                            "damaged (%s): left out, computed again by an evaluation with the model", self.path,
                            layer, n, why)
                continue
            out[int(n)] = a
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

    def __init__(self, ws: Workspace, *, create: bool = True) -> None:
        self.ws = ws
        have = {r[0] for r in ws._conn().execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self._ready = {"build_plans", "build_units", "scan_partials"} <= have
        if not self._ready and create and ws.mode != "read":
            self._create()

    def _create(self) -> None:
        with self.ws.transaction() as c:  # takes the writer lock
            for stmt in _BUILD_SCHEMA.split(";"):
                if stmt.strip():
                    c.execute(stmt)
        self._ready = True

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

    def plans(self) -> list[str]:
        """Plan ids, oldest first."""
        if not self._ready:
            return []
        return [r[0] for r in self.ws._conn().execute("SELECT plan_id FROM build_plans ORDER BY created_at")]

    def fit_planned(self, plan_id: str) -> bool:
        if not self._ready:
            return False
        row = self.ws._conn().execute("SELECT fit_planned FROM build_plans WHERE plan_id = ?", (plan_id,)).fetchone()
        return bool(row and row[0])

    def units(self, plan_id: str, kind: str | None = None) -> list[UnitRecord]:
        if not self._ready:
            return []
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
        if not self._ready:
            return set()
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
        rows = [Workspace.neuron_row(rec) for rec in records]  # refuses NaN/inf and misplaced graph blobs
        with self.ws.transaction() as c:
            for row in rows:
                c.execute(
                    "INSERT OR REPLACE INTO neurons (layer, neuron, max_activation, graph, examples, stats, metrics, "
                    "job_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
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
