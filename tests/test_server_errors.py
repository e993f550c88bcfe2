"""Bad input for every RPC: status codes and messages, and the server still answering afterwards.
Also auth (missing/wrong bearer token), TLS, a server without a model, crashes inside a request
and the model lock's deadline."""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import grpc
import pytest

from n2g.client import N2GClient, N2GError
from n2g.v1 import n2g_pb2 as pb
from n2g.v1 import n2g_pb2_grpc as pbg
from n2g_servers import NATIVE_MODEL, ServerProcess, free_port, native_workspace, self_signed_cert

C = grpc.StatusCode
LIMITS = ["--max-texts", "8", "--max-tokens-per-sequence", "64", "--max-total-tokens", "200",
          "--max-neuron-tokens", "300", "--max-message-bytes", str(1 << 20), "--max-build-neurons", "50"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ws = native_workspace(tmp_path_factory, "errors")
    with ServerProcess(ws, "--model", NATIVE_MODEL, "--device", "cpu", *LIMITS).running() as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as ch:
        yield pbg.N2GStub(ch)


@pytest.fixture(scope="module")
def keys(server):
    from n2g_service.workspace import Workspace

    ws = Workspace(server.workspace)
    built = ws.built_keys()
    unbuilt = next((0, n) for n in range(128) if (0, n) not in built)
    return built, unbuilt


STREAMS = {"WatchJob", "StreamPairs", "ExportGraphs", "GetReport"}


def expect(stub, method, request, code, words):
    with pytest.raises(grpc.RpcError) as e:
        fn = getattr(stub, method)
        resp = fn(request, timeout=30)
        if method in STREAMS:
            list(resp)
    assert e.value.code() == code, f"{method}: {e.value.code()} {e.value.details()}"
    for w in words.split("|"):
        assert w in e.value.details(), f"{method}: {w!r} not in {e.value.details()!r}"
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).loaded  # still answering


K = pb.NeuronKey
T = pb.TokenIds


