"""A real `n2g serve` process for the benchmarks that measure the service over gRPC."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    """This checkout's service and client first on the path (as an installed checkout has them)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO / "service"), str(REPO / "python_client"), e.get("PYTHONPATH", "")])
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(workspace: Path, *extra: str) -> Iterator[str]:
    """Serves ``workspace`` without a model (stored graphs only) on a free loopback port; yields
    the address and stops the server at the end. Its log is in the temp folder."""
    port = free_port()
    log = open(Path(tempfile.gettempdir()) / f"n2g-bench-server-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "n2g.cli", "serve", "--workspace", str(workspace), "--no-model",
                             "--port", str(port), "--log-level", "warning", *extra], env=env(), stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
