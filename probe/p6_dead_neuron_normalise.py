"""GetActivations(normalise=true) on neurons that never fire on the corpus (a_max <= 0, as the scan
of a GELU or ReLU model stores for a dead neuron): the answer is inf/NaN or sign-flipped values,
with no error."""
import sys; sys.path.insert(0, "probe")
import common, grpc, numpy as np
from n2g.v1 import n2g_pb2 as pb, n2g_pb2_grpc as pbg
from n2g_service.workspace import Workspace
srv = common.server("p6")
w = Workspace(srv.workspace, mode="write", purpose="probe")
s = w.load_layer_scan(0)
amax = np.array(s["max_activation"], np.float32); amax[5] = -0.05; amax[6] = 0.0  # dead neurons
w.save_layer_scan(0, amax, s["top_window_ids"], s["top_scores"], s["seconds"]); w.close()
with srv.running():
    stub = pbg.N2GStub(grpc.insecure_channel(srv.address))
    keys = [pb.NeuronKey(layer=0, neuron=n) for n in (5, 6, 7)]
    for norm in (False, True):
        try:
            r = stub.GetActivations(pb.GetActivationsRequest(neurons=keys, texts=["the cat sat on the mat"], normalise=norm), timeout=30)
            a = np.asarray(r.sequences[0].activations).reshape(3, -1)
            print("normalise", norm, "max_activation", list(r.max_activation)); print(np.round(a, 3))
        except grpc.RpcError as e:
            print("normalise", norm, e.code().name, e.details())
