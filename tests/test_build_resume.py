"""A build whose driver is killed with SIGKILL (during the scan, then during the fit) resumes on
rerun at unit granularity: every neuron present once, no finished unit run again, results
identical to a build that was never interrupted. The driver runs in a subprocess that the test
kills as soon as the workspace shows the progress it waits for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from n2g_service.config import ScanConfig
from n2g_service.build.request import BuildRequest, plan_neurons
from n2g_service.build.runner import run_build
from n2g_service.workspace import BuildStore, Workspace

ROOT = Path(__file__).resolve().parents[1]
PLAIN = dict(layers="0-1", neurons=list(range(0, 128, 16)), group_size=2, shard_windows=32)
SCAN = dict(k=6, window_tokens=32)
REQ = dict(**PLAIN, scan=ScanConfig(**SCAN))
# the driver: the same model (weights from its seed), request and job as the reference build
SCRIPT = f"""
import sys
sys.path.insert(0, {str(ROOT / 'service')!r})
from n2g_service.config import ScanConfig
from n2g_service.build.request import BuildRequest, plan_neurons
from n2g_service.build.runner import run_build
from n2g_service.models import native_random_model
from n2g_service.workspace import Workspace
import time
from n2g_service.build import executors
_unit = executors.execute_unit
def paced_unit(*args, **kwargs):  # each unit takes 0.1 s more, so the watcher sees every stage
    out = _unit(*args, **kwargs)
    time.sleep(0.1)
    return out
