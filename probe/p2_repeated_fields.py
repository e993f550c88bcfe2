"""Every repeated field of every RPC filled with a few million valid-looking entries: time to
answer, the server's RSS, and a small call's latency meanwhile."""
import sys, time, threading; sys.path.insert(0, "probe")
import common, grpc
from n2g.v1 import n2g_pb2 as pb, n2g_pb2_grpc as pbg
N = int(sys.argv[1]) if len(sys.argv) > 1 else 4_000_000
only = sys.argv[2:] 
K = pb.NeuronKey
srv = common.server("p2")
cases = {
    "StartBuild": lambda: pb.StartBuildRequest(layers=[0] * N, neurons=[1]),
    "PlanBuild": lambda: pb.StartBuildRequest(layers=[0] * N, neurons=[1]),
    "ListGraphs": lambda: pb.ListGraphsRequest(layers=[0] * N),
    "Evaluate": lambda: pb.EvaluateRequest(layers=[0] * N),
    "ExportGraphs": lambda: pb.ExportGraphsRequest(layers=[0] * N),
    "GetReport": lambda: pb.GetReportRequest(layers=[0] * N),
    "ListJobs": lambda: pb.ListJobsRequest(states=[1] * N),
    "Search": lambda: pb.SearchRequest(clauses=[pb.SearchClause(token_id=5)] * (N // 4)),
    "SearchLabel": lambda: pb.SearchRequest(clauses=[pb.SearchClause(label="the")] * (N // 8)),
}
STREAMS = {"ExportGraphs", "GetReport"}
with srv.running():
    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(srv.address, options=opts) as ch:
        stub = pbg.N2GStub(ch)
        base = common.rss_kb(srv.proc.pid)
        print("baseline rss MB", base // 1024)
        for name, make in cases.items():
            if only and name not in only: continue
            req = make(); rpc = "Search" if name.startswith("Search") else name
            out = {}
            def go():
                t = time.perf_counter()
                try:
                    r = getattr(stub, rpc)(req, timeout=300)
                    if rpc in STREAMS: r = list(r)
                    out["r"] = ("OK", time.perf_counter() - t)
                except grpc.RpcError as e:
                    out["r"] = (e.code().name, e.details()[:120], round(time.perf_counter() - t, 2))
            th = threading.Thread(target=go); th.start()
            lat, peak = [], 0
            while th.is_alive():
                t = time.perf_counter()
                try: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
                except grpc.RpcError as e: lat.append(e.code().name)
                lat.append(time.perf_counter() - t)
                peak = max(peak, common.rss_kb(srv.proc.pid))
                time.sleep(0.2)
            th.join()
            nums = [x for x in lat if isinstance(x, float)]
            print(f"{name:12s} bytes={req.ByteSize():>9} {out['r']} peak_rss_MB={peak//1024} max_small_call_s={max(nums, default=0):.2f}", flush=True)
