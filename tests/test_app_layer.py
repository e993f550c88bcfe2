"""The application layer (issue 8): local and remote commands run the same code below the
transport, the clients share one body, and the defects found in review stay fixed."""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import re
import zipfile
from pathlib import Path

import grpc
import pytest

from n2g.client import AsyncN2GClient, N2GClient, N2GError
from n2g_servers import NATIVE_MODEL, REPO, ServerProcess, native_workspace, run_cli


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two copies of the native workspace (32-token windows): one used locally, one served with
    the model."""
    local = native_workspace(tmp_path_factory, "app-local")
    remote = native_workspace(tmp_path_factory, "app-remote")
    with ServerProcess(remote, "--model", NATIVE_MODEL, "--device", "cpu").running() as srv:
        yield local, srv


def _unbuilt(ws: Path, layer: int) -> list[int]:
    from n2g_service.workspace import Workspace

    built = {n for l, n in Workspace(ws).built_keys() if l == layer}
    return [n for n in range(128) if n not in built][:2]


def test_build_local_and_remote_are_the_same_calls(pair):
    """Before: a local build on a workspace of 32-token windows failed unless --window-tokens was
    repeated (the local path assumed 64); the server used the stored length."""
    local, srv = pair
    neurons = [str(n) for n in _unbuilt(local, 1)]
    for where in (("--workspace", str(local)), ("--server", srv.address)):
        p = run_cli("build", *where, "--layers", "1", "--neurons", *neurons, "--json")
        last = json.loads(p.stdout.splitlines()[-1])
        assert last["stage"] == "done" and last["job"]["state"] == "succeeded", p.stdout
    for n in neurons:
        got = [json.loads(run_cli("graph", "1", n, *where, "--json").stdout)
               for where in (("--workspace", str(local)), ("--server", srv.address))]
        assert got[0] == got[1]  # byte-identical graphs, through either path
    # the job is recorded locally too (the report's "build settings" come from it)
    jobs = json.loads(run_cli("jobs", "--workspace", str(local), "--json").stdout)
    assert any(j["request"]["neurons"] == [int(n) for n in neurons] and j["state"] == "succeeded" for j in jobs)


def test_the_scan_keeps_the_top_windows_the_fit_learns_from(tmp_path_factory):
    """The default fit (calibrated) learns from extra_top further top windows after the paper's
    2 x n_train: unless k is given, the scan keeps that many (it kept 20, so they were never there)."""
    from n2g_service.config import EvalConfig, FitConfig
    from n2g_service.fit import scan_k

    local = native_workspace(tmp_path_factory, "scan-k")  # its rescans must not touch the pair's
    assert scan_k(FitConfig(extra_top=10), 10, 20) == 30 and scan_k(FitConfig(method="paper"), 10, 20) == 20
    assert scan_k(FitConfig(extra_top=25), 10, 20) == 45 and scan_k(FitConfig(method="paper"), 10, 64) == 64
    want = {None: 2 * EvalConfig().n_train + FitConfig().extra_top, "paper": 2 * EvalConfig().n_train, "k": 24}
    for i, (method, k) in enumerate(want.items()):
        args = ["--method", "paper"] if method == "paper" else ["--k", "24"] if method == "k" else []
        job = f"scan-k-{method}"
        run_cli("build", "--workspace", str(local), "--layers", "0", "--neurons", str(60 + i),
                "--job-id", job, *args)
        jobs = json.loads(run_cli("jobs", "--workspace", str(local), "--json").stdout)
        assert [j["request"]["scan"]["k"] for j in jobs if j["id"] == job] == [k]


def test_config_mistakes_refused_the_same_both_ways(pair):
    """Before: the local path ignored a misspelt top-level --config key that the server refused."""
    local, srv = pair
    for config, needle in (('{"fitt": {}}', "unknown key"), ('{"scan": 5}', "must be an object"),
                           ('{"fit": {"no_such_field": 1}}', "unknown field")):
        out = []
        for where in (("--workspace", str(local)), ("--server", srv.address)):
            p = run_cli("build", *where, "--layers", "0", "--neurons", "1", "--config", config, check=False)
            assert p.returncode == 1 and "INVALID_ARGUMENT" in p.stderr and needle in p.stderr, p.stderr
            out.append(p.stderr.strip().splitlines()[-1])
        assert out[0] == out[1]


def test_async_client_answers_as_the_sync_one(pair):
    """Every method of N2GClient, called on AsyncN2GClient in a loop, gives an awaitable (or an
    async iterator for streams) whose answer equals the blocking client's; a build started and
    waited for asynchronously succeeds."""
    local, srv = pair
    public = {n for n, f in inspect.getmembers(N2GClient, inspect.isfunction) if not n.startswith("_")}
    with N2GClient(srv.address) as s:
        key = s.list_graphs()[0].key
        job = s.list_jobs()[0].id
        label = s.graph(*key).summary.activating[0]
    calls = {  # name -> (args, kwargs); results compared by their repr (numpy arrays inside)
        "model_info": ((), {}), "tokenize": ((["a cat"],), {}), "list_jobs": ((), {}), "get_job": ((job,), {}),
        "list_graphs": ((), {}), "graph": (key, {"structure": True}),
        "predict": (([key],), {"token_ids": [[1, 5, 7]]}), "activations": (([key],), {"token_ids": [[1, 5, 7]]}),
        "evaluate": ((), {}), "search": (([(label, "activating")],), {}), "in_context_neurons": ((), {}),
        "similar": (key, {"threshold": 0.5}), "plan_build": (([1],), {"neurons": [0, 1]}),
        "pairs": (("subset",), {"threshold": 0.5}), "export": (([key[0]],), {}), "watch_job": ((job,), {}),
        "wait_job": ((job,), {}), "cancel_job": ((job,), {}), "health": ((), {}), "wait_ready": ((), {}),
    }
    # export_to, report and report_to: test_async_export_and_report; start_build below
    assert public - set(calls) == {"close", "start_build", "export_to", "report", "report_to"}

    def plain(x):
        x = list(x) if inspect.isgenerator(x) or type(x).__name__ == "generator" else x
        if type(x).__name__ == "BuildPlan":  # its time estimate is measured on each call
            return (x.layers, x.neurons, x.neurons_built, x.scan_shards, x.scan_tokens, x.fit_groups)
        return repr(x)

    with N2GClient(srv.address) as s:
        want = {name: plain(getattr(s, name)(*a, **kw)) for name, (a, kw) in calls.items()}

    async def go():
        got = {}
        async with AsyncN2GClient(srv.address) as c:
            for name, (a, kw) in calls.items():
                r = getattr(c, name)(*a, **kw)
                if inspect.isawaitable(r):
                    got[name] = await r
                else:
                    assert hasattr(r, "__aiter__"), name
                    got[name] = [x async for x in r]
            neuron = _unbuilt(local, 1)[:1]
            started = await c.start_build([1], neuron)
            done = await c.wait_job(started.id, timeout=600)
            return got, done, neuron

    got, done, neuron = asyncio.run(go())
    for name in calls:
        assert plain(got[name]) == want[name], name
    assert done.state == "succeeded"
    with N2GClient(srv.address) as s:
        assert s.graph(1, neuron[0]).key == (1, neuron[0])


def test_async_export_and_report(pair, tmp_path):
    local, srv = pair

    async def go():
        async with AsyncN2GClient(srv.address) as c:
            n = await c.export_to(tmp_path / "export")
            index = await c.report_to(tmp_path / "report")
            jobs = await c.list_jobs()
            return n, index, jobs

    n, index, jobs = asyncio.run(go())
    with N2GClient(srv.address) as c:
        assert n == c.model_info().neurons_built == len(list((tmp_path / "export" / "graphs").glob("*.json")))
        assert [j.id for j in jobs] == [j.id for j in c.list_jobs()]
    assert index.exists() and "n2g report" in index.read_text()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_report_unzip_refuses_a_sibling_folder(tmp_path):
    """Before: a string-prefix check let '../out2/x' through for out_dir /tmp/out."""
    from n2g.client import _unzip

    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unsafe path"):
        _unzip(_zip({"index.html": b"ok", "../out2/evil.html": b"x"}), out)
    assert not (tmp_path / "out2").exists() and not (out / "index.html").exists()
    assert _unzip(_zip({"index.html": b"ok", "neurons/0_1.html": b"y"}), out) == out / "index.html"


def test_report_unzip_and_stream_are_bounded(tmp_path, monkeypatch):
    """Before: a 0.31 MB archive unpacked to 315 MB, and an endless stream was held in memory."""
    import n2g.client as client

    monkeypatch.setattr(client, "MAX_REPORT_UNPACKED_BYTES", 100_000)
    bomb = _zip({"index.html": b"\0" * 1_000_000})
    assert len(bomb) < 5_000
    with pytest.raises(ValueError, match="unpacks past"):
        client._unzip(bomb, tmp_path / "out")
    # refused while unpacking: nothing of it is left (files are written whole or not at all)
    assert not (tmp_path / "out" / "index.html").exists() and not list((tmp_path / "out").iterdir())
    # an archive of many empty files (inodes, not bytes) is refused before anything is written
    monkeypatch.setattr(client, "MAX_REPORT_FILES", 50)
    many = _zip({f"neurons/{i}.html": b"" for i in range(59)} | {"index.html": b"x"})
    with monkeypatch.context() as m:  # from the archive's end record, before zipfile reads its directory
        m.setattr(client.zipfile, "ZipFile", lambda *a, **k: pytest.fail("the directory was parsed first"))
        with pytest.raises(ValueError, match="holds 60 files, past 50"):
            client._unzip(many, tmp_path / "many")
    assert not (tmp_path / "many" / "neurons").exists()
    # the front page is written last whatever its name in the archive says
    order = []
    monkeypatch.setattr(client, "write_file", lambda target, blocks: order.append(Path(target).name) or list(blocks))
    client._unzip(_zip({"./index.html": b"i", "neurons/0_1.html": b"p"}), tmp_path / "front")
    assert order == ["0_1.html", "index.html"]
    monkeypatch.setattr(client, "MAX_REPORT_BYTES", 10)
    sink = client._ReportSink()
    sink.add(b"12345")
    with pytest.raises(N2GError) as e:
        sink.add(b"678901")
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_report_shows_the_build_settings(pair, tmp_path):
    """Before: a workspace built locally said "Build settings: none recorded" (no job stored) and
    the report read an `eval.semantics` setting that does not exist."""
    local, _ = pair
    run_cli("report", "--workspace", str(local), "--out", str(tmp_path / "r"))
    html = (tmp_path / "r" / "index.html").read_text()
    assert "none recorded" not in html and "group_size" in html


def test_layers_stay_in_their_lane():
    """No module outside the workspace runs SQL; the servicer holds no pipeline code."""
    service = REPO / "service" / "n2g_service"
    for path in list(service.rglob("*.py")) + list((REPO / "python_client" / "n2g").rglob("*.py")):
        if path.name == "workspace.py" or "_pb2" in path.name:
            continue
        text = path.read_text()
        assert "._conn(" not in text and not re.search(r"\bexecute\(\s*[\"']", text), path
    server = (service / "server.py").read_text()
    for needle in ("import torch", "from .build", "from .evaluate", "from .activations", "np.", "json.loads"):
        assert needle not in server, needle


def test_every_rpc_is_translated_once():
    from n2g.convert import OPS
    from n2g.v1 import n2g_pb2 as pb

    rpcs = {m.name for m in pb.DESCRIPTOR.services_by_name["N2G"].methods}
    assert rpcs == {op.rpc for op in OPS.values()}
    from n2g_service.app import N2GApp

    for op in OPS.values():
        params = inspect.signature(getattr(N2GApp, op.name)).parameters
        assert "deadline" in params, op.name
        assert hasattr(N2GClient, op.name), op.name


def test_vocabulary_is_defined_once():
    """Job states, semantics, roles and pair kinds are spelt out in n2g.vocab only."""
    tuples = {"JOB_STATES": '"queued", "running"', "SEMANTICS": '"all_paths_max", "greedy_deepest"',
              "ROLES": '"activating", "context", "either"'}
    files = [p for p in (REPO / "service").rglob("*.py")] + [p for p in (REPO / "python_client").rglob("*.py")]
    for name, literal in tuples.items():
        holders = [p.name for p in files if literal in p.read_text() and "_pb2" not in p.name]
        assert holders == ["vocab.py"], (name, holders)


def test_eval_on_every_test_set_local_and_remote(pair):
    """`n2g eval --compute` stores the held-out activations once; afterwards every reader (here the
    server) scores ordinary text and detection from them without computing anything."""
    local, srv = pair
    before = json.loads(run_cli("eval", "--workspace", str(local), "--json").stdout)["test_sets"]
    assert "ordinary" in before["unavailable"]  # nothing stored yet, and no model asked for
    after = json.loads(run_cli("eval", "--workspace", str(local), "--json", "--compute").stdout)["test_sets"]
    assert after["unavailable"] == {} and after["heldout"]["size"] > 0
    sets = {(n["layer"], n["neuron"], n["test_set"]) for n in after["neurons"]}
    assert {t for _, _, t in sets} == {"paper", "ordinary", "detection"}
    again = json.loads(run_cli("eval", "--workspace", str(local), "--json").stdout)["test_sets"]
    assert again["neurons"] == after["neurons"]  # read back, the same scores
    # the server (its own copy of the workspace, the same seeded sample) computes and stores them
    # on request, then scores from what it stored; its neurons that the local copy has score the same
    remote = json.loads(run_cli("eval", "--server", srv.address, "--json", "--compute").stdout)["test_sets"]
    assert remote["unavailable"] == {} and remote["heldout"] == after["heldout"]
    assert json.loads(run_cli("eval", "--server", srv.address, "--json").stdout)["test_sets"]["neurons"] == remote[
        "neurons"]
    keys = {(n["layer"], n["neuron"]) for n in after["neurons"]}
    shared = [n for n in remote["neurons"] if (n["layer"], n["neuron"]) in keys]
    assert shared and shared == after["neurons"]


def test_a_dry_run_answers_while_a_build_writes(pair):
    """A dry run writes nothing, so it reads a workspace whose writer (a build) is busy, and says
    what is left; a real build there is still refused with the writer named."""
    from n2g_service.workspace import Workspace

    local, _ = pair
    writer = Workspace(local, mode="write", purpose="n2g build")
    try:
        dry = run_cli("build", "--workspace", str(local), "--layers", "0", "--sample", "3", "--dry-run", "--json")
        assert json.loads(dry.stdout)["layers"] == [0]
        real = run_cli("build", "--workspace", str(local), "--layers", "0", "--sample", "3", check=False)
        assert real.returncode != 0 and "already has a writer" in real.stderr
    finally:
        writer.close()


def test_dry_run_plans_every_layer_both_ways(pair):
    local, srv = pair
    plans = [json.loads(run_cli("build", *where, "--layers", "all", "--sample", "3", "--dry-run", "--json").stdout)
             for where in (("--workspace", str(local)), ("--server", srv.address))]
    for p in plans:
        assert p["layers"] == [0, 1] and p["scan_shards"] == 0  # the layers are scanned already
        assert "forward" in p["summary"] and "tok/s" in p["summary"]
    assert {k: v for k, v in plans[0].items() if k not in ("summary", "details", "total_seconds")} == \
        {k: v for k, v in plans[1].items() if k not in ("summary", "details", "total_seconds")}


def test_a_damaged_workspace_under_search_is_data_loss_not_a_bad_request(tmp_path_factory, monkeypatch):
    """WorkspaceError is a ValueError: search, which turns the index's ValueErrors into
    INVALID_ARGUMENT, must let a damaged workspace through with its own status."""
    from n2g.local import LocalN2GClient
    from n2g_service.graphs import GraphIndex
    from n2g_service.workspace import WorkspaceError

    ws = native_workspace(tmp_path_factory, "damaged-search")

    def damaged(self, clauses):
        raise WorkspaceError(f"workspace {ws}: database disk image is malformed", "damaged")

    monkeypatch.setattr(GraphIndex, "search", damaged)
    with LocalN2GClient(ws, no_model=True) as c:
        with pytest.raises(N2GError) as e:
            c.search([(1, "either")])
    assert e.value.code == grpc.StatusCode.DATA_LOSS and "malformed" in e.value.message


def test_what_the_model_cannot_read_is_refused_before_any_work(pair, tmp_path):
    """The native model reads 256 tokens (n_ctx): longer corpus windows were stored, then failed the
    scan and poisoned the workspace; a longer sequence for true activations was an INTERNAL error.
    A config_json window length other than the stored one failed in the job."""
    from n2g.local import LocalN2GClient

    local, _ = pair
    with LocalN2GClient(tmp_path / "new", model=NATIVE_MODEL, device="cpu", create=True) as c:
        with pytest.raises(N2GError) as e:
            c.plan_build([0], [1], window_tokens=300)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "model reads (n_ctx 256)" in e.value.message
    with LocalN2GClient(local, device="cpu") as c:
        key = c.list_graphs()[0].key
        with pytest.raises(N2GError) as e:
            c.activations([key], token_ids=[[1, 2, 3], list(range(1, 301))])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "sequence 1 is 300 tokens long" in e.value.message
        assert c.activations([key], token_ids=[list(range(1, 257))]).values[0].shape == (1, 256)
        with pytest.raises(N2GError) as e:
            c.plan_build([0], [1], config={"scan": {"window_tokens": 48}})
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "windows of 32 tokens, not 48" in e.value.message
    # a plan on a corpus that cannot make one window says so (it was INTERNAL on a server)
    (tmp_path / "short.txt").write_text("the cat")
    with LocalN2GClient(tmp_path / "short", model=NATIVE_MODEL, device="cpu", create=True,
                        corpus=str(tmp_path / "short.txt")) as c:
        with pytest.raises(N2GError) as e:
            c.plan_build([0], [1])
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "fewer than one window" in e.value.message


def test_a_reader_during_a_graph_index_update_waits_for_it(tmp_path, monkeypatch):
    """The index marked itself fresh before its update had finished: a call arriving meanwhile (an
    evaluation right after a build's last commit) answered from the graphs before it."""
    import threading
    import time

    import n2g_fast

    from n2g_service.graphs import GraphIndex
    from n2g_service.workspace import NeuronRecord, Workspace

    def record(n: int) -> NeuronRecord:
        g = n2g_fast.NeuronGraph("m", 0, n, "h", 2.0)
        g.add_path(("cat", [7], 1.0), [], 1.0)
        return NeuronRecord(0, n, 2.0, g.to_bytes(), {}, {}, {})

    ws = Workspace(tmp_path / "ws", create=True, model="m")
    for n in (0, 1):
        ws.put_neuron(record(n))
    index = GraphIndex(ws, refresh_interval=60)
    assert index.keys() == {(0, 0), (0, 1)}
    for n in (2, 3, 4):
        ws.put_neuron(record(n))
    index.invalidate()
    rows = ws.graph_rows

    inside = threading.Event()

    def slow_rows(keys):
        inside.set()
        time.sleep(0.5)  # an update of many graphs
        yield from rows(keys)

    monkeypatch.setattr(ws, "graph_rows", slow_rows)
    first = threading.Thread(target=index.keys)
    first.start()
    assert inside.wait(30)  # the first reader is inside the update
    monkeypatch.setattr(ws, "graph_rows", lambda keys: pytest.fail("a second update: the reader did not wait"))
    assert index.keys() == {(0, n) for n in range(5)}
    first.join()


def test_a_report_whose_caller_has_gone_is_not_built(pair, monkeypatch):
    """Calls with a 10 ms deadline queued behind a report each built a whole report afterwards,
    holding a stream slot all along."""
    import threading
    import time

    import n2g_service.app as app_module
    from n2g_service.app import Deadline, N2GApp, open_workspace

    local, _ = pair
    ws, host = open_workspace(local, no_model=True)
    app = N2GApp(ws, host)
    built = []
    monkeypatch.setattr(app_module, "report_zip", lambda path, layers=None: built.append(path) or b"zip")
    app._report_lock.acquire()  # a report is being built
    got: list = []
    errors: list = []

    def call():
        try:
            got.extend(app.report(deadline=Deadline.after(0.3)))
        except N2GError as e:
            errors.append(e.code.name)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.8)
    app._report_lock.release()
    t.join(5)
    assert not t.is_alive() and got == [] and built == [] and errors == ["DEADLINE_EXCEEDED"]
    assert [c.data for c in app.report()] == [b"zip"] and len(built) == 1  # a caller that waits gets it
    app.close()


