"""The workspace under hostile conditions (issue 10): one writer per workspace, damaged rows and
database files refused clearly while healthy data is still served, nothing non-finite stored.

Damage is made with the sqlite3 module directly, as a bad disk, a stray tool or a person would."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import n2g_fast
import numpy as np
import pytest

from n2g_servers import read_only_dir
from n2g_service.workspace import (DB_NAME, LOCK_NAME, NeuronRecord, Workspace, WorkspaceError,
                                   check_graph_blob)

ROOT = Path(__file__).resolve().parents[1]
KEYS = [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1), (1, 2), (1, 3)]


def _graph_bytes(layer: int, neuron: int, label: str = "cat") -> bytes:
    g = n2g_fast.NeuronGraph("m", layer, neuron, "h", 2.0)
    g.add_path((label, [7], 1.0), [("the", [3], 0.5)], 1.0)
    return g.to_bytes()


def _record(layer: int, neuron: int, **kw) -> NeuronRecord:
    fields = dict(max_activation=2.0, graph_bytes=_graph_bytes(layer, neuron),
                  examples={"train": [{"token_ids": [3, 7], "activations": [0.0, 1.0]}], "test": []},
                  stats={"n_paths": 1}, metrics={"paper": {"precision": 1.0, "recall": 0.5, "f1": 0.667}})
    fields.update(kw)
    return NeuronRecord(layer, neuron, **fields)


@pytest.fixture
def ws_path(tmp_path) -> Path:
    path = tmp_path / "ws"
    ws = Workspace(path, create=True, model="m", corpus="c", hook="h")
    ws.save_windows(np.arange(64 * 1000, dtype=np.int64).reshape(1000, 64) % 50)  # some pages to truncate
    for key in KEYS:
        ws.put_neuron(_record(*key))
    ws.close()
    return path


def _sql(path: Path, sql: str, *args) -> None:
    conn = sqlite3.connect(path / DB_NAME)
    conn.execute(sql, args)
    conn.commit()
    conn.close()


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "service"), str(ROOT / "python_client"), e.get("PYTHONPATH", "")])
    return e


def _one_line(e: WorkspaceError) -> str:
    msg = str(e)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


# -- one writer per workspace -------------------------------------------------------------------
_HOLDER = """
import sys, time
from n2g_service.workspace import Workspace
ws = Workspace(sys.argv[1], mode="write", purpose="lock test holder")
print("ready", flush=True)
time.sleep(600)
"""

_SECOND = """
import sys
from n2g_service.workspace import Workspace, WorkspaceError
try:
    ws = Workspace(sys.argv[1], mode="write", purpose="second writer")
    ws.set_meta("second", "yes")
except WorkspaceError as e:
    print(e.kind, e)
    sys.exit(3)
