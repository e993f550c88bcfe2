"""8 threads share one LocalN2GClient (as a thread pool over neurons would): similar() is refused
RESOURCE_EXHAUSTED "retry shortly" (retry_after=1) instead of being retried as N2GClient does."""
import sys, threading
from n2g.local import LocalN2GClient

c = LocalN2GClient(sys.argv[1] if len(sys.argv) > 1 else "/tmp/pb/ws", no_model=True)
errs = []
def work():
    for _ in range(10):
        try:
            c.similar(0, 34)
        except Exception as e:
            errs.append(f"{type(e).__name__}: {e} (retry_after={getattr(e, 'retry_after', None)})")
ts = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
print(len(errs), "errors", errs[:1])
