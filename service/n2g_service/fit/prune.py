"""Pruning (n2g-method.md section 2).

For one example x (token ids, x[0] = BOS) with pivot e (its most activating token, BOS excluded):

1. sentence cut: the example ends with the pivot's sentence (the first token at or after the
   pivot whose string holds '.', '!' or a newline closes it; without one the example runs to its
   end). In a causal model this only bounds the post-context of step 4.
2. candidates: x[e-c .. e] with BOS prepended, for c context tokens before the pivot. Lengths
   c = 0 .. prune_dense-1 are all tried, then every prune_stride-th (the reference: "after the first
   few only every 5th"), at most max_prune_starts candidates; the full prefix c = e-1 ends the list
   when the cap allows, so the fallback is the unpruned prefix.
3. candidates run in rounds of prune_batch (per example; the rounds of all examples of all neurons
   share forward passes). The first candidate, shortest first, whose pivot activation is
   >= prune_threshold x the original pivot activation and whose argmax (BOS excluded) is still the
   pivot is kept; if none passes the longest candidate tried is kept.
4. post-context: up to post_context tokens after the pivot, inside the pivot's sentence, are
   appended.
5. scale factor = original pivot activation / truncated pivot activation.

Every candidate tried also gives one point of the example's activation trajectory (section 9):
(context tokens kept, normalised pivot activation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..config import FitConfig

SENTENCE_END_CHARS = (".", "!", "\n")


def is_sentence_end(token_string: str) -> bool:
    return any(c in token_string for c in SENTENCE_END_CHARS)


def sentence_end(token_strings: Sequence[str], pivot: int) -> int:
    """Index of the last token of the pivot's sentence."""
    for i in range(pivot, len(token_strings)):
        if is_sentence_end(token_strings[i]):
            return i
    return len(token_strings) - 1


def candidate_context_lengths(n_before: int, cfg: FitConfig = FitConfig()) -> list[int]:
    """Context lengths c (tokens kept before the pivot, BOS not counted) to try, shortest first.

    ``n_before`` is the number of real tokens before the pivot (pivot index - 1).
    """
    out: list[int] = []
    c = 0
    while c <= n_before and len(out) < cfg.max_prune_starts:
        out.append(c)
        c = c + 1 if c + 1 < cfg.prune_dense else c + cfg.prune_stride
    if out[-1] != n_before and len(out) < cfg.max_prune_starts:
        out.append(n_before)
    return out


def candidate_tokens(tokens: np.ndarray, pivot: int, c: int, bos_id: int) -> list[int]:
    """BOS + x[pivot-c .. pivot]."""
    return [int(bos_id)] + [int(t) for t in tokens[pivot - c : pivot + 1]]


def candidate_passes(acts: np.ndarray, original_pivot_act: float, threshold: float) -> bool:
    """Pivot (last position) >= threshold x original, and still the argmax (BOS excluded)."""
    piv = float(acts[-1])
    return piv >= threshold * original_pivot_act and piv >= float(np.max(acts[1:]))


@dataclass
class PruneState:
    """Search state of one example (all fields filled in by :func:`prune_examples`)."""

    tokens: np.ndarray  # original example, tokens[0] = BOS
    acts: np.ndarray  # original activations of the neuron
    neuron: int
    pivot: int
    cut_end: int
    candidates: list[int]
    next: int = 0
    tried: list[tuple[int, float]] = field(default_factory=list)  # (c, raw pivot activation)
    chosen: int | None = None
    chosen_act: float = 0.0

    @property
    def original_pivot_act(self) -> float:
        return float(self.acts[self.pivot])


@dataclass
class Pruned:
    """A pruned prompt: BOS + context + pivot + post-context."""

    tokens: list[int]
    pivot: int  # index of the pivot in ``tokens``
    context_len: int  # tokens kept before the pivot (BOS not counted)
    scale: float  # original pivot activation / truncated pivot activation
    original_pivot_act: float
    truncated_pivot_act: float
    trajectory: list[tuple[int, float]]  # (context_len, pivot act / a_max), by context_len


def find_pivot(acts: np.ndarray) -> int:
    """Most activating position, BOS (position 0) excluded."""
    if len(acts) < 2:
        raise ValueError("an example needs at least one token after BOS")
    return 1 + int(np.argmax(acts[1:]))


def prune_examples(
    run: Callable[[list[list[int]], list[int]], list[np.ndarray]],
    examples: Sequence[tuple[np.ndarray, np.ndarray, int]],
    token_strings: Callable[[Sequence[int]], list[str]],
    bos_id: int,
    max_activation: Callable[[int], float],
    cfg: FitConfig = FitConfig(),
) -> list[Pruned]:
    """Prunes many examples at once.

    ``examples``: (tokens, original activations, neuron) per example. ``run(sequences, neurons)``
    returns the activations of neuron ``neurons[j]`` on ``sequences[j]`` (one shared batched pass).
    """
    states: list[PruneState] = []
    for tokens, acts, neuron in examples:
        pivot = find_pivot(acts)
        strings = token_strings(tokens)
        states.append(
            PruneState(
                tokens=np.asarray(tokens),
                acts=np.asarray(acts, dtype=np.float32),
                neuron=int(neuron),
                pivot=pivot,
                cut_end=sentence_end(strings, pivot),
                candidates=candidate_context_lengths(pivot - 1, cfg),
            )
        )
    for st in states:
        if st.original_pivot_act <= 0:  # nothing to keep: no pruning
            st.chosen, st.chosen_act = st.pivot - 1, st.original_pivot_act
    while True:
        seqs, neurons, owners = [], [], []
        for si, st in enumerate(states):
            if st.chosen is not None:
                continue
            for c in st.candidates[st.next : st.next + cfg.prune_batch]:
                seqs.append(candidate_tokens(st.tokens, st.pivot, c, bos_id))
                neurons.append(st.neuron)
                owners.append((si, c))
        if not seqs:
            break
        results = run(seqs, neurons)
        by_state: dict[int, list[tuple[int, np.ndarray]]] = {}
        for (si, c), a in zip(owners, results):
            by_state.setdefault(si, []).append((c, a))
        for si, items in by_state.items():
            st = states[si]
            for c, a in items:  # shortest first
                st.tried.append((c, float(a[-1])))
                if st.chosen is None and candidate_passes(a, st.original_pivot_act, cfg.prune_threshold):
                    st.chosen, st.chosen_act = c, float(a[-1])
            st.next += len(items)
            if st.chosen is None and st.next >= len(st.candidates):
                st.chosen, st.chosen_act = st.tried[-1]  # none passed: the longest
    out: list[Pruned] = []
    for st in states:
        c = int(st.chosen)  # type: ignore[arg-type]
        post_end = min(st.pivot + cfg.post_context, st.cut_end)
        toks = candidate_tokens(st.tokens, st.pivot, c, bos_id) + [
            int(t) for t in st.tokens[st.pivot + 1 : post_end + 1]
        ]
        a_max = max_activation(st.neuron)
        traj = sorted({cc: act / a_max for cc, act in st.tried}.items())
        full = st.pivot - 1
        if all(cc != full for cc, _ in traj):  # the unpruned example is the last point
            traj.append((full, st.original_pivot_act / a_max))
        trunc = st.chosen_act
        scale = st.original_pivot_act / trunc if trunc > 0 else 1.0
        out.append(
            Pruned(
                tokens=toks,
                pivot=c + 1,
                context_len=c,
                scale=float(scale),
                original_pivot_act=st.original_pivot_act,
                truncated_pivot_act=float(trunc),
                trajectory=[(int(cc), float(v)) for cc, v in traj],
            )
        )
    return out
