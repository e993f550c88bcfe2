"""The `n2g` command line: every operation against a server (`--server`) prints the same as on the
workspace itself (`--workspace`), and errors are one clear line."""

from __future__ import annotations

import json
import time

import pytest

from n2g.cli import main
from n2g_servers import native_workspace


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from n2g_service.server import serve

    ws = native_workspace(tmp_path_factory, "cli")
    running = serve(ws, no_model=True, port=0, block=False)
    try:
        yield ws, f"127.0.0.1:{running.port}"
    finally:
        running.stop(0)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def both(capsys, setup, *argv) -> str:
    """Runs a command remotely and locally; asserts the same output; returns it."""
    ws, addr = setup
    c1, remote, err1 = run(capsys, *argv, "--server", addr)
    c2, local, err2 = run(capsys, *argv, "--workspace", str(ws))
    assert c1 == 0 and c2 == 0, (err1, err2)
    assert remote == local
    return remote


def test_same_answers_remote_and_local(capsys, setup):
    ws, _ = setup
    info = json.loads(both(capsys, setup, "info", "--json"))
    assert info["neurons_built"] > 0 and info["model"] == "native:0"
    graphs = json.loads(both(capsys, setup, "graph", "--json"))
    key = graphs[0]["key"]
    label = graphs[0]["activating"][0]
    doc = json.loads(both(capsys, setup, "graph", str(key[0]), str(key[1]), "--json"))
    assert doc["schema"] == "n2g.graph/v1" and (doc["layer"], doc["neuron"]) == tuple(key)
    other = graphs[1]["key"]
    pred = json.loads(both(capsys, setup, "predict", "--neurons", f"{key[0]}:{key[1]}", f"{other[0]}:{other[1]}",
                           "--tokens", "1 5 7", "--tokens", "1,9", "--json"))
    assert [len(s["activations"]) for s in pred["sequences"]] == [2, 2]
    found = json.loads(both(capsys, setup, "search", "--activating", label, "--json"))
    assert key in found["neurons"]
    both(capsys, setup, "search", "--in-context", "--json")
    both(capsys, setup, "similar", str(key[0]), str(key[1]), "--threshold", "0.5", "--json")
    both(capsys, setup, "similar", "--all", "--kind", "subset", "--threshold", "0.5", "--json")
    ev = json.loads(both(capsys, setup, "eval", "--json"))
    assert set(ev["paper"]) == {str(l) for l in {g["key"][0] for g in graphs}}
    assert ev["test_sets"]["test_sets"] == ["paper", "ordinary", "detection"]
    assert set(json.loads(both(capsys, setup, "eval", "--json", "--paper-only"))) == set(ev["paper"])
    both(capsys, setup, "jobs", "--json")


def test_human_readable_output(capsys, setup):
    ws, addr = setup
    text = both(capsys, setup, "eval")
    assert "model native:0" in text and "N2G (all paths, max)" in text
    text = both(capsys, setup, "graph")
    assert text.splitlines()[0].split()[:3] == ["neuron", "a_max", "nodes"]
    code, out, _ = run(capsys, "info", "--server", addr)
    assert code == 0 and "not loaded" in out and "layer" in out


def test_export_and_svg(capsys, setup, tmp_path):
    ws, addr = setup
    assert run(capsys, "export", "--out", str(tmp_path / "r"), "--server", addr)[0] == 0
    assert run(capsys, "export", "--out", str(tmp_path / "l"), "--workspace", str(ws))[0] == 0
    files = sorted(p.relative_to(tmp_path / "r") for p in (tmp_path / "r").rglob("*.json"))
    assert files and files == sorted(p.relative_to(tmp_path / "l") for p in (tmp_path / "l").rglob("*.json"))
    for f in files:
        assert (tmp_path / "r" / f).read_text() == (tmp_path / "l" / f).read_text()
    # export.json, written last, lists what a finished export holds (no temporary files are left)
    manifest = json.loads((tmp_path / "r" / "export.json").read_text())
    graphs = sorted((tmp_path / "r" / "graphs").iterdir())
    assert manifest["neurons"] == len(graphs) == len(manifest["keys"]) > 0
    assert not [p for p in (tmp_path / "r").rglob(".*")]
    from n2g_service.workspace import Workspace

    layer, neuron = Workspace(ws).built_keys()[0]
    code, out, err = run(capsys, "graph", str(layer), str(neuron), "--svg", str(tmp_path / "g.svg"), "--server", addr)
    assert code == 0 and (tmp_path / "g.svg").read_text().lstrip().startswith("<")


