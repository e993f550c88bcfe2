"""export() stream of a LocalN2GClient read on after close(): sqlite3.ProgrammingError, not N2GError."""
import sys
from n2g.local import LocalN2GClient
c = LocalN2GClient(sys.argv[1] if len(sys.argv) > 1 else "/tmp/pb/ws", no_model=True)
it = c.export(); next(it); c.close()
try:
    list(it); print("no error")
except Exception as e:
    print(type(e).__module__, type(e).__name__, e)
