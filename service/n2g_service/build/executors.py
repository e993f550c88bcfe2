"""Executors run a build's work units: in this process (the default) or on Ray actors.

Both take the same units and return the same results; the driver (``runner.run_build``) is the only
writer to the workspace. A unit is a pure function of the model and its payload
(:func:`execute_unit`), so where it runs never changes what it gives.

Ray: each actor loads its own model from a *model spec* (:func:`model_spec`; the model object
itself is never shipped): with GPUs in the cluster, one actor per GPU, or ``workers`` actors
sharing them evenly (:func:`actor_layout`); else ``workers`` actors of ``threads`` torch threads
each. A unit whose actor dies is retried on another actor (a replacement is started), up to
``max_attempts`` times; an error raised by the unit's own code is not retried.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import numpy as np

from .compute import compute_group
from .request import BuildCancelled, BuildRequest

_SERVICE_DIR = str(Path(__file__).resolve().parents[2])  # holds the n2g_service package


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """Raises ConnectionError unless ``address`` ("HOST[:PORT]", "ray://HOST[:PORT]"; a bare
    host means Ray's port, 6379 or 10001 for Ray Client; "[::1]:6379" for IPv6; "auto" and
    "local" are not checked) accepts a connection and answers gRPC within ``timeout`` seconds each:
    ``ray.init`` waits minutes on an address nobody answers (for ever on one that answers
    another protocol), and cannot be interrupted meanwhile."""
    import socket

    address = address.strip()
    if address in ("auto", "local"):
        return
    client = address.startswith("ray://")
    hostport = address.removeprefix("ray://")
    host, port = hostport, str(10001 if client else 6379)
    if hostport.startswith("["):  # [IPv6] or [IPv6]:port
        host, _, rest = hostport[1:].partition("]")
        if rest:
            port = rest.removeprefix(":")
    elif hostport.count(":") == 1:
        host, port = hostport.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"Ray address {address!r}: give HOST:PORT (a port from 1 to 65535), or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: {e}") from None
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "false", ""):
        # Ray's GCS and Ray Client speak gRPC: a port that takes connections but speaks something
        # else (the dashboard's 8265, a web server) would leave ray.init waiting for ever
        import grpc

        channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ConnectionError(f"{address} takes connections but no gRPC server answers there, so it is not a Ray "
                                  "cluster: give its GCS address (HEAD:6379) or ray://HEAD:10001 for Ray Client") from None
        finally:
            channel.close()


class ExecutorError(RuntimeError):
    """A build's executor cannot go on (workers that keep dying, a cluster too small, Ray
    missing): the message says why, and a failed job logs it in one line."""


@dataclass
class Unit:
    unit_id: str
    kind: str  # scan | fit
    payload: dict[str, Any]


@dataclass
class UnitResult:
    unit: Unit
    value: Any
    seconds: float
    worker: str


# ---- model specs -----------------------------------------------------------------------------

def model_spec(model) -> dict[str, Any]:
    """What a worker needs to load the same model: a native random model's constructor
    parameters (its weights follow from its seed), or a model name."""
    cfg = model.bridge.cfg
    if model.name.startswith("native-"):
        return {"native": {"n_layers": int(cfg.n_layers), "d_model": int(cfg.d_model), "d_mlp": int(cfg.d_mlp),
                           "seed": int(cfg.seed), "n_heads": int(cfg.n_heads), "n_ctx": int(cfg.n_ctx),
                           "act_fn": str(cfg.act_fn)},
                "hook": model.hook}
    return {"name": model.name, "hook": model.hook}


def load_model_from_spec(spec: dict[str, Any], device: str | None = None):
    from .. import models

    if "native" in spec:
        return models.native_random_model(device=device or "cpu", hook=spec.get("hook"), **spec["native"])
    return models.load_model(spec["name"], device=device, hook=spec.get("hook"))


# ---- what a unit computes --------------------------------------------------------------------

def execute_unit(model, unit: Unit, windows, on_progress: Callable[[int, int], None] | None = None) -> Any:
    """Runs one unit on ``model``; ``windows`` is the corpus (int64 [n, T]).

    scan -> ``{layer: LayerScan}`` of windows [start, stop) less the excluded ones;
    fit -> the group's ``NeuronRecord`` list (not committed: the driver commits).
    ``on_progress(done, total)`` follows a scan unit batch by batch."""
    from ..config import ScanConfig
    from ..scan import scan_layers

    p = unit.payload
    if unit.kind == "scan":
        a, b = p["start"], p["stop"]
        return scan_layers(model, windows[a:b], p["layers"], ScanConfig.from_dict(p["scan"]), progress=False,
                           window_ids=np.arange(a, b), exclude=p.get("exclude"),
                           precision=p.get("precision", "float32"), on_batch=on_progress)
    if unit.kind == "fit":
        req = BuildRequest.from_dict(p["request"])
        return compute_group(model, p["layer"], p["neurons"], windows, p["max_activation"], p["top_window_ids"],
                             req, p.get("job_id"), p.get("heldout"))
    raise ValueError(f"unknown unit kind {unit.kind!r}")


# ---- in-process ------------------------------------------------------------------------------

class InProcessExecutor:
    """Runs units one after another on the driver's model, holding ``model_lock`` around each so
    other users of the model (the server's RPCs) interleave with a long build."""

    name = "inprocess"

    def __init__(self, model, model_lock: ContextManager | None = None) -> None:
        self.model = model
        self.lock = model_lock if model_lock is not None else contextlib.nullcontext()

    def run(self, units: Sequence[Unit], windows, *, cancel=None,
            on_start: Callable[[Unit, str], None] | None = None,
            on_progress: Callable[[Unit, int, int], None] | None = None) -> Iterator[UnitResult]:
        """``on_progress(unit, done, total)`` follows a scan unit batch by batch; a cancel
        stops a unit at its next forward pass (nothing of the unit is committed)."""
        from ..activations import Stopped, stop_when

        for unit in units:
            if cancel is not None and cancel.is_set():
                raise BuildCancelled()
            if on_start is not None:
                on_start(unit, "inprocess")

            def batch_done(done: int, total: int, unit: Unit = unit) -> None:
                if cancel is not None and cancel.is_set():
                    raise BuildCancelled()
                if on_progress is not None:
                    on_progress(unit, done, total)

            t0 = time.perf_counter()
            try:
                with self.lock, stop_when(None if cancel is None else cancel.is_set):
                    value = execute_unit(self.model, unit, windows, batch_done)
            except Stopped:  # cancelled within the unit: nothing of it is committed
                raise BuildCancelled() from None
            yield UnitResult(unit, value, time.perf_counter() - t0, "inprocess")

    def close(self) -> None:
        pass


# ---- Ray -------------------------------------------------------------------------------------

class _Worker:
    """A Ray actor holding one model."""

    def __init__(self, spec: dict[str, Any], device: str, threads: int) -> None:
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.model = load_model_from_spec(spec, device)

    def pid(self) -> int:
        return os.getpid()

    def free_device_bytes(self) -> int | None:
        import torch

        if self.model.device.type != "cuda":
            return None
        return int(torch.cuda.mem_get_info(self.model.device)[0])

    def run(self, unit: Unit, windows) -> tuple[Any, float]:
        t0 = time.perf_counter()
        value = execute_unit(self.model, unit, windows)
        return value, time.perf_counter() - t0


def actor_layout(gpus: int, workers: int, cpus: int, threads: int = 0) -> tuple[int, dict[str, Any], int, float]:
    """(actors, Ray resources of each, torch threads of each, share of a GPU each holds).

    With GPUs: ``max(workers, gpus)`` actors, at most ceil(actors / gpus) on a GPU, each asking
    that fraction of one (Ray packs them) and sizing its batches to that share of the GPU's free
    memory. On a GPU the default fit waits on host work and small sequential passes, not on the
    GPU's throughput (README, whole-model figures), so several actors a GPU can overlap them.
    Without: ``workers`` CPU actors (at least one). Threads default to the host's cores split
    evenly."""
    if gpus > 0:
        n = max(int(workers), int(gpus))
        share = 1.0 / math.ceil(n / gpus)
        return n, {"num_gpus": share, "num_cpus": 0}, threads if threads > 0 else max(1, cpus // n), share
    n = max(int(workers), 1)
    return n, {"num_cpus": 1}, threads if threads > 0 else max(1, cpus // n), 0.0


class _RayNotices(logging.Filter):
    """Drops two notices ``ray.init`` prints on every build, into the user's progress output:
    that it set no SIGTERM handler (n2g's build runs off the main thread, and the server and the
    CLI handle SIGTERM themselves) and that the cluster uses token authentication (how to turn it
    off is no advice n2g should pass on). Every other Ray message is kept."""

    NOTICES = ("SIGTERM handler is not set", "Token authentication is enabled")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICES)


def _quiet_ray_notices(ray) -> None:
    for handler in logging.getLogger("ray").handlers:  # Ray's own handler; its loggers do not propagate
        if not any(isinstance(f, _RayNotices) for f in handler.filters):
            handler.addFilter(_RayNotices())


class RayExecutor:
    """Runs units on Ray actors. With no ``address`` a local Ray cluster is started (and shut
    down by :meth:`close`); with one, ``ray.init(address=...)`` joins that cluster."""

    name = "ray"

    def __init__(self, spec: dict[str, Any], *, address: str | None = None, workers: int = 0, threads: int = 0,
                 max_attempts: int = 3, on_submit: Callable[[Unit, int], None] | None = None) -> None:
        # Ray's core worker installs absl's crash handler in this process, which takes SIGTERM too
        # and kills the process at once: a server that had run a Ray build never shut down cleanly
        # again (its job left running, Ray's agents orphaned). Ray reads the switch at its import.
        own_switch = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER" not in os.environ
        if own_switch:
            os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] = "1"
            if "ray._private.ray_constants" in sys.modules:  # imported before (an embedding program)
                sys.modules["ray._private.ray_constants"].RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
        try:
            import ray
        except ImportError:
            raise ExecutorError("--executor ray needs Ray: pip install 'ray>=2.9' in this environment "
                               "(and on every node of the cluster)") from None

        _quiet_ray_notices(ray)
        self.ray = ray
        self.spec = spec
        self.max_attempts = max_attempts
        self.on_submit = on_submit
        self._owns_ray = False
        env = {"PYTHONPATH": os.pathsep.join([_SERVICE_DIR, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])}
        if own_switch:  # the workers keep their crash reports
            env["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] = "0"
        if not ray.is_initialized():
            kw: dict[str, Any] = {"runtime_env": {"env_vars": env}, "include_dashboard": False,
                                  "logging_level": "warning", "log_to_driver": False}
            if address is None:
                kw["num_cpus"] = max(workers, 1)
            else:
                address = address.strip()
                check_reachable(address)
            # "local": a cluster of our own even where one already runs (ray start, RAY_ADDRESS),
            # which would otherwise be joined and refuse the num_cpus given
            ray.init(address=address or "local", **kw)
            self._owns_ray = address is None
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        self.device = "cuda" if gpus else "cpu"
        self.n_workers, opts, self.threads, self.gpu_share = actor_layout(gpus, workers, os.cpu_count() or 1, threads)
        # an actor the cluster cannot place waits for ever (and the build with it): refuse now
        need = self.n_workers * opts.get("num_cpus", 0)
        self.actors: list[Any] = []
        if need > resources.get("CPU", 0):
            self.close()
            raise ExecutorError(f"the Ray cluster has {resources.get('CPU', 0):g} CPUs and {gpus} GPUs; "
                               f"{self.n_workers} workers need {need:g} CPUs: ask fewer --workers")
        self._actor_cls = ray.remote(max_restarts=0, max_task_retries=0, **opts)(_Worker)
        self.pids: dict[Any, int] = {}
        self.started = 0
        for _ in range(self.n_workers):
            self._spawn()
        ray.get([a.pid.remote() for a in self.actors])

    def free_device_bytes(self) -> int | None:
        """A worker's share of its GPU's free memory, once every worker holds its model (None on
        CPU workers)."""
        free = self.ray.get(self.actors[0].free_device_bytes.remote()) if self.actors else None
        return None if free is None else int(free * self.gpu_share)

    def _spawn(self) -> Any:
        actor = self._actor_cls.remote(self.spec, self.device, self.threads)
        self.actors.append(actor)
        self.started += 1
        return actor

    def _pid(self, actor) -> int:
        if actor not in self.pids:
            self.pids[actor] = self.ray.get(actor.pid.remote())
        return self.pids[actor]

    def run(self, units: Sequence[Unit], windows, *, cancel=None,
            on_start: Callable[[Unit, str], None] | None = None,
            on_progress: Callable[[Unit, int, int], None] | None = None) -> Iterator[UnitResult]:
        """(``on_progress`` is not called: an actor's unit reports when it is done.)"""
        from ray.exceptions import RayActorError, RayTaskError


        ray = self.ray
        windows_ref = ray.put(windows)  # once; each actor reads it zero-copy
        queue: deque[Unit] = deque(units)
        attempts: dict[str, int] = {}
        free = list(self.actors)
        pending: dict[Any, tuple[Unit, Any]] = {}
        # replacements for dead workers, loading their model: they join `free` once ready, so the
        # results of the others are taken meanwhile (waiting on one stalled the build ~25 s)
        starting: dict[Any, Any] = {}
        failed_starts = 0

        def replace() -> None:
            new = self._spawn()
            starting[new.pid.remote()] = new
        while queue or pending:
            if cancel is not None and cancel.is_set():
                raise BuildCancelled()
            while queue and free:
                unit = queue.popleft()
                actor = free.pop(0)
                attempts[unit.unit_id] = attempts.get(unit.unit_id, 0) + 1
                pid = self._pid(actor)
                if on_start is not None:
                    on_start(unit, f"ray:{pid}")
                ref = actor.run.remote(unit, windows_ref)
                pending[ref] = (unit, actor)
                if self.on_submit is not None:
                    self.on_submit(unit, pid)
            ready, _ = ray.wait([*pending, *starting], num_returns=1, timeout=0.5)
            for ref in ready:
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        self.pids[actor] = ray.get(ref)
                    except RayActorError:  # it died while loading its model: another one, a few times
                        self.actors.remove(actor)
                        failed_starts += 1
                        if failed_starts >= self.max_attempts:
                            raise ExecutorError(f"{failed_starts} Ray workers died while loading the model") from None
                        replace()
                        continue
                    free.append(actor)
                    continue
                unit, actor = pending.pop(ref)
                try:
                    value, seconds = ray.get(ref)
                except RayActorError:
                    # the worker died (killed, out of memory, node lost): retry the unit elsewhere
                    if actor in self.actors:
                        self.actors.remove(actor)
                    if attempts[unit.unit_id] >= self.max_attempts:
                        raise ExecutorError(f"unit {unit.unit_id} failed on {attempts[unit.unit_id]} workers") from None
                    queue.appendleft(unit)
                    replace()
                    continue
                except RayTaskError as e:
                    # the unit's own error, as the in-process executor raises it: Ray's wrapper puts
                    # the worker's traceback (and terminal colours) in its message, which a failed
                    # job stored and showed as its one-line reason (kept here as the cause)
                    if isinstance(e.cause, Exception):
                        raise e.cause from e
                    raise
                free.append(actor)
                yield UnitResult(unit, value, seconds, f"ray:{self.pids.get(actor)}")

    def close(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(a)
        self.actors.clear()
        if self._owns_ray:
            self.ray.shutdown()
            self._owns_ray = False
