"""Ray executor: a local cluster of 2 CPU workers builds a native random model's neurons
byte-identical to the in-process executor, and a unit whose worker is killed is retried on
another. One cluster (and its two actors) is shared by the module: Ray start-up is slow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from n2g_service.build.executors import InProcessExecutor, RayExecutor, Unit, model_spec
from n2g_service.config import ScanConfig
from n2g_service.build.request import BuildRequest
from n2g_service.build.runner import run_build
from n2g_service.workspace import BuildStore, Workspace
from n2g_servers import env

REQ = dict(layers="all", neurons=[3, 17, 40, 77, 101], group_size=2, scan=ScanConfig(k=6, window_tokens=32),
           shard_windows=64)


def _workspace(path, model, windows):
    ws = Workspace(path, create=True, model=model.name, corpus="fortunes", hook=model.hook)
    ws.save_windows(windows)
    return ws


@pytest.fixture(scope="module")
def windows(native_windows):
    return native_windows[:256]


@pytest.fixture(scope="module")
def ray_executor(native_model):
    kills: list = []
    ex = RayExecutor(model_spec(native_model), workers=2, threads=1, on_submit=lambda u, pid: [k(u, pid) for k in kills])
    ex.kill_hooks = kills
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def inprocess_graphs(native_model, windows, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors run 1 thread each: same kernels, same floats
    try:
        ws = _workspace(tmp_path_factory.mktemp("inproc"), native_model, windows)
        keys = run_build(ws, native_model, BuildRequest(**REQ))
    finally:
        torch.set_num_threads(threads)
    return {(l, n): g for l, n, g in ws.graph_bytes()}, {l: ws.load_layer_scan(l) for l in (0, 1)}, keys


def test_a_process_that_ran_a_ray_build_still_shuts_down_on_sigterm():
    """Ray's core worker installed absl's crash handler in the driver, which took SIGTERM and
    killed the process at once (exit -15): a server that had run a Ray build never ran its clean
    shutdown again (its job left running, Ray's agents orphaned). Run before the module's cluster
    starts: a subprocess with a cluster of its own (1 worker), its executor started in a thread as
    the server's build worker starts it."""
    code = """if True:
        import os, signal, threading, time
        got = []
        signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
        from n2g_service.build.executors import RayExecutor, model_spec
        from n2g_service.models import native_random_model

        def build():
            RayExecutor(model_spec(native_random_model(n_layers=2, d_model=64, d_mlp=128, seed=0)), workers=1,
                        threads=1).close()

        t = threading.Thread(target=build)
        t.start()
        t.join()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        print("handled" if got else "not handled")
    """
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=300)
    assert p.returncode == 0 and p.stdout.split() == ["handled"], (p.returncode, p.stdout, p.stderr[-2000:])
    # ray.init off the main thread printed two notices into every Ray build's progress output
    assert "SIGTERM handler" not in p.stderr and "Token authentication" not in p.stderr, p.stderr[-2000:]


def test_ray_build_is_identical_to_inprocess(native_model, windows, ray_executor, inprocess_graphs, tmp_path):
    graphs, scans, keys = inprocess_graphs
    ws = _workspace(tmp_path, native_model, windows)
    got = run_build(ws, native_model, BuildRequest(**REQ, executor="ray"), executor=ray_executor)
    assert got == keys and len(keys) == 10
    assert {(l, n): g for l, n, g in ws.graph_bytes()} == graphs
    for l in (0, 1):
        s = ws.load_layer_scan(l)
        assert np.array_equal(s["top_window_ids"], scans[l]["top_window_ids"])
        assert np.array_equal(s["top_scores"], scans[l]["top_scores"])
        assert np.array_equal(s["max_activation"], scans[l]["max_activation"])
    store = BuildStore(ws)
    units = store.units(store.plans()[0])
    workers = {u.worker for u in units}
    assert len(workers) == 2 and all(w.startswith("ray:") for w in workers)  # both actors took units


def test_killed_worker_unit_is_retried(native_model, windows, ray_executor, inprocess_graphs, tmp_path):
    graphs, _, keys = inprocess_graphs
    killed: dict = {}

    def kill_first_fit(unit, pid):
        if unit.kind == "fit" and not killed:
            killed[unit.unit_id] = pid
            os.kill(pid, signal.SIGKILL)

    ray_executor.kill_hooks.append(kill_first_fit)
    try:
        ws = _workspace(tmp_path, native_model, windows)
        got = run_build(ws, native_model, BuildRequest(**REQ, executor="ray"), executor=ray_executor)
    finally:
        ray_executor.kill_hooks.clear()
    assert got == keys and len(killed) == 1
    assert {(l, n): g for l, n, g in ws.graph_bytes()} == graphs  # nothing lost, nothing different
    store = BuildStore(ws)
    plan_id, = store.plans()
    (unit_id, pid), = killed.items()
    unit = next(u for u in store.units(plan_id) if u.unit_id == unit_id)
    assert unit.state == "done" and unit.attempts == 2 and unit.worker != f"ray:{pid}"
    assert all(u.attempts == 1 for u in store.units(plan_id) if u.unit_id != unit_id)
    assert len(ray_executor.actors) == 2  # the dead worker was replaced