def bad_cases(built, unbuilt):
    b = K(layer=built[0][0], neuron=built[0][1])
    u = K(layer=unbuilt[0], neuron=unbuilt[1])
    I, NF, RE = C.INVALID_ARGUMENT, C.NOT_FOUND, C.RESOURCE_EXHAUSTED
    return [
        ("Tokenize", pb.TokenizeRequest(), I, "no input"),
        ("Tokenize", pb.TokenizeRequest(texts=["a"], token_ids=[T(ids=[1])]), I, "not both"),
        ("Tokenize", pb.TokenizeRequest(token_ids=[T(ids=[10 ** 6])]), I, "token id 1000000|out of range"),
        ("Tokenize", pb.TokenizeRequest(token_ids=[T(ids=[-3])]), I, "out of range"),
        ("Tokenize", pb.TokenizeRequest(texts=["the cat"] * 9), RE, "9 sequences|limit is 8"),
        ("Tokenize", pb.TokenizeRequest(texts=["the cat " * 40]), RE, "tokens; the limit is 64"),
        ("Tokenize", pb.TokenizeRequest(texts=[""], skip_bos=True), I, "sequence 0 is empty"),
        ("StartBuild", pb.StartBuildRequest(), I, "no layers"),
        ("StartBuild", pb.StartBuildRequest(layers=[7], neurons=[1]), I, "layer 7 out of range"),
        ("StartBuild", pb.StartBuildRequest(layers=[0], neurons=[128]), I, "neuron 128 out of range"),
        ("StartBuild", pb.StartBuildRequest(layers=[0]), I, "either neurons"),
        ("StartBuild", pb.StartBuildRequest(layers=[0], neurons=[1], sample=2), I, "not both"),
        ("PlanBuild", pb.StartBuildRequest(layers=[0], neurons=[1], sample=2), I, "not both"),
        ("PlanBuild", pb.StartBuildRequest(layer_spec="0-99", neurons=[1]), I, "out of range"),
        ("StartBuild", pb.StartBuildRequest(layer_spec="every", neurons=[1]), I, "every"),
        ("StartBuild", pb.StartBuildRequest(layers=[0], neurons=[1], k=10_000_000), I, "k must be between"),
        ("StartBuild", pb.StartBuildRequest(layers=[0], neurons=[1], seed=-1), I, "seed must be 0 or more"),
        ("StartBuild", pb.StartBuildRequest(layers=[0], neurons=[1], executor="spark"), I, "unknown executor"),
        # a server joins no Ray cluster a client names (it would run that cluster's code)
        ("StartBuild", pb.StartBuildRequest(layers=[0], neurons=[1], executor="ray", ray_address="127.0.0.1:1"),
         C.PERMISSION_DENIED, "only on the cluster on its own machine|n2g serve --ray-address"),
        ("PlanBuild", pb.StartBuildRequest(layers=[0], neurons=[1], ray_address="ray://attacker:10001"),
         C.PERMISSION_DENIED, "leave ray_address unset"),
        ("PlanBuild", pb.StartBuildRequest(layer_spec="0-99999999999999999999999999", neurons=[1]), I,
         "layer 2 out of range"),
        # fit settings: checked at the request, not left to fail (or load a model) in the job
        ("StartBuild", pb.StartBuildRequest(layers=[0], neurons=[1], config_json='{"fit": {"mask_token": "id:99999999"}}'),
         I, "token id 99999999 out of range"),
        ("StartBuild", pb.StartBuildRequest(layers=[0], neurons=[1], config_json='{"fit": {"random_windows": 1e9}}'),
         I, "random_windows must be"),
        ("PlanBuild", pb.StartBuildRequest(layers=[0], neurons=[1], config_json='{"fit": {"start_vocab": 1000000000000}}'),
         I, "start_vocab must be at most"),
        ("StartBuild", pb.StartBuildRequest(layers=[0], neurons=[1], config_json='{"fit": {"mlm_name": "/tmp/x"}}'),
         C.PERMISSION_DENIED, "loads no model a request names"),
        ("StartBuild", pb.StartBuildRequest(layers=[0], sample=-1), I, "sample must be positive"),
        ("StartBuild", pb.StartBuildRequest(layers=[0], sample=500), I, "sample must be between"),
        ("StartBuild", pb.StartBuildRequest(layers=[0, 1], sample=30), RE, "plans 60 neurons|limit"),
        ("StartBuild", pb.StartBuildRequest(layers=[0], neurons=[1], config_json="{nope"), I, "not valid JSON"),
        ("StartBuild", pb.StartBuildRequest(layers=[0], neurons=[1], config_json='{"fit": {"bogus": 1}}'), I,
         "unknown field"),
        ("StartBuild", pb.StartBuildRequest(layers=[0], neurons=[1], config_json='{"other": {}}'), I, "keys among"),
        ("StartBuild", pb.StartBuildRequest(layers=[0], neurons=[1], window_tokens=48), I, "windows of 32"),
        ("StartBuild", pb.StartBuildRequest(layers=[0], neurons=[1], job_id="no spaces!"), I, "job_id"),
        ("WatchJob", pb.WatchJobRequest(job_id="nope"), NF, "no job 'nope'"),
        ("WatchJob", pb.WatchJobRequest(), I, "no job_id"),
        ("GetJob", pb.GetJobRequest(job_id="nope"), NF, "no job"),
        ("CancelJob", pb.CancelJobRequest(job_id="nope"), NF, "no job"),
        ("CancelJob", pb.CancelJobRequest(), I, "no job_id"),
        ("ListJobs", pb.ListJobsRequest(states=[42]), I, "unknown job state"),
        ("ListGraphs", pb.ListGraphsRequest(layers=[-1]), I, "layer -1 out of range"),
        ("ListGraphs", pb.ListGraphsRequest(limit=-1), I, "limit"),
        ("GetGraph", pb.GetGraphRequest(), I, "no neuron given"),
        ("GetGraph", pb.GetGraphRequest(neuron=K(layer=2, neuron=0)), I, "layer 2 out of range|0..1"),
        ("GetGraph", pb.GetGraphRequest(neuron=K(layer=0, neuron=128)), I, "neuron 128 (layer 0) out of range|0..127"),
        ("GetGraph", pb.GetGraphRequest(neuron=K(layer=0, neuron=-1)), I, "out of range"),
        ("GetGraph", pb.GetGraphRequest(neuron=u), NF, f"no graph built for 1 neuron(s): {u.layer}:{u.neuron}"),
        ("Predict", pb.PredictRequest(token_ids=[T(ids=[1, 2])]), I, "no neurons given"),
        ("Predict", pb.PredictRequest(neurons=[u], token_ids=[T(ids=[1, 2])]), NF, "no graph built"),
        ("Predict", pb.PredictRequest(neurons=[b, b], token_ids=[T(ids=[1, 2])]), I, "asked twice"),
        ("Predict", pb.PredictRequest(neurons=[b], token_ids=[T(ids=[1])], semantics=9), I, "unknown semantics"),
        ("Predict", pb.PredictRequest(neurons=[b]), I, "no input"),
        ("Predict", pb.PredictRequest(neurons=[b], token_ids=[T(ids=[])]), I, "sequence 0 is empty"),
        ("Predict", pb.PredictRequest(neurons=[b], token_ids=[T(ids=[1, 99999])]), I, "token id 99999"),
        ("Predict", pb.PredictRequest(neurons=[b], token_ids=[T(ids=[1] * 65)]), RE, "65 tokens"),
        ("Predict", pb.PredictRequest(neurons=[b], token_ids=[T(ids=[1] * 50)] * 5), RE, "250 tokens|limit is 200"),
        ("Predict", pb.PredictRequest(neurons=[K(layer=l, neuron=n) for l, n in built[:4]],
                                      token_ids=[T(ids=[1] * 60)] * 3), RE, "activations; the limit is 300"),
        ("GetActivations", pb.GetActivationsRequest(neurons=[K(layer=3, neuron=0)], texts=["a"]), I,
         "layer 3 out of range"),
        ("GetActivations", pb.GetActivationsRequest(neurons=[b]), I, "no input"),
        ("GetActivations", pb.GetActivationsRequest(texts=["the cat"]), I, "no neurons"),
        ("Evaluate", pb.EvaluateRequest(neurons=[b], layers=[0]), I, "not both"),
        ("Evaluate", pb.EvaluateRequest(neurons=[u]), NF, "no graph built"),
        ("Evaluate", pb.EvaluateRequest(layers=[5]), I, "layer 5 out of range"),
        ("Evaluate", pb.EvaluateRequest(eval_config_json='{"fire_threshold": "high"'), I, "eval_config_json"),
        ("Evaluate", pb.EvaluateRequest(eval_config_json='{"n_train": 0}'), I, "n_train"),
        ("Search", pb.SearchRequest(), I, "no clauses"),
        ("Search", pb.SearchRequest(clauses=[pb.SearchClause(role=pb.ROLE_CONTEXT)]), I, "clause 0 has no token"),
        ("Search", pb.SearchRequest(clauses=[pb.SearchClause(label="")]), I, "empty token label"),
        ("Search", pb.SearchRequest(clauses=[pb.SearchClause(token_id=10 ** 6)]), I, "token id 1000000"),
        ("Search", pb.SearchRequest(clauses=[pb.SearchClause(label="cat", role=7)]), I, "unknown role 7"),
        ("Search", pb.SearchRequest(clauses=[pb.SearchClause(label="cat")], limit=-2), I, "limit"),
        ("ListInContextNeurons", pb.ListInContextNeuronsRequest(limit=-1), I, "limit"),
        ("FindSimilar", pb.FindSimilarRequest(), I, "no neuron given"),
        ("FindSimilar", pb.FindSimilarRequest(neuron=u), NF, "no graph built"),
        ("FindSimilar", pb.FindSimilarRequest(neuron=b, threshold=1.5), I, "threshold 1.5 out of range"),
        ("FindSimilar", pb.FindSimilarRequest(neuron=b, threshold=-0.2), I, "threshold"),
        ("FindSimilar", pb.FindSimilarRequest(neuron=b, threshold=math.nan), I, "threshold"),
        ("FindSimilar", pb.FindSimilarRequest(neuron=b, k=-1), I, "k must be"),
        ("StreamPairs", pb.StreamPairsRequest(kind=7), I, "unknown pair kind"),
        ("StreamPairs", pb.StreamPairsRequest(threshold=2.0), I, "threshold"),
        ("StreamPairs", pb.StreamPairsRequest(batch_size=-1), I, "batch_size"),
        ("ExportGraphs", pb.ExportGraphsRequest(layers=[9]), I, "layer 9 out of range"),
    ]


