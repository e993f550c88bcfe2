"""The gRPC server of n2g (package n2g.v1, proto/n2g/v1/n2g.proto): transport only.

The servicer translates: a request message becomes the arguments of an `N2GApp` method
(n2g.convert), its result becomes the reply, and an `N2GError` becomes the status code and
message. Everything else - validation, limits, builds, evaluation - is the application layer's
(app.py). Beside the servicer sit the serving concerns: parse-safe request decoding, bearer-token
auth, TLS, health checking, reflection and a clean shutdown on SIGINT/SIGTERM.

An exception that is not an N2GError is a bug: it becomes INTERNAL with the exception's name and
message, and the server keeps serving.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from n2g.convert import OPS, Op
from n2g.types import Limits, N2GError
from n2g.v1 import n2g_pb2 as pb
from n2g.vocab import DEFAULT_PORT  # noqa: F401 - re-exported for callers of serve()

from .app import Deadline, N2GApp, as_n2g_error, open_workspace
from .workspace import utf8_text

log = logging.getLogger("n2g.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["N2G"].full_name  # "n2g.v1.N2G"
_SERVICE = pb.DESCRIPTOR.services_by_name["N2G"]
C = grpc.StatusCode


# ---------------------------------------------------------------------------------------------
# The servicer

class _BadRequest:
    """Stands for a request whose bytes did not parse as the method's message."""

    def __init__(self, type_name: str, error: Exception):
        self.message = f"the request is not a valid {type_name}: {str(error)[:200]}"


def _safe_deserializer(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except Exception as e:  # noqa: BLE001 - any decode failure is the client's
            return _BadRequest(cls.DESCRIPTOR.full_name, e)
    return parse


def _deadline(context) -> Deadline:
    return Deadline(context.time_remaining, context.is_active, context.cancel)


def _abort(context, rpc: str, e: Exception):
    err = as_n2g_error(e)
    if err is not None and err.retry_after is not None:
        # busy, not wrong: google.rpc.RetryInfo says when to try again (gRPC's rich error model)
        context.abort_with_status(rpc_status.to_status(_status_with_retry(err)))
    if err is not None:
        # (a message may quote a file name that is not UTF-8: sent with escapes, not an encoding error)
        context.abort(err.code, utf8_text(err.message))
    log.exception("internal error in %s", rpc)
    context.abort(C.INTERNAL, utf8_text(f"internal error in {rpc}: {type(e).__name__}: {str(e)[:500]}"))


def _status_with_retry(err: N2GError) -> status_pb2.Status:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(err.retry_after * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status_pb2.Status(code=err.code.value[0], message=err.message, details=[detail])


class N2GServicer:
    """The n2g.v1.N2G service: one handler per RPC, each a translation to `app`."""

    def __init__(self, app: N2GApp):
        self.app = app

    def handler(self, op: Op) -> Callable:
        if op.stream:
            def stream(request, context):
                try:
                    if isinstance(request, _BadRequest):
                        raise N2GError(C.INVALID_ARGUMENT, request.message)
                    for item in self.app.stream(op.name, op.args(request), _deadline(context)):
                        yield op.result_pb(item)
                except Exception as e:  # noqa: BLE001 - one request never takes the server down
                    _abort(context, op.rpc, e)
            return stream

        def unary(request, context):
            try:
                if isinstance(request, _BadRequest):
                    raise N2GError(C.INVALID_ARGUMENT, request.message)
                return op.result_pb(self.app.call(op.name, op.args(request), _deadline(context)))
            except Exception as e:  # noqa: BLE001
                _abort(context, op.rpc, e)
        return unary

    def generic_handler(self) -> grpc.GenericRpcHandler:
        handlers = {}
        for m in _SERVICE.methods:
            op = next(o for o in OPS.values() if o.rpc == m.name)
            make = grpc.unary_stream_rpc_method_handler if op.stream else grpc.unary_unary_rpc_method_handler
            handlers[m.name] = make(self.handler(op), request_deserializer=_safe_deserializer(getattr(pb, m.input_type.name)),
                                    response_serializer=getattr(pb, m.output_type.name).SerializeToString)
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class _AuthInterceptor(grpc.ServerInterceptor):
    """Checks `authorization: Bearer <token>` on every RPC but grpc.health.v1.Health."""

    def __init__(self, token: str):
        if not token or not token.strip():
            raise ValueError("an empty auth token would switch auth off: give a real token or none")
        self._expected = f"Bearer {token}".encode()

    @staticmethod
    def _deny(message: str):
        def abort(request, context):
            context.abort(C.UNAUTHENTICATED, message)
        return grpc.unary_unary_rpc_method_handler(abort)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(handler_call_details)
        got = [v if isinstance(v, str) else v.decode("utf-8", "replace")
               for k, v in handler_call_details.invocation_metadata or () if k == "authorization"]
        if not got:
            return self._deny("missing credentials: this server wants metadata 'authorization: Bearer <token>' "
                              "(n2g --token / N2G_TOKEN)")
        # Two credentials are ambiguous (a proxy may read the other one): refused, not picked from.
        if len(got) > 1:
            return self._deny(f"{len(got)} 'authorization' headers: send exactly one")
        if not hmac.compare_digest(got[0].encode(), self._expected):
            return self._deny("invalid bearer token")
        return continuation(handler_call_details)


# ---------------------------------------------------------------------------------------------
# Serving

def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _server_credentials(tls_cert: str | Path, tls_key: str | Path) -> grpc.ServerCredentials:
    """TLS credentials from PEM files, checked with the ssl module first: gRPC reports a key it
    cannot use only as a failed bind, which reads like a port in use."""
    import ssl

    try:
        cert_pem, key_pem = Path(tls_cert).read_bytes(), Path(tls_key).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the TLS certificate or key: {e}") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_verify_locations(cadata=cert_pem.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as e:
        raise ValueError(f"--tls-cert {tls_cert} is not a PEM certificate ({getattr(e, 'reason', None) or e})") from None
    try:
        ctx.load_cert_chain(tls_cert, tls_key, password=lambda: b"")  # never prompt for a passphrase
    except ssl.SSLError as e:
        why = ("it belongs to another certificate" if e.reason == "KEY_VALUES_MISMATCH"
               else "not an unencrypted PEM private key")
        raise ValueError(f"--tls-key {tls_key} is not the private key of --tls-cert {tls_cert}: {why}") from None
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])


