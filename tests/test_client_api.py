"""The Python client: retries while the server is unavailable, deadlines, no protobuf types in
its results, no torch or service imports; what it refuses before sending (the same refusals from
the in-process client), and the in-process client's busy retries, closed streams and output files."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from n2g.client import N2GClient, N2GError, _Api, write_file
from n2g.local import LocalN2GClient
from n2g_servers import PYTHON, ServerProcess, env, free_port, native_workspace, read_only_dir


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


def test_waiting_for_a_job_on_a_server_never_reached_is_an_error():
    """wait_job's reconnect waited for ever (and `n2g jobs watch` printed nothing) when no server
    was there to begin with; it is for a server that goes away during the watch."""
    import asyncio

    from n2g.client import AsyncN2GClient

    port = free_port()
    outcome = {}

    def wait():
        with N2GClient(f"127.0.0.1:{port}", retries=2, backoff=0.05) as c:
            try:
                c.wait_job("some-job")
            except N2GError as e:
                outcome["sync"] = e.code

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive() and outcome["sync"] == grpc.StatusCode.UNAVAILABLE

    async def wait_async():
        async with AsyncN2GClient(f"127.0.0.1:{port}", retries=2, backoff=0.05) as c:
            with pytest.raises(N2GError) as e:
                await asyncio.wait_for(c.wait_job("some-job"), 30)
            return e.value.code

    assert asyncio.run(wait_async()) == grpc.StatusCode.UNAVAILABLE


def test_deadline(inproc):
    with N2GClient(f"127.0.0.1:{inproc.port}") as c:
        with pytest.raises(N2GError) as e:
            c.predict([c.list_graphs()[0].key], token_ids=[[1] * 4000] * 60, timeout=1e-4)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert c.model_info().neurons_built > 0


def _busy_server(delay_s: float):
    """A gRPC server whose every call is refused as busy with RetryInfo(delay_s); returns
    (server, port, calls) where calls counts the attempts."""
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    calls = []

    def refuse(request, context):
        calls.append(time.monotonic())
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(delay_s * 1e9))
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        context.abort_with_status(rpc_status.to_status(status_pb2.Status(
            code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="busy", details=[detail])))

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            return grpc.unary_unary_rpc_method_handler(refuse)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[Handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, calls


def test_busy_retry_hints_are_bounded_by_the_deadline_and_the_client_backoff():
    """Whatever a server's RetryInfo says, the client neither busy-loops (a hint of 0 waits the
    client's own backoff) nor waits past the call's deadline (a hint of an hour gives up at once,
    handing the hint on)."""
    server, port, calls = _busy_server(0.0)
    try:
        with N2GClient(f"127.0.0.1:{port}", backoff=0.1) as c:
            t0 = time.monotonic()
            with pytest.raises(N2GError) as e:
                c.model_info(timeout=3.0)
            elapsed = time.monotonic() - t0
            # the busy error handed on, not DEADLINE_EXCEEDED: no try was started past the deadline
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.retry_after == 0.0, e.value
            assert elapsed < 3.0 + 1.0, elapsed
            # tried again (a hint is no reason to give up), each time after the 0.1-0.2 s backoff:
            # at most 3.0 / 0.1 + 1 tries in the 3 s; a busy loop makes thousands
            assert 2 <= len(calls) <= 31, len(calls)
            assert min(np.diff(calls)) >= 0.09
    finally:
        server.stop(None)
    server, port, calls = _busy_server(3600.0)
    try:
        with N2GClient(f"127.0.0.1:{port}") as c:
            t0 = time.monotonic()
            with pytest.raises(N2GError) as e:
                c.model_info(timeout=30)
            # given up at once: waiting out the hour, or the deadline, would take 30 s or more
            assert e.value.retry_after == 3600.0 and len(calls) == 1 and time.monotonic() - t0 < 10
    finally:
        server.stop(None)


def test_a_busy_retry_fits_its_jitter_to_the_deadline():
    """With a 1 s hint and 1.5 s left, the retry gave up 61% of the time (its jittered wait of 1-2 s
    was compared with the time left) although a 1.0-1.4 s wait still left room for a try."""
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2

    from n2g.client import _MIN_TRY_S, _Retry

    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromSeconds(1)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="busy", details=[detail])

    class Busy(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def trailing_metadata(self):
            return (("grpc-status-details-bin", status.SerializeToString()),)

    client = type("C", (), {"retries": 5, "backoff": 0.1, "max_backoff": 2.0})()
    now = 100.0
    for left, gives_up in ((1.5, False), (2.0, False), (3.5, False), (1.05, True)):
        waits = [_Retry(client, now + left, lambda: now).delay(Busy()) for _ in range(200)]
        if gives_up:
            assert waits == [None] * 200, left
        else:
            assert None not in waits, left
            assert all(1.0 <= w <= min(2.0, left - _MIN_TRY_S) for w in waits), (left, min(waits), max(waits))
    # without a deadline: the whole jitter, 1-2 s
    waits = [_Retry(client, None, lambda: now).delay(Busy()) for _ in range(200)]
    assert all(1.0 <= w <= 2.0 for w in waits) and max(waits) > 1.5


def test_a_health_check_on_a_closed_client_says_it_is_closed(tmp_path_factory):
    """health() and wait_ready() skipped the closed-client check: gRPC then crashed the whole
    process on the closed channel (SIGSEGV from N2GClient, an abort from AsyncN2GClient), and the
    in-process client answered SERVING."""
    code = """if True:
        import asyncio
        from n2g.client import AsyncN2GClient, N2GClient, N2GError

        async def said(call):
            try:
                r = call()
                await r if asyncio.iscoroutine(r) else None
            except N2GError as e:
                return e.code.name
            return "answered"

        async def go():
            sync, aio = N2GClient("127.0.0.1:1"), AsyncN2GClient("127.0.0.1:1")
            sync.close()
            await aio.close()
            return [await said(c.health) for c in (sync, aio)] + [
                await said(lambda: c.wait_ready(timeout=1)) for c in (sync, aio)]

        print(*asyncio.run(go()))
    """
    p = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=env(), timeout=60)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert p.stdout.split() == ["FAILED_PRECONDITION"] * 4, p.stdout
    local = LocalN2GClient(native_workspace(tmp_path_factory, "closed-health"), no_model=True)
    local.close()
    for call in (local.health, local.wait_ready):
        with pytest.raises(N2GError) as e:
            call()
        assert e.value.code.name == "FAILED_PRECONDITION" and "closed" in e.value.message


def test_an_asyncio_call_cut_short_by_close_is_an_error_not_a_cancelled_task():
    """close() while another task awaited a call (unary or a stream) raised asyncio.CancelledError
    in that task, which nobody had cancelled: it ended as cancelled (a TaskGroup drops such a task
    silently) where the blocking client raises an N2GError."""
    import asyncio

    from n2g.client import AsyncN2GClient
    from n2g.convert import OPS

    def hang(request, context):  # answers nothing until the caller goes away
        while context.is_active():
            time.sleep(0.05)

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            if any(op.stream and details.method.endswith(f"/{op.rpc}") for op in OPS.values()):
                return grpc.unary_stream_rpc_method_handler(hang)
            return grpc.unary_unary_rpc_method_handler(hang)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[Handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    async def cut(call) -> tuple[bool, BaseException | None]:
        c = AsyncN2GClient(f"127.0.0.1:{port}")
        task = asyncio.create_task(call(c))
        await asyncio.sleep(0.5)
        await c.close()
        await asyncio.wait([task], timeout=10)
        return task.cancelled(), None if task.cancelled() else task.exception()

    async def stream(c):
        return [x async for x in c.export()]

    async def cancelled(c):  # the caller's own cancel stays a cancel
        task = asyncio.create_task(c.model_info())
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.wait([task], timeout=10)
        return task.cancelled()

    async def go():
        c = AsyncN2GClient(f"127.0.0.1:{port}")
        own = await cancelled(c)
        await c.close()
        return [await cut(lambda c: c.model_info()), await cut(stream)], own

    try:
        got, own = asyncio.run(go())
    finally:
        server.stop(None)
    for was_cancelled, error in got:
        assert not was_cancelled and isinstance(error, N2GError), (was_cancelled, error)
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION and "closed" in error.message
    assert own


# --- what the clients refuse before sending, alike ------------------------------------------------


class _Recorder(_Api):
    """The client API over a transport that returns what it was asked."""

    timeout = None

    def _call(self, name, args, timeout):
        return args


@pytest.mark.parametrize("method", ["start_build", "plan_build"])
def test_build_requests_refuse_what_they_would_truncate_and_take_numpy(method):
    """A float or a bool neuron was truncated into another neuron's build (1.7 built neuron 1,
    True layer 1, seed 1.9 seed 1); a numpy array of neurons had no truth value."""
    call = getattr(_Recorder(), method)
    sent = call(np.array([0, 1]), np.array([3, 7], dtype=np.int32), seed=np.int64(2))
    assert (sent["layers"], sent["neurons"], sent["seed"]) == ([0, 1], [3, 7], 2)
    assert all(type(x) is int for x in [*sent["layers"], *sent["neurons"], sent["seed"]])
    assert call(1, [5])["layers"] == [1]  # one layer, as list_graphs and evaluate take it
    assert call("0-2", sample=4)["layer_spec"] == "0-2"
    for bad in (dict(layers=[0], neurons=[1.7]), dict(layers=[0.9], neurons=[1]), dict(layers=[True], neurons=[1]),
                dict(layers=[0], neurons=[np.float64(3.0)]), dict(layers=[0], sample=2.5),
                dict(layers=[0], sample=4, seed=1.9), dict(layers=[0], sample=4, group_size="8")):
        with pytest.raises(ValueError, match="is not a whole number"):
            call(**bad)


def test_search_clauses_that_are_not_token_role_pairs_say_so():
    """A string, or one pair, for the clauses failed with "not enough values to unpack"."""
    call = _Recorder().search
    assert call([(" love", "activating"), (17, "either")])["clauses"] == [(" love", "activating"), (17, "either")]
    assert call(np.array([[" love", "context"]]))["clauses"] == [(" love", "context")]
    with pytest.raises(ValueError, match="'love' is one string: give \\(token, role\\) pairs"):
        call("love")
    for bad, shown in ((("love", "activating"), "clause 0 'love'"), ([(" a", "either"), 5], "clause 1 5"),
                       ([(" a", "either", 3)], "clause 0 (' a', 'either', 3)")):
        with pytest.raises(ValueError, match=re.escape(shown) + " is not a \\(token, role\\) pair"):
            call(bad)


def test_the_in_process_client_refuses_wrongly_typed_arguments_as_the_network_client_does(inproc):
    """The in-process client raised TypeErrors from deep in the application (or took limit=True
    as 1) where the network client's request message refused the argument."""
    with N2GClient(f"127.0.0.1:{inproc.port}") as remote, LocalN2GClient(inproc.app.ws.path, no_model=True) as local:
        key = remote.list_graphs(limit=1)[0].key
        for call in (lambda c: c.list_graphs(limit="2"), lambda c: c.list_graphs(limit=1.5),
                     lambda c: c.list_graphs(limit=True), lambda c: c.similar(*key, k=2.5),
                     lambda c: c.search([("cat", "either")], limit=2.7), lambda c: c.get_job(5)):
            said = []
            for c in (remote, local):
                with pytest.raises(N2GError) as e:
                    call(c)
                said.append((e.value.code, e.value.message))
            assert said[0] == said[1] and said[0][0] == grpc.StatusCode.INVALID_ARGUMENT, said
        assert len(local.list_graphs(limit=np.int64(2))) == 2  # numpy's whole numbers still go


