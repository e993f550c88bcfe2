"""StartBuild/PlanBuild with a huge `layers` list of valid values (duplicates): no length limit."""
import sys, time, threading; sys.path.insert(0, "probe")
import common, grpc
from n2g.v1 import n2g_pb2 as pb, n2g_pb2_grpc as pbg
N = int(sys.argv[1]) if len(sys.argv) > 1 else 2_000_000
srv = common.server("p1")
with srv.running():
    with grpc.insecure_channel(srv.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = pbg.N2GStub(ch)
        req = pb.StartBuildRequest(layers=[0] * N, neurons=[1], job_id="big")
        print("request bytes", req.ByteSize())
        def small():
            t = time.perf_counter(); stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60); return time.perf_counter() - t
        res = {}
        def go():
            t = time.perf_counter()
            try:
                r = stub.PlanBuild(req if len(sys.argv) > 2 else pb.StartBuildRequest(layers=[0] * N, neurons=[1]), timeout=120)
                res["plan"] = ("ok", time.perf_counter() - t)
            except grpc.RpcError as e:
                res["plan"] = (e.code(), e.details()[:200], time.perf_counter() - t)
            t = time.perf_counter()
            try:
                r = stub.StartBuild(req, timeout=120)
                res["start"] = ("ok", r.state, time.perf_counter() - t)
            except grpc.RpcError as e:
                res["start"] = (e.code(), e.details()[:200], time.perf_counter() - t)
        th = threading.Thread(target=go); th.start()
        time.sleep(1.0)
        print("small call during attack", small(), "rss", common.rss_kb(srv.proc.pid))
        th.join()
        print(res)
        t = time.perf_counter(); jobs = stub.ListJobs(pb.ListJobsRequest(), timeout=60)
        print("ListJobs", time.perf_counter() - t, "bytes", jobs.ByteSize(), [len(j.request_json) for j in jobs.jobs])
        try:
            t = time.perf_counter(); j = stub.GetJob(pb.GetJobRequest(job_id="big"), timeout=60); print("GetJob", len(j.request_json), time.perf_counter()-t)
        except grpc.RpcError as e: print("GetJob", e.code(), e.details()[:200])
        print("rss", common.rss_kb(srv.proc.pid), "small", small())
