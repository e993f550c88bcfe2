"""Augmentation (n2g-method.md section 4).

Important positions of a pruned prompt: k (1 <= k < pivot) with alpha[k, pivot] >=
augment_importance. Each is replaced, one at a time, by substitutes from the proposers in
FitConfig.proposers, up to n_substitutes from each:

- "model": the model's own next-token predictions at that position (the logits at k-1 of the
  pruned prompt, i.e. what the model expects in place of token k given its left context);
- "embedding": nearest neighbours of token k in the token-embedding matrix W_E (cosine);
- "mlm" (only with FitConfig.mlm_name): a Hugging Face fill-mask model (the paper used
  distilbert-base-uncased) fills the masked word; a proposal is kept when it is one token of the
  model under study (so positions stay aligned).

Never proposed: special tokens, the original token, and any token with the original's label
(it would only repeat the original path). Proposals are de-duplicated across proposers.

Every augmented prompt is run through the model: it is positive if its pivot activation is >=
augment_positive x the pivot activation of the pruned prompt it came from, else negative.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..activations import logits_at
from ..models import LoadedModel


def important_positions(
    alpha: np.ndarray, pivot: int, threshold: float = 0.8, include_pivot: bool = False
) -> list[int]:
    """Positions k in 1..pivot-1 (1..pivot with ``include_pivot``) with alpha[k, pivot] >= threshold."""
    last = pivot + 1 if include_pivot else pivot
    return [k for k in range(1, last) if float(alpha[k, pivot]) >= threshold]


def _excluded(model: LoadedModel, original: int) -> set[int]:
    ex = set(model.special_ids())
    ex.update(model.label_token_ids(model.token_labels()[original]))
    ex.add(int(original))
    return ex


def _take(ranked: Sequence[int], excluded: set[int], n: int) -> list[int]:
    out = []
    for t in ranked:
        t = int(t)
        if t not in excluded and t not in out:
            out.append(t)
            if len(out) == n:
                break
    return out


def propose_model(
    model: LoadedModel,
    requests: Sequence[tuple[Sequence[int], int]],
    n: int,
    batch_tokens: int = 4096,
) -> list[list[int]]:
    """For each (prompt, position k): up to n tokens the model predicts at k from prompt[:k].

    The logits at k-1 depend on prompt[:k] only, so each distinct prompt runs once, cut after its
    last position asked, and only the rows asked are unembedded (:func:`logits_at`).
    """
    if not requests or n <= 0:
        return [[] for _ in requests]
    prefixes: dict[tuple[int, ...], int] = {}  # prompt -> longest prefix needed
    for toks, k in requests:
        key = tuple(int(t) for t in toks)
        prefixes[key] = max(prefixes.get(key, 0), int(k))
    plist = sorted(prefixes, key=lambda key: prefixes[key])
    extra = n + 8 + len(model.special_ids())
    ranked: dict[tuple[tuple[int, ...], int], list[int]] = {}
    asked: dict[tuple[int, ...], set[int]] = {}
    for toks, k in requests:
        asked.setdefault(tuple(int(t) for t in toks), set()).add(int(k) - 1)
    i = 0
    while i < len(plist):
        j = i + 1
        while j < len(plist) and (j + 1 - i) * prefixes[plist[j]] <= batch_tokens:
            j += 1
        chunk = plist[i:j]
        t_max = prefixes[chunk[-1]]
        batch = np.full((len(chunk), t_max), model.pad_id, dtype=np.int64)
        rows, positions, keys = [], [], []
        for r, key in enumerate(chunk):
            batch[r, : prefixes[key]] = key[: prefixes[key]]
            for pos in sorted(asked[key]):
                rows.append(r)
                positions.append(pos)
                keys.append((key, pos))
        logits = logits_at(model, torch.from_numpy(batch), rows, positions)
        top = torch.topk(logits, k=min(extra + 64, logits.shape[-1]), dim=-1).indices.cpu().numpy()
        for key_pos, row in zip(keys, top):
            ranked[key_pos] = row.tolist()
        i = j
    out = []
    for toks, k in requests:
        key = tuple(int(t) for t in toks)
        out.append(_take(ranked[(key, int(k) - 1)], _excluded(model, int(toks[k])), n))
    return out


def propose_embedding(model: LoadedModel, originals: Sequence[int], n: int) -> list[list[int]]:
    """For each token id: up to n nearest neighbours in W_E by cosine similarity."""
    if not originals or n <= 0:
        return [[] for _ in originals]
    emb = model.unit_embeddings()
    ids = torch.as_tensor([int(t) for t in originals], device=emb.device)
    sims = emb[ids] @ emb.T  # [n_orig, d_vocab]
    k = min(n + 16 + len(model.special_ids()), sims.shape[-1])
    top = torch.topk(sims, k=k, dim=-1).indices.cpu().numpy()
    return [_take(top[r], _excluded(model, int(t)), n) for r, t in enumerate(originals)]


class MLMProposer:
    """Fill-mask proposals from a Hugging Face masked language model (loaded on first use)."""

    def __init__(self, name: str, device: torch.device | str | None = None) -> None:
        self.name = name
        self.device = device
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            from transformers import pipeline

            dev = torch.device(self.device) if self.device is not None else torch.device("cpu")
            try:
                self._pipe = pipeline("fill-mask", model=self.name, device=dev)
            except Exception as e:  # noqa: BLE001 - hub/network errors
                raise RuntimeError(f"could not load the masked language model {self.name!r}: {e}") from e
        return self._pipe

    def propose(
        self, model: LoadedModel, requests: Sequence[tuple[Sequence[int], int]], n: int
    ) -> list[list[int]]:
        if not requests or n <= 0:
            return [[] for _ in requests]
        pipe = self._pipeline()
        mask = pipe.tokenizer.mask_token
        out = []
        for toks, k in requests:
            strings = model.decode_tokens(toks[1:])  # without BOS
            kk = int(k) - 1
            lead = strings[kk][: len(strings[kk]) - len(strings[kk].lstrip())]
            text = "".join(strings[:kk]) + lead + mask + "".join(strings[kk + 1 :])
            preds = pipe(text, top_k=max(3 * n, 10))
            if preds and isinstance(preds[0], list):  # several masks in the text
                preds = preds[0]
            cands = []
            for p in preds:
                word = str(p.get("token_str", "")).strip()
                if not word:
                    continue
                ids = model.encode(lead + word)
                if len(ids) == 1:
                    cands.append(ids[0])
            out.append(_take(cands, _excluded(model, int(toks[k])), n))
        return out


def substitute(tokens: Sequence[int], k: int, new_id: int) -> list[int]:
    out = [int(t) for t in tokens]
    out[int(k)] = int(new_id)
    return out
