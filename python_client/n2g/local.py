"""`LocalN2GClient`: the `N2GClient` API on a workspace directory, in this process, no server.

It calls the server's own request handlers directly (same validation, same answers, same errors
as over the network), so the command line's local mode and its `--server` mode print the same
things. The model is loaded lazily, only for calls that need it (tokenising texts, true
activations, builds). Needs the service package (`n2g_service`), imported here on first use.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import grpc

from .client import N2GClient, N2GError


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


class _LocalContext:
    """The slice of grpc.ServicerContext the handlers use."""

    def __init__(self, timeout: float | None):
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def time_remaining(self):
        return None if self._deadline is None else self._deadline - time.monotonic()

    def is_active(self) -> bool:
        return self._deadline is None or time.monotonic() < self._deadline

    def abort(self, code, details):
        raise _Aborted(code, details)

    def invocation_metadata(self):
        return ()


class LocalN2GClient(N2GClient):
    """`N2GClient` over a local workspace. `model` overrides the workspace's model name;
    `no_model=True` never loads one (model calls answer FAILED_PRECONDITION)."""

    def __init__(self, workspace: str | os.PathLike, *, model: str | None = None, device: str | None = None,
                 no_model: bool = False, timeout: float | None = None):
        from n2g_service.server import ModelHost, N2GServicer, load_named_model, local_handlers
        from n2g_service.workspace import Workspace

        self.target = f"local:{workspace}"
        self.timeout = timeout
        self.retries = 0
        self._channel = None
        self._stub = None
        self._metadata = ()
        ws = Workspace(Path(workspace))
        name = model or ws.model_name
        loader = None if (no_model or not name) else (lambda: load_named_model(name, device=device, hook=ws.hook))
        self._servicer = N2GServicer(ws, ModelHost(name, loader))
        self._handlers = local_handlers(self._servicer)

    def close(self) -> None:
        self._servicer.ws.close()

    def _unary(self, method: str, request, timeout: float | None = None):
        fn, streaming = self._handlers[method]
        try:
            return fn(request, _LocalContext(timeout if timeout is not None else self.timeout))
        except _Aborted as e:
            raise N2GError(e.code, e.details) from None

    def _stream(self, method: str, request, timeout: float | None = None) -> Iterator:
        fn, streaming = self._handlers[method]
        try:
            yield from fn(request, _LocalContext(timeout))
        except _Aborted as e:
            raise N2GError(e.code, e.details) from None

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        return "SERVING"

    def wait_ready(self, timeout: float = 60.0) -> None:
        return None
