"""Two Evaluate(compute_heldout) at once on a workspace with no stored held-out activations: each
computes the same layers' true activations again under the model lock (duplicate forward passes)."""
import sys, threading, time; sys.path.insert(0, "probe")
import common
from n2g_service import evaluate as ev, activations as A
from n2g_service.app import open_workspace, N2GApp
ws, host = open_workspace(common.fresh("p4"), model="native:0", device="cpu", writer="x", load_now=True)
app = N2GApp(ws, host)
calls = []
orig = A.layer_activations
def counting(model, toks, layers, *a, **kw):
    calls.append(tuple(toks.shape)); time.sleep(0.05)  # a real model's pass takes long: widen the window
    return orig(model, toks, layers, *a, **kw)
A.layer_activations = counting
N = int(sys.argv[1]) if len(sys.argv) > 1 else 2
def one():
    app.evaluate(compute_heldout=True)
t0 = time.perf_counter()
one_alone = None
ths = [threading.Thread(target=one) for _ in range(N)]
[t.start() for t in ths]; [t.join() for t in ths]
print(f"{N} concurrent evaluations: {len(calls)} forward batches in {time.perf_counter()-t0:.1f}s")
calls.clear(); app.evaluate(compute_heldout=True); print("a later evaluation (all stored):", len(calls), "batches")
