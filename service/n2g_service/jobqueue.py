"""Background build jobs for the server: one worker thread, a FIFO of job ids, progress fan-out.

Jobs live in the workspace's `jobs` table, so they outlive the process: on start the server calls
`resume_pending()`, which puts every job still `queued` or `running` (a server that was killed
mid-build) back in the queue; `build.runner.run_build` skips the neurons already committed, so a resumed
job loses and duplicates nothing. The server holds the workspace's writer lock, so a job found
`running` at start was left by a process that died. A job is never resumed into a crash loop:
each start is counted with the `done` it started from (and marked once it commits a scan shard
or a neuron group), and a job whose attempts died MAX_STALLS times in a row without committing
anything (it kills its process, e.g. by asking for
more memory than there is) is failed with that reason; so is a job whose stored request cannot
run (damaged, too big, refused by the application layer's `check_request`), once.

The worker holds the model lock only while it computes (corpus windows, the dataset scan, one
neuron group at a time), so requests that need the model interleave with a build between groups,
and requests that need no model never wait for it.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

from .build.request import BuildEvent
from .workspace import (ACTIVE_JOB_STATES, MAX_JOB_REQUEST_BYTES, TERMINAL_JOB_STATES, JobRecord, Workspace,
                        WorkspaceError, utf8_text)

log = logging.getLogger("n2g.jobs")

TERMINAL = TERMINAL_JOB_STATES
# interrupted attempts in a row that committed no neuron before a job is failed, not resumed
MAX_STALLS = 2


@dataclass
class JobUpdate:
    """What a watcher receives: a progress event of the build and the job right after it."""
    job: JobRecord
    event: BuildEvent

    @property
    def final(self) -> bool:
        return self.job.state in TERMINAL


class JobQueue:
    """Runs build jobs one at a time in a daemon thread."""

    def __init__(self, ws: Workspace, get_model: Callable[[], Any], model_lock: threading.Lock,
                 *, on_commit: Callable[[], None] = lambda: None,
                 check_request: Callable[[dict[str, Any]], None] | None = None):
        """`check_request(request_dict)` raises ValueError with the reason a stored request
        cannot run now (the application layer's limits, the model's shape); it runs when jobs
        are resumed and before each run."""
        self.ws = ws
        self._check_request = check_request
        self._get_model = get_model
        self._model_lock = model_lock
        self._on_commit = on_commit
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._cancel: dict[str, threading.Event] = {}
        self._subs: dict[str, list[queue.Queue]] = defaultdict(list)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.current: str | None = None
        self._seen: JobRecord | None = None  # the job the worker last read, for when it cannot read it again

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="n2g-build-worker", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stops the running job at its next forward pass (an in-process build; a Ray build after
        its current units); it is stored `queued` and resumes on the next start."""
        for ev in list(self._cancel.values()):
            ev.set()
        self._stopping = True
        self._queue.put(None)

    _stopping = False

    def join(self, timeout: float | None = None) -> bool:
        """Waits for the worker to stop after stop(); True if it did."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def resume_pending(self, *, resume: bool = True) -> list[str]:
        """Called once at start by the workspace's writer: queues the unfinished jobs that can
        run and returns their ids. Fails, with the reason, a `running` job (its process died)
        that stalled MAX_STALLS times in a row, every `running` job when `resume` is False
        (interrupted; `queued` ones stay queued for a later start), and a job whose stored
        request cannot run."""
        ids = []
        for job in self.ws.list_jobs(ACTIVE_JOB_STATES, with_request=False):
            if job.state == "running":
                stage = job.stage or "unknown"
                stalls = job.stalls + 1 if job.done <= job.start_done else 0  # start_done -1: it progressed
                if not resume:
                    self._fail(job, f"interrupted: the process running it stopped (stage {stage}, {job.done}/{job.total} "
                                    "neurons committed) and the process that opened the workspace next does not "
                                    "resume jobs (a local command, or `n2g serve --no-resume`); start the build again "
                                    "to finish it")
                    continue
                if stalls >= MAX_STALLS:
                    self._fail(job, f"interrupted {stalls} times in a row before committing any work (its process died "
                                    f"in stage {stage}, e.g. out of memory): not resumed again; start a smaller job")
                    continue
                self.ws.update_job(job.id, state="queued", stalls=stalls)
            if not resume:
                continue
            problem = self._problem(job.id)
            if problem:
                self._fail(job, problem)
                continue
            log.info("resuming job %s", job.id)
            self._queue.put(job.id)
            ids.append(job.id)
        return ids

    def _problem(self, job_id: str) -> str | None:
        """Why the stored job cannot run, or None."""
        from .build.request import BuildRequest

        job = self.ws.get_job(job_id)
        if job is None:
            return "the job is gone from the workspace"
        if not job.request:
            if job.request_bytes > MAX_JOB_REQUEST_BYTES:
                return f"its stored request is {job.request_bytes} bytes, over the {MAX_JOB_REQUEST_BYTES} byte limit"
            return "its stored request is missing or damaged"
        try:
            BuildRequest.from_dict(job.request)
            if self._check_request is not None:
                self._check_request(job.request)
        except (KeyError, TypeError, ValueError) as e:
            return f"its request cannot run: {type(e).__name__}: {e}"
        return None

    def _fail(self, job: JobRecord, reason: str) -> None:
        reason = utf8_text(reason)  # storable and sendable
        log.warning("job %s failed: %s", job.id, reason)
        try:
            self.ws.update_job(job.id, state="failed", error=reason)
        except Exception as e:  # noqa: BLE001 - e.g. the disk is full: the next start decides
            # The workspace cannot record it (its file removed, a full disk): its watchers must
            # still hear that it ended, or they would wait on a job that never moves again.
            log.error("job %s: could not record its failure: %s", job.id, e)
            reason += " (not recorded in the workspace)"
            ended = dataclasses.replace(job, state="failed", error=reason)
            self._publish(job.id, BuildEvent("failed", job.done, job.total, reason), job=ended)
            return
        self._publish(job.id, BuildEvent("failed", job.done, job.total, reason))

    # -- requests -------------------------------------------------------------------------------
    def submit(self, job_id: str, request: dict[str, Any]) -> JobRecord:
        job = self.ws.create_job(job_id, request, total=0)
        self._queue.put(job_id)
        log.info("job %s queued: %s", job_id, request.get("layers"))
        return job

    def cancel(self, job_id: str) -> JobRecord:
        """Cancels a queued or running job. The state is stored at once, also for the job running
        here (which stops at its next forward pass): a server stopped or killed before that
        does not resume it. A job that has just ended keeps its final state."""
        with self._lock:
            self._cancel.setdefault(job_id, threading.Event()).set()
            running_here = self.current == job_id
            job = self.ws.get_job(job_id)
            cancelled = job is not None and self.ws.update_job(job_id, state="cancelled", only_if=ACTIVE_JOB_STATES)
        if cancelled and not running_here:
            # queued, left `running` by a crash, or running in another process (whose runner sees
            # the state at its next neuron group and stops); the runner here reports its own end
            self._publish(job_id, BuildEvent("cancelled", job.done, job.total, "cancelled"))
        return self.ws.get_job(job_id)

    def subscribe(self, job_id: str) -> "queue.Queue[JobUpdate]":
        q: queue.Queue[JobUpdate] = queue.Queue()
        with self._lock:
            self._subs[job_id].append(q)
        return q

    def unsubscribe(self, job_id: str, q: queue.Queue) -> None:
        with self._lock:
            subs = self._subs.get(job_id, [])
            if q in subs:
                subs.remove(q)
            if not subs:
                self._subs.pop(job_id, None)

    # -- worker ---------------------------------------------------------------------------------
    def _publish(self, job_id: str, event: BuildEvent, job: JobRecord | None = None) -> None:
        with self._lock:
            subs = list(self._subs.get(job_id, ()))
        if not subs:
            return
        update = JobUpdate(job or self.ws.get_job(job_id), event)
        for q in subs:
            q.put(update)

    def _worker(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None or self._stopping:
                return
            try:
                self._run(job_id)
            except Exception as e:  # noqa: BLE001 - the worker must survive anything
                log.error("job %s: error in the job runner: %s: %s", job_id, type(e).__name__, e,
                          exc_info=not isinstance(e, WorkspaceError))
                try:  # fail it once, with the reason, rather than leave it to be resumed again
                    job = self.ws.get_job(job_id)
                except Exception:  # noqa: BLE001 - the workspace cannot be read: still tell the watchers
                    job = self._seen if self._seen is not None and self._seen.id == job_id else \
                        JobRecord(job_id, "running", {}, 0, 0, None, 0.0, time.time())
                if job is not None and job.state in ACTIVE_JOB_STATES:
                    self._fail(job, f"{type(e).__name__}: {e}")
            finally:
                self.current = None

    def _run(self, job_id: str) -> None:
        from .build.request import BuildCancelled, BuildRequest
        from .build.runner import run_build

        job = self._seen = self.ws.get_job(job_id)
        if job is None or job.state not in ACTIVE_JOB_STATES:
            return
        with self._lock:
            cancel = self._cancel.setdefault(job_id, threading.Event())
        if cancel.is_set():
            self.ws.update_job(job_id, state="cancelled")
            self._publish(job_id, BuildEvent("cancelled", job.done, job.total, "cancelled before it started"))
            return
        problem = self._problem(job_id)
        if problem:
            self._fail(job, problem)
            return
        self.current = job_id
        job = self.ws.start_job(job_id)
        self._publish(job_id, BuildEvent("state", job.done, job.total, "running"))
        t0 = time.perf_counter()
        stage = [job.stage]
        first_done: dict[str, int] = {}
        progressed = [False]
        finished = ["build finished"]  # run_build's last word (how many it built), sent once stored

        def progress(ev) -> None:
            if ev.stage != stage[0] and ev.stage != "done":  # kept for the reason of an interruption
                stage[0] = ev.stage
                self.ws.update_job(job_id, stage=ev.stage)
            if not progressed[0] and not ev.partial:  # the first committed scan shard or neuron group
                base = first_done.setdefault(ev.stage, ev.done)
                if (ev.stage == "fit" and ev.neuron is not None) or ev.stage == "merge" or (
                        ev.stage == "scan" and ev.done > base):
                    progressed[0] = True
                    self.ws.mark_job_progress(job_id)
            if ev.stage == "fit" and ev.neuron is not None:
                self._on_commit()
                if self.ws.get_job(job_id).state == "cancelled":  # cancelled from another process
                    cancel.set()
            if ev.stage == "done":  # the final event is sent below, once the state is stored
                finished[0] = ev.message
                return
            self._publish(job_id, dataclasses.replace(ev, elapsed_s=time.perf_counter() - t0))

        try:
            req = BuildRequest.from_dict(job.request)
            run_build(self.ws, self._get_model(), req, job_id=job_id, progress=progress, cancel=cancel,
                      model_lock=self._model_lock)
        except BuildCancelled:
            self._on_commit()
            if self._stopping and self.ws.get_job(job_id).state != "cancelled":
                # a clean shutdown, not a user's cancel: queued again, it resumes on restart
                self.ws.update_job(job_id, state="queued")
                return
            self.ws.update_job(job_id, state="cancelled")
            j = self.ws.get_job(job_id)
            log.info("job %s cancelled after %d/%d neurons", job_id, j.done, j.total)
            self._publish(job_id, BuildEvent("cancelled", j.done, j.total, "cancelled",
                                             elapsed_s=time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001 - a failed job is recorded, the server goes on
            from .build.executors import ExecutorError

            # a bad corpus, a workspace error, Ray workers that keep dying: said in its message
            if isinstance(e, (ValueError, OSError, ExecutorError)):
                log.error("job %s failed: %s", job_id, e)
                log.debug("job %s failed", job_id, exc_info=True)
            else:
                log.exception("job %s failed", job_id)
            self._fail(self.ws.get_job(job_id) or job, f"{type(e).__name__}: {e}")
        else:
            # a job cancelled during its last neuron group stays cancelled (its watchers were told)
            succeeded = self.ws.update_job(job_id, state="succeeded", only_if=("running",))
            self._on_commit()
            j = self.ws.get_job(job_id)
            if succeeded:
                log.info("job %s succeeded: %d neurons in %.1f s", job_id, j.total, time.perf_counter() - t0)
                self._publish(job_id, BuildEvent("done", j.done, j.total, finished[0],
                                                 elapsed_s=time.perf_counter() - t0))
            else:
                log.info("job %s cancelled during its last neuron group (%d/%d neurons)", job_id, j.done, j.total)
                self._publish(job_id, BuildEvent("cancelled", j.done, j.total, "cancelled",
                                                 elapsed_s=time.perf_counter() - t0))
