"""Saliency, the token-importance matrix (n2g-method.md section 3).

For a prompt y (y[0] = BOS) and one copy y_k per position k with token k replaced by the mask
token:

    alpha[k, k'] = 1 - a(k', y_k) / a(k', y)      (0 where a(k', y) = 0)

The whole matrix is kept. BOS is never masked (row 0 is zero). In a causal model masking k cannot
change positions before k, so alpha[k, k'] for k' < k is 0 up to float noise; it is computed like
every other entry, not forced. Only the rows that can matter are computed: copies are made for
k = 1 .. upto-1, where ``upto`` is the last position whose activation will be explained (the last
firing token, or the pivot); rows from ``upto`` on are left at 0.

Mask token: FitConfig.mask_token ("pad" = the tokenizer's padding token, as in the reference; see
:meth:`LoadedModel.token_id_for` for the other choices).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def masked_copies(tokens: Sequence[int], mask_id: int, upto: int | None = None) -> list[list[int]]:
    """One copy per position k = 1 .. upto-1 with token k replaced by ``mask_id``."""
    toks = [int(t) for t in tokens]
    upto = len(toks) if upto is None else min(int(upto), len(toks))
    out = []
    for k in range(1, upto):
        c = list(toks)
        c[k] = int(mask_id)
        out.append(c)
    return out


def saliency_from_acts(base: np.ndarray, masked: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """alpha [T, T] from the unmasked activations [T] and masked[k-1] = activations of copy k."""
    base = np.asarray(base, dtype=np.float64)
    t = base.shape[0]
    alpha = np.zeros((t, t), dtype=np.float32)
    if len(masked) == 0:
        return alpha
    m = np.asarray(np.stack([np.asarray(x, dtype=np.float64) for x in masked]))
    nz = base != 0
    ratio = np.divide(m, base[None, :], out=np.ones_like(m), where=nz[None, :])
    alpha[1 : 1 + m.shape[0]] = (1.0 - ratio).astype(np.float32)
    alpha[1 : 1 + m.shape[0], ~nz] = 0.0
    return alpha


def saliency_batch(
    run: Callable[[list[list[int]], list[int]], list[np.ndarray]],
    items: Sequence[tuple[Sequence[int], int, np.ndarray, int]],
    mask_id: int,
) -> list[np.ndarray]:
    """Saliency matrices of many prompts in shared forward passes.

    ``items``: (tokens, neuron, unmasked activations, upto) per prompt.
    """
    seqs: list[list[int]] = []
    neurons: list[int] = []
    spans = []
    for tokens, neuron, _, upto in items:
        copies = masked_copies(tokens, mask_id, upto)
        spans.append((len(seqs), len(copies)))
        seqs.extend(copies)
        neurons.extend([int(neuron)] * len(copies))
    acts = run(seqs, neurons) if seqs else []
    return [
        saliency_from_acts(base, acts[s : s + n]) for (s, n), (_, _, base, _) in zip(spans, items)
    ]
