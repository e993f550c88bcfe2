"""`LocalN2GClient`: the n2g client API on a workspace directory, in this process, no server.

It calls the service's application layer (`n2g_service.app.N2GApp`) directly - the same methods,
checks and answers as a server, without protobuf - so the command line's local mode and its
`--server` mode run the same code below the transport. Builds run in the application's job
worker in this process. The model is loaded lazily, only for calls that need it. Needs the
service package (`n2g_service`), imported here on first use.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterator

from .client import _Api, _budget, _request, _Retry
from .convert import OPS
from .types import N2GError


class LocalN2GClient(_Api):
    """The client API over a local workspace. `model` names the model (default: the workspace's);
    `create=True` makes a new workspace (with `corpus`); `no_model=True` never loads one (model
    calls answer FAILED_PRECONDITION); with `no_model`, `writes=True` still takes the writer lock
    when it writes (e.g. cancelling a job no process runs). A call refused as busy (all the
    application's slots taken, e.g. by this client's other threads) is tried again as the network
    client does: after the delay it names, within the deadline (without one, `retries` times)."""

    retries, backoff, max_backoff = 5, 0.1, 2.0  # the network client's defaults

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

    def _checked(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """`args`, if the network client could send them: what its request message refuses (a
        float or a bool count, a number for a job id, text that is not Unicode) is the same
        INVALID_ARGUMENT here, not an error from deep in the application."""
        _request(OPS[name], self._open(args))
        return args

    def _tries(self, budget: float | None):
        """The application's deadline for the call, and when to try it again (`_Retry`)."""
        from n2g_service.app import Deadline

        return Deadline.after(budget), _Retry(self, None if budget is None else time.monotonic() + budget,
                                              time.monotonic, unavailable=False)

    def _call(self, name: str, args: dict[str, Any], timeout: float | None):
        deadline, retry = self._tries(self.timeout if timeout is None else _budget(timeout))
        while True:
            try:
                return self.app.call(name, self._checked(name, args), deadline)
            except Exception as e:
                d = retry.delay(e) if isinstance(e, N2GError) else None
                if d is None:
                    self._reraise(e)
            time.sleep(d)

    def _stream_call(self, name: str, args: dict[str, Any], timeout: float | None) -> Iterator:
        # as over the network: a stream has no deadline unless the call gives one (the client's
        # timeout is for unary calls; an export or a report of a whole model takes longer)
        deadline, retry = self._tries(_budget(timeout))
        while True:
            started = False
            try:
                for item in self.app.stream(name, self._checked(name, args), deadline):
                    self._open(args)  # closed while its reader held the stream: it ends, as every call after close()
                    started = True
                    if isinstance(item, list):
                        yield from item
                    else:
                        yield item
                return
            except Exception as e:
                if self.closed:  # the database went with it: sqlite3's "closed database" said less
                    self._open(args)
                # tried again before its first item only, as over the network
                d = retry.delay(e) if isinstance(e, N2GError) and not started else None
                if d is None:
                    self._reraise(e)
            time.sleep(d)

    @staticmethod
    def _reraise(e: Exception):
        """Raises what a server would answer: the same N2GError (a bug stays what it is)."""
        from n2g_service.app import as_n2g_error

        err = as_n2g_error(e)
        if err is None or err is e:
            raise e
        raise err from None

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        self._open({})  # closed: the error every client gives
        return "SERVING"

    def wait_ready(self, timeout: float = 60.0) -> None:
        self._open({})