print("wrote")
"""


def _second_writer(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _SECOND, str(path)], capture_output=True, text=True,
                          timeout=120, env=_env())


def test_second_writer_process_is_refused_until_the_first_is_killed(ws_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(ws_path)], stdout=subprocess.PIPE, text=True,
                              env=_env())
    try:
        assert holder.stdout.readline().strip() == "ready"
        second = _second_writer(ws_path)
        assert second.returncode == 3, second.stderr
        out = second.stdout.strip()
        assert out.startswith("locked ") and "\n" not in out
        assert f"pid {holder.pid}" in out and "lock test holder" in out

        # readers share the workspace with its writer
        assert Workspace(ws_path, mode="read").built_keys() == KEYS
        reader = Workspace(ws_path)  # mode auto: reads without the lock ...
        assert reader.get_neuron(0, 0).stats == {"n_paths": 1}
        with pytest.raises(WorkspaceError) as e:  # ... and is refused at its first write
            reader.set_meta("x", "y")
        assert e.value.kind == "locked" and e.value.details["holder"]["pid"] == holder.pid
        assert reader.writer_holder()["purpose"] == "lock test holder"

        holder.send_signal(signal.SIGKILL)  # no clean-up code runs: the kernel drops the lock
        holder.wait(30)
        second = _second_writer(ws_path)
        assert second.returncode == 0 and second.stdout.strip() == "wrote", second.stdout + second.stderr
        assert Workspace(ws_path, mode="read").get_meta("second") == "yes"
        assert Workspace(ws_path, mode="read").writer_holder() is None
    finally:
        holder.kill()
        holder.wait()


def test_writer_lock_within_a_process_modes_and_release(ws_path):
    first = Workspace(ws_path, mode="write", purpose="first")
    assert first.is_writer
    with pytest.raises(WorkspaceError) as e:
        Workspace(ws_path, mode="write")
    assert e.value.kind == "locked" and f"pid {os.getpid()}" in _one_line(e.value) and "first" in str(e.value)

    ro = Workspace(ws_path, mode="read")
    with pytest.raises(WorkspaceError) as e:
        ro.set_meta("k", "v")
    assert e.value.kind == "read_only"
    with pytest.raises(ValueError):
        Workspace(ws_path, mode="read", create=True)

    first.close()  # gives the lock back
    assert not first.is_writer and ro.writer_holder() is None
    second = Workspace(ws_path, mode="write")
    second.set_meta("k", "v")
    assert ro.get_meta("k") == "v"


def test_auto_mode_takes_the_lock_only_when_it_writes(ws_path):
    peek = Workspace(ws_path)
    assert peek.model_name == "m" and not peek.is_writer  # a reader holds nothing
    writer = Workspace(ws_path, mode="write")  # so a writer may start meanwhile
    writer.release_writer()
    peek.set_meta("k", "v")
    assert peek.is_writer
    with pytest.raises(WorkspaceError) as e:
        writer.set_meta("k", "w")
    assert e.value.kind == "locked"


# -- damaged rows -------------------------------------------------------------------------------
DAMAGE = {
    (0, 1): ("UPDATE neurons SET graph = substr(graph, 1, 10) WHERE layer = 0 AND neuron = 1", "truncated"),
    (0, 2): ("UPDATE neurons SET stats = '{\"n_paths\": ' WHERE layer = 0 AND neuron = 2", "stats"),
    (0, 3): ("UPDATE neurons SET examples = '{\"train\": [NaN]}' WHERE layer = 0 AND neuron = 3", "examples"),
    (0, 4): ("UPDATE neurons SET metrics = '{\"paper\": {\"f1\": NaN}}' WHERE layer = 0 AND neuron = 4", "metrics"),
    (1, 2): ("UPDATE neurons SET graph = randomblob(length(graph)) WHERE layer = 1 AND neuron = 2", "graph"),
}
SWAPPED = [(1, 0), (1, 1)]
HEALTHY = [(0, 0), (1, 3)]


def test_damaged_rows_are_skipped_reported_and_refused_while_healthy_ones_are_served(ws_path):
    ref = {k: _graph_bytes(*k) for k in SWAPPED}
    _sql(ws_path, "UPDATE neurons SET graph = ? WHERE layer = 1 AND neuron = 0", ref[(1, 1)])
    _sql(ws_path, "UPDATE neurons SET graph = ? WHERE layer = 1 AND neuron = 1", ref[(1, 0)])
    for sql, _ in DAMAGE.values():
        _sql(ws_path, sql)

    # every listing, each on a fresh handle (nothing checked before), serves the healthy rows only
    assert Workspace(ws_path).built_keys() == HEALTHY
    assert [(r.layer, r.neuron) for r in Workspace(ws_path).iter_neurons()] == HEALTHY
    assert [(r.layer, r.neuron) for r in Workspace(ws_path).iter_neurons(with_examples=False)] == HEALTHY
    # the listing's form: one layer, no stats decoded (a damaged stats row is still left out)
    light = list(Workspace(ws_path).iter_neurons(with_examples=False, with_stats=False, layers=[0]))
    assert [(r.layer, r.neuron) for r in light] == [k for k in HEALTHY if k[0] == 0]
    assert all(r.stats == {} and r.examples == {} and r.metrics for r in light)
    assert list(Workspace(ws_path).iter_neurons(layers=[])) == []
    assert [r.stats for r in Workspace(ws_path).iter_neurons(layers=[1])] == [
        r.stats for r in Workspace(ws_path).iter_neurons() if r.layer == 1]
    assert [(l, n) for l, n, _ in Workspace(ws_path).graph_bytes()] == HEALTHY
    rows = {r[:2] for r in Workspace(ws_path).graph_rows(KEYS)}  # the graph index's load: sound blobs only
    assert set(HEALTHY) <= rows and not rows & {(0, 1), (1, 2), *SWAPPED}
    ro = Workspace(ws_path, mode="read")
    assert [ro.has_neuron(*k) for k in KEYS] == [k in HEALTHY for k in KEYS]

    damaged = {(d.layer, d.neuron): d.reason for d in ro.damaged()}
    assert sorted(damaged) == sorted([*DAMAGE, *SWAPPED])
    for key, (_, word) in DAMAGE.items():
        assert word in damaged[key], (key, damaged[key])
    assert "belongs to neuron (1, 1)" in damaged[(1, 0)] and "belongs to neuron (1, 0)" in damaged[(1, 1)]

    for key in [*DAMAGE, *SWAPPED]:
        with pytest.raises(WorkspaceError) as e:
            ro.get_neuron(*key)
        assert e.value.kind == "damaged_neuron" and e.value.details["layer"] == key[0]
        assert f"neuron {key}" in _one_line(e.value)
    g = ro.get_neuron(1, 3).graph()  # the healthy graph decodes and is its own
    assert (g.layer, g.neuron) == (1, 3)
    assert ro.get_neuron(5, 5) is None

    # rebuilding a damaged neuron replaces it (a build's has_neuron says "not built")
    ws = Workspace(ws_path, mode="write")
    ws.put_neuron(_record(0, 1))
    assert (0, 1) in ws.built_keys() and ws.get_neuron(0, 1).graph().neuron == 1


def test_examples_are_stored_compressed_and_text_rows_still_read(ws_path):
    """Examples are a compressed record (a third of their JSON or less); a row written as JSON
    text before that reads the same; a compressed record that is not zlib is left out of every
    listing, one whose body is damaged is refused where it is read, and reported."""
    import json

    rng = np.random.default_rng(0)
    big = {"train": [{"token_ids": rng.integers(0, 49152, 64).tolist(),
                      "activations": np.round(rng.normal(size=64), 6).tolist()} for _ in range(300)], "test": []}
    ws = Workspace(ws_path, mode="write")
    ws.put_neuron(_record(0, 0, examples=big))
    text = json.dumps(big)
    kind, size = sqlite3.connect(ws_path / DB_NAME).execute(
        "SELECT typeof(examples), length(examples) FROM neurons WHERE layer = 0 AND neuron = 0").fetchone()
    assert kind == "blob" and size < len(text) / 2
    assert ws.get_neuron(0, 0).examples == big
    ws.close()

    _sql(ws_path, "UPDATE neurons SET examples = ? WHERE layer = 0 AND neuron = 1", text)  # an older row
    _sql(ws_path, "UPDATE neurons SET examples = x'00112233' WHERE layer = 0 AND neuron = 2")  # not zlib
    _sql(ws_path, "UPDATE neurons SET examples = ? WHERE layer = 0 AND neuron = 3",  # a zlib header, then noise
         b"\x78\x9c" + rng.integers(0, 256, 200, dtype=np.uint8).tobytes())
    ro = Workspace(ws_path, mode="read")
    assert ro.get_neuron(0, 1).examples == big
    assert (0, 2) not in ro.built_keys() and (0, 1) in ro.built_keys()
    with pytest.raises(WorkspaceError) as e:
        ro.get_neuron(0, 3)
    assert e.value.kind == "damaged_neuron" and "examples is damaged" in _one_line(e.value)
    assert [(r.layer, r.neuron) for r in Workspace(ws_path, mode="read").iter_neurons()] == [
        k for k in KEYS if k not in ((0, 2), (0, 3))]
    damaged = {(d.layer, d.neuron): d.reason for d in Workspace(ws_path, mode="read").damaged()}
    assert set(damaged) == {(0, 2), (0, 3)} and all("examples" in r for r in damaged.values())


def test_check_graph_blob_never_passes_what_n2g_fast_refuses():
    good = _graph_bytes(2, 9)
    assert check_graph_blob(good, 2, 9) is None
    assert "belongs to neuron (2, 9)" in check_graph_blob(good, 2, 8)
    rng = np.random.default_rng(0)
    variants = [good[:n] for n in range(len(good))] + [good + b"\0"]
    for i in rng.integers(0, len(good), 40):
        b = bytearray(good)
        b[i] ^= 1 + int(rng.integers(0, 255))
        variants.append(bytes(b))
    for blob in variants:
        reason = check_graph_blob(blob, 2, 9)
        try:
            g = n2g_fast.NeuronGraph.from_bytes(blob)
            decoded = (g.layer, g.neuron)
        except Exception:  # noqa: BLE001 - any refusal by n2g_fast
            decoded = None
        assert reason is not None or decoded == (2, 9), blob  # what the check passes decodes as its key
        assert reason is not None or blob == good


def test_non_finite_values_are_refused_by_put_neuron(ws_path):
    ws = Workspace(ws_path, mode="write")
    cases = {
        "examples.train[0].activations[1]": dict(examples={"train": [{"token_ids": [1, 2], "activations": [0.0, float("nan")]}]}),
        "stats.loss": dict(stats={"loss": float("inf")}),
        "metrics.paper.f1": dict(metrics={"paper": {"f1": float("-inf")}}),
        "max_activation": dict(max_activation=float("inf")),
    }
    for where, kw in cases.items():
        with pytest.raises(WorkspaceError) as e:
            ws.put_neuron(_record(3, 7, **kw))
        assert e.value.kind == "non_finite" and where in _one_line(e.value), str(e.value)
    with pytest.raises(WorkspaceError) as e:  # a blob of another neuron is refused too
        ws.put_neuron(_record(3, 7, graph_bytes=_graph_bytes(3, 8)))
    assert e.value.kind == "invalid"
    assert not ws.has_neuron(3, 7) and ws.damaged() == []
    ws.put_neuron(_record(3, 7, max_activation=0.0))  # a dead neuron (a_max 0) is stored
    assert ws.has_neuron(3, 7)


# -- damaged, unreadable or unwritable database files -----------------------------------------------
def _garbage(db: Path) -> None:
    db.write_bytes(np.random.default_rng(1).bytes(16384))


def _truncated(db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])


def _zero(db: Path) -> None:
    db.write_bytes(b"")


def _pages_overwritten(db: Path) -> None:
    data = bytearray(db.read_bytes())
    data[4096:] = b"\xff" * (len(data) - 4096)  # page 1 (the header and the schema) intact
    db.write_bytes(bytes(data))


def _not_n2g(db: Path) -> None:
    db.unlink()
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE other (x)")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("damage, kind, words", [
    (_garbage, "damaged", "not an SQLite database"),
    (_truncated, "damaged", "truncated"),
    (_zero, "damaged", "empty (0 bytes)"),
    (_pages_overwritten, "damaged", "damaged"),
    (_not_n2g, "schema", "n2g"),
])
def test_damaged_database_files_end_in_one_line_errors(ws_path, damage, kind, words):
    for p in ws_path.glob(DB_NAME + "-*"):
        p.unlink()
    damage(ws_path / DB_NAME)
    for opener in (lambda: Workspace(ws_path), lambda: Workspace(ws_path, mode="read"),
                   lambda: Workspace(ws_path, mode="write"),
                   lambda: Workspace(ws_path, create=True, model="m", corpus="c", hook="h")):
        with pytest.raises(WorkspaceError) as e:
            ws = opener()
            ws.built_keys()
        assert e.value.kind == kind and words in _one_line(e.value), str(e.value)
    assert not (ws_path / (DB_NAME + ".new")).exists()


def test_command_line_reports_a_damaged_workspace_in_one_line(ws_path, tmp_path):
    _zero(ws_path / DB_NAME)
    p = subprocess.run([sys.executable, "-m", "n2g.cli", "report", "--workspace", str(ws_path), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120, env=_env())
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and p.stderr.strip().count("\n") == 0, p.stderr
    assert "empty (0 bytes)" in p.stderr


def test_a_file_named_as_the_workspace_is_refused_as_a_file(tmp_path):
    """Reading commands said "no workspace; build one first", and that build then failed with
    "cannot create workspace (File exists)"."""
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    for args in (["info"], ["build", "--model", "native:0", "--layers", "0", "--sample", "1"]):
        p = subprocess.run([sys.executable, "-m", "n2g.cli", *args, "--workspace", str(f)], capture_output=True,
                           text=True, timeout=120, env=_env())
        assert p.returncode == 2 and p.stderr.strip() == (f"error: {f} is a file, not a workspace folder: give a "
                                                          f"folder (a new one, or one n2g made)"), p.stderr
    with pytest.raises(WorkspaceError) as e:
        Workspace(f, create=True)
    assert e.value.kind == "invalid"
    assert f.read_text() == "mine"


def test_creation_is_atomic_and_writes_no_temporary_files(tmp_path):
    path = tmp_path / "new"
    ws = Workspace(path, create=True, model="m")
    ws.close()
    assert sorted(p.name for p in path.iterdir()) == sorted([DB_NAME, LOCK_NAME])
    assert (path / LOCK_NAME).read_text() == ""  # released: no stale holder details
    # a creation killed half-way leaves only its temporary database, which the next one removes
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / (DB_NAME + ".new")).write_bytes(b"half")
    Workspace(tmp_path / "killed", create=True).close()
    assert not (tmp_path / "killed" / (DB_NAME + ".new")).exists()
    assert Workspace(tmp_path / "killed", mode="read").get_meta("schema_version") == "2"


def test_read_only_workspace_is_read_and_refused_for_writing(ws_path):
    for p in ws_path.glob(DB_NAME + "-*"):
        p.unlink()
    with read_only_dir(ws_path):
        assert not os.access(ws_path, os.W_OK)
        with pytest.raises(WorkspaceError) as e:
            Workspace(ws_path, mode="write")
        assert e.value.kind == "read_only" and "read-only" in _one_line(e.value)
        for mode in ("auto", "read"):
            ws = Workspace(ws_path, mode=mode)
            assert ws.built_keys() == KEYS and ws.get_neuron(1, 2).graph().neuron == 2
            ws.close()
        ws = Workspace(ws_path)
        with pytest.raises(WorkspaceError) as e:
            ws.set_meta("k", "v")
        assert e.value.kind == "read_only"
        ws.close()
        with pytest.raises(WorkspaceError) as e:
            Workspace(ws_path, create=True, model="other")
        assert e.value.kind == "mismatch"


def test_damaged_stored_true_activations_are_left_out_and_stored_again(ws_path, caplog):
    """The held-out windows' true activations carry a CRC-32: a row whose bytes changed (finite
    or not), whose size is wrong, or whose values are not finite is left out with a warning
    naming the neuron, as if missing; storing it again repairs it. Rows an older n2g wrote (no
    checksum) are still read."""
    ws = Workspace(ws_path)
    acts = {n: np.linspace(0, 1, 6 * 5, dtype=np.float32).reshape(6, 5) * (n + 1) for n in range(5)}
    ws.save_ordinary_activations(0, acts)
    got = ws.load_ordinary_activations(0, list(range(5)))
    assert sorted(got) == list(range(5)) and all(np.allclose(got[n], acts[n], atol=1e-2) for n in range(5))
    where = "WHERE layer = 0 AND neuron = ?"
    blob = bytearray(np.float16(0.5).tobytes() * 30)
    _sql(ws_path, f"UPDATE eval_ordinary_acts SET acts = ? {where}", bytes(blob), 1)  # finite, other values
    _sql(ws_path, f"UPDATE eval_ordinary_acts SET acts = substr(acts, 1, 20) {where}", 2)  # cut short
    nan = np.full((6, 5), np.nan, np.float16).tobytes()
    _sql(ws_path, f"UPDATE eval_ordinary_acts SET acts = ?, crc = NULL {where}", nan, 3)  # no checksum, NaN
    _sql(ws_path, f"UPDATE eval_ordinary_acts SET crc = NULL {where}", 4)  # an older n2g's sound row
    ws = Workspace(ws_path)
    with caplog.at_level("WARNING", logger="n2g.workspace"):
        got = ws.load_ordinary_activations(0, list(range(5)))
    assert sorted(got) == [0, 4] and np.allclose(got[4], acts[4], atol=1e-2)
    text = caplog.text
    for n, why in ((1, "(checksum mismatch)"), (2, "(20 bytes for [6, 5] float16)"), (3, "(NaN or infinite values)")):
        assert f"neuron 0:{n} on the held-out windows are damaged {why}" in text
    ws.save_ordinary_activations(0, {n: acts[n] for n in (1, 2, 3)})  # what an evaluation with the model does
    assert sorted(ws.load_ordinary_activations(0, list(range(5)))) == list(range(5))


def test_an_older_workspace_gains_the_checksum_columns_and_version_2(ws_path):
    _sql(ws_path, "DROP TABLE eval_ordinary_acts")
    _sql(ws_path, "CREATE TABLE eval_ordinary_acts (layer INTEGER NOT NULL, neuron INTEGER NOT NULL, n_windows "
                  "INTEGER NOT NULL, length INTEGER NOT NULL, dtype TEXT NOT NULL, acts BLOB NOT NULL, "
                  "PRIMARY KEY (layer, neuron))")
    _sql(ws_path, "INSERT INTO eval_ordinary_acts VALUES (0, 1, 1, 2, 'float32', ?)",
         np.array([[0.25, 0.5]], np.float32).tobytes())
    for table in ("windows", "layer_scans"):  # as version 1 wrote them (SQLite >= 3.35 drops columns)
        _sql(ws_path, f"ALTER TABLE {table} DROP COLUMN crc")
    _sql(ws_path, "UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    reader = Workspace(ws_path, mode="read")
    assert np.array_equal(reader.load_ordinary_activations(0, [1])[1], [[0.25, 0.5]])  # read without it
    assert reader.load_windows().shape == (1000, 64) and reader.get_meta("schema_version") == "1"
    ws = Workspace(ws_path)  # a writer upgrades it to version 2 (an older n2g then refuses it)
    assert ws.get_meta("schema_version") == "2"
    ws.save_ordinary_activations(0, {2: np.ones((1, 2), np.float32)})  # the writer adds the column first
    assert sorted(ws.load_ordinary_activations(0, [1, 2])) == [1, 2]
    conn = sqlite3.connect(ws_path / DB_NAME)
    assert conn.execute("SELECT crc IS NULL FROM eval_ordinary_acts ORDER BY neuron").fetchall() == [(1,), (0,)]
    conn.close()
    ws.close()
    _sql(ws_path, "UPDATE meta SET value = '3' WHERE key = 'schema_version'")  # a newer n2g's
    for mode in ("read", "auto"):
        with pytest.raises(WorkspaceError, match="schema version 3, this n2g reads 1, 2: use the n2g that wrote it"):
            Workspace(ws_path, mode=mode)


def test_the_graph_stores_freshness_check_reads_an_index_not_the_rows(ws_path):
    """The check `COUNT(*), MAX(created_at)` read every row (~100 KB each with its examples): 1.8 s
    on a whole SmolLM2 (46,080 neurons, 7 GB), paid again by every read once it took longer than
    the refresh interval: ListGraphs of 100 neurons timed out. An index covers it; a workspace an
    older n2g wrote gains the index at the next open that may write."""
    _sql(ws_path, "DROP INDEX neurons_by_time")
    reader = Workspace(ws_path, mode="read")
    assert reader.neurons_version()[0] == len(KEYS)  # answered without it
    Workspace(ws_path).close()  # auto: the missing index is added
    conn = sqlite3.connect(ws_path / DB_NAME)
    for sql in ("SELECT COUNT(*), COALESCE(MAX(created_at), 0) FROM neurons",
                "SELECT layer, neuron, created_at FROM neurons"):
        plan = " ".join(str(r) for r in conn.execute("EXPLAIN QUERY PLAN " + sql))
        assert "COVERING INDEX neurons_by_time" in plan, plan
    conn.close()


def test_damaged_corpus_windows_and_scans_are_refused_in_one_line(ws_path):
    """The corpus windows and each layer's scan carry a CRC-32 too: bytes changed in place (the
    size intact, so the shapes still fit) end in a one-line "damaged" error, not in token ids
    past the vocabulary deep in a build."""
    ws = Workspace(ws_path)
    ws.save_layer_scan(0, np.ones(4, np.float32), np.arange(8, dtype=np.int64).reshape(4, 2),
                       np.ones((4, 2), np.float32), 1.0)
    assert ws.load_layer_scan(0)["top_window_ids"].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert ws.load_windows().shape == (1000, 64)
    ws.close()
    _sql(ws_path, "UPDATE windows SET tokens = ? WHERE id = 0", np.full(64 * 1000, 10 ** 6, np.int32).tobytes())
    _sql(ws_path, "UPDATE layer_scans SET top_window_ids = ? WHERE layer = 0",
         np.arange(8, dtype=np.int64)[::-1].copy().tobytes())
    ws = Workspace(ws_path)
    with pytest.raises(WorkspaceError) as e:
        ws.load_windows()
    assert e.value.kind == "damaged" and "corpus windows are damaged" in _one_line(e.value)
    with pytest.raises(WorkspaceError) as e:
        ws.load_layer_scan(0)
    assert e.value.kind == "damaged" and "scan of layer 0 is damaged" in _one_line(e.value)


def test_a_database_removed_or_replaced_under_a_writer_stops_its_writes(ws_path, tmp_path):
    import shutil

    backup = tmp_path / "backup.sqlite"
    ws = Workspace(ws_path, mode="write")
    ws.put_neuron(_record(2, 0))
    shutil.copy(ws_path / DB_NAME, backup)  # (the WAL is not in it: only the checked file's identity matters)
    # SQLite would write on into the unlinked file and say nothing: every neuron after would be lost
    (ws_path / DB_NAME).unlink()
    with pytest.raises(WorkspaceError) as e:
        ws.put_neuron(_record(2, 1))
    assert e.value.kind == "damaged" and "removed or replaced" in _one_line(e.value)
    # another file in its place (a restored backup) is not the one this handle wrote to either
    shutil.copy(backup, ws_path / DB_NAME)
    with pytest.raises(WorkspaceError, match="removed or replaced"):
        ws.set_meta("x", "y")
    ws.close()
    ws = Workspace(ws_path, mode="write")  # a new handle opens the file that is there now and writes
    ws.put_neuron(_record(2, 1))
    assert ws.has_neuron(2, 1)
    ws.close()


# -- a paused reader ------------------------------------------------------------------------------
def test_a_paused_neuron_iteration_holds_no_read_transaction(ws_path):
    """Before: iter_neurons read every row in one statement, so a caller paused between rows (a
    slow export stream) held a read transaction: WAL checkpoints could not copy what was written
    since into the database, and the -wal file grew by all a build wrote meanwhile."""
    w = Workspace(ws_path, mode="write", purpose="test")
    for n in range(5, 100):  # more rows than one read
        w.put_neuron(_record(0, n))
    r = Workspace(ws_path, mode="read")
    it = r.iter_neurons()
    first = next(it)
    for n in range(100, 110):  # a build commits while the reader waits
        w.put_neuron(_record(0, n))
    conn = sqlite3.connect(ws_path / DB_NAME)
    busy, log, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    conn.close()
    assert log > 0 and done == log, (busy, log, done)
    # every row there when it started, in order, once; none added since
    got = [(first.layer, first.neuron)] + [(x.layer, x.neuron) for x in it]
    assert got == sorted(set(KEYS) | {(0, n) for n in range(5, 100)})
    r.close()
    w.close()
