"""Helpers for the server, client and command-line tests: a real `n2g serve` subprocess on a free
port, a small generated corpus, and a workspace built once per test session on a native random
model (`native:0`) and copied for each test module."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
NATIVE_MODEL = "native:0"
NATIVE_LAYERS = (0, 1)
NATIVE_SAMPLE = 4
NATIVE_WINDOW = 32

# words the native models' WordTokenizer knows (n2g_service.models._WORDS)
_WORDS = ("the of and to a in is it you that he was for on are with as his they be at one have this from "
          "or had by not word but what some we can out other were all there when up use your how said an each "
          "she which do their time if will way about many then them write would like so these her long make "
          "thing see him two has look more day could go come did number sound no most people my over know "
          "water than call first who may down side been now find any new work part take get place made live "
          "where after back little only round man year came show every good me give our under name very "
          "through just form sentence great think say help low line cat dog sat mat red blue love life god "
          "money computer program").split()


def env() -> dict[str, str]:
    e = dict(os.environ)
    paths = [str(REPO / "service"), str(REPO / "python_client")]
    e["PYTHONPATH"] = os.pathsep.join(paths + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e.pop("N2G_TOKEN", None)
    e.pop("N2G_SERVER", None)
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("MKL_NUM_THREADS", "1")
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_corpus(path: Path, n_texts: int = 400, seed: int = 0) -> Path:
    """A .jsonl corpus of short generated texts in the native tokenizer's words, with recurring
    phrases so that neurons have structure to find."""
    import json

    rng = random.Random(seed)
    phrases = ["the cat sat on the mat", "the dog sat on the mat", "love is all you need", "the red dog",
               "a blue cat", "money for the people", "the computer program", "god is love", "one man, one year"]
    lines = []
    for _ in range(n_texts):
        parts = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.4:
                s = rng.choice(phrases)
            else:
                s = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12)))
            parts.append(s[0].upper() + s[1:] + rng.choice([".", ".", "!", "?"]))
        lines.append(json.dumps({"text": " ".join(parts)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(*args: str, timeout: float = 300, check: bool = True, extra_env: dict | None = None
            ) -> subprocess.CompletedProcess:
    e = env()
    e.update(extra_env or {})
    p = subprocess.run([PYTHON, "-m", "n2g.cli", *args], capture_output=True, text=True, timeout=timeout, env=e,
                       cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"n2g {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def _native_cache(tmp_path_factory) -> Path:
    """The session's native workspace, built on first use (NATIVE_SAMPLE neurons of each of
    NATIVE_LAYERS, through the local command line) next to its corpus."""
    base = tmp_path_factory.getbasetemp() / "native-cache"
    base.mkdir(exist_ok=True)
    with open(base / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / "ready").exists():
            src = base / "ws"
            if src.exists():
                shutil.rmtree(src)
            corpus = write_corpus(base / "corpus.jsonl")
            run_cli("build", "--workspace", str(src), "--model", NATIVE_MODEL, "--corpus", str(corpus),
                    "--layers", *map(str, NATIVE_LAYERS), "--sample", str(NATIVE_SAMPLE),
                    "--window-tokens", str(NATIVE_WINDOW), "--group-size", "4", "--device", "cpu")
            (base / "ready").write_text("ok")
    return base


def native_workspace(tmp_path_factory, name: str) -> Path:
    """A fresh copy of the session's native workspace."""
    base = _native_cache(tmp_path_factory)
    dst = tmp_path_factory.mktemp(name) / "ws"
    shutil.copytree(base / "ws", dst)
    return dst


def native_corpus(tmp_path_factory) -> Path:
    return _native_cache(tmp_path_factory) / "corpus.jsonl"


class ServerProcess:
    """`n2g serve` in a subprocess on a free port."""

    def __init__(self, workspace: Path, *args: str, port: int | None = None, log: Path | None = None,
                 extra_env: dict | None = None):
        self.workspace = Path(workspace)
        self.args = list(args)
        self.port = port or free_port()
        self.log_path = log or (self.workspace.parent / f"server-{self.port}.log")
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        e = env()
        e.update(self.extra_env)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "n2g.cli", "serve", "--workspace", str(self.workspace), "--port", str(self.port),
             *self.args], stdout=self._log, stderr=subprocess.STDOUT, env=e, cwd=REPO)
        return self

    def wait_ready(self, timeout: float = 120.0, **client_kw) -> None:
        from n2g.client import N2GClient, N2GError

        deadline = time.monotonic() + timeout
        with N2GClient(self.address, **client_kw) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"n2g serve exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
                try:
                    if c.health(timeout=1.0) == "SERVING":
                        return
                except N2GError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"n2g serve not ready after {timeout} s:\n{self.log()[-4000:]}")
                time.sleep(0.2)

    @contextlib.contextmanager
    def running(self, **ready_kw) -> Iterator["ServerProcess"]:
        """Starts the server, waits until it is SERVING, and stops it on the way out."""
        self.start()
        try:
            self.wait_ready(**ready_kw)
            yield self
        finally:
            self.stop()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (a crash)."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()


def self_signed_cert(directory: Path, name: str | None = None) -> tuple[Path, Path]:
    """(cert, key) PEM files in `directory` (made if missing): for CN=localhost with subjectAltName
    localhost and 127.0.0.1, or for `name` alone."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "server.crt", directory / "server.key"
    cn, alt = ("localhost", "DNS:localhost,IP:127.0.0.1") if name is None else (name, f"DNS:{name}")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", f"/CN={cn}", "-addext", f"subjectAltName={alt}"],
                   check=True, capture_output=True)
    return cert, key


@contextlib.contextmanager
def read_only_dir(path: Path):
    """The directory made unwritable: by its mode for an ordinary user, by a read-only bind
    mount for root (whom modes do not stop)."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)
        return
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)
