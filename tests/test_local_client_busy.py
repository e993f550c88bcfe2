"""The in-process client waits out a busy refusal as the network clients do (its threads got
RESOURCE_EXHAUSTED "retry shortly" where N2GClient would have retried)."""

from __future__ import annotations

import threading

import pytest

from n2g.client import N2GError
from n2g.local import LocalN2GClient
from n2g_servers import native_workspace


def _hold_heavy_slots(client, seconds: float | None) -> None:
    """Takes every whole-store computation slot, as other threads' calls would; gives them back
    after `seconds` (None: never)."""
    slots = client.app._heavy_slots
    n = 0
    while slots.acquire(blocking=False):
        n += 1
    if seconds is not None:
        threading.Timer(seconds, lambda: [slots.release() for _ in range(n)]).start()


def test_local_client_retries_busy_refusals_within_the_deadline(tmp_path_factory):
    ws = native_workspace(tmp_path_factory, "busy")
    with LocalN2GClient(ws, no_model=True) as c:
        key = c.list_graphs()[0].key
        _hold_heavy_slots(c, 0.5)
        assert c.similar(*key, timeout=30).neighbours is not None  # a unary call
        _hold_heavy_slots(c, 0.5)
        assert isinstance(list(c.pairs("subset", threshold=0.5, timeout=30)), list)  # a stream, before its first item
        _hold_heavy_slots(c, None)
        with pytest.raises(N2GError) as e:  # past the deadline: the refusal itself, with its hint
            c.similar(*key, timeout=0.5)
        assert e.value.code.name == "RESOURCE_EXHAUSTED" and e.value.retry_after
