"""Most similar neurons for each neuron page.

Preferred: `n2g_fast.GraphStore.neighbours(key, k)` (Rust, inverted index; its score). Fallback
(an n2g_fast without GraphStore): the mean of the Jaccard indices of the activating-label sets and
of the context-label sets (n2g-method.md section 9 compares the same two sets), with candidates
drawn from an inverted index so that only neurons sharing a label are compared.
"""

from __future__ import annotations

from collections import defaultdict

Key = tuple[int, int]
FALLBACK_SCORE = "mean of the Jaccard indices of the activating-token sets and the context-token sets"
MAX_POSTING = 5000  # labels shared by more neurons than this do not propose candidates (the fallback's cap)


def _jaccard(a: frozenset, b: frozenset) -> float:
    if not a or not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def python_neighbours(labels: dict[Key, tuple[frozenset, frozenset]], k: int) -> dict[Key, list[tuple[Key, float]]]:
    index: dict[tuple[int, str], list[Key]] = defaultdict(list)
    for key, (act, ctx) in labels.items():
        for lab in act:
            index[(0, lab)].append(key)
        for lab in ctx:
            index[(1, lab)].append(key)
    out: dict[Key, list[tuple[Key, float]]] = {}
    for key, (act, ctx) in labels.items():
        cands: set[Key] = set()
        for role, labs in ((0, act), (1, ctx)):
            for lab in labs:
                post = index[(role, lab)]
                if len(post) <= MAX_POSTING:
                    cands.update(post)
        cands.discard(key)
        scored = []
        for other in cands:
            oa, oc = labels[other]
            s = 0.5 * (_jaccard(act, oa) + _jaccard(ctx, oc))
            if s > 0:
                scored.append((other, s))
        scored.sort(key=lambda t: (-t[1], t[0]))
        out[key] = scored[:k]
    return out


def rust_neighbours(graphs: dict[Key, object], k: int):
    """Neighbours through n2g_fast.GraphStore; None when this n2g_fast has no GraphStore."""
    import n2g_fast

    store_cls = getattr(n2g_fast, "GraphStore", None)
    if store_cls is None or not hasattr(store_cls, "neighbours"):
        return None
    store = store_cls()
    for (layer, neuron), g in graphs.items():
        store.add(g)
    out = {}
    for key in graphs:
        out[key] = [((int(l), int(n)), float(s)) for (l, n), s in store.neighbours(key, k)]
    return out