def test_bad_input_every_rpc(stub, keys):
    built, unbuilt = keys
    cases = bad_cases(built, unbuilt)
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["N2G"].methods}
    covered = {c[0] for c in cases} | {"GetModelInfo", "GetReport"}  # no fields to get wrong; garbage below
    assert methods <= covered, methods - covered
    for method, request, code, words in cases:
        expect(stub, method, request, code, words)


def test_garbage_bytes_every_rpc(server):
    """Bytes that are not the method's message (a wrong wire type for field 1): INVALID_ARGUMENT."""
    with grpc.insecure_channel(server.address) as ch:
        for m in pb.DESCRIPTOR.services_by_name["N2G"].methods:
            path = f"/n2g.v1.N2G/{m.name}"
            fn = (ch.unary_stream if m.server_streaming else ch.unary_unary)(path)
            with pytest.raises(grpc.RpcError) as e:
                r = fn(b"\x0a\xff\xff\xff\xff\x0f", timeout=10)
                if m.server_streaming:
                    list(r)
            assert e.value.code() == C.INVALID_ARGUMENT, (m.name, e.value.details())
            assert f"not a valid n2g.v1.{m.input_type.name}" in e.value.details()
        assert pbg.N2GStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=10).loaded


def test_oversized_message(stub, keys):
    built, _ = keys
    big = pb.PredictRequest(neurons=[K(layer=built[0][0], neuron=built[0][1])],
                            texts=["x" * (2 << 20)])
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(big, timeout=30)
    assert e.value.code() == C.RESOURCE_EXHAUSTED
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).loaded