def test_the_commands_a_new_user_tripped_on(capsys, setup, tmp_path):
    """A walk through the README found: a refused export left its folders; `--layers 0-1` and `all`
    worked for build only; `--server` naming no server said "Connection refused" and nothing
    more, and a host without a port went to 443; `n2g ... | head` ended in "error: Broken pipe";
    `progress=print` printed ~2 KB an event; cancelling an ended job said nothing."""
    import subprocess

    from n2g.client import N2GClient
    from n2g_servers import PYTHON, env, free_port
    from n2g_service.workspace import Workspace

    ws, addr = setup
    code, out, err = run(capsys, "export", "--out", str(tmp_path / "bad"), "--layers", "40", "--server", addr)
    assert code == 1 and "out of range" in err and not (tmp_path / "bad").exists()
    layers = sorted({l for l, _ in Workspace(ws, mode="read").built_keys()})
    assert layers == [0, 1]
    for cmd in (("eval", "--json"), ("graph", "--json")):
        explicit = both(capsys, setup, *cmd, "--layers", "0", "1")
        assert both(capsys, setup, *cmd, "--layers", "0-1") == explicit == both(capsys, setup, *cmd, "--layers", "all")
    assert both(capsys, setup, "graph", "--json", "--layers", "1") != explicit
    # a whole model's listing in pages: --limit after --offset, the same remotely and locally
    listed = json.loads(both(capsys, setup, "graph", "--json"))
    pages = [json.loads(both(capsys, setup, "graph", "--json", "--limit", "3", "--offset", str(o)))
             for o in range(0, len(listed) + 3, 3)]
    assert [g for page in pages for g in page] == listed and pages[-1] == []
    assert "--offset 3 for the next" in both(capsys, setup, "graph", "--limit", "3")
    code, out, err = run(capsys, "graph", "--offset", "-1", "--server", addr)
    assert code == 1 and "offset must be 0 or more" in err
    code, out, err = run(capsys, "graph", "--layers", "1-0", "--workspace", str(ws))
    assert code == 2 and "--layers: bad layer range" in err
    assert both(capsys, setup, "graph", "--json", "--layers", "all,0") == explicit  # "all" inside a list
    for spec in ("0_1", "+1", "\u0661"):  # int() reads these; the layer grammar does not
        code, out, err = run(capsys, "build", "--workspace", str(ws), "--layers", spec, "--neurons", "1", "--dry-run")
        assert code != 0 and "bad layer spec" in err, (spec, err)
    with N2GClient(addr) as c:  # the library takes the same grammar, and one number
        full = c.list_graphs()
        assert c.list_graphs("0-1") == full == c.list_graphs("all") and c.list_graphs(1) == c.list_graphs([1])
        with pytest.raises(ValueError, match="bad layer spec"):
            c.list_graphs("0_1")
    # no server there: what to check, in one line
    code, out, err = run(capsys, "info", "--server", f"127.0.0.1:{free_port()}", "--timeout", "3")
    assert code == 1 and "UNAVAILABLE" in err and "is an n2g server running at 127.0.0.1:" in err
    assert N2GClient("127.0.0.1:").target == "127.0.0.1:50051"
    code, out, err = run(capsys, "eval", "--server", addr, "--timeout", "0.000001")
    assert code == 1 and "DEADLINE_EXCEEDED" in err and "give a larger --timeout" in err
    assert N2GClient("localhost").target == "localhost:50051" and N2GClient("[::1]").target == "[::1]:50051"
    assert N2GClient(addr).target == addr and N2GClient("dns:///h:1").target == "dns:///h:1"
    # a reader that goes away early: no error, the exit status of a broken pipe
    p = subprocess.Popen([PYTHON, "-m", "n2g.cli", "graph", "--workspace", str(ws)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env())
    p.stdout.close()
    assert p.wait(120) == 141 and p.stderr.read() == b""
    with N2GClient(addr) as c:
        [job] = c.list_jobs()
        event = next(iter(c.watch_job(job.id)))
    assert str(event) == f"[{job.id}] state {event.done}/{event.total}: {event.message}" and "\n" not in str(event)
    code, out, err = run(capsys, "jobs", "cancel", job.id, "--server", addr)
    assert code == 0 and f"had already ended ({job.state}): nothing to cancel" in err


def test_a_reader_scores_a_workspace_that_never_recorded_its_held_out_sample(setup, tmp_path):
    """A workspace with corpus windows and no recorded held-out sample (an older n2g's, an import)
    made `n2g eval` on a reader fail with INTERNAL (TypeError) instead of scoring it."""
    import shutil
    import sqlite3

    from n2g.local import LocalN2GClient
    from n2g_service.workspace import DB_NAME

    ws, _ = setup
    copy = tmp_path / "ws"
    shutil.copytree(ws, copy, ignore=shutil.ignore_patterns("writer.lock"))
    conn = sqlite3.connect(copy / DB_NAME)
    conn.execute("DELETE FROM eval_heldout")
    conn.execute("DELETE FROM eval_ordinary_acts")
    conn.commit()
    conn.close()
    with LocalN2GClient(copy, no_model=True) as c:
        ev = c.evaluate(test_sets=True)
    assert ev.details["heldout"]["size"] > 0 and "n2g eval --compute" in ev.details["unavailable"]["ordinary"]
    assert ev.layers and all(s.f1 >= 0 for l in ev.layers for s in l.scores)


def test_errors_are_one_line(capsys, setup):
    ws, addr = setup
    code, out, err = run(capsys, "graph", "0", "127", "--server", addr)
    assert code == 1 and err.startswith("error: NOT_FOUND: no graph built") and "Traceback" not in err
    code, out, err = run(capsys, "graph", "0", "127", "--workspace", str(ws))
    assert code == 1 and err.startswith("error: NOT_FOUND")
    code, out, err = run(capsys, "graph", "0")
    assert code == 2 and "both LAYER and NEURON" in err
    code, out, err = run(capsys, "predict", "--neurons", "0-1", "--tokens", "1", "--server", addr)
    assert code == 2 and "LAYER:NEURON" in err
    for spec in ("\u0660:\u0661", "0:1_0", "0:-1", "0:"):  # Arabic-Indic digits and 1_0 were read as 0:1, 0:10
        code, out, err = run(capsys, "predict", "--neurons", spec, "--tokens", "1", "--server", addr)
        assert code == 2 and "bad neuron" in err and "LAYER:NEURON" in err, (spec, err)
    code, out, err = run(capsys, "tokenize", "the cat", "--server", addr)
    assert code == 1 and "FAILED_PRECONDITION" in err
    code, out, err = run(capsys, "eval", "--workspace", str(ws / "missing"))
    assert code == 2 and "no workspace" in err


def test_text_that_is_not_valid_unicode_is_refused_the_same_remotely_and_locally(capsys, setup):
    """A lone surrogate (a Python string protobuf cannot carry) is INVALID_ARGUMENT naming where it
    is, from the remote client (it crashed with UnicodeEncodeError) and the local one alike."""
    from n2g.client import N2GClient, N2GError
    from n2g.local import LocalN2GClient

    ws, addr = setup
    with N2GClient(addr) as remote, LocalN2GClient(ws, no_model=True) as local:
        label = remote.list_graphs()[0].activating[0]
        for c in (remote, local):
            for call in (lambda: c.predict(["0:1"], ["fine", "a\ud800b"]), lambda: c.tokenize(["\udcff"]),
                         lambda: c.search([(label, "activating"), ("x\udfff", "context")])):
                with pytest.raises(N2GError) as e:
                    call()
                assert e.value.code.name == "INVALID_ARGUMENT" and "lone surrogate U+D" in e.value.message
            assert c.search([(label, "activating")]).neurons  # the same call with valid text is answered
    code, out, err = run(capsys, "predict", "--neurons", "0:1", "--text", "a\udc80", "--server", addr)
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT: texts[0] holds a lone surrogate U+DC80")


def test_output_paths_and_settings_errors_are_one_line(capsys, setup, tmp_path):
    """A folder where a file is to go, a file where a folder is to go, a port past 65535, an
    unknown device: one line and exit 2, never a traceback; and a dry run leaves no workspace."""
    ws, addr = setup
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    from n2g_service.workspace import Workspace

    layer, neuron = Workspace(ws).built_keys()[0]
    for argv, say in ((("export", "--out", str(a_file)), str(a_file)),
                      (("report", "--out", str(a_file)), str(a_file)),
                      (("graph", str(layer), str(neuron), "--svg", str(tmp_path)), str(tmp_path)),
                      (("graph", str(layer), str(neuron), "--svg", str(a_file / "g.svg")), str(a_file))):
        code, out, err = run(capsys, *argv, "--server", addr)
        assert code == 2 and err.startswith("error: ") and say in err and "Traceback" not in err, err
    # --zip makes its folder, as --out does
    code, _, err = run(capsys, "report", "--out", str(tmp_path / "rep"), "--zip", str(tmp_path / "new" / "r.zip"),
                       "--server", addr)
    assert code == 0 and (tmp_path / "new" / "r.zip").is_file(), err
    code, _, err = run(capsys, "build", "--workspace", str(tmp_path / "w0"), "--layers", "0", "--sample", "0")
    assert code == 2 and "--sample must be at least 1" in err
    code, _, err = run(capsys, "serve", "--workspace", str(ws), "--no-model", "--port", "99999")
    assert code == 2 and "--port must be from 0 to 65535" in err
    # streams and long computations must leave RPC threads for the short calls
    code, _, err = run(capsys, "serve", "--workspace", str(ws), "--no-model", "--port", "0", "--max-workers", "32",
                       "--max-streams", "200")
    assert code == 2 and "would leave no RPC thread of --max-workers 32" in err and "at most 15 streams" in err
    code, _, err = run(capsys, "serve", "--workspace", str(ws), "--no-model", "--port", "0", "--max-workers", "1")
    assert code == 2 and "give --max-workers 3 or more" in err
    code, _, err = run(capsys, "build", "--workspace", str(tmp_path / "w1"), "--model", "native:0", "--layers", "0",
                       "--sample", "1", "--device", "bogus")
    assert code == 2 and "unknown device 'bogus'" in err and "Traceback" not in err
    code, out, err = run(capsys, "build", "--workspace", str(tmp_path / "w2"), "--model", "native:0", "--layers", "0",
                         "--sample", "1", "--dry-run")
    assert code == 0 and "neuron" in out, err
    assert not (tmp_path / "w2").exists()  # a dry run writes nothing


def test_report_remote_equals_local(capsys, setup, tmp_path):
    ws, addr = setup
    code, out, err = run(capsys, "report", "--out", str(tmp_path / "r"), "--zip", str(tmp_path / "r.zip"),
                         "--server", addr)
    assert code == 0, err
    assert run(capsys, "report", "--out", str(tmp_path / "l"), "--workspace", str(ws))[0] == 0
    remote = sorted(p.relative_to(tmp_path / "r") for p in (tmp_path / "r").rglob("*") if p.is_file())
    local = sorted(p.relative_to(tmp_path / "l") for p in (tmp_path / "l").rglob("*") if p.is_file())
    assert remote == local and any(p.name == "index.html" for p in remote)
    import zipfile

    assert sorted(zipfile.ZipFile(tmp_path / "r.zip").namelist()) == sorted(p.as_posix() for p in remote)
    # a whole model's report was one archive past the client's limit: a few layers at a time
    pages = {p.name for p in (tmp_path / "l" / "neurons").iterdir()}
    for where in (("--server", addr), ("--workspace", str(ws))):
        out_dir = tmp_path / f"one{where[0]}"
        code, out, err = run(capsys, "report", "--out", str(out_dir), "--layers", "1", *where)
        assert code == 0, err
        one = {p.name for p in (out_dir / "neurons").iterdir()}
        assert one == {p for p in pages if p.startswith("1_")} and one < pages, (one, pages)
    code, out, err = run(capsys, "report", "--out", str(tmp_path / "none"), "--layers", "5", "--server", addr)
    assert code == 1 and "out of range" in err


def test_a_watched_build_says_its_state_once(capsys, tmp_path_factory):
    """The watch of a build is reopened at each call deadline (here every second) and each
    reopening starts with the job's state: the command line says it once, not every time."""
    from n2g_servers import NATIVE_MODEL, native_corpus

    ws = tmp_path_factory.mktemp("watched") / "ws"
    code, _, err = run(capsys, "build", "--workspace", str(ws), "--model", NATIVE_MODEL, "--corpus",
                       str(native_corpus(tmp_path_factory)), "--layers", "0", "1", "--sample", "6",
                       "--window-tokens", "32", "--device", "cpu", "--timeout", "1")
    assert code == 0, err
    assert "building neurons" in err  # it ran long enough to be watched again and again
    assert err.count("[state] running") == 1, err[-2000:]


def test_a_corpus_too_short_for_one_window_fails_in_one_line_and_leaves_the_workspace_usable(capsys, tmp_path):
    """It stored an empty set of windows that every later build reused and failed on."""
    from n2g_servers import write_corpus

    short, good = tmp_path / "short.txt", write_corpus(tmp_path / "good.jsonl")
    short.write_text("the cat")
    ws = tmp_path / "ws"
    args = ["build", "--workspace", str(ws), "--model", "native:0", "--layers", "0", "--neurons", "1",
            "--window-tokens", "32", "--device", "cpu"]
    code, out, err = run(capsys, *args, "--corpus", str(short))
    assert code == 1 and "fewer than one window of 32" in err and "Traceback" not in err
    # the workspace read nothing from that corpus: a build on another one goes ahead
    code, out, err = run(capsys, *args, "--corpus", str(good), "--json")
    assert code == 0, err
    from n2g_service.workspace import Workspace

    w = Workspace(ws, mode="read")
    assert w.built_keys() == [(0, 1)] and w.corpus == str(good) and w.window_count() > 0


def test_jobs_cancel_on_a_workspace_no_process_runs(capsys, tmp_path):
    """A job a killed server left queued or running could not be cancelled locally (the command
    opened the workspace read-only): starting a server, which resumes it, was the only way."""
    from n2g_service.workspace import Workspace

    ws = Workspace(tmp_path / "ws", create=True, model="native:0", corpus="fortunes", hook="mlp.hook_post")
    for job_id, state in (("left-queued", "queued"), ("left-running", "running")):
        ws.create_job(job_id, {"layers": [0], "neurons": [1]}, 1)
        ws.update_job(job_id, state=state)
    ws.close()
    for job_id in ("left-queued", "left-running"):
        code, out, err = run(capsys, "jobs", "cancel", job_id, "--workspace", str(tmp_path / "ws"))
        assert code == 0, err
    assert {j.id: j.state for j in Workspace(tmp_path / "ws", mode="read").list_jobs()} == {
        "left-queued": "cancelled", "left-running": "cancelled"}
    # while another process writes the workspace, the command says who (it does not wait or break it)
    holder = Workspace(tmp_path / "ws", create=True)
    holder.create_job("busy", {"layers": [0], "neurons": [1]}, 1)
    import subprocess
    import sys

    from n2g_servers import env

    p = subprocess.run([sys.executable, "-m", "n2g.cli", "jobs", "cancel", "busy", "--workspace", str(tmp_path / "ws")],
                       capture_output=True, text=True, env=env(), timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "writer" in p.stderr.lower(), p.stderr
    assert "n2g jobs cancel busy --server HOST:PORT" in p.stderr
    assert holder.get_job("busy").state == "queued"
    holder.close()


def test_watching_a_job_no_process_runs_says_so(capsys, tmp_path):
    """A reader's WatchJob on a job whose server was killed sent one `running` event, then nothing
    until the caller's deadline; GetJob and ListJobs said `running` as for a live job."""
    from n2g.client import N2GClient, N2GError
    from n2g.local import LocalN2GClient
    from n2g_service.server import serve
    from n2g_service.workspace import Workspace

    ws = Workspace(tmp_path / "ws", create=True, model="native:0", corpus="fortunes", hook="mlp.hook_post")
    ws.create_job("orphan", {"layers": [0], "neurons": [1]}, 1)
    ws.update_job("orphan", state="running")
    ws.create_job("ended", {"layers": [0], "neurons": [2]}, 1)
    ws.update_job("ended", state="succeeded")
    ws.close()
    with LocalN2GClient(tmp_path / "ws", no_model=True) as c:
        events = []
        with pytest.raises(N2GError) as e:  # the watch goes on (a writer may come) until its deadline
            for event in c.watch_job("orphan", timeout=2.5):
                events.append(event)
        assert e.value.code.name == "DEADLINE_EXCEEDED"
        local = [c.get_job("orphan"), *c.list_jobs()]
    assert [e.job.state for e in events] == ["running", "running"]
    assert "no process is running this job" in events[1].message and events[1].job.orphaned
    running = serve(tmp_path / "ws", no_model=True, port=0, block=False)
    try:
        with N2GClient(f"127.0.0.1:{running.port}") as c:
            remote = [c.get_job("orphan"), *c.list_jobs()]
    finally:
        running.stop(0)
    for jobs in (local, remote):
        assert [(j.id, j.state, j.orphaned) for j in jobs] == [
            ("orphan", "running", True), ("orphan", "running", True), ("ended", "succeeded", False)]
    code, out, err = run(capsys, "jobs", "--workspace", str(tmp_path / "ws"))
    assert code == 0 and "running (no process runs it)" in out and "resumed by `n2g serve`" in out
    # watching it ends (it waited for a writer for ever) and says why
    code, out, err = run(capsys, "jobs", "watch", "orphan", "--workspace", str(tmp_path / "ws"))
    assert code == 1 and "running (no process runs it)" in out
    # a writer holding the workspace runs it (or will): not orphaned
    w = Workspace(tmp_path / "ws", mode="write")
    try:
        with LocalN2GClient(tmp_path / "ws", no_model=True) as c:
            assert not c.get_job("orphan").orphaned
    finally:
        w.close()


def test_a_build_with_other_fit_settings_is_refused_before_it_scans(capsys, tmp_path):
    """`--method paper` on a neuron the default fit built scanned the whole corpus before it failed,
    and its dry run planned that scan without a word."""
    from n2g_servers import write_corpus
    from n2g_service.workspace import Workspace

    corpus = write_corpus(tmp_path / "c.jsonl", n_texts=200)
    ws = tmp_path / "ws"
    common = ("--workspace", str(ws), "--model", "native:0", "--corpus", str(corpus), "--layers", "0",
              "--window-tokens", "32", "--device", "cpu")
    code, out, err = run(capsys, "build", *common, "--neurons", "1")
    assert code == 0, err
    k = Workspace(ws, mode="read").load_layer_scan(0)["top_window_ids"].shape[1]
    for extra in (("--dry-run",), ()):
        code, out, err = run(capsys, "build", *common, "--neurons", "1", "2", "--method", "paper", *extra)
        assert code != 0 and "neuron 0:1 was built with other fit settings" in err and "Traceback" not in err, err
        assert "scan" not in out.lower(), out
    assert Workspace(ws, mode="read").load_layer_scan(0)["top_window_ids"].shape[1] == k  # the scan kept


def test_ctrl_c_on_a_local_build_cancels_its_job_and_the_same_command_resumes(capsys, tmp_path):
    """Ctrl-C on `n2g build --workspace` left its job `queued` (or `running`) for good: no local
    command resumes jobs, and a later server would have run it behind the user's back."""
    import signal
    import subprocess
    import threading
    import time

    from n2g_servers import PYTHON, env, write_corpus
    from n2g_service.workspace import Workspace

    corpus = write_corpus(tmp_path / "c.jsonl", n_texts=300)
    ws = tmp_path / "ws"
    cmd = ["build", "--workspace", str(ws), "--model", "native:0", "--corpus", str(corpus), "--layers", "0", "1",
           "--neurons", *map(str, range(0, 64, 2)), "--group-size", "2", "--window-tokens", "32", "--device", "cpu"]
    # Ctrl-C as a terminal delivers it: a shell's background job (`make test &`) hands SIGINT on
    # ignored, and Python keeps an ignored SIGINT ignored (the build then ran to its end, exit 0)
    interactive = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "runpy.run_module('n2g.cli', run_name='__main__', alter_sys=True)")
    p = subprocess.Popen([PYTHON, "-c", interactive, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=env())
    chunks: list[bytes] = []  # read as it comes: the signal goes once the first group is built, mid-build

    def read():
        while piece := p.stderr.read1(4096):
            chunks.append(piece)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None and b"built [" not in b"".join(chunks):
        time.sleep(0.05)
    [job] = Workspace(ws, mode="read").list_jobs()
    assert p.poll() is None and job.done < job.total, f"the build ended before it could be interrupted: {job}"
    p.send_signal(signal.SIGINT)
    p.wait(timeout=120)
    reader.join(timeout=10)
    err = b"".join(chunks)
    assert p.returncode == 130, (job, err.decode(errors="replace").replace("\r", "\n")[-3000:])
    assert b"cancelled; what it committed is kept" in err
    [job] = Workspace(ws, mode="read").list_jobs()
    assert job.state == "cancelled"
    code, out, err = run(capsys, *cmd)
    assert code == 0, err
    assert len(Workspace(ws, mode="read").built_keys()) == 64
    import re  # the closing line says what this run built (it said "built 64 neurons" either way)

    now, before = map(int, re.search(r"\((\d+) built now, (\d+) before\)", out).groups())
    assert now + before == 64 and now > 0


def test_terminal_controls_in_workspace_or_server_strings_are_shown_not_obeyed(capsys, setup, tmp_path):
    """A model name, corpus or error message holding ESC sequences set the terminal's title and
    cleared its screen when printed."""
    from n2g_service.workspace import Workspace

    evil = "m\x1b]0;OWNED\x07\x1b[2J\u202e"
    ws = Workspace(tmp_path / "ws", create=True, model=evil, corpus=f"c{evil}", hook=f"h{evil}")
    ws.close()
    code, out, err = run(capsys, "info", "--workspace", str(tmp_path / "ws"))
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "m\\x1b]0;OWNED\\x07\\x1b[2J\\u202e" in out  # shown, as codes
    code, out, err = run(capsys, "graph", "0", "1", "--workspace", str(tmp_path / "ws" / f"x{evil}"))
    assert code == 2 and "\x1b" not in err and "\\x1b" in err


def test_graph_json_with_controls_in_labels_is_json(capsys, tmp_path):
    """`graph --json` printed n2g_fast's JSON through the terminal escapes: a label holding NEL,
    CSI or DEL (kept raw in the JSON) came out as "\\x85", which is no JSON escape."""
    import n2g_fast

    from n2g_service.workspace import NeuronRecord, Workspace

    labels = ["a\x85", "\x9b31m", "d\x7f", "r\u202e", "e\x1b[2J", "\u2028"]
    ws = Workspace(tmp_path / "ws", create=True, model="m", corpus="c", hook="h")
    g = n2g_fast.NeuronGraph("m", 0, 1, "h", 1.0)
    for i, label in enumerate(labels):
        g.add_path((label, [i], 0.9), [], 0.9)
    ws.put_neuron(NeuronRecord(0, 1, 1.0, g.to_bytes(), {}, {}, {}))
    ws.close()
    code, out, err = run(capsys, "graph", "0", "1", "--json", "--workspace", str(tmp_path / "ws"))
    assert code == 0, err
    assert not any(ch in out for ch in "\x85\x9b\x7f\u202e\x1b\u2028")
    assert sorted(r["label"] for r in json.loads(out)["roots"]) == sorted(labels)


def test_a_corpus_file_name_that_is_not_utf8_fails_the_job_with_it_escaped(capsys, tmp_path):
    """The failure quoted the name with a lone surrogate, which neither the workspace nor gRPC can
    carry: the job stayed `running` for good and its watch answered INTERNAL."""
    import os

    from n2g_service.workspace import Workspace

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "fine.txt").write_text("the cat sat on the mat " * 40)
    (corpus / os.fsdecode(b"z\xe9.txt")).write_bytes(b"caf\xe9")  # Latin-1 name and content
    ws = tmp_path / "ws"
    code, out, err = run(capsys, "build", "--workspace", str(ws), "--model", "native:0", "--corpus", str(corpus),
                         "--layers", "0", "--neurons", "1", "--window-tokens", "32", "--device", "cpu")
    assert code == 1 and "z\\udce9.txt:1: not UTF-8 text" in err and "Traceback" not in err
    [job] = Workspace(ws, mode="read").list_jobs()
    assert job.state == "failed" and "z\\udce9.txt" in job.error
    code, out, err = run(capsys, "build", "--workspace", str(tmp_path / "ws2"), "--model", "native:0", "--corpus",
                         str(tmp_path / os.fsdecode(b"caf\xe9.jsonl")), "--layers", "0", "--neurons", "1")
    assert code == 2 and "is not UTF-8: rename it" in err


def test_the_clients_take_numpy_and_refuse_what_they_would_truncate(setup):
    """numpy arrays as neurons or token ids crashed in the client ("truth value of an array");
    34.9 was neuron 34, True layer 1, [1.0, 2.7] ids [1, 2]; ids past int64 and float layers were a
    bare ValueError / TypeError remotely and answered locally; the summary's layer keys were
    strings remotely; timeout=None broke every call; a closed client failed three ways."""
    import asyncio
    import math

    import numpy as np

    from n2g.client import AsyncN2GClient, N2GClient, N2GError
    from n2g.local import LocalN2GClient

    ws, addr = setup
    with N2GClient(addr) as remote, LocalN2GClient(ws, no_model=True) as local:
        key = remote.list_graphs()[0].key
        for c in (remote, local):
            a = c.predict([key], token_ids=[[1, 5, 7], [1, 9, 2]])
            b = c.predict(np.array([key]), token_ids=np.array([[1, 5, 7], [1, 9, 2]], dtype=np.int32))
            assert len(b.values) == 2 and all((x == y).all() for x, y in zip(a.values, b.values))
            for bad in (dict(neurons=[(key[0], key[1] + 0.9)]), dict(neurons=[(True, key[1])]),
                        dict(neurons=np.array(5)), dict(token_ids=[[1.0, 2.7]]), dict(token_ids=[[[1, 2], [3, 4]]]),
                        dict(token_ids=np.array([1, 2, 3]))):
                with pytest.raises(ValueError):
                    c.predict(**{"neurons": [key], "token_ids": [[1, 2]], **bad})
            with pytest.raises(ValueError, match="layer 0.0 is not a whole number"):
                c.list_graphs(layers=[0.0])
            with pytest.raises(N2GError) as e:
                c.predict([key], token_ids=[[1, 2 ** 70]])
            assert e.value.code.name == "INVALID_ARGUMENT"
            assert all(isinstance(layer, int) for layer in c.evaluate().summary)
    for timeout in (None, math.inf):  # no deadline
        with N2GClient(addr, timeout=timeout) as c:
            assert c.model_info().neurons_built > 0
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        N2GClient(addr, timeout=0)
    closed = [N2GClient(addr), LocalN2GClient(ws, no_model=True)]
    for c in closed:
        c.close()
        with pytest.raises(N2GError) as e:
            c.model_info()
        assert e.value.code.name == "FAILED_PRECONDITION" and "closed" in e.value.message

    async def closed_async():
        c = AsyncN2GClient(addr)
        await c.close()
        with pytest.raises(N2GError) as e:
            await c.model_info()
        assert e.value.code.name == "FAILED_PRECONDITION"

    asyncio.run(closed_async())


def _hand_made_workspace(path):
    """Layer-0 graphs whose pairs are known by construction: 0:1 and 0:2 hold the same labels
    (similar), 0:3 holds half of each (a subset of both), 0:4 shares nothing, 0:5 fires on "a" after
    "a" (a token in both roles)."""
    import n2g_fast
    from n2g_service.workspace import NeuronRecord, Workspace

    ws = Workspace(path, create=True, model="test/hand-made", corpus="hand-made", hook="blocks.{l}.mlp.hook_post")
    ws.set_meta("token_strings", json.dumps([chr(97 + i) for i in range(26)]))
    spec = {1: [("a", "x"), ("b", "y")], 2: [("a", "x"), ("b", "y")], 3: [("a", "x")], 4: [("q", "z")], 5: [("a", "a")]}
    for n, paths in spec.items():
        g = n2g_fast.NeuronGraph("test/hand-made", 0, n, "blocks.0.mlp.hook_post", 2.0)
        for act, ctx in paths:
            g.add_path((act, [ord(act) - 97], 0.9), [(ctx, [ord(ctx) - 97], 0.9)], 0.9)
        g.finalize()
        ws.put_neuron(NeuronRecord(0, n, 2.0, g.to_bytes(), {"train": [], "test": []}, {}, {}))


def test_similar_and_subset_pairs_of_graphs_made_to_have_them(capsys, tmp_path):
    from n2g.client import N2GClient
    from n2g_service.server import serve

    _hand_made_workspace(tmp_path / "ws")
    running = serve(tmp_path / "ws", no_model=True, port=0, block=False)
    try:
        hand = (tmp_path / "ws", f"127.0.0.1:{running.port}")

        def pairs(doc):
            return [(tuple(p["a"]), tuple(p["b"]), p["kind"], p["activating_overlap"], p["context_overlap"]) for p in doc]

        assert pairs(json.loads(both(capsys, hand, "similar", "--all", "--json"))) == [
            ((0, 1), (0, 2), "similar", 1.0, 1.0)]
        assert pairs(json.loads(both(capsys, hand, "similar", "--all", "--kind", "subset", "--json"))) == [
            ((0, 3), (0, 1), "subset", 1.0, 1.0), ((0, 3), (0, 2), "subset", 1.0, 1.0)]
        one = json.loads(both(capsys, hand, "similar", "0", "3", "--json"))
        assert pairs(one["similar"]) == []
        assert pairs(one["subset"]) == [((0, 3), (0, 1), "subset", 1.0, 1.0), ((0, 3), (0, 2), "subset", 1.0, 1.0)]
        assert [(tuple(n["key"]), n["score"]) for n in one["neighbours"]] == [((0, 1), 0.5), ((0, 2), 0.5), ((0, 5), 0.5)]
        # at a threshold of .5, 0:3 and 0:1 overlap by half on both sets: similar now
        low = json.loads(both(capsys, hand, "similar", "0", "1", "--threshold", "0.5", "--json"))
        assert {(tuple(p["a"]), tuple(p["b"])) for p in low["similar"]} == {((0, 1), (0, 2)), ((0, 1), (0, 3))}
        # the client library gives the same
        with N2GClient(hand[1]) as c:
            got = c.similar(0, 1)
            assert [(p.a, p.b) for p in got.similar] == [((0, 1), (0, 2))]
            assert [(p.a, p.b) for p in got.subset] == [((0, 3), (0, 1))]
            assert [(n.key, n.score) for n in got.neighbours] == [((0, 2), 1.0), ((0, 3), 0.5), ((0, 5), 0.25)]
            assert [(p.a, p.b) for p in c.pairs("subset", threshold=0.9, batch_size=1)] == [((0, 3), (0, 1)),
                                                                                            ((0, 3), (0, 2))]
            assert c.similar(0, 4).neighbours == [] and c.similar(0, 4).subset == []
        # searches by role, and the neurons with a token in both roles
        found = json.loads(both(capsys, hand, "search", "--in-context", "--json"))
        assert found["neurons"] == [{"key": [0, 5], "shared": ["a"], "fraction": 1.0}] and found["total"] == 1
        assert json.loads(both(capsys, hand, "search", "--context", "x", "--json"))["neurons"] == [[0, 1], [0, 2], [0, 3]]
        assert json.loads(both(capsys, hand, "search", "--either", "a", "--json"))["neurons"] == [[0, 1], [0, 2], [0, 3],
                                                                                                 [0, 5]]
        assert json.loads(both(capsys, hand, "search", "--context", "a", "--activating", "a", "--json"))["neurons"] == [
            [0, 5]]
    finally:
        running.stop(0)


def test_a_local_stream_is_not_cut_by_the_unary_timeout_and_never_ends_as_if_complete(setup, tmp_path):
    """The client's timeout bounds unary calls; a stream (export, report) has a deadline only when
    the call gives one, locally as over the network. A stream its deadline cuts short raises
    DEADLINE_EXCEEDED: an export or a report is never written as if complete."""
    from n2g.client import N2GError
    from n2g.local import LocalN2GClient

    ws, addr = setup
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        LocalN2GClient(ws, no_model=True, timeout=0)  # as N2GClient checks it (was: every call DEADLINE_EXCEEDED)
    with LocalN2GClient(ws, no_model=True) as c:
        keys = [g.key for g in c.list_graphs()]
        n = len(keys)
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            c.list_graphs(timeout=float("nan"))
    with LocalN2GClient(ws, no_model=True, timeout=1e-3) as c:
        written = []  # export_to's progress: each neuron's key as it is written
        assert c.export_to(tmp_path / "all", progress=written.append) == n
        assert sorted(written) == sorted(keys) and len(list((tmp_path / "all" / "graphs").iterdir())) == n
        # one layer exported again into the folder: it holds that export only (export.json listed
        # one layer beside files of every layer); files not named as n2g names them stay
        (tmp_path / "all" / "graphs" / "notes.json").write_text("{}")
        layer = keys[0][0]
        mine = sorted(k for k in keys if k[0] == layer)
        assert c.export_to(tmp_path / "all", layers=[layer]) == len(mine) < n
        assert sorted(p.name for p in (tmp_path / "all" / "graphs").iterdir()) == sorted(
            [f"{l}_{m}.json" for l, m in mine] + ["notes.json"])
        assert sorted(p.name for p in (tmp_path / "all" / "examples").iterdir()) == sorted(f"{l}_{m}.json" for l, m in mine)
        assert c.report_to(tmp_path / "report") == tmp_path / "report" / "index.html"
        assert (tmp_path / "report" / "index.html").exists()
        for call in (lambda: c.export_to(tmp_path / "cut", timeout=1e-9),
                     lambda: c.report_to(tmp_path / "cut-report", timeout=1e-9),
                     lambda: list(c.pairs("subset", threshold=0.3, timeout=1e-9))):
            with pytest.raises(N2GError) as e:
                call()
            assert e.value.code.name == "DEADLINE_EXCEEDED", e.value
        assert not (tmp_path / "cut" / "export.json").exists()
        assert not (tmp_path / "cut-report" / "index.html").exists()
        # a stream that sent everything is complete, however long its reader took over it
        job = c.list_jobs()[0]
        assert job.state == "succeeded"
        assert c.wait_job(job.id, progress=lambda ev: time.sleep(0.6), timeout=0.3).state == "succeeded"
        got = []
        for batch_item in c.pairs("subset", threshold=0.3, timeout=0.3):  # one batch: every pair at once
            got.append(batch_item)
            time.sleep(0.4) if len(got) == 1 else None
        assert got and len(got) == len(list(c.pairs("subset", threshold=0.3)))


def test_report_zip_must_be_a_file_path(capsys, setup, tmp_path):
    ws, _ = setup
    for bad in ("", str(tmp_path)):
        code, out, err = run(capsys, "report", "--out", str(tmp_path / "r"), "--zip", bad, "--workspace", str(ws))
        assert code == 2 and err.startswith("error: --zip needs the path of a file") and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()
