"""A LocalN2GClient closed while one of its streams is read: the reader's next item is the
closed-client error every call gives after close(), not sqlite3's ProgrammingError."""

from __future__ import annotations

import pytest

from n2g.client import N2GError
from n2g.local import LocalN2GClient
from n2g_servers import native_workspace


def test_a_stream_of_a_closed_local_client_says_it_is_closed(tmp_path_factory):
    ws = native_workspace(tmp_path_factory, "closed-stream")
    c = LocalN2GClient(ws, no_model=True)
    stream = c.export()
    next(stream)
    c.close()
    with pytest.raises(N2GError) as e:
        list(stream)
    assert e.value.code.name == "FAILED_PRECONDITION" and "closed" in e.value.message