def test_a_unit_that_raises_on_ray_fails_as_it_does_in_process(native_model, windows, ray_executor):
    """A unit's own error reached the job as Ray's RayTaskError(ValueError), whose message is the
    worker's traceback with terminal colour codes: the failed job stored that as its reason, where
    the same build in-process says `ValueError: ...` in one line."""
    bad = Unit("bad", "bogus", {})
    said = []
    for ex in (InProcessExecutor(native_model), ray_executor):
        with pytest.raises(ValueError) as e:
            list(ex.run([bad], windows))
        said.append(f"{type(e.value).__name__}: {e.value}")
    assert said[0] == said[1] == "ValueError: unknown unit kind 'bogus'", said
    assert len(ray_executor.actors) == 2  # the worker is not dead: nothing to replace


def test_actor_layout_spreads_workers_over_the_gpus():
    """With GPUs, `workers` beyond one a GPU share them evenly: each actor asks the fraction of a
    GPU that lets Ray place them all, and sizes its batches to that share of the free memory."""
    from n2g_service.build.executors import actor_layout

    assert actor_layout(1, 0, 16) == (1, {"num_gpus": 1.0, "num_cpus": 0}, 16, 1.0)  # the default
    assert actor_layout(1, 4, 16) == (4, {"num_gpus": 0.25, "num_cpus": 0}, 4, 0.25)
    assert actor_layout(4, 2, 16)[0] == 4  # never fewer than one a GPU
    for gpus, workers in ((2, 5), (3, 7), (8, 8), (2, 16)):
        n, opts, threads, share = actor_layout(gpus, workers, 16)
        assert n == workers and opts["num_gpus"] == share and threads == max(1, 16 // n)
        assert int(1 / share + 1e-9) * gpus >= n  # every actor fits on some GPU
    # without GPUs: CPU actors, as before
    assert actor_layout(0, 0, 2) == (1, {"num_cpus": 1}, 2, 0.0)
    assert actor_layout(0, 2, 2, threads=1) == (2, {"num_cpus": 1}, 1, 0.0)


def test_cpu_actors_report_no_gpu_memory(ray_executor):
    assert ray_executor.device == "cpu" and ray_executor.gpu_share == 0.0
    assert ray_executor.free_device_bytes() is None


def test_an_unreachable_ray_address_fails_at_once():
    """`ray.init` waits minutes, uninterruptibly, on an address nobody answers, and for ever on one
    that answers another protocol (a web server, Ray's dashboard port): the executor checks that
    the address takes a connection and speaks gRPC first, so such a build fails with a reason."""
    import http.server
    import socket
    import threading
    import time
    from concurrent import futures

    import grpc

    from n2g_service.build.executors import check_reachable

    server = grpc.server(futures.ThreadPoolExecutor(1))  # a gRPC server stands in for Ray's GCS
    port = server.add_insecure_port("127.0.0.1:0")
    port6 = server.add_insecure_port("[::1]:0")
    server.start()
    web = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        with socket.socket() as closed_port:
            closed_port.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
            check_reachable(f"127.0.0.1:{port}")
            check_reachable(f"ray://127.0.0.1:{port}")
            t0 = time.monotonic()
            with pytest.raises(ConnectionError, match="cannot reach the Ray cluster at 127.0.0.1"):
                check_reachable(f"127.0.0.1:{closed_port.getsockname()[1]}")
            assert time.monotonic() - t0 < 10
            # IPv6 in brackets, and surrounding blanks
            check_reachable(f" 127.0.0.1:{port} ")
            check_reachable(f"[::1]:{port6}")
            t0 = time.monotonic()
            with pytest.raises(ConnectionError, match="takes connections but no gRPC server answers there"):
                check_reachable(f"127.0.0.1:{web.server_address[1]}", timeout=2)
            assert time.monotonic() - t0 < 8
    finally:
        web.shutdown()
        server.stop(0)
    # no port: Ray's own (6379, or 10001 for Ray Client), checked too, not skipped
    with pytest.raises(ConnectionError, match="cannot reach the Ray cluster at 127.0.0.1"):
        check_reachable("127.0.0.1")
    with pytest.raises(ConnectionError, match="cannot reach the Ray cluster at ray://127.0.0.1"):
        check_reachable("ray://127.0.0.1")
    for bad in ("host:http", "ray://[::1]:x", ":6379", "host:0"):
        with pytest.raises(ValueError, match="give HOST:PORT"):
            check_reachable(bad)
    check_reachable("auto")  # resolved by Ray from the local node, not a host:port


def test_more_workers_than_the_cluster_can_place_are_refused_at_once(ray_executor, native_model):
    """On a 2-CPU cluster, 3 workers waited for ever for a CPU (the build hung, a cancel could not
    stop it, the server's queue jammed behind it): refused before any actor starts."""
    import time

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"the Ray cluster has 2 CPUs and 0 GPUs; 5 workers need 5 CPUs"):
        RayExecutor(model_spec(native_model), workers=5, threads=1)
    assert time.monotonic() - t0 < 30
    assert len(ray_executor.actors) == 2  # the cluster and its actors are left as they were
