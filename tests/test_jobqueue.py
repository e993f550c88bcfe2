"""Build jobs that cannot run (issue 10): they fail once with their reason and are never resumed
into a crash loop; an interrupted job is not left `running`; job ids and stored requests are
bounded at the storage level; job listings stay small."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from n2g_service.jobqueue import MAX_STALLS, JobQueue
from n2g_service.build.request import BuildRequest
from n2g_service.workspace import (DB_NAME, JOB_STATES, MAX_JOB_ID_CHARS, MAX_JOB_REQUEST_BYTES, Workspace,
                                   WorkspaceError, validate_job_id)

ROOT = Path(__file__).resolve().parents[1]
REQUEST = BuildRequest(layers=[0], neurons=[1, 2]).to_dict()


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "service"), str(ROOT / "python_client"), e.get("PYTHONPATH", "")])
    return e


@pytest.fixture
def ws(tmp_path) -> Workspace:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "the cat sat on the mat"}\n')
    return Workspace(tmp_path / "ws", create=True, model="fake", corpus=str(corpus), hook="h")


def _queue(ws: Workspace, **kw) -> JobQueue:
    return JobQueue(ws, lambda: None, threading.Lock(), **kw)


# -- a job that kills its process is not resumed into a crash loop ------------------------------
# One "server start": the workspace's writer resumes the unfinished jobs; the fake model kills the
# process (SIGKILL, like the kernel's OOM killer) when the build first uses it, while setting up.
_SERVER = """
import os, signal, sys, threading, time
from n2g_service.jobqueue import JobQueue
from n2g_service.workspace import Workspace

class KillerModel:
    n_layers, d_mlp, d_vocab, device = 2, 16, 50, "cpu"
    def encode(self, text):
        os.kill(os.getpid(), signal.SIGKILL)

ws = Workspace(sys.argv[1], mode="write", purpose="test server")
q = JobQueue(ws, KillerModel, threading.Lock())
q.start()
if not q.resume_pending():
    sys.exit(0)
