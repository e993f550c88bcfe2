"""The layer grammar the command line, the clients and the server share: ``"all"``, ``N``,
``A-B`` (inclusive), and lists of them."""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np

_RANGE_RE = re.compile(r"^\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?$")  # ASCII digits only
# Without the model's layer count a range is still bounded, so a spec cannot ask for a huge set.
MAX_LAYERS = 4096


def _items(spec: str | int | Iterable[int | str]) -> list[str]:
    """The spec's items ("N", "A-B", "all"), split at commas and blanks."""
    if isinstance(spec, (int, np.integer)):
        return [str(int(spec))]
    if isinstance(spec, str):
        return [s for s in re.split(r"[,\s]+", spec.strip()) if s]
    items: list[str] = []
    for s in spec:
        items.extend(_items(s) if isinstance(s, (int, np.integer)) else _items(str(s)))
    return items


def layer_filter(spec: str | int | Iterable[int | str] | None) -> list[int] | None:
    """A listing's layers: None (every layer) for no spec or one that says "all" anywhere, else
    `parse_layers(spec)` (no layer count is needed to filter)."""
    if spec is None or any(item.lower() == "all" for item in _items(spec)):
        return None
    return parse_layers(spec)


def parse_layers(spec: str | int | Iterable[int | str], n_layers: int | None = None) -> list[int]:
    """Layers named by ``spec``, sorted and unique.

    ``spec`` is ``"all"`` (needs ``n_layers``), an int, a string of comma- or space-separated
    items each ``N`` or ``A-B`` (inclusive), or a sequence of such items (``[0, "2-4"]``).
    With ``n_layers`` every layer is checked against the model's range.
    """
    items = _items(spec)
    if not items:
        raise ValueError("no layers asked: give at least one layer (N, A-B, a list, or all)")
    out: set[int] = set()
    for item in items:
        if item.lower() == "all":
            if n_layers is None:
                raise ValueError("layers 'all' needs the model's number of layers")
            out.update(range(n_layers))
            continue
        m = _RANGE_RE.match(item)
        if m is None:
            raise ValueError(f"bad layer spec {item!r}: use N, A-B (inclusive), a list of them, or all")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise ValueError(f"bad layer range {item!r}: the end is before the start")
        # checked before the range is made: "0-99999999999" must not build a huge set
        if n_layers is not None and b >= n_layers:
            raise ValueError(f"layer {max(a, n_layers)} out of range: the model has layers 0..{n_layers - 1}")
        if b >= MAX_LAYERS:
            raise ValueError(f"layer {max(a, MAX_LAYERS)} out of range: at most {MAX_LAYERS} layers")
        out.update(range(a, b + 1))
    return sorted(out)
