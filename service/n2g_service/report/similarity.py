"""Most similar neurons for each neuron page, from n2g_fast.GraphStore.neighbours.

Score (n2g-method.md section 9, as n2g_fast.GraphStore.neighbours defines it): the mean of the
max-normalised overlaps of the activating-label sets and of the context-label sets,
(|A n A'| / max(|A|, |A'|) + |C n C'| / max(|C|, |C'|)) / 2; an empty set overlaps nothing.
"""

from __future__ import annotations

from typing import Iterable

Key = tuple[int, int]
Neighbour = tuple[Key, float, float, float]  # (key, score, activating overlap, context overlap)
SCORE = "mean of the max-normalised overlaps of the activating-token sets and of the context-token sets"


def neighbours(keys: Iterable[Key], blobs: list[bytes], k: int) -> dict[Key, list[Neighbour]]:
    """For each key, its k nearest graphs (graphs given as NeuronGraph.to_bytes() blobs)."""
    import n2g_fast

    store = n2g_fast.GraphStore.from_bytes_list(blobs)
    return {key: [((int(o[0][0]), int(o[0][1])), float(o[1]), float(o[2]), float(o[3]))
                  for o in store.neighbours(key, k)] for key in keys}