class _StoppedWhileStarting(BaseException):
    """SIGINT/SIGTERM before the server serves (a BaseException: no `except Exception` keeps it)."""


@dataclass
class RunningServer:
    """A started server: `port` is the bound port; `stop()` shuts it down cleanly (the build
    worker stops at its next forward pass, the groups it committed kept; the job resumes later)."""
    server: grpc.Server
    app: N2GApp
    health: health.HealthServicer
    port: int
    address: str

    def __post_init__(self) -> None:
        self._stopping = threading.Event()
        threading.Thread(target=self._watch_workspace, name="n2g-workspace-watch", daemon=True).start()

    def _watch_workspace(self, every_s: float = 2.0) -> None:
        """Health NOT_SERVING once the workspace's database is removed or replaced under the server
        (every RPC then answers DATA_LOSS): a balancer or an operator's probe sees it needs a restart."""
        lost = False
        while not self._stopping.wait(every_s):
            if self.app.ws.replaced() == lost:
                continue
            lost = not lost  # (a folder moved away and back serves again, as every RPC does)
            if lost:
                log.error("workspace %s: its database was removed or replaced under this server; every call answers "
                          "DATA_LOSS until it is back or the server restarts", self.app.ws.path)
            else:
                log.warning("workspace %s: its database is back; serving again", self.app.ws.path)
            for name in ("", SERVICE_NAME):
                self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING if lost
                                else health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = 2.0) -> None:
        self._stopping.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.app.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def serve(workspace: str | Path, model: str | None = None, *, no_model: bool = False, corpus: str | None = None,
          host: str = "127.0.0.1", port: int = DEFAULT_PORT, device: str | None = None, hook: str | None = None,
          token: str | None = None, tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
          limits: Limits = Limits(), max_workers: int = 32, max_streams: int | None = None, resume: bool = True,
          allow_remote_without_token: bool = False, ray_address: str | None = None,
          block: bool = True) -> RunningServer | None:
    """Starts the n2g server. `block=True` waits until SIGINT/SIGTERM (None when one came before
    it served); `block=False` returns the running server (tests, embedding). Binding beyond
    loopback without a token needs `allow_remote_without_token`. Builds with executor "ray" join
    `ray_address` (None: a local cluster); a request cannot name another."""
    if token is not None and not token.strip():
        raise ValueError("an empty --token (or N2G_TOKEN) would switch auth off: give a real token or none")
    if not _is_loopback(host) and not token and not allow_remote_without_token:
        raise ValueError(f"refusing to listen on {host} (beyond this machine) without an auth token: give --token, "
                         f"or --allow-remote-without-token if the network is trusted")
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    if not 0 <= port <= 65535:  # grpc would wrap it (99999 -> 34463)
        raise ValueError(f"--port must be from 0 to 65535 (0 picks a free one), got {port}")
    # A quarter of the RPC threads for streams, half for long computations: what is left is for the
    # short calls, which must always find a thread.
    streams, computations = max_streams or max(1, max_workers // 4), max(1, max_workers // 2)
    if streams < 1 or streams + computations >= max_workers:
        given = "--max-streams" if max_streams else "a quarter of --max-workers"
        raise ValueError(f"{streams} streams ({given}) and {computations} long computations (half of --max-workers) "
                         f"would leave no RPC thread of --max-workers {max_workers} for short calls: "
                         + (f"give at most {max_workers - computations - 1} streams" if max_workers - computations > 1
                            else "give --max-workers 3 or more"))
    creds = _server_credentials(tls_cert, tls_key) if tls_cert is not None else None

    # A signal while starting (loading the model can take minutes) stops the start-up at once;
    # once serving, it stops the server cleanly (the loop below).
    stop = threading.Event()
    starting = True
    previous: dict = {}
    if block:
        def on_signal(signum, frame):
            if starting:
                raise _StoppedWhileStarting(signum)
            log.info("signal %d: shutting down", signum)
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        app = server = None
        try:
            log.info("starting on workspace %s", workspace)
            t0 = time.perf_counter()
            ws, model_host = open_workspace(workspace, model=model, no_model=no_model, corpus=corpus, device=device,
                                            hook=hook, create=not no_model, writer=None if no_model else "n2g serve",
                                            load_now=not no_model)
            app = N2GApp(ws, model_host, limits, max_streams=streams, max_computations=computations,
                         ray_address=ray_address or None, trusted_caller=False)
            if model_host.loaded:
                m = model_host.get()
                log.info("model %s loaded on %s in %.1f s (%d layers x %d neurons, hook %s)", model_host.name, m.device,
                         time.perf_counter() - t0, m.n_layers, m.d_mlp, m.hook)
            app.record_shape()
            graphs = len(app.graphs)  # load the graph store now: a damaged workspace fails here, not later

            interceptors = [_AuthInterceptor(token)] if token else []
            opts = [("grpc.max_receive_message_length", limits.max_message_bytes),
                    ("grpc.max_send_message_length", limits.max_message_bytes),
                    ("grpc.so_reuseport", 0)]
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="n2g-rpc"),
                                 interceptors=interceptors, options=opts)
            server.add_generic_rpc_handlers((N2GServicer(app).generic_handler(),))
            health_servicer = health.HealthServicer(experimental_non_blocking=True)
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

            address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
            try:
                bound = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
            except RuntimeError as e:  # grpc reports a failed bind this way (the TLS files were checked above)
                app.close()
                raise OSError(f"could not listen on {address} ({e}); is the port in use?") from None
            if not bound:
                app.close()
                raise OSError(f"could not listen on {address}; is the port in use?")
            server.start()
            for name in ("", SERVICE_NAME):
                health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            starting = False
        except _StoppedWhileStarting as e:
            log.info("signal %d while starting: stopped before serving", e.args[0])
            if server is not None:
                server.stop(0)
            if app is not None:
                app.close()
            return None

        log.info("workspace %s: model %s, corpus %s, %d graphs", ws.path, ws.model_name, ws.corpus, graphs)
        if not model_host.enabled:
            log.warning("running WITHOUT a model (--no-model): graph RPCs only; Tokenize, GetActivations, StartBuild, "
                        "PlanBuild, Predict on texts and Evaluate with compute answer FAILED_PRECONDITION")
        log.log(logging.INFO if token else logging.WARNING, "auth: %s",
                "bearer token required on every RPC but health" if token
                else "OFF (no --token): any client that can connect may call every RPC")
        log.log(logging.INFO if tls_cert else logging.WARNING, "TLS: %s",
                f"ON (certificate {tls_cert})" if tls_cert else "OFF (plain-text connections)")
        actual = f"{host}:{bound}" if ":" not in host else f"[{host}]:{bound}"
        log.info("listening on %s (max %d concurrent RPC threads, %d streams, %d computations)", actual, max_workers,
                 app.max_streams, app.max_computations)
        resumed = app.start_jobs(resume=resume)
        if resumed:
            log.info("resuming %d unfinished job(s): %s", len(resumed), ", ".join(resumed))
        running = RunningServer(server, app, health_servicer, bound, actual)
        if block:
            while not stop.wait(1.0):
                pass
            running.stop()
        return running
    finally:  # an in-process caller (tests, embedding) gets its own handlers back
        for sig, handler in previous.items():
            signal.signal(sig, handler)
