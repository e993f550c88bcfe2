"""Learning from more than the training windows: the "calibrated" fit's extra stages.

The paper fits a graph on 10 windows where the neuron fires hardest; on ordinary text it then
misses the tokens it never saw fire, and a token that fired once becomes a path even where the
same token mostly leaves the neuron silent. The calibrated fit adds:

- more positives: further top windows of the scan (:attr:`TrainingPool.top`, ranks after the
  paper's train and test windows) go through the whole paper fit with the training windows;
- ordinary windows: a seeded random sample of the usable corpus windows (one shared pass for the
  layer), where the neuron fires at the levels and rates it has on ordinary text;
- a vocabulary sweep (:func:`vocabulary_sweep`): every token in a neutral prompt; the tokens on
  which the neuron fires there are candidates the windows never showed;
- real occurrences: for each activating label of the fitted graph, each label that fires in the
  windows above and each swept candidate, corpus windows holding it (:func:`select_occurrences`),
  and, with ``FitConfig.max_path_windows`` > 0, for each firing path those windows still match
  too rarely (a context path, mostly), windows where it matches
  (:func:`select_path_occurrences`), run through the model for their true activations;
- calibration (:func:`calibrate_paths`), on those occurrences and the training windows:
  every path matched at >= calibrate_min_support tokens takes the mean true activation there as
  its END, kept on the firing side only if >= a fire rate of those tokens fire: the neuron's own,
  half the F1 its graph calibrated at calibrate_fire_rate reaches (``FitConfig.fire_rate_f1``) (with
  ``FitConfig.fire_rate_from`` "ordinary", both measured off the top windows, which overstate how
  often a path fires: fewer false fires, but less paper-protocol recall at depth; a context
  path survives as a firing path only where it separates firing from non-firing occurrences;
  a token that alone over-fires stops firing alone); tokens that fire without any path get one
  (learn_tokens); an over-firing token learns context tokens at offsets 1..context_offsets whose
  matches do fire (:func:`learn_contexts`); a swept candidate that never occurs in the usable
  corpus keeps its sweep activation as END if that fires (nothing real contradicts it);
- start tokens (:func:`start_paths`): at the first token after BOS a neuron's activation is a
  function of that token alone, so it is measured, not estimated: each frequent corpus token t in
  [BOS, t] (one shared pass per layer, :func:`first_token_activations`); the labels on which the
  neuron fires there get a path [label, BOS] (BOS as the context at offset 1). Every other stage
  then learns from positions >= 2 only: a token that fires only at the start of a text is not a
  token that fires;
- graded tokens (:func:`graded_paths`): a graph that only says where the neuron fires predicts 0
  everywhere else, so its predictions cannot follow the neuron's ordinary level (the correlation
  score); the labels that carry most of that level in the ordinary and occurrence windows get
  token paths whose END is their mean there, kept below the firing threshold. A label's mean over
  a few occurrences is noisy and most labels never occur in the windows, so the frequent tokens
  measured in real contexts (each after a few seeded corpus prefixes, :func:`context_prefixes`,
  one pass a prefix for the layer) serve as a prior: a line from a label's mean value there to its
  mean in the windows, fitted per neuron, shrinks the one and fills in the other
  (``FitConfig.graded_prior``). They change no fire; search, similarity and drawings leave them
  out (``n2g_fast``: paths that cannot fire);
- token ids (:func:`split_labels`): a label stands for several ids, which a neuron that is a
  function of its token (:func:`token_share` over the same real contexts) treats apart; there
  token paths are decided per id, the ids that fire alone apart from the rest, and the rarer
  corpus tokens are measured too (:func:`measure_tokens`, once a layer has such a neuron).

Windows the evaluation holds out (:attr:`TrainingPool.usable` False) and each neuron's test
windows (:attr:`TrainingPool.exclude`) are never drawn. Every window drawn is returned with its
true activations (``FitResult.extra_train``) so the baselines are fitted on the same windows.

Matching uses the graph's own semantics: a path's matches are where a graph holding that path
alone predicts (``n2g_fast`` all-paths walk), so the statistics are those of the path as it
predicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Mapping, Sequence

import numpy as np

from ..config import FitConfig
from .paths import Path


@dataclass
class TrainingPool:
    """Corpus windows a fit may learn from beyond the training windows it is given.

    ``windows``: every corpus window (int64 [n, T], BOS first), indexed by window id.
    ``usable``: bool [n]; False for windows no fit may see (the evaluation's held-out text).
    ``exclude``: per neuron, window ids it must never see (its test windows).
    ``top``: per neuron, further top windows of the scan, best first (the ranks after the paper's
    train + test windows).
    """

    windows: np.ndarray
    usable: np.ndarray | None = None
    exclude: Mapping[int, Collection[int]] = field(default_factory=dict)
    top: Mapping[int, Sequence[int]] = field(default_factory=dict)
    _index: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    _counts: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.windows = np.asarray(self.windows, dtype=np.int64)
        if self.windows.ndim != 2 or self.windows.shape[1] < 2:
            raise ValueError("TrainingPool.windows must be int64 [n_windows, tokens >= 2]")
        n = self.windows.shape[0]
        if self.usable is None:
            self.usable = np.ones(n, dtype=bool)
        self.usable = np.asarray(self.usable, dtype=bool)
        if self.usable.shape != (n,):
            raise ValueError(f"TrainingPool.usable must be bool [{n}], got shape {self.usable.shape}")
        for what, d in (("exclude", self.exclude), ("top", self.top)):
            for neuron, ids in d.items():
                bad = [int(i) for i in ids if not 0 <= int(i) < n]
                if bad:
                    raise ValueError(f"TrainingPool.{what}[{neuron}]: window ids {bad[:5]} out of range 0..{n - 1}")

    def allowed(self, neuron: int) -> np.ndarray:
        """bool [n]: the windows ``neuron`` may learn from."""
        ok = self.usable.copy()
        ex = [int(i) for i in self.exclude.get(int(neuron), ())]
        if ex:
            ok[ex] = False
        return ok

    def top_windows(self, neuron: int, k: int) -> list[int]:
        """Up to ``k`` further top windows of ``neuron`` that it may learn from, best first."""
        ok = self.allowed(neuron)
        out: list[int] = []
        for i in self.top.get(int(neuron), ()):
            i = int(i)
            if i >= 0 and ok[i] and i not in out:
                out.append(i)
                if len(out) == k:
                    break
        return out

    def token_counts(self) -> np.ndarray:
        """int64 [max id + 1]: how often each token id occurs after BOS in the usable windows."""
        if self._counts is None:
            self._counts = np.bincount(self.windows[self.usable, 1:].ravel())
        return self._counts

    def candidates(self, ok: np.ndarray, token_ids: Sequence[int], seen: Collection[int]) -> np.ndarray:
        """Sorted ids of the windows holding any of ``token_ids`` that ``ok`` (bool [n], from
        :meth:`allowed`) allows and ``seen`` does not hold: where a neuron may draw them from."""
        w = self.windows_with(token_ids)
        w = w[ok[w]]
        return w[~np.isin(w, np.fromiter((int(i) for i in seen), dtype=np.int64, count=len(seen)))] if seen else w

    def windows_with(self, token_ids: Sequence[int]) -> np.ndarray:
        """Sorted ids of the windows holding any of ``token_ids`` after BOS."""
        if self._index is None:
            flat = self.windows[:, 1:].ravel()
            order = np.argsort(flat, kind="stable")
            self._index = (flat[order], order // (self.windows.shape[1] - 1))
        keys, owner = self._index
        parts = []
        for t in token_ids:
            lo, hi = np.searchsorted(keys, int(t), "left"), np.searchsorted(keys, int(t), "right")
            parts.append(owner[lo:hi])
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def training_pool(
    windows: np.ndarray,
    top_window_ids: np.ndarray,
    neurons: Sequence[int],
    n_paper: int,
    test_ids: Mapping[int, Collection[int]],
    heldout: Collection[int] = (),
) -> TrainingPool:
    """The pool of a build: the corpus windows, the held-out windows unusable, each neuron's test
    windows excluded, and its scan ranks from ``n_paper`` on (after the paper's train + test
    windows) as further top windows.

    ``top_window_ids``: the scan's [d_mlp, k] window ids (-1 pads); ``test_ids[n]``: the window
    ids of neuron n's test windows."""
    usable = np.ones(len(windows), dtype=bool)
    held = [int(i) for i in heldout]
    if held:
        usable[held] = False
    top = {int(n): [int(i) for i in np.asarray(top_window_ids[n])[n_paper:] if i >= 0] for n in neurons}
    return TrainingPool(windows, usable, {int(n): set(int(i) for i in test_ids[n]) for n in neurons}, top)


def select_occurrences(
    pool: TrainingPool,
    neuron: int,
    label_ids: Sequence[Sequence[int]],
    skip: Collection[int],
    cfg: FitConfig,
    rng: np.random.Generator,
) -> list[int]:
    """Window ids holding the labels' tokens: per label (in the order given) up to
    cfg.occurrence_windows allowed windows not in ``skip`` drawn at random, at most
    cfg.max_occurrence_windows in all."""
    ok = pool.allowed(neuron)
    taken: list[int] = []
    seen = set(int(i) for i in skip)
    for ids in label_ids:
        if len(taken) >= cfg.max_occurrence_windows:
            break
        cand = pool.candidates(ok, ids, seen)
        k = min(cfg.occurrence_windows, cfg.max_occurrence_windows - len(taken), len(cand))
        if k <= 0:
            continue
        pick = sorted(int(cand[i]) for i in rng.choice(len(cand), size=k, replace=False))
        taken.extend(pick)
        seen.update(pick)
    return taken


def select_path_occurrences(
    pool: TrainingPool,
    neuron: int,
    paths: Sequence[Path],
    drawn: Collection[int],
    skip: Collection[int],
    graph_factory,
    cfg: FitConfig,
    rng: np.random.Generator,
) -> list[int]:
    """Window ids where the firing paths that the ordinary windows ``drawn`` so far match at fewer
    than cfg.calibrate_min_support tokens do match: per such path up to cfg.occurrence_windows
    allowed windows not in ``drawn`` or ``skip``, drawn at random (among at most
    cfg.path_candidates windows holding its activating token), at most cfg.max_path_windows in
    all. A context path is rarer than its token: without these it would keep the paper's END, or
    be measured on the top windows, which overstate how often it fires."""
    if cfg.max_path_windows <= 0 or cfg.occurrence_windows <= 0:
        return []
    ok = pool.allowed(neuron)
    seen = set(int(i) for i in drawn) | set(int(i) for i in skip)
    have = sorted(int(i) for i in drawn)
    taken: list[int] = []
    for path in unique_paths(paths):
        if len(taken) >= cfg.max_path_windows:
            break
        if path[2] < cfg.activation_threshold:
            continue
        rows = have + taken
        if rows and int(path_matches(graph_factory, path, pool.windows[rows]).sum()) >= cfg.calibrate_min_support:
            continue
        cand = pool.candidates(ok, path[0][1], seen)
        if cand.size > cfg.path_candidates:
            cand = np.sort(rng.choice(cand, size=cfg.path_candidates, replace=False))
        if cand.size == 0:
            continue
        cand = cand[path_matches(graph_factory, path, pool.windows[cand]).any(axis=1)]
        k = min(cfg.occurrence_windows, cfg.max_path_windows - len(taken), cand.size)
        if k <= 0:
            continue
        pick = sorted(int(w) for w in rng.choice(cand, size=k, replace=False))
        taken.extend(pick)
        seen.update(pick)
    return taken


def _path_key(path: Path) -> tuple:
    activating, context, _ = path
    return (activating[0], tuple(None if c is None else c[0] for c in context))


def unique_paths(paths: Sequence[Path]) -> list[Path]:
    """One path per (activating label, context labels), values folded by max as the trie does."""
    merged: dict[tuple, Path] = {}
    for activating, context, end in paths:
        key = _path_key((activating, context, end))
        have = merged.get(key)
        if have is None:
            merged[key] = (tuple(activating), list(context), float(end))
            continue
        (lab, ids, act), ctx, e = have
        new_ctx = [
            None if a is None else (a[0], a[1], max(a[2], b[2])) for a, b in zip(ctx, context)
        ]
        merged[key] = ((lab, ids, max(act, activating[2])), new_ctx, max(e, float(end)))
    return list(merged.values())


def path_matches(graph_factory, path: Path, tokens: np.ndarray) -> np.ndarray:
    """bool [W, T]: where ``path`` alone predicts on ``tokens`` (BOS column never)."""
    activating, context, _ = path
    m = np.zeros(tokens.shape, dtype=bool)
    rows = np.flatnonzero(np.isin(tokens[:, 1:], np.asarray(activating[1], dtype=np.int64)).any(axis=1))
    if rows.size == 0:  # only windows holding the activating token can match
        return m
    g = graph_factory()
    g.add_path((activating[0], activating[1], 1.0), context, 1.0)
    m[rows] = np.asarray(g.predict(tokens[rows], semantics="all_paths_max")) > 0
    m[:, 0] = False
    return m


@dataclass
class Calibration:
    """What calibration did to one neuron's paths (for its stats)."""

    n_paths_in: int = 0
    n_calibrated: int = 0  # paths with enough support to take their END from the occurrences
    n_stopped_firing: int = 0  # calibrated paths that fired before and no longer do
    n_tokens_learnt: int = 0
    n_contexts_learnt: int = 0
    n_tokens_swept: int = 0  # swept tokens with no occurrence to check them, kept on their sweep value
    n_graded: int = 0  # token paths below the threshold that carry the neuron's ordinary level
    n_start: int = 0  # paths [label, BOS]: the labels it fires on as the first token of a text
    n_labels_split: int = 0  # labels whose ids fire apart (split_labels)


def calibrate_paths(
    paths: Sequence[Path],
    tokens: np.ndarray,
    true: np.ndarray,
    valid: np.ndarray,
    graph_factory,
    cfg: FitConfig,
    cal: Calibration,
    ordinary: np.ndarray | None = None,
) -> list[Path]:
    """Each unique path's END from the true normalised activations ``true`` [W, T] where it
    matches ``tokens`` [W, T] at ``valid`` positions (see the module doc); paths with too little
    support keep theirs. ``ordinary`` (bool [W, T], within ``valid``): the positions of windows not
    chosen for the neuron's activation; a path with enough support there is measured there only
    (top windows overstate how often a token fires)."""
    thr = cfg.activation_threshold
    below = float(np.nextafter(np.float32(thr), np.float32(0)))
    out: list[Path] = []
    for path in unique_paths(paths):
        cal.n_paths_in += 1
        m = path_matches(graph_factory, path, tokens) & valid
        m = _measured(m, ordinary, cfg)
        n = int(m.sum())
        if n < cfg.calibrate_min_support:
            out.append(path)
            continue
        vals = true[m]
        end = max(float(vals.mean()), 0.0)
        fires = float(np.mean(vals >= thr)) >= cfg.calibrate_fire_rate
        end = max(end, thr) if fires else min(end, below)
        cal.n_calibrated += 1
        cal.n_stopped_firing += int(path[2] > thr and not fires)
        activating, context, _ = path
        out.append(((activating[0], activating[1], end), context, end))
    return out


def _measured(m: np.ndarray, ordinary: np.ndarray | None, cfg: FitConfig) -> np.ndarray:
    """The positions of ``m`` to measure a path's fire rate on: those in ``ordinary`` windows when
    they are at least cfg.calibrate_min_support (and cfg.fire_rate_from is "ordinary"), else all."""
    if ordinary is None or cfg.fire_rate_from != "ordinary":
        return m
    mo = m & ordinary
    return mo if int(mo.sum()) >= cfg.calibrate_min_support else m


def learn_contexts(
    label: str,
    label_ids: Sequence[int],
    tokens: np.ndarray,
    true: np.ndarray,
    valid: np.ndarray,
    label_of: np.ndarray,
    label_names: Sequence[str],
    ids_of,
    cfg: FitConfig,
) -> list[Path]:
    """Firing paths [label, IGNORE x (d-1), context] for the context labels at offset d
    (1..cfg.context_offsets) under which ``label`` fires: matched at >= calibrate_min_support
    tokens, at least two of them firing, >= calibrate_fire_rate firing. At most 3 per offset, the
    most firing matches first."""
    thr = cfg.activation_threshold
    w, i = np.nonzero(np.isin(tokens, np.asarray(label_ids, dtype=np.int64)) & valid)
    keep = i >= 1
    w, i = w[keep], i[keep]
    if w.size == 0:
        return []
    fire = true[w, i] >= thr
    out: list[Path] = []
    for d in range(1, cfg.context_offsets + 1):
        ok = i - d >= 1  # BOS is never context
        if not ok.any():
            break
        ctx = label_of[tokens[w[ok], i[ok] - d]]
        f = fire[ok]
        vals = true[w[ok], i[ok]]
        uniq, inv = np.unique(ctx, return_inverse=True)
        n = np.bincount(inv, minlength=uniq.size)
        nf = np.bincount(inv, weights=f.astype(np.float64), minlength=uniq.size)
        s = np.bincount(inv, weights=vals.astype(np.float64), minlength=uniq.size)
        good = (n >= cfg.calibrate_min_support) & (nf >= 2) & (nf / np.maximum(n, 1) >= cfg.calibrate_fire_rate)
        for j in sorted(np.flatnonzero(good), key=lambda j: (-nf[j], int(uniq[j])))[:3]:
            name = label_names[int(uniq[j])]
            end = max(float(s[j] / n[j]), thr)
            rate = float(nf[j] / n[j])
            context = [None] * (d - 1) + [(name, ids_of(name), min(max(rate, 0.0), 1.0))]
            out.append(((label, list(label_ids), end), context, end))
    return out


def learn_from_misses(
    predicted: np.ndarray,
    tokens: np.ndarray,
    true: np.ndarray,
    valid: np.ndarray,
    label_of: np.ndarray,
    label_names: Sequence[str],
    ids_of,
    cfg: FitConfig,
    cal: Calibration,
    ordinary: np.ndarray | None = None,
) -> list[Path]:
    """New paths for the firing tokens the calibrated graph misses (``predicted`` [W, T] below
    the threshold where ``true`` fires). Per label of a missed token: a token path if its
    occurrences fire often enough (with cfg.learn_tokens; measured as :func:`calibrate_paths`
    does, on ``ordinary`` positions where there are enough), else the contexts that separate its
    firing occurrences (:func:`learn_contexts`)."""
    thr = cfg.activation_threshold
    missed = (true >= thr) & (predicted < thr) & valid
    missed[:, 0] = False
    out: list[Path] = []
    for lab_i in np.unique(label_of[tokens[missed]]):
        name = label_names[int(lab_i)]
        ids = ids_of(name)
        occ = np.isin(tokens, np.asarray(ids, dtype=np.int64)) & valid
        occ[:, 0] = False
        vals = true[_measured(occ, ordinary, cfg)]
        rate = float(np.mean(vals >= thr))
        if rate >= cfg.calibrate_fire_rate:
            if cfg.learn_tokens:
                end = max(float(vals.mean()), thr)
                out.append(((name, ids, end), [], end))
                cal.n_tokens_learnt += 1
            continue
        learnt = learn_contexts(name, ids, tokens, true, valid, label_of, label_names, ids_of, cfg)
        cal.n_contexts_learnt += len(learnt)
        out.extend(learnt)
    return out


def split_labels(
    paths: Sequence[Path],
    tokens: np.ndarray,
    true: np.ndarray,
    valid: np.ndarray,
    measured: tuple[np.ndarray, np.ndarray] | None,
    label_of: np.ndarray,
    label_names: Sequence[str],
    ids_of,
    token_strings: Sequence[str],
    cfg: FitConfig,
    cal: "Calibration",
) -> list[Path]:
    """Token paths decided per token id, not per label. A label stands for several ids (" the",
    "The", "the"...), which a neuron can treat apart (at layer 0 a neuron is nearly a function of
    the id). Per id: its occurrences at ``valid`` positions of ``tokens`` [W, T] (true normalised
    activations ``true``) and, for the frequent ids, its values in real contexts (``measured``:
    ids [n], values [C, n]), each context counted as one occurrence. An id with >=
    cfg.calibrate_min_support of them fires alone if >= cfg.calibrate_fire_rate of them fire.

    Per label with an id that fires alone (ids without enough support follow the label's token
    path; a label none of whose ids fires alone is left to :func:`calibrate_paths`): if every id fires and
    the label has no firing token path, it gets one; if only some ids S fire, S gets a firing token
    path of its own, END = S's mean, and the others R keep the label's token path below the
    threshold, END = R's mean. S keeps the label's name where no context path starts at the label
    (a search for the label still finds it) and R's path takes :func:`split_name` (no label of the
    vocabulary, nor of the graph); where context paths start at the label (they match every id of
    it), S takes the split name."""
    thr = cfg.activation_threshold
    below = float(np.nextafter(np.float32(thr), np.float32(0)))
    v = len(label_of)
    t = tokens[valid]
    a = true[valid].astype(np.float64)
    n = np.bincount(t, minlength=v).astype(np.float64)[:v]
    f = np.bincount(t, weights=(a >= thr).astype(np.float64), minlength=v)[:v]
    s = np.bincount(t, weights=a, minlength=v)[:v]
    if measured is not None and len(measured[0]):
        ids, values = np.asarray(measured[0], dtype=np.int64), np.asarray(measured[1], dtype=np.float64)
        n[ids] += values.shape[0]
        f[ids] += (values >= thr).sum(axis=0)
        s[ids] += values.sum(axis=0)
    ok = n >= cfg.calibrate_min_support
    fires = ok & (f >= cfg.calibrate_fire_rate * n)
    token_end: dict[str, float] = {}
    with_context: set[str] = set()
    for (name, _, _), ctx, end in paths:
        if any(c is not None for c in ctx):
            with_context.add(name)
        else:
            token_end[name] = max(token_end.get(name, float("-inf")), float(end))
    names = {act[0] for act, _, _ in paths} | set(label_names)  # a split name is no label

    def mean(group: list[int]) -> float:
        return float(s[group].sum() / n[group].sum()) if n[group].sum() > 0 else 0.0

    out = list(paths)
    for j in np.unique(label_of[np.flatnonzero(fires)]):
        name = label_names[int(j)]
        lid = [int(i) for i in ids_of(name)]
        cur = token_end.get(name, 0.0) >= thr
        S = [i for i in lid if fires[i] or (cur and not ok[i])]
        R = [i for i in lid if i not in S]
        if not R:
            if not cur:  # every id fires alone: the label does
                end = max(mean(S), thr)
                out.append(((name, lid, end), [], end))
                cal.n_tokens_learnt += 1
            continue
        end_s, end_r = max(mean(S), thr), min(mean(R), below)
        keep = [p for p in out if not (p[0][0] == name and not any(c is not None for c in p[1]))]
        if name in with_context:  # the label's node matches every id: S apart, R on the label
            if name in token_end:
                keep.append(((name, lid, end_r), [], end_r))
            other = split_name([token_strings[i] for i in S], names)
            keep.append(((other, S, end_s), [], end_s))
        else:
            keep.append(((name, S, end_s), [], end_s))
            if name in token_end or abs(end_r) >= cfg.graded_floor:
                other = split_name([token_strings[i] for i in R], names)
                keep.append(((other, R, end_r), [], end_r))
        names.add(keep[-1][0][0])
        out = keep
        cal.n_labels_split += 1
    return out


def token_share(values: np.ndarray) -> float:
    """The share of a neuron's variance over real contexts that the token id explains: ``values``
    [C, n] (n tokens, each in the same C contexts), 1 - mean within-token variance / total
    variance (0 where nothing varies). Near 1: the neuron is a function of the token, and
    per-id decisions (:func:`split_labels`) are safe; lower, context decides."""
    values = np.asarray(values, dtype=np.float64)
    total = float(values.var()) if values.size else 0.0
    if total <= 0:
        return 0.0
    return 1.0 - float(values.var(axis=0).mean()) / total


def split_name(strings: Sequence[str], taken: Collection[str]) -> str:
    """The name of a label's ids apart from it: their token strings quoted, joined by "|"
    (" The" -> '" The"'), with "'" added until no name in ``taken`` has it."""
    import json

    name = "|".join(json.dumps(x, ensure_ascii=False) for x in strings)
    while name in taken:
        name += "'"
    return name


def label_means(values: np.ndarray, token_ids: np.ndarray, counts: np.ndarray,
                label_of: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label of ``token_ids`` [n]: (label indices, the ``counts``-weighted mean of ``values``
    [n] over its ids, the summed counts), labels ascending."""
    labs = label_of[np.asarray(token_ids, dtype=np.int64)]
    w = np.asarray(counts, dtype=np.float64)
    uniq, inv = np.unique(labs, return_inverse=True)
    n = np.bincount(inv, weights=w, minlength=uniq.size)
    mean = np.bincount(inv, weights=w * np.asarray(values, dtype=np.float64), minlength=uniq.size) / np.maximum(n, 1e-12)
    return uniq, mean, n


def _weighted_line(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Weighted least squares y ~ a + b x: (a, b); b = 0 where x does not vary."""
    sw = float(w.sum())
    xm, ym = float((w * x).sum()) / sw, float((w * y).sum()) / sw
    vx = float((w * (x - xm) ** 2).sum())
    b = float((w * (x - xm) * (y - ym)).sum()) / vx if vx > 0 else 0.0
    return ym - b * xm, b


def graded_paths(
    tokens: np.ndarray,
    true: np.ndarray,
    valid: np.ndarray,
    label_of: np.ndarray,
    label_names: Sequence[str],
    ids_of,
    have: Collection[str],
    cfg: FitConfig,
    measured: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> list[Path]:
    """Token paths that never fire, for the labels whose mean normalised activation in ``true``
    [W, T] (at ``valid`` positions of ordinary and occurrence windows, not top windows: those
    overstate a token's usual level) is at least cfg.graded_floor away from 0 (either sign: a
    neuron held below 0 is graded too) over >= cfg.graded_min_support tokens; labels in ``have``
    (already a token path) are skipped. END = the mean, kept below the firing threshold; at most
    cfg.graded_tokens, largest count x mean^2 first (the share of the activations' variance the
    path predicts).

    ``measured`` (label indices, the neuron's measured normalised activation on each label in a
    neutral prompt, the label's corpus count; :func:`label_means` of :func:`prompt_activations`), with
    cfg.graded_prior > 0: a line fitted from a label's measured value to its mean in the windows
    (weighted by support) predicts each label's level; where it rises, a label seen n times takes
    (n x mean + graded_prior x line) / (n + graded_prior), a label the windows never showed takes
    the line, and the largest corpus count x END^2 come first. A mean over one or two occurrences
    is mostly noise; the measured value is known for every frequent token."""
    if cfg.graded_tokens <= 0 or not valid.any():
        return []
    below = float(np.nextafter(np.float32(cfg.activation_threshold), np.float32(0)))
    # per label index: occurrences and mean in the windows
    labs, size = label_of[tokens[valid]], len(label_names)
    n = np.bincount(labs, minlength=size).astype(np.float64)
    mean = np.bincount(labs, weights=true[valid].astype(np.float64), minlength=size) / np.maximum(n, 1)
    ok = n >= cfg.graded_min_support
    weight = n
    if measured is not None and cfg.graded_prior > 0:
        m_lab, m_val, m_count = measured
        both = n[m_lab] > 0  # measured labels the windows show too
        if both.sum() >= 8:
            a, b = _weighted_line(m_val[both], mean[m_lab[both]], n[m_lab[both]])
            if b > 0:  # a line that falls or is flat says nothing about the labels
                # every label seen or measured: its shrunk mean, ranked by how often it occurs
                k, line = np.zeros(size), np.zeros(size)
                k[m_lab], line[m_lab] = float(cfg.graded_prior), a + b * m_val
                mean = (n * mean + k * line) / np.maximum(n + k, 1e-12)
                weight = n.copy()  # a label not measured is a rare one: its count in the windows
                weight[m_lab] = np.maximum(weight[m_lab], m_count)
                ok |= k > 0
    ok &= np.abs(mean) >= cfg.graded_floor
    skip = set(have)
    cand = np.flatnonzero(ok)
    # largest count x mean^2 first, ties by label index; sorted in numpy (tens of thousands of
    # labels a neuron once the corpus's rarer tokens are measured), read until enough are taken
    order = cand[np.lexsort((cand, -(weight[cand] * mean[cand] ** 2)))]
    out: list[Path] = []
    for j in order.tolist():
        name = label_names[j]
        if name in skip:
            continue
        end = min(float(mean[j]), below)
        out.append(((name, ids_of(name), end), [], end))
        if len(out) >= cfg.graded_tokens:
            break
    return out


def start_candidates(pool: TrainingPool, k: int, skip: Collection[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most frequent token ids of the usable corpus (not in ``skip``), most frequent
    first, and their counts: the tokens worth a start path."""
    counts = pool.token_counts().copy()
    skip_ids = [int(t) for t in skip if 0 <= int(t) < counts.size]
    counts[skip_ids] = 0
    order = np.argsort(-counts, kind="stable")[: max(int(k), 0)]
    order = order[counts[order] > 0]
    return order.astype(np.int64), counts[order].astype(np.int64)


def start_paths(
    values: np.ndarray,
    token_ids: np.ndarray,
    counts: np.ndarray,
    label_of: np.ndarray,
    label_names: Sequence[str],
    ids_of,
    bos_label: str,
    cfg: FitConfig,
) -> list[Path]:
    """Paths [label, BOS] for the labels the neuron fires on as the first token after BOS:
    ``values`` [n] its normalised activation at t in [BOS, t] for ``token_ids`` [n] (corpus
    ``counts`` [n]). A label's value is the count-weighted mean over its ids; it fires at >=
    cfg.activation_threshold. At most cfg.start_tokens labels, the most frequent first. END = that
    value; the BOS context element has importance 1."""
    if cfg.start_tokens <= 0 or len(token_ids) == 0:
        return []
    uniq, mean, n = label_means(values, token_ids, counts, label_of)
    fire = np.flatnonzero(mean >= cfg.activation_threshold)
    picks = sorted(fire, key=lambda j: (-n[j], int(uniq[j])))[: cfg.start_tokens]
    bos = (bos_label, ids_of(bos_label), 1.0)
    out: list[Path] = []
    for j in picks:
        name = label_names[int(uniq[j])]
        end = float(mean[j])
        out.append(((name, ids_of(name), end), [bos], end))
    return out


@dataclass
class TokenMeasurements:
    """Corpus tokens measured by the model at one layer, most frequent first: ``ids`` [n], their
    usable-corpus ``counts`` [n], and per part (a slice of the ids measured in one pass) every
    neuron at t in [BOS, t] (``first``: [n_i, d_mlp] a part, or empty) and after each prompt of
    :func:`measure_tokens` (``prompts``: [P, n_i, d_mlp] a part, or empty). Parts let a layer
    measure its rarer ids only once a neuron needs them, without copying the frequent ones."""

    ids: np.ndarray
    counts: np.ndarray
    first_parts: list[np.ndarray] = field(default_factory=list)
    prompt_parts: list[np.ndarray] = field(default_factory=list)

    def first(self, neuron: int) -> np.ndarray | None:
        """[n]: ``neuron`` at t in [BOS, t], or None where that was not measured."""
        return np.concatenate([p[:, neuron] for p in self.first_parts]) if self.first_parts else None

    def prompts(self, neuron: int) -> np.ndarray | None:
        """[P, n]: ``neuron`` at t after each prompt, or None where none was measured."""
        return np.concatenate([p[:, :, neuron] for p in self.prompt_parts], axis=1) if self.prompt_parts else None

    def joined(self, other: "TokenMeasurements") -> "TokenMeasurements":
        """These ids followed by ``other``'s (measured the same way)."""
        return TokenMeasurements(np.concatenate([self.ids, other.ids]), np.concatenate([self.counts, other.counts]),
                                 self.first_parts + other.first_parts, self.prompt_parts + other.prompt_parts)


def measure_tokens(model, layer: int, pool: TrainingPool, ranks: tuple[int, int], prompts: Sequence[Sequence[int]],
                   first: bool, batch_tokens: int = 4096) -> TokenMeasurements:
    """The corpus tokens of frequency ranks ``ranks`` = [start, stop) (:func:`start_candidates`,
    special tokens left out) measured at ``layer``: at t in [BOS, t] if ``first``, and after each
    of ``prompts`` (one pass each for the layer, cached by :func:`prompt_activations`)."""
    ids, counts = start_candidates(pool, ranks[1], model.special_ids())
    ids, counts = ids[ranks[0]:], counts[ranks[0]:]
    out = TokenMeasurements(ids, counts)
    if first:  # no ids (a corpus smaller than ranks[0]): an empty part, no pass
        out.first_parts.append(first_token_activations(model, layer, ids, batch_tokens))
    if prompts:
        out.prompt_parts.append(prompt_activations(model, layer, prompts, ids, batch_tokens))
    return out


def _after_prefix(model, layer: int, prefix: Sequence[int], ids, batch_tokens: int):
    """Batches of (token ids [rows], every neuron of ``layer`` at t in [*prefix, t] [rows,
    d_mlp], on the model's device) for the tokens t of ``ids`` (a torch long tensor), at most
    ``batch_tokens`` tokens a batch: the single pass that the sweep and the first-token
    measurement share."""
    import torch

    from ..activations import layer_activations

    rows = max(1, batch_tokens // (len(prefix) + 1))
    for s in range(0, len(ids), rows):
        t = ids[s: s + rows]
        seq = torch.stack([torch.full_like(t, int(p)) for p in prefix] + [t], dim=1)
        yield t, layer_activations(model, seq, [layer])[layer][:, len(prefix)]


_PROMPT_CACHE: dict[tuple, np.ndarray] = {}


def prompt_activations(model, layer: int, prefixes: Sequence[Sequence[int]], token_ids: np.ndarray,
                       batch_tokens: int = 4096) -> np.ndarray:
    """float32 [len(prefixes), len(token_ids), d_mlp]: every neuron of ``layer`` at t in
    [*prefix, t], for each prefix and each t of ``token_ids`` (one pass a prefix). The last four
    calls are cached (one pass serves every neuron group of a layer: a layer makes up to four,
    the first token and the prompts, for the frequent and for the rarer ids)."""
    import torch

    ids = np.asarray(token_ids, dtype=np.int64)
    prefixes = [[int(p) for p in prefix] for prefix in prefixes]
    if not prefixes:
        raise ValueError("prompt_activations needs at least one prefix")
    key = (id(model), model.name, int(layer), tuple(map(tuple, prefixes)), ids.tobytes())
    got = _PROMPT_CACHE.get(key)
    if got is not None:
        return got
    if len(_PROMPT_CACHE) >= 4:
        _PROMPT_CACHE.pop(next(iter(_PROMPT_CACHE)))  # the oldest
    out = np.zeros((len(prefixes), len(ids), model.d_mlp), dtype=np.float32)
    for c, prefix in enumerate(prefixes):
        s = 0
        for t, a in _after_prefix(model, layer, prefix, torch.as_tensor(ids), batch_tokens):
            out[c, s: s + len(t)] = a.float().cpu().numpy()
            s += len(t)
    _PROMPT_CACHE[key] = out
    return out


def context_prefixes(pool: TrainingPool, count: int, length: int, seed: Sequence[int]) -> list[list[int]]:
    """``count`` real corpus prefixes: the ``length`` tokens after BOS of usable windows that no
    neuron of the pool excludes (a test window's text never enters a fit), drawn with ``seed``."""
    if count <= 0 or length <= 0:
        return []
    excluded = np.zeros(len(pool.windows), dtype=bool)
    for ids in pool.exclude.values():
        excluded[[int(i) for i in ids]] = True
    order = np.random.default_rng(list(seed)).permutation(np.flatnonzero(pool.usable & ~excluded))
    return [[int(t) for t in pool.windows[w, 1: 1 + length]] for w in order[:count]]


def first_token_activations(model, layer: int, token_ids: np.ndarray, batch_tokens: int = 4096) -> np.ndarray:
    """float32 [len(token_ids), d_mlp]: every neuron of ``layer`` at t in [BOS, t], for each t of
    ``token_ids``. The first token after BOS sees nothing else, so this is the neuron's exact
    activation there (cached as :func:`prompt_activations`)."""
    return prompt_activations(model, layer, [[model.bos_id]], token_ids, batch_tokens)[0]


_SWEEP_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def vocabulary_sweep(model, layer: int, prefix_id: int, k: int, batch_tokens: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` vocabulary tokens t on which each neuron of ``layer`` is highest in the neutral
    prompt [BOS, prefix, t] (read at t): (activations float32 [k, d_mlp], token ids int64
    [k, d_mlp]), highest first. Candidate tokens for a graph that its training windows never
    showed; real occurrences then decide (:func:`learn_from_misses`). The top-k is kept on the
    device batch by batch (never [d_vocab, d_mlp]); the last sweep is cached (one pass over the
    vocabulary serves every neuron group of a layer)."""
    import torch

    key = (id(model), model.name, int(layer), int(prefix_id), int(k))
    got = _SWEEP_CACHE.get(key)
    if got is not None:
        return got
    _SWEEP_CACHE.clear()
    v = model.d_vocab
    k = min(int(k), v)
    best_v = best_i = None
    vocab = torch.arange(v, dtype=torch.long)
    for ids, acts in _after_prefix(model, layer, [model.bos_id, prefix_id], vocab, batch_tokens):
        cand_i = ids.to(acts.device)[:, None].expand_as(acts)
        if best_v is not None:
            acts, cand_i = torch.cat([best_v, acts]), torch.cat([best_i, cand_i])
        top = torch.topk(acts, k=min(k, acts.shape[0]), dim=0)
        best_v, best_i = top.values, torch.gather(cand_i, 0, top.indices)
    out = (best_v.float().cpu().numpy(), best_i.cpu().numpy().astype(np.int64))
    _SWEEP_CACHE[key] = out
    return out
