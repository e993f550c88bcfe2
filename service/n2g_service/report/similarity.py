"""Most similar neurons for each neuron page.

Score (n2g-method.md section 9, as n2g_fast.GraphStore.neighbours defines it): the mean of the
max-normalised overlaps of the activating-label sets and of the context-label sets,
(|A n A'| / max(|A|, |A'|) + |C n C'| / max(|C|, |C'|)) / 2; an empty set overlaps nothing.
Preferred: `n2g_fast.GraphStore.neighbours(key, k)` (Rust, inverted index, parallel). Fallback for
an n2g_fast without GraphStore: the same score computed here through an inverted index.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from typing import Iterable

Key = tuple[int, int]
Neighbour = tuple[Key, float, float, float]  # (key, score, activating overlap, context overlap)
SCORE = "mean of the max-normalised overlaps of the activating-token sets and of the context-token sets"
MAX_POSTING = 5000  # the fallback leaves labels shared by more neurons than this out of its counts


def python_neighbours(labels: dict[Key, tuple[frozenset, frozenset]], k: int) -> dict[Key, list[Neighbour]]:
    """For each neuron, the k others with the highest score > 0 (ties by key)."""
    index: tuple[dict[str, list[Key]], dict[str, list[Key]]] = (defaultdict(list), defaultdict(list))
    for key, sets in labels.items():
        for role in (0, 1):
            for lab in sets[role]:
                index[role][lab].append(key)
    out: dict[Key, list[Neighbour]] = {}
    for key, sets in labels.items():
        counts = (Counter(), Counter())
        for role in (0, 1):
            for lab in sets[role]:
                post = index[role][lab]
                if len(post) <= MAX_POSTING:
                    counts[role].update(post)
        n_act, n_ctx = len(sets[0]), len(sets[1])
        scored = []
        for other in counts[0].keys() | counts[1].keys():
            if other == key:
                continue
            oa, oc = labels[other]
            ov_a = counts[0][other] / max(n_act, len(oa), 1)
            ov_c = counts[1][other] / max(n_ctx, len(oc), 1)
            scored.append((-(ov_a + ov_c) / 2, other, ov_a, ov_c))
        out[key] = [(other, -neg, ov_a, ov_c) for neg, other, ov_a, ov_c in heapq.nsmallest(k, scored)]
    return out


def rust_neighbours(keys: Iterable[Key], blobs: list[bytes], k: int) -> dict[Key, list[Neighbour]] | None:
    """Through n2g_fast.GraphStore (graphs given as to_bytes() blobs); None without GraphStore."""
    import n2g_fast

    store_cls = getattr(n2g_fast, "GraphStore", None)
    if store_cls is None or not hasattr(store_cls, "neighbours"):
        return None
    store = store_cls.from_bytes_list(blobs)
    out = {}
    for key in keys:
        out[key] = [((int(o[0][0]), int(o[0][1])), float(o[1]), float(o[2]), float(o[3]))
                    for o in store.neighbours(key, k)]
    return out