# --- the in-process client -------------------------------------------------------------------------


def test_the_in_process_client_retries_busy_refusals_within_the_deadline(tmp_path_factory):
    """Threads sharing one in-process client got RESOURCE_EXHAUSTED "retry shortly" where the
    network client waits and tries again."""
    ws = native_workspace(tmp_path_factory, "busy")

    def hold_slots(client, seconds: float | None) -> None:
        """Takes every whole-store computation slot, as other threads' calls would; gives them
        back after `seconds` (None: never)."""
        slots, n = client.app._heavy_slots, 0
        while slots.acquire(blocking=False):
            n += 1
        if seconds is not None:
            threading.Timer(seconds, lambda: [slots.release() for _ in range(n)]).start()

    with LocalN2GClient(ws, no_model=True) as c:
        key = c.list_graphs()[0].key
        hold_slots(c, 0.5)
        assert c.similar(*key, timeout=30).neighbours is not None  # a unary call
        hold_slots(c, 0.5)
        assert isinstance(list(c.pairs("subset", threshold=0.5, timeout=30)), list)  # a stream, before its first item
        hold_slots(c, None)
        with pytest.raises(N2GError) as e:  # past the deadline: the refusal itself, with its hint
            c.similar(*key, timeout=0.5)
        assert e.value.code.name == "RESOURCE_EXHAUSTED" and e.value.retry_after


def test_a_stream_of_a_closed_in_process_client_says_it_is_closed(tmp_path_factory):
    """The reader's next item was sqlite3's ProgrammingError ("Cannot operate on a closed
    database"), not the closed-client error every call gives after close()."""
    ws = native_workspace(tmp_path_factory, "closed-stream")
    c = LocalN2GClient(ws, no_model=True)
    stream = c.export()
    next(stream)
    c.close()
    with pytest.raises(N2GError) as e:
        list(stream)
    assert e.value.code.name == "FAILED_PRECONDITION" and "closed" in e.value.message


def test_write_file_on_a_read_only_folder_names_the_file_asked_for(tmp_path):
    """The error named the temporary file beside it, whose clean-up the read-only disk refused too."""
    out = tmp_path / "out"
    out.mkdir()
    with read_only_dir(out):
        with pytest.raises(OSError) as e:
            write_file(out / "g.svg", "<svg/>")
    assert e.value.filename == str(out / "g.svg")
    assert list(out.iterdir()) == []