executors.execute_unit = paced_unit
model = native_random_model(n_layers=2, d_model=64, d_mlp=128, seed=0)
req = BuildRequest(**{PLAIN!r}, scan=ScanConfig(**{SCAN!r}))
run_build(Workspace(sys.argv[1]), model, req, job_id="j1")
"""


def _new_ws(path, model, windows):
    ws = Workspace(path, create=True, model=model.name, corpus="fortunes", hook=model.hook)
    ws.save_windows(windows)
    ws.create_job("j1", {}, 0)
    return ws


def _units(ws):
    store = BuildStore(ws)
    plans = store.plans()
    return store.units(plans[0]) if plans else []


def _run_until(ws_path, stop) -> int:
    """Runs the driver in a subprocess and SIGKILLs it as soon as ``stop(units)`` holds; returns
    its exit status (-9 when killed)."""
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(ws_path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ws = Workspace(ws_path, mode="read")
    try:
        while proc.poll() is None:
            if stop(_units(ws)):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read().decode()[-2000:]
    return proc.returncode


def _done(units, kind):
    return [u for u in units if u.kind == kind and u.state == "done"]


def test_sigkill_during_scan_and_fit_resumes_exactly(native_model, native_windows, tmp_path):
    windows = native_windows[:320]
    ref = _new_ws(tmp_path / "ref", native_model, windows)
    keys = run_build(ref, native_model, BuildRequest(**REQ), job_id="j1")
    assert len(keys) == 16

    ws = _new_ws(tmp_path / "ws", native_model, windows)
    ws.release_writer()  # the driver subprocess is the writer
    n_shards = 320 // 32
    # 1. killed in the middle of the scan
    rc = _run_until(ws.path, lambda u: 0 < len(_done(u, "scan")) < n_shards - 2)
    assert rc == -signal.SIGKILL
    before = {u.unit_id: u.finished_at for u in _done(_units(ws), "scan")}
    assert 0 < len(before) < n_shards and ws.built_keys() == []
    # 2. resumed, killed in the middle of the fit
    rc = _run_until(ws.path, lambda u: 0 < len(_done(u, "fit")) < 6)
    assert rc == -signal.SIGKILL
    units = _units(ws)
    scan_units = [u for u in units if u.kind == "scan"]
    assert len(scan_units) == n_shards and all(u.state == "done" for u in scan_units)
    for u in scan_units:  # shards finished before the first kill were not scanned again
        if u.unit_id in before:
            assert u.finished_at == before[u.unit_id] and u.attempts == 1
    fit_before = {u.unit_id: u.finished_at for u in _done(units, "fit")}
    assert 0 < len(fit_before) < 8
    assert len(ws.built_keys()) == 2 * len(fit_before)  # a group is committed whole or not at all
    # 3. resumed to the end (here: the driver is any process that runs the same request)
    ws = Workspace(ws.path)
    assert run_build(ws, native_model, BuildRequest(**REQ), job_id="j1") == keys
    units = _units(ws)
    assert len([u for u in units if u.kind == "fit"]) == 8 and all(u.state == "done" for u in units)
    for u in units:
        if u.unit_id in fit_before:
            assert u.finished_at == fit_before[u.unit_id] and u.attempts == 1
    assert sum(u.attempts for u in units) <= len(units) + 2  # at most the two killed units ran twice
    assert ws.built_keys() == sorted(keys)
    assert ws.get_job("j1").done == 16  # every neuron counted once
    assert ws.graph_bytes() == ref.graph_bytes()
    for l in (0, 1):
        a, b = ws.load_layer_scan(l), ref.load_layer_scan(l)
        for f in ("max_activation", "top_window_ids", "top_scores"):
            assert (a[f] == b[f]).all()


def test_a_rebuild_with_other_fit_settings_is_refused_not_mixed(native_model, native_windows, tmp_path):
    """Built neurons are kept by a later build; one built with another fit (here --method paper,
    then the default) must not be kept silently beside the new graphs: the build says which and why."""
    import dataclasses

    import pytest

    from n2g_service.fit import preset

    ws = _new_ws(tmp_path / "ws", native_model, native_windows[:128])
    small = dict(layers=[0], neurons=[5, 9], group_size=2, scan=ScanConfig(**SCAN))
    paper = BuildRequest(**small, fit=preset("paper"))
    assert run_build(ws, native_model, paper) == [(0, 5), (0, 9)]
    graphs = {k: ws.get_neuron(*k).graph().to_json() for k in ws.built_keys()}
    with pytest.raises(ValueError, match=r"neuron 0:5 .* built with other fit settings: .*method='paper' "
                                         r"\(now 'calibrated'\).*another workspace"):
        run_build(ws, native_model, BuildRequest(**dict(small, neurons=[5, 9, 12])))
    assert ws.built_keys() == [(0, 5), (0, 9)]  # nothing built, nothing replaced
    assert {k: ws.get_neuron(*k).graph().to_json() for k in ws.built_keys()} == graphs
    # the same fit (its device-sized batch_tokens aside) adds neurons beside them
    again = BuildRequest(**dict(small, neurons=[5, 9, 12]),
                         fit=dataclasses.replace(preset("paper"), batch_tokens=1024))
    assert run_build(ws, native_model, again) == [(0, 5), (0, 9), (0, 12)]


def test_other_fit_settings_are_refused_before_any_scan_and_a_larger_scan_serves(native_model, native_windows,
                                                                                 tmp_path):
    """A build asking other fit settings for a built neuron scanned the whole corpus first (hours
    at depth) and only then failed, having replaced the stored scan by one of its own smaller k
    (the default fit keeps 40 windows a neuron, the paper's 20): the next default build scanned
    again. The check now runs before any scan (the dry run's too), and a stored scan with a larger
    k serves a smaller one exactly."""
    import pytest

    from n2g_service.build.summary import plan_summary
    from n2g_service.fit import preset

    ws = _new_ws(tmp_path / "ws", native_model, native_windows[:128])
    assert run_build(ws, native_model, BuildRequest(layers=[0], neurons=[5], group_size=2,
                                                    scan=ScanConfig(k=12, window_tokens=32))) == [(0, 5)]
    scan = ws.load_layer_scan(0)
    assert scan["top_window_ids"].shape[1] == 12
    paper = dict(layers=[0], group_size=2, scan=ScanConfig(**SCAN), fit=preset("paper"))
    for neurons, sample in (([5, 9], None), (None, native_model.d_mlp)):  # a sample's come from the stored a_max
        req = BuildRequest(**paper, neurons=neurons, sample=sample, seed=0)
        if sample is not None:
            assert (0, 5) in plan_neurons(req, {0: scan["max_activation"]})
        with pytest.raises(ValueError, match=r"neuron 0:5 .*other fit settings"):
            plan_summary(ws, native_model, req, calibrate=False)
        with pytest.raises(ValueError, match=r"neuron 0:5 .*other fit settings"):
            run_build(ws, native_model, req)
        after = ws.load_layer_scan(0)
        assert after["top_window_ids"].shape[1] == 12 and after["seconds"] == scan["seconds"]  # not scanned again
    # another neuron with the paper fit: the k=12 scan serves k=6, the same graph as a k=6 scan gives
    assert run_build(ws, native_model, BuildRequest(**paper, neurons=[9])) == [(0, 9)]
    assert ws.load_layer_scan(0)["seconds"] == scan["seconds"]
    fresh = _new_ws(tmp_path / "fresh", native_model, native_windows[:128])
    run_build(fresh, native_model, BuildRequest(**paper, neurons=[9]))
    assert fresh.load_layer_scan(0)["top_window_ids"].shape[1] == 6
    assert ws.get_neuron(0, 9).graph().to_json() == fresh.get_neuron(0, 9).graph().to_json()
    assert ws.get_neuron(0, 9).examples == fresh.get_neuron(0, 9).examples


def test_a_cancel_is_kept_when_the_server_stops_before_the_job_does(native_model, native_windows, tmp_path):
    """A cancelled running job was only told in memory: a server stopped (or killed) before the
    neuron group ended stored it `queued` (or left it `running`) and the next start finished it."""
    import threading

    from n2g_service.jobqueue import JobQueue

    ws = Workspace(tmp_path / "ws", create=True, model=native_model.name, corpus="fortunes", hook=native_model.hook)
    ws.save_windows(native_windows[:128])
    req = BuildRequest(layers=[0], neurons=list(range(0, 128, 2)), group_size=8, scan=ScanConfig(**SCAN))
    q = JobQueue(ws, lambda: native_model, threading.Lock())
    q.start()
    q.submit("c1", req.to_dict())
    sub = q.subscribe("c1")
    while not (up := sub.get(timeout=120)).event.stage == "fit" or up.event.neuron is None:
        assert not up.final, up
    assert q.cancel("c1").state == "cancelled"  # stored at once: a kill -9 from here on keeps it
    q.stop()  # SIGTERM: the worker stops after its group, as on a shutdown
    assert q.join(120)
    job = ws.get_job("c1")
    assert job.state == "cancelled" and 0 < job.done < job.total
    assert JobQueue(ws, lambda: native_model, threading.Lock()).resume_pending() == []
    # a cancel that comes after the job ended leaves its final state
    q2 = JobQueue(ws, lambda: native_model, threading.Lock())
    q2.start()
    q2.submit("c2", BuildRequest(layers=[0], neurons=[1], scan=ScanConfig(**SCAN)).to_dict())
    deadline = time.monotonic() + 120
    while ws.get_job("c2").state != "succeeded" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert q2.cancel("c2").state == "succeeded"
    q2.stop()