time.sleep(60)  # the job runs: the process is killed long before this ends
sys.exit(1)
"""


def test_a_job_that_kills_its_process_fails_after_max_stalls_instead_of_looping(ws):
    ws.create_job("oom", REQUEST, total=0)
    ws.close()
    codes = []
    for _ in range(MAX_STALLS + 2):
        p = subprocess.run([sys.executable, "-c", _SERVER, str(ws.path)], capture_output=True, text=True,
                           timeout=120, env=_env())
        codes.append(p.returncode)
    assert codes == [-9] * MAX_STALLS + [0, 0]  # then the job is failed, not resumed again
    job = Workspace(ws.path, mode="read").get_job("oom")
    assert job.state == "failed" and job.attempts == MAX_STALLS
    assert f"interrupted {MAX_STALLS} times in a row before committing any work" in job.error
    assert "stage corpus" in job.error  # where it died, recorded as it went


def test_an_interrupted_job_that_made_progress_is_resumed(ws):
    ws.create_job("progress", REQUEST, total=2)
    ws.start_job("progress")
    ws.update_job("progress", done=1)  # one neuron committed, then the process died
    q = _queue(ws)
    assert q.resume_pending() == ["progress"]
    job = ws.get_job("progress")
    assert job.state == "queued" and job.stalls == 0


def test_interruptions_after_committed_scan_work_are_not_stalls(ws):
    ws.create_job("long-scan", REQUEST, total=0)
    for _ in range(MAX_STALLS + 1):  # killed again and again in a long scan, each time after a shard
        ws.start_job("long-scan")
        ws.mark_job_progress("long-scan")
        assert _queue(ws).resume_pending() == ["long-scan"]
    job = ws.get_job("long-scan")
    assert job.state == "queued" and job.stalls == 0 and job.attempts == MAX_STALLS + 1
    ws.start_job("long-scan")  # but an attempt that commits nothing counts
    _queue(ws).resume_pending()
    assert ws.get_job("long-scan").stalls == 1


def test_without_resume_an_interrupted_job_is_failed_not_left_running(ws):
    ws.create_job("killed", REQUEST, total=2)
    ws.create_job("waiting", REQUEST, total=0)
    ws.start_job("killed")
    ws.update_job("killed", stage="fit")
    assert _queue(ws).resume_pending(resume=False) == []
    killed = ws.get_job("killed")
    assert killed.state == "failed" and killed.error.startswith("interrupted") and "stage fit" in killed.error
    assert ws.get_job("waiting").state == "queued"  # never started: runs at a later start


def test_a_stored_job_that_cannot_run_fails_once_with_its_reason(ws):
    ws.create_job("no-layers", {"neurons": [1]}, total=0)
    ws.create_job("bad-config", dict(REQUEST, scan={"bogus": 1}), total=0)
    ws.create_job("too-big", dict(REQUEST, scan={"k": 10_000_000}), total=0)
    ws.create_job("fine", REQUEST, total=0)

    def check(request):  # the application layer's limits, applied to stored jobs too
        if request.get("scan", {}).get("k", 0) > 10_000:
            raise ValueError(f"scan.k {request['scan']['k']} is over the limit 10000")

    q = _queue(ws, check_request=check)
    assert q.resume_pending() == ["fine"]
    errors = {j.id: j.error for j in ws.list_jobs(["failed"])}
    assert set(errors) == {"no-layers", "bad-config", "too-big"}
    assert "KeyError" in errors["no-layers"] and "bogus" in errors["bad-config"]
    assert "over the limit 10000" in errors["too-big"]
    assert _queue(ws, check_request=check).resume_pending() == ["fine"]  # failed jobs stay failed

    # a job that raises while setting up (no model here) fails once when the worker runs it
    q.start()
    deadline = time.monotonic() + 30
    while ws.get_job("fine").state in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.05)
    q.stop()
    fine = ws.get_job("fine")
    assert fine.state == "failed" and fine.error and fine.attempts == 1
    assert _queue(ws).resume_pending() == []


# -- job ids, stored requests and listings -------------------------------------------------------
@pytest.mark.parametrize("job_id", ["", "a\nb", "tab\there", "nul\0", " padded", "x" * (MAX_JOB_ID_CHARS + 1),
                                    "esc\x1b[31m", 12000 * "y"])
def test_bad_job_ids_are_refused_at_the_storage_level(ws, job_id):
    with pytest.raises(WorkspaceError) as e:
        ws.create_job(job_id, REQUEST, total=0)
    assert e.value.kind == "invalid" and len(str(e.value)) < 200 and "\n" not in str(e.value)
    assert ws.get_job(job_id) is None and ws.list_jobs() == []


def test_good_job_ids_are_kept_as_given(ws):
    for job_id in ["a", "cancel-me", "run 2026-11-26 12:00", "z" * MAX_JOB_ID_CHARS, "été"]:
        assert validate_job_id(job_id) == job_id
        assert ws.create_job(job_id, REQUEST, total=0).id == job_id
    with pytest.raises(WorkspaceError) as e:
        ws.create_job("a", REQUEST, total=0)
    assert e.value.kind == "conflict"


def test_stored_request_size_is_bounded(ws):
    big = dict(REQUEST, neurons=list(range(MAX_JOB_REQUEST_BYTES // 4)))
    with pytest.raises(WorkspaceError) as e:
        ws.create_job("big", big, total=0)
    assert e.value.kind == "too_large" and str(MAX_JOB_REQUEST_BYTES) in str(e.value)
    with pytest.raises(WorkspaceError) as e:
        ws.create_job("nan", dict(REQUEST, eval={"fire_threshold": float("nan")}), total=0)
    assert e.value.kind == "invalid"
    assert ws.list_jobs() == []


def test_list_jobs_filters_limits_and_leaves_out_requests(ws):
    for i in range(5):
        ws.create_job(f"j{i}", REQUEST, total=0)
    ws.update_job("j1", state="failed", error="x")
    assert [j.id for j in ws.list_jobs()] == [f"j{i}" for i in range(5)]
    assert [j.id for j in ws.list_jobs(limit=2)] == ["j3", "j4"]  # the latest, oldest first
    assert [j.id for j in ws.list_jobs(["failed"])] == ["j1"]
    light = ws.list_jobs(with_request=False)
    assert all(j.request == {} and j.request_bytes > 0 for j in light)
    with pytest.raises(WorkspaceError):
        ws.list_jobs(["exploded"])
    assert set(JOB_STATES) == {"queued", "running", "succeeded", "failed", "cancelled"}


def test_an_oversized_request_stored_before_the_limit_is_not_loaded_and_fails(ws):
    # a workspace written by an n2g without the bound: a 200 KB request in the table
    ws.create_job("legacy", REQUEST, total=0)
    huge = '{"layers": [0], "neurons": [' + ", ".join(["1"] * 70_000) + "]}"
    conn = sqlite3.connect(ws.path / DB_NAME)
    conn.execute("UPDATE jobs SET request = ? WHERE id = 'legacy'", (huge,))
    conn.commit()
    conn.close()
    (job,) = ws.list_jobs()
    assert job.request == {} and job.request_bytes == len(huge)
    assert _queue(ws).resume_pending() == []
    job = ws.get_job("legacy")
    assert job.state == "failed" and "over the" in job.error and str(len(huge)) in job.error


def test_watchers_hear_that_a_job_ended_when_the_workspace_cannot_record_it(ws):
    """A workspace whose database was removed under the server: the job fails, and since that
    cannot be stored, its watchers are told directly instead of waiting on it for ever."""
    q = _queue(ws)
    q.submit("lost", REQUEST)
    sub = q.subscribe("lost")
    (Path(ws.path) / DB_NAME).unlink()
    q.start()
    try:
        up = sub.get(timeout=30)
        while not up.final:
            up = sub.get(timeout=30)
    finally:
        q.stop()
    assert up.job.id == "lost" and up.job.state == "failed" and up.event.stage == "failed"
    assert "not recorded in the workspace" in up.job.error
    assert not (Path(ws.path) / DB_NAME).exists()  # no new empty database made in its place


def test_an_executor_that_cannot_go_on_fails_the_job_in_one_log_line(ws, monkeypatch, caplog):
    """Ray workers that kept dying (or a cluster too small) failed the job with a full traceback
    in the log, as for a bug; the reason is the whole story."""
    import logging

    import n2g_service.build.runner as jobs_module
    from n2g_service.build.executors import ExecutorError

    def run_build(*a, **kw):
        raise ExecutorError("3 Ray workers died while loading the model")

    monkeypatch.setattr(jobs_module, "run_build", run_build)
    q = _queue(ws)
    q.start()
    try:
        q.submit("ex", REQUEST)
        deadline = time.monotonic() + 30
        while ws.get_job("ex").state not in ("failed", "succeeded") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        q.stop()
        q.join(30)
    job = ws.get_job("ex")
    assert job.state == "failed" and "3 Ray workers died while loading the model" in job.error
    records = [r for r in caplog.records if r.levelno >= logging.ERROR and "ex" in r.getMessage()]
    assert records and not any(r.exc_info for r in records), records
