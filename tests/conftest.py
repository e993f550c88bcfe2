"""Shared fixtures: a tiny native random model (fast) and the real default model (session-wide,
loaded once; tests that use it are marked ``real_model``)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
for sub in ("service", "python_client"):
    p = str(ROOT / sub)
    if p not in sys.path:
        sys.path.insert(0, p)


@pytest.fixture(autouse=True)
def signal_handlers_left_as_found():
    """A test that runs `serve` in-process must leave SIGINT/SIGTERM as it found them: a handler
    left behind is inherited by forked workers (multiprocessing pools), where a terminate's SIGTERM
    raised SystemExit before the worker's exit code was set and the worker ran the rest of the
    suite while pytest waited for it for ever."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    changed = [signal.Signals(sig).name for sig, h in before.items() if signal.getsignal(sig) is not h]
    for sig, handler in before.items():
        signal.signal(sig, handler)
    assert not changed, f"the test left its own handler for {', '.join(changed)}"


@pytest.fixture(scope="session")
def native_model():
    from n2g_service.models import native_random_model

    return native_random_model(n_layers=2, d_model=64, d_mlp=128, seed=0)


@pytest.fixture(scope="session")
def native_windows(native_model):
    from n2g_service.corpus import load_texts, make_windows

    return make_windows(native_model, load_texts("fortunes")[:600], window_tokens=32)


@pytest.fixture(scope="session")
def real_model():
    from n2g_service.models import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="session")
def real_windows(real_model):
    """The first 256 windows of the default corpus (64 tokens each)."""
    from n2g_service.corpus import load_texts, make_windows

    return make_windows(real_model, load_texts("fortunes"), window_tokens=64, max_windows=256)


@pytest.fixture(scope="session")
def real_scan0(real_model, real_windows):
    """Layer-0 scan of ``real_windows``."""
    from n2g_service.config import ScanConfig
    from n2g_service.scan import scan_layers

    return scan_layers(real_model, real_windows, [0], ScanConfig(k=20, batch_size=32), progress=False)[0]


def pick_neurons(scan, candidates, n, min_score=0.0):
    """The first ``n`` candidate neurons whose 20th best window still has a positive score."""
    out = []
    for c in candidates:
        if scan.max_activation[c] > 0 and np.isfinite(scan.top_scores[c]).all() and scan.top_scores[c][-1] > min_score:
            out.append(int(c))
        if len(out) == n:
            break
    return out