def test_a_local_client_refuses_a_workspace_replaced_under_it(tmp_path_factory):
    """Both transports go through one entry point (N2GApp.call / stream) with the same checks: a
    local client answered from a database file that was replaced under it (a server said
    DATA_LOSS)."""
    import os
    import shutil

    from n2g.local import LocalN2GClient

    ws = native_workspace(tmp_path_factory, "app-replaced")
    db = ws / "n2g.sqlite"
    shutil.copy(db, ws.parent / "backup.sqlite")
    with LocalN2GClient(ws, no_model=True) as c:
        key = c.list_graphs()[0].key
        os.replace(ws.parent / "backup.sqlite", db)
        for call in (c.list_graphs, lambda: c.graph(*key), lambda: list(c.export(examples=False))):
            with pytest.raises(N2GError) as e:
                call()
            assert e.value.code == grpc.StatusCode.DATA_LOSS and "removed or replaced" in e.value.message
    with LocalN2GClient(ws, no_model=True) as c:  # opened again: the file there now
        assert c.graph(*key).key == key
        # replaced while an export runs: it stops with DATA_LOSS (it read on from the old file)
        shutil.copy(db, ws.parent / "backup.sqlite")
        exported = c.export(examples=False)
        next(exported)
        os.replace(ws.parent / "backup.sqlite", db)
        with pytest.raises(N2GError) as e:
            list(exported)
        assert e.value.code == grpc.StatusCode.DATA_LOSS
