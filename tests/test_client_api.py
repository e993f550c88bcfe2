"""The Python client: retries while the server is unavailable, deadlines, no protobuf types in
its results, no torch or service imports."""

from __future__ import annotations

import dataclasses
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest

from n2g.client import N2GClient, N2GError
from n2g_servers import PYTHON, ServerProcess, env, free_port, native_workspace


@pytest.fixture(scope="module")
def inproc(tmp_path_factory):
    """A model-free server in this process (fast to start)."""
    from n2g_service.server import serve

    ws = native_workspace(tmp_path_factory, "client")
    running = serve(ws, no_model=True, port=0, block=False)
    try:
        yield running
    finally:
        running.stop(0)


def test_client_needs_no_torch_nor_service():
    code = ("import sys, n2g.client, n2g.cli; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('n2g_service') or m == 'transformer_lens']; "
            "assert not bad, bad")
    subprocess.run([PYTHON, "-c", code], check=True, env=env(), timeout=60)


def _no_protobuf(obj, path="result"):
    assert not type(obj).__module__.endswith("_pb2"), f"{path} is a protobuf {type(obj)}"
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _no_protobuf(getattr(obj, f.name), f"{path}.{f.name}")
    elif isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            _no_protobuf(x, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _no_protobuf(v, f"{path}[{k!r}]")


def test_results_are_dataclasses_and_numpy(inproc):
    with N2GClient(f"127.0.0.1:{inproc.port}") as c:
        keys = [g.key for g in c.list_graphs()]
        results = [c.model_info(), c.list_graphs(), c.graph(*keys[0], structure=True, json=True),
                   c.predict(keys[:3], token_ids=[[1, 5, 7], [1, 9]]), c.evaluate(), c.list_jobs(),
                   c.search([(c.list_graphs()[0].activating[0], "either")]), c.similar(*keys[0]),
                   list(c.pairs("subset", threshold=0.5)), list(c.export(examples=False))]
        for r in results:
            _no_protobuf(r)
        pred = results[3]
        assert isinstance(pred.values[0], np.ndarray) and pred.values[0].dtype == np.float32
        assert pred.values[1].shape == (3, 2) and pred.token_ids[1].tolist() == [1, 9]
        np.testing.assert_array_equal(pred.of(*keys[1])[0], pred.values[0][1])
        assert pred.padded(fill=-1.0)[0, 1, 2] == -1.0


def test_retries_until_the_server_starts(tmp_path_factory):
    ws = native_workspace(tmp_path_factory, "retry")
    port = free_port()
    got: dict = {}

    def call():
        try:
            with N2GClient(f"127.0.0.1:{port}", retries=60, backoff=0.1, max_backoff=0.5, timeout=90) as c:
                got["info"] = c.model_info()
        except Exception as e:  # noqa: BLE001
            got["error"] = e

    t = threading.Thread(target=call)
    t.start()
    time.sleep(1.0)  # the call is already retrying
    srv = ServerProcess(ws, "--no-model", port=port).start()
    try:
        t.join(120)
        assert "error" not in got, got.get("error")
        assert got["info"].neurons_built > 0
    finally:
        srv.stop()


def test_unavailable_after_bounded_retries():
    port = free_port()
    t0 = time.perf_counter()
    with N2GClient(f"127.0.0.1:{port}", retries=3, backoff=0.05, timeout=10) as c:
        with pytest.raises(N2GError) as e:
            c.model_info()
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.perf_counter() - t0 < 5


def test_deadline(inproc):
    with N2GClient(f"127.0.0.1:{inproc.port}") as c:
        with pytest.raises(N2GError) as e:
            c.predict([c.list_graphs()[0].key], token_ids=[[1] * 4000] * 60, timeout=1e-4)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert c.model_info().neurons_built > 0
