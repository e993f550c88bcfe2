"""Fuzzing every RPC (issue 10): requests generated from the proto's own message descriptors by
hypothesis (extreme numbers, NaN and infinities, huge and odd strings, long lists, nested
messages), and raw garbage bytes, against a real server with a model. Every answer must be a
reply or a client-error status with a message - never INTERNAL or UNKNOWN - and the server must
keep answering health checks and short calls throughout."""

from __future__ import annotations

import collections

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from n2g.v1 import n2g_pb2 as pb
from n2g_servers import NATIVE_MODEL, native_workspace

SERVICE = pb.DESCRIPTOR.services_by_name["N2G"]
# what a client mistake may come back as (UNAVAILABLE: a full queue; CANCELLED: a stream cut short;
# PERMISSION_DENIED: a setting only the server's operator may choose, e.g. a Ray cluster to join)
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE,
           grpc.StatusCode.CANCELLED, grpc.StatusCode.PERMISSION_DENIED}
SEEN: collections.Counter = collections.Counter()

INTS = st.one_of(st.integers(-3, 300), st.sampled_from([-2**31, 2**31 - 1, 0, 1, 10_000_000]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e-9, 0.5, 0.9, 1.0, -1.0]))
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", "all", "0-1", "the cat", "\n", "x" * 5000, "{}",
                                                        '{"scan": 5}', '{"fit": {"x": 1}}', "[" * 3000]))


def _repeated(f) -> bool:
    """A repeated field (protobuf 7 has `is_repeated` only; older ones `label`)."""
    return f.is_repeated if hasattr(f, "is_repeated") else f.label == F.LABEL_REPEATED


def message(desc, depth: int = 0) -> st.SearchStrategy:
    """A strategy for any message of type `desc`, built from its fields."""
    fields = {}
    for f in desc.fields:
        if f.type == F.TYPE_MESSAGE:
            if depth >= 3:
                continue
            one = st.deferred(lambda f=f: message(f.message_type, depth + 1))
        elif f.type == F.TYPE_ENUM:
            one = st.integers(-1, len(f.enum_type.values) + 1)
        elif f.type in (F.TYPE_INT32, F.TYPE_INT64, F.TYPE_UINT32, F.TYPE_UINT64, F.TYPE_SINT32, F.TYPE_SINT64):
            one = INTS
        elif f.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
            one = FLOATS
        elif f.type == F.TYPE_BOOL:
            one = st.booleans()
        elif f.type == F.TYPE_STRING:
            one = TEXT
        elif f.type == F.TYPE_BYTES:
            one = st.binary(max_size=64)
        else:
            continue
        if _repeated(f):
            one = st.lists(one, max_size=6 if f.type == F.TYPE_MESSAGE else 40)
        fields[f.name] = st.one_of(st.none(), one)
    cls = getattr(pb, desc.name) if hasattr(pb, desc.name) else None

    def build(values):
        msg = cls()
        for name, v in values.items():
            if v is None:
                continue
            f = desc.fields_by_name[name]
            try:
                if _repeated(f):
                    target = getattr(msg, name)
                    if f.type == F.TYPE_MESSAGE:
                        for x in v:
                            target.add().CopyFrom(x)
                    else:
                        target.extend(v)
                elif f.type == F.TYPE_MESSAGE:
                    getattr(msg, name).CopyFrom(v)
                else:
                    setattr(msg, name, v)
            except (ValueError, TypeError):  # a value the field cannot hold (e.g. int64 range)
                pass
        return msg

    return st.fixed_dictionaries({}, optional=fields).map(build)


REQUESTS = st.sampled_from(list(SERVICE.methods)).flatmap(
    lambda m: st.tuples(st.just(m), message(m.input_type)))


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    from n2g_service.server import serve

    ws = native_workspace(tmp_path_factory, "fuzz")
    running = serve(ws, NATIVE_MODEL, device="cpu", port=0, block=False, max_workers=8)
    ch = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield ch
    finally:
        ch.close()
        running.stop(0)
        print(f"fuzz: status codes seen {dict(SEEN)}")


def _call(channel, method, data: bytes, timeout: float = 10.0):
    path = f"/{SERVICE.full_name}/{method.name}"
    resp_cls = getattr(pb, method.output_type.name)
    if method.server_streaming:
        call = channel.unary_stream(path, request_serializer=None, response_deserializer=resp_cls.FromString)
        try:
            for i, _ in enumerate(call(data, timeout=timeout)):
                if i > 50:
                    break
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            return e.code(), e.details()
    call = channel.unary_unary(path, request_serializer=None, response_deserializer=resp_cls.FromString)
    try:
        call(data, timeout=timeout)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details()


def _check(code, details, what):
    SEEN[code.name] += 1
    assert code in ALLOWED, f"{what}: {code.name}: {details}"
    if code != grpc.StatusCode.OK:
        assert details and len(details) < 2000, (what, code, details)


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(req=REQUESTS)
def test_generated_requests(channel, req):
    method, msg = req
    code, details = _call(channel, method, msg.SerializeToString())
    _check(code, details, f"{method.name}({msg})"[:500])


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(method=st.sampled_from(list(SERVICE.methods)), data=st.binary(max_size=200))
def test_garbage_bytes(channel, method, data):
    code, details = _call(channel, method, data)
    _check(code, details, f"{method.name}(garbage {data[:40]!r})")


def test_server_still_answers_after_fuzzing(channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    info = channel.unary_unary(f"/{SERVICE.full_name}/GetModelInfo", request_serializer=None,
                               response_deserializer=pb.ModelInfo.FromString)(b"", timeout=5)
    assert info.loaded and info.neurons_built > 0
