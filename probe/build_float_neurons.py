"""start_build/plan_build with float or bool neurons/layers: README says a float or a bool where a
whole number belongs is refused, not truncated; numpy arrays of neurons are accepted."""
import sys, tempfile
import numpy as np
sys.path.insert(0, "/work/probeB/tests")
from pathlib import Path
from n2g_servers import write_corpus
from n2g.local import LocalN2GClient

d = Path(tempfile.mkdtemp())
corpus = write_corpus(d / "c.jsonl", 200)
with LocalN2GClient(d / "ws", model="native:0", corpus=str(corpus), create=True, device="cpu") as c:
    for what, kw in [("neurons [1.7]", dict(layers=[0], neurons=[1.7])),
                     ("layers [0.9]", dict(layers=[0.9], neurons=[1])),
                     ("layers [True]", dict(layers=[True], neurons=[1])),
                     ("neurons np.array([1, 2])", dict(layers=[0], neurons=np.array([1, 2]))),
                     ("layers np.array([0])", dict(layers=np.array([0]), neurons=[1])),
                     ("layers 0 (an int)", dict(layers=0, neurons=[1]))]:
        try:
            p = c.plan_build(window_tokens=32, **kw)
            print(f"{what}: planned {p.neurons if hasattr(p, 'neurons') else ''} -> {p.summary.splitlines()[0]!r}")
            print("   request:", {k: v for k, v in vars(p).items() if k in ('layers', 'keys', 'neurons')} )
        except Exception as e:
            print(f"{what}: {type(e).__name__}: {e}")
