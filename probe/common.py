"""Shared probe helpers: a native workspace built once under /tmp/pa, copied per probe, and a
real `n2g serve` subprocess on it."""
import os, shutil, sys, time, subprocess
from pathlib import Path
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "service"), str(REPO / "python_client")]
from n2g_servers import ServerProcess, run_cli, write_corpus, NATIVE_MODEL  # noqa

BASE = Path("/tmp/pa/base")

def base():
    if not (BASE / "ready").exists():
        BASE.mkdir(parents=True, exist_ok=True)
        corpus = write_corpus(BASE / "corpus.jsonl")
        run_cli("build", "--workspace", str(BASE / "ws"), "--model", NATIVE_MODEL, "--corpus", str(corpus),
                "--layers", "0", "1", "--sample", "4", "--window-tokens", "32", "--group-size", "4", "--device", "cpu")
        (BASE / "ready").write_text("ok")
    return BASE

def fresh(name):
    base()
    dst = Path("/tmp/pa") / name
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copytree(BASE / "ws", dst / "ws")
    return dst / "ws"

def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])

def server(name, *args):
    ws = fresh(name)
    return ServerProcess(ws, "--model", NATIVE_MODEL, "--device", "cpu", *args)
