"""`LocalN2GClient`: the n2g client API on a workspace directory, in this process, no server.

It calls the service's application layer (`n2g_service.app.N2GApp`) directly - the same methods,
checks and answers as a server, without protobuf - so the command line's local mode and its
`--server` mode run the same code below the transport. Builds run in the application's job
worker in this process. The model is loaded lazily, only for calls that need it. Needs the
service package (`n2g_service`), imported here on first use.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from typing import Any, Iterator

from .client import _MIN_TRY_S, _Api, _budget, _checked_text
from .types import N2GError

# busy refusals retried without a deadline (the network clients' default `retries`)
BUSY_RETRIES = 5


class LocalN2GClient(_Api):
    """The client API over a local workspace. `model` names the model (default: the workspace's);
    `create=True` makes a new workspace (with `corpus`); `no_model=True` never loads one (model
    calls answer FAILED_PRECONDITION); with `no_model`, `writes=True` still takes the writer lock
    when it writes (e.g. cancelling a job no process runs)."""

    def __init__(self, workspace: str | os.PathLike, *, model: str | None = None, corpus: str | None = None,
                 device: str | None = None, no_model: bool = False, create: bool = False,
                 timeout: float | None = None, writes: bool = False):
        from n2g_service.app import N2GApp, open_workspace

        self.target = f"local:{workspace}"
        self.timeout = _budget(timeout)  # checked as the network client checks it
        # a build (create=True) is the workspace's writer: it takes the lock at once; other
        # commands read, and take it only if they must write (e.g. evaluation's stored activations)
        ws, host = open_workspace(workspace, model=model, no_model=no_model, corpus=corpus, device=device,
                                  create=create, writer="n2g build" if create else None, writes=writes)
        self.app = N2GApp(ws, host)
        if create:
            self.app.record_shape()
            # builds run here; jobs a killed process left running are failed as interrupted (a
            # rerun of the same build resumes its work units), not taken over implicitly
            self.app.start_jobs(resume=False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.app.close()

    def __enter__(self) -> "LocalN2GClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _deadline(self, timeout: float | None):
        from n2g_service.app import Deadline

        return Deadline.after(self.timeout if timeout is None else _budget(timeout))

    def _call(self, name: str, args: dict[str, Any], timeout: float | None):
        deadline = self._deadline(timeout)
        for tries in itertools.count():
            try:
                return self.app.call(name, _checked_text(self._open(args)), deadline)
            except Exception as e:
                wait = _busy_wait(e, deadline, tries)
                if wait is None:
                    self._reraise(e)
            time.sleep(wait)

    def _stream_call(self, name: str, args: dict[str, Any], timeout: float | None) -> Iterator:
        from n2g_service.app import Deadline

        # as over the network: a stream has no deadline unless the call gives one (the client's
        # timeout is for unary calls; an export or a report of a whole model takes longer)
        deadline = Deadline.after(_budget(timeout))
        for tries in itertools.count():
            started = False
            try:
                for item in self.app.stream(name, _checked_text(self._open(args)), deadline):
                    started = True
                    if isinstance(item, list):
                        yield from item
                    else:
                        yield item
                return
            except Exception as e:
                if self.closed:  # closed while its reader held the stream: sqlite3's "closed database" said less
                    self._open(args)
                wait = None if started else _busy_wait(e, deadline, tries)  # retried before its first item only
                if wait is None:
                    self._reraise(e)
            time.sleep(wait)

    @staticmethod
    def _reraise(e: Exception):
        """Raises what a server would answer: the same N2GError (a bug stays what it is)."""
        from n2g_service.app import as_n2g_error

        err = as_n2g_error(e)
        if err is None or err is e:
            raise e
        raise err from None

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        return "SERVING"

    def wait_ready(self, timeout: float = 60.0) -> None:
        return None


def _busy_wait(e: Exception, deadline, tries: int) -> float | None:
    """Seconds to wait before trying again a call the application refused as busy (all its slots
    taken, e.g. by this client's other threads), as the network clients do: the delay it names,
    jittered up to twice, within the deadline (without one, BUSY_RETRIES times); None: give up."""
    after = e.retry_after if isinstance(e, N2GError) else None
    if after is None:
        return None
    wait = max(after, 0.01) * (1.0 + random.random())
    left = deadline.remaining()
    if left is None:
        return wait if tries < BUSY_RETRIES else None
    room = left - _MIN_TRY_S
    return None if room < after else min(wait, room)