def test_unknown_job_through_client(server):
    with N2GClient(server.address) as c:
        with pytest.raises(N2GError) as e:
            c.get_job("does-not-exist")
        assert e.value.code == C.NOT_FOUND and "does-not-exist" in e.value.message


# ---------------------------------------------------------------------------------------------
# auth, TLS, no model

@pytest.fixture(scope="module")
def secure_server(tmp_path_factory):
    ws = native_workspace(tmp_path_factory, "secure")
    cert, key = self_signed_cert(ws.parent)
    srv = ServerProcess(ws, "--no-model", "--token", "s3cret", "--tls-cert", str(cert), "--tls-key", str(key))
    with srv.running(root_certificates=cert, tls_server_name="localhost"):
        srv.cert = cert
        yield srv


def test_auth_and_tls(secure_server):
    srv = secure_server
    tls = dict(root_certificates=srv.cert)
    with N2GClient(srv.address, **tls) as c:  # no token
        assert c.health() == "SERVING"  # health needs no token
        with pytest.raises(N2GError) as e:
            c.model_info()
        assert e.value.code == C.UNAUTHENTICATED and "missing credentials" in e.value.message
        with pytest.raises(N2GError) as e:
            list(c.pairs())
        assert e.value.code == C.UNAUTHENTICATED
    with N2GClient(srv.address, token="wrong", **tls) as c:
        with pytest.raises(N2GError) as e:
            c.list_graphs()
        assert e.value.code == C.UNAUTHENTICATED and "invalid bearer token" in e.value.message
    with N2GClient(srv.address, token="s3cret", **tls) as c:
        info = c.model_info()
        assert not info.loaded and (info.n_layers, info.d_mlp, info.n_ctx) == (2, 128, 256)  # recorded by the builder
        assert len(c.list_graphs()) == info.neurons_built
    # reflection is guarded too
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    creds = grpc.ssl_channel_credentials(srv.cert.read_bytes())
    with grpc.secure_channel(srv.address, creds) as ch:
        with pytest.raises(grpc.RpcError) as e:
            next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert e.value.code() == C.UNAUTHENTICATED
        # two credentials, the right one among them, in either order: ambiguous, so refused
        stub = pbg.N2GStub(ch)
        for pair in (("Bearer s3cret", "Bearer wrong"), ("Bearer wrong", "Bearer s3cret")):
            with pytest.raises(grpc.RpcError) as e:
                stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10,
                                  metadata=[("authorization", v) for v in pair])
            assert e.value.code() == C.UNAUTHENTICATED and "exactly one" in e.value.details()
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10,
                                 metadata=[("authorization", "Bearer s3cret")]).n_layers == 2
    # plain text against a TLS port fails (after the client's retries)
    with N2GClient(srv.address, token="s3cret", retries=1, backoff=0.05, timeout=3) as c:
        with pytest.raises(N2GError) as e:
            c.model_info()
        assert e.value.code == C.UNAVAILABLE


