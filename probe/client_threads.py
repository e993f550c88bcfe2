"""One LocalN2GClient used from several threads at once; close() while others call; a with block
that raises inside."""
import sys, threading, traceback
from n2g.local import LocalN2GClient

ws = sys.argv[1] if len(sys.argv) > 1 else "/tmp/pb/ws"
c = LocalN2GClient(ws, no_model=True)
ref = c.predict([(0, 34), (1, 65)], token_ids=[[1, 27, 438, 444]]).values[0]
errs, n = [], [0]

def work(i):
    try:
        for j in range(30):
            op = (i + j) % 5
            if op == 0:
                v = c.predict([(0, 34), (1, 65)], token_ids=[[1, 27, 438, 444]]).values[0]
                assert (v == ref).all(), "predict differs"
            elif op == 1:
                assert len(c.list_graphs()) == 8
            elif op == 2:
                c.similar(0, 34)
            elif op == 3:
                c.search([("love", "activating")])
            else:
                assert sum(1 for _ in c.export([0])) == 4
            n[0] += 1
    except Exception as e:
        errs.append(f"{type(e).__name__}: {e}")

ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
print("calls", n[0], "errors", errs[:5])
c.close()

try:
    with LocalN2GClient(ws, no_model=True) as c2:
        c2.list_graphs()
        raise RuntimeError("inside")
except RuntimeError as e:
    print("with-block raised through:", e, "closed:", c2.closed)

# close while another thread streams an export
c3 = LocalN2GClient(ws, no_model=True)
it = c3.export()
first = next(it)
c3.close()
try:
    rest = list(it)
    print("export continued after close:", 1 + len(rest), "items")
except Exception as e:
    print("export after close:", type(e).__name__, e)