def test_no_model_server(secure_server):
    from n2g_service.workspace import Workspace

    key = Workspace(secure_server.workspace).built_keys()[0]
    with N2GClient(secure_server.address, token="s3cret", root_certificates=secure_server.cert) as c:
        for fn in (lambda: c.tokenize(["the cat"]),
                   lambda: c.activations([key], token_ids=[[1, 2, 3]]),
                   lambda: c.start_build([0], [5]),
                   lambda: c.predict([key], ["the cat"])):
            with pytest.raises(N2GError) as e:
                fn()
            assert e.value.code == C.FAILED_PRECONDITION and "--no-model" in e.value.message
        assert c.predict([key], token_ids=[[1, 5, 9]]).values[0].shape == (1, 3)  # graphs need no model
        assert c.predict([key], token_ids=[[1, 5, 9]]).tokens == [[]]  # no tokenizer: no labels
        assert c.evaluate().neurons


# ---------------------------------------------------------------------------------------------
# in-process: a crash inside one request, and the model lock's deadline

def test_internal_error_keeps_server_up(tmp_path_factory):
    from n2g_service.server import serve

    ws = native_workspace(tmp_path_factory, "inproc")
    running = serve(ws, no_model=True, port=0, block=False)
    try:
        def boom(clauses):
            raise RuntimeError("simulated bug")

        running.app.graphs.search = boom
        with N2GClient(f"127.0.0.1:{running.port}") as c:
            with pytest.raises(N2GError) as e:
                c.search([("cat", "either")])
            assert e.value.code == C.INTERNAL and "RuntimeError: simulated bug" in e.value.message
            assert "internal error in Search" in e.value.message
            assert c.model_info().neurons_built > 0 and c.health() == "SERVING"
    finally:
        running.stop(0)


def test_serve_in_process_stops_on_sigterm_and_gives_the_callers_handlers_back(tmp_path_factory):
    """`n2g serve` run through main() in this process (as an embedding would): SIGTERM stops it
    cleanly, and SIGINT/SIGTERM are the caller's again afterwards (a handler left behind was
    inherited by forked pool workers, where it hung the test suite)."""
    from n2g.cli import main

    ws = native_workspace(tmp_path_factory, "inproc-signal")
    port = free_port()
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    served, returned = [], threading.Event()

    def stop_once_serving():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not served and not returned.is_set():
            try:
                with N2GClient(f"127.0.0.1:{port}", timeout=2) as c:
                    served.append(c.health())
            except N2GError:
                time.sleep(0.1)
        if not returned.is_set():  # SIGINT if it never served: a failure, not a hang
            os.kill(os.getpid(), signal.SIGTERM if served else signal.SIGINT)

    t = threading.Thread(target=stop_once_serving)
    t.start()
    try:
        code = main(["serve", "--workspace", str(ws), "--no-model", "--port", str(port)])
    finally:
        returned.set()
        t.join(timeout=70)
    assert code == 0 and served == ["SERVING"]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_model_lock_honours_deadline():
    from n2g_service.app import Deadline, ModelHost

    host = ModelHost("m", lambda: object())
    outcome = {}

    def forward():  # in a thread: a wait that ignored the deadline fails the test instead of hanging it
        t0 = time.perf_counter()
        try:
            with host.forward(Deadline.after(0.2)):
                outcome["got"] = "the model"
        except N2GError as e:
            outcome["got"] = e
        outcome["seconds"] = time.perf_counter() - t0

    host.lock.acquire()
    try:
        t = threading.Thread(target=forward, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "forward() still waited for the model lock 10 s past a 0.2 s deadline"
    finally:
        host.lock.release()
    t.join(10)
    err = outcome["got"]
    assert isinstance(err, N2GError) and err.code == C.DEADLINE_EXCEEDED, err
    # waited for the lock until the deadline (not refused at once), and no longer than a loaded machine explains
    assert 0.15 <= outcome["seconds"] < 5, outcome
