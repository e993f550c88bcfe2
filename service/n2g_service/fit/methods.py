"""The fit interface: a small registry of N2G fit methods (as SAELens registers architectures).

A :class:`FitMethod` has a name, a one-line summary, a preset (the FitConfig fields it sets) and a
``fit(run, train, pool, bar, details)`` that returns one :class:`FitResult` per neuron.
:func:`n2g_service.fit.fit_neurons` looks the method up by ``FitConfig.method``. Registered here:

- ``paper``: the paper's fit on the training windows alone (stages 1 to 6 of
  :mod:`.pipeline`); byte for byte the graphs of the reference fit (tests/fit_paper_reference.py);
- ``calibrated``: the paper's fit on the training windows plus further top windows, then END
  values and contexts calibrated on real corpus occurrences (:mod:`.calibrate`).

Adding a method: write ``fit`` from the stages, then ``register_fit_method(FitMethod(...))``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Mapping

import numpy as np

from ..config import FitConfig
from ..metrics import firing_scores
from .calibrate import (
    Calibration,
    TrainingPool,
    calibrate_paths,
    context_prefixes,
    graded_paths,
    label_means,
    learn_from_misses,
    measure_tokens,
    select_occurrences,
    select_path_occurrences,
    split_labels,
    start_paths,
    token_share,
    vocabulary_sweep,
)
from .pipeline import (
    FitRun,
    augment_stage,
    augmented_saliency_stage,
    by_neuron,
    collect_paths,
    make_graph,
    original_examples,
    paper_details,
    paper_stats,
    prune_stage,
    run_paper_stages,
    saliency_stage,
)


@dataclass
class FitResult:
    graph: Any  # n2g_fast.NeuronGraph
    stats: dict = field(default_factory=dict)
    # with fit_neurons(..., details=True): the pruned prompts and augmented prompts, for tests and
    # measurements (``{"examples": [...], "augmented": [...]}``, plain Python values)
    details: dict | None = None
    # windows learnt from beyond the training windows given (window id, token ids, activations /
    # a_max): they belong in the neuron's training examples, so the baselines see them too
    extra_train: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)


FitFn = Callable[[FitRun, dict, "TrainingPool | None", Any, bool], dict]


@dataclass(frozen=True)
class FitMethod:
    name: str
    summary: str
    fit: FitFn
    preset: Mapping[str, Any] = field(default_factory=dict)  # FitConfig fields the preset sets
    n_stages: int = 6  # progress-bar steps
    uses_pool: bool = False  # learns from a TrainingPool when given one
    # what a neuron's fit costs, for the dry run's estimate before the workspace has built any
    # neuron with this method: forward-pass tokens a neuron (its group's passes shared out), and
    # the tokens of the passes run once a layer, from (FitConfig, d_vocab)
    fit_tokens_per_neuron: int = 3_000
    layer_tokens: Callable[[FitConfig, int], int] = lambda cfg, d_vocab: 0


_REGISTRY: dict[str, FitMethod] = {}


def register_fit_method(method: FitMethod) -> FitMethod:
    """Adds ``method`` under its name (a name registered twice is an error)."""
    if method.name in _REGISTRY:
        raise ValueError(f"fit method {method.name!r} is already registered")
    FitConfig.from_dict(dict(method.preset))  # the preset must be valid settings
    _REGISTRY[method.name] = method
    return method


def fit_method(name: str) -> FitMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown fit method {name!r}; known: {sorted(_REGISTRY)}") from None


def fit_methods() -> dict[str, FitMethod]:
    """Every registered method by name."""
    return dict(_REGISTRY)


def preset(name: str, **overrides: Any) -> FitConfig:
    """The FitConfig of method ``name``'s preset, with ``overrides`` on top."""
    m = fit_method(name)
    return FitConfig.from_dict({**m.preset, **overrides, "method": name})


# ---- paper ------------------------------------------------------------------------------------


def _fit_paper(fr: FitRun, train: dict, pool: TrainingPool | None, bar: Any, details: bool) -> dict:
    examples, augmented, proposers = run_paper_stages(fr, train, bar)
    paths = collect_paths(fr, examples, augmented)
    ex_of, aug_of = by_neuron(fr, examples, augmented)
    results = {}
    for n in fr.neurons:
        graph = make_graph(fr, n, paths[n])
        stats = paper_stats(fr, n, [examples[i] for i in ex_of[n]], aug_of[n], proposers, graph, len(paths[n]))
        results[n] = FitResult(graph, stats, paper_details(ex_of[n], examples, aug_of[n]) if details else None)
    bar.update()
    return results


# ---- calibrated -------------------------------------------------------------------------------


def _labels(model) -> tuple[np.ndarray, list[str]]:
    """Label index of every vocabulary id, and the label names."""
    labels = model.token_labels()
    names: list[str] = []
    index: dict[str, int] = {}
    of = np.empty(len(labels), dtype=np.int64)
    for t, lab in enumerate(labels):
        j = index.get(lab)
        if j is None:
            j = index[lab] = len(names)
            names.append(lab)
        of[t] = j
    return of, names


def _stack(rows: list[np.ndarray], fill: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged rows -> [W, T] padded with ``fill``, and the bool mask of real positions."""
    t = max((len(r) for r in rows), default=1)
    out = np.full((len(rows), t), fill, dtype=np.int64)
    valid = np.zeros((len(rows), t), dtype=bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        valid[i, : len(r)] = True
    valid[:, 0] = False  # BOS is never scored, never fitted
    return out, valid


def _graph_factory(fr: FitRun, n: int):
    """An empty graph of neuron ``n`` (paths are matched by adding them to one)."""
    import n2g_fast

    a_max = fr.a_max[n]
    return n2g_fast.NeuronGraph(fr.model.name, fr.layer, n, fr.model.hook, a_max if a_max > 0 else 0.0)


def _fit_calibrated(fr: FitRun, train: dict, pool: TrainingPool | None, bar: Any, details: bool) -> dict:
    cfg, model = fr.cfg, fr.model
    tick = bar.update
    live = [n for n in fr.neurons if fr.a_max[n] > 0]
    top_ids = {n: pool.top_windows(n, cfg.extra_top) if pool is not None and n in live else [] for n in fr.neurons}
    positives = {n: list(train.get(n, [])) + [pool.windows[i] for i in top_ids[n]] for n in fr.neurons}
    originals, orig_acts = original_examples(fr, positives)
    tick()
    examples = prune_stage(fr, originals, orig_acts)
    tick()
    saliency_stage(fr, examples)
    tick()
    augmented, proposers = augment_stage(fr, examples)
    tick()
    augmented_saliency_stage(fr, examples, augmented)
    tick()
    paths = collect_paths(fr, examples, augmented)

    # real occurrences of the graph's labels and of the labels that fire in the positives
    label_of, names = _labels(model)
    thr = cfg.activation_threshold
    pos_of: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in fr.neurons}
    for (x, n), a in zip(originals, orig_acts):
        pos_of[n].append((x, a))
    # ordinary windows: one seeded sample for the layer, each neuron keeping those it may see
    rand_ids: dict[int, list[int]] = {n: [] for n in fr.neurons}
    if pool is not None and cfg.random_windows > 0:
        usable = np.flatnonzero(pool.usable)
        rng = np.random.default_rng([cfg.calibration_seed, fr.layer, 1])
        sample = np.sort(rng.choice(usable, size=min(cfg.random_windows, usable.size), replace=False))
        for n in live:
            ok, top = pool.allowed(n), set(top_ids[n])
            rand_ids[n] = [int(w) for w in sample if ok[w] and int(w) not in top]
    jobs = [(w, n) for n in fr.neurons for w in rand_ids[n]]
    rand_of: dict[int, list[tuple[int, np.ndarray]]] = {n: [] for n in fr.neurons}
    for (w, n), a in zip(jobs, fr.run([pool.windows[w] for w, _ in jobs], [n for _, n in jobs]) if jobs else []):
        rand_of[n].append((w, a))
    # vocabulary sweep: candidate labels the windows never showed firing, highest first
    sweep: dict[int, dict[str, float]] = {n: {} for n in fr.neurons}
    if pool is not None and cfg.sweep_tokens > 0 and live:
        special = model.special_ids()
        # room for special tokens and ids that share a label
        values, ids = vocabulary_sweep(model, fr.layer, fr.mask_id, 2 * cfg.sweep_tokens + len(special),
                                       cfg.batch_tokens)
        for n in live:
            for value, t in zip(values[:, n] / fr.a_max[n], ids[:, n]):
                if value < cfg.sweep_threshold or len(sweep[n]) >= cfg.sweep_tokens:
                    break
                if int(t) not in special:
                    sweep[n].setdefault(names[label_of[t]], float(value))
    occ_ids: dict[int, list[int]] = {n: [] for n in fr.neurons}
    path_ids: dict[int, list[int]] = {n: [] for n in fr.neurons}
    if pool is not None:
        for n in live:
            order: list[str] = []
            for activating, _, _ in paths[n]:
                if activating[0] not in order:
                    order.append(activating[0])
            seen = pos_of[n] + [(pool.windows[w], a) for w, a in rand_of[n]]
            firing = [(float(a[i]), names[label_of[int(x[i])]]) for x, a in seen
                      for i in range(1, len(x)) if a[i] / fr.a_max[n] >= thr]
            for _, lab in sorted(firing, key=lambda p: -p[0]):
                if lab not in order:
                    order.append(lab)
            order += [lab for lab in sweep[n] if lab not in order]
            rng = np.random.default_rng([cfg.calibration_seed, fr.layer, n])
            occ_ids[n] = select_occurrences(pool, n, [model.label_token_ids(l) for l in order],
                                            top_ids[n] + rand_ids[n], cfg, rng)
            path_ids[n] = select_path_occurrences(pool, n, paths[n], rand_ids[n] + occ_ids[n], top_ids[n],
                                                  partial(_graph_factory, fr, n), cfg, rng)
            occ_ids[n] += path_ids[n]
    jobs = [(w, n) for n in fr.neurons for w in occ_ids[n]]
    occ_acts = fr.run([pool.windows[w] for w, _ in jobs], [n for _, n in jobs]) if jobs else []
    occ_of: dict[int, list[tuple[int, np.ndarray]]] = {n: [] for n in fr.neurons}
    for (w, n), a in zip(jobs, occ_acts):
        occ_of[n].append((w, a))

    # the frequent corpus tokens, measured (one pass a prompt for the layer): as the first token
    # after BOS (start paths) and after real corpus prefixes (the graded prior, the token share and
    # split_labels; without contexts the prior takes the neutral prompt [BOS, mask]). The rarer
    # ids (ranks start_vocab..split_vocab) only once a neuron the split runs on needs them.
    use_prior = cfg.graded_prior > 0 and cfg.graded_tokens > 0
    contexts = context_prefixes(pool, cfg.token_contexts, cfg.token_context_length,
                                [cfg.calibration_seed, fr.layer, 2]) if pool is not None else []
    use_contexts = bool(contexts) and (use_prior or cfg.split_labels)
    prompts = ([[model.bos_id, *c] for c in contexts] if use_contexts
               else [[model.bos_id, fr.mask_id]] if use_prior else [])
    frequent = rare = None
    if pool is not None and cfg.start_vocab > 0 and live and (cfg.start_tokens > 0 or prompts):
        frequent = measure_tokens(model, fr.layer, pool, (0, cfg.start_vocab), prompts, cfg.start_tokens > 0,
                                  cfg.batch_tokens)
    bos_label = names[label_of[model.bos_id]]

    ex_of, aug_of = by_neuron(fr, examples, augmented)
    results = {}
    for n in fr.neurons:
        a_max = fr.a_max[n]
        factory = partial(_graph_factory, fr, n)
        cal = Calibration()
        fire_rate = cfg.calibrate_fire_rate
        share = float("nan")
        if use_contexts and frequent is not None and a_max > 0:
            share = token_share(frequent.prompts(n) / a_max)
        split = cfg.split_labels and share >= cfg.split_min_token_share
        measured = frequent
        if split and cfg.split_vocab > cfg.start_vocab:
            if rare is None:
                rare = measure_tokens(model, fr.layer, pool, (cfg.start_vocab, cfg.split_vocab), prompts,
                                      cfg.start_tokens > 0, cfg.batch_tokens)
            measured = frequent.joined(rare)
        final = list(paths[n])
        seen = rand_of[n] + occ_of[n]
        rows = [x for x, _ in pos_of[n]] + [pool.windows[w] for w, _ in seen]
        if rows and a_max > 0:
            tokens, valid = _stack(rows, model.pad_id)
            true = np.zeros(tokens.shape, dtype=np.float32)
            for r, a in enumerate([a for _, a in pos_of[n]] + [a for _, a in seen]):
                true[r, : len(a)] = a / a_max
            start = []
            first = measured.first(n) if measured is not None else None
            if first is not None:
                start = start_paths(first / a_max, measured.ids, measured.counts, label_of, names,
                                    model.label_token_ids, bos_label, cfg)
                valid[:, 1] = False  # the first token is measured: learn the rest from positions >= 2
            ordinary = valid.copy()
            ordinary[: len(pos_of[n])] = False  # top windows overstate a token's usual level
            levels = measured.prompts(n) / a_max if measured is not None and prompts else None  # [P, n]

            def predicted_by(with_paths: list) -> np.ndarray:
                return np.asarray(make_graph(fr, n, with_paths).predict(tokens, semantics="all_paths_max"))

            def fires_at(c: FitConfig, cal: Calibration) -> list:
                """The firing paths calibrated at c.calibrate_fire_rate."""
                cal.n_start = len(start)
                out = calibrate_paths(paths[n], tokens, true, valid, factory, c, cal, ordinary) + start
                out += learn_from_misses(predicted_by(out), tokens, true, valid, label_of, names,
                                         model.label_token_ids, c, cal, ordinary)
                if split:
                    out = split_labels(out, tokens, true, valid, (measured.ids, levels),
                                       label_of, names, model.label_token_ids, model.token_strings(), c, cal)
                return out

            final = fires_at(cfg, cal)
            if cfg.fire_rate_f1 > 0:  # the neuron's own rate: a fraction of the F1 it reaches
                f1 = firing_scores(true[valid], predicted_by(final)[valid], thr)["f1"]
                rate = max(cfg.fire_rate_f1 * f1, cfg.fire_rate_floor)
                if rate != cfg.calibrate_fire_rate:
                    cal = Calibration()
                    final = fires_at(dataclasses.replace(cfg, calibrate_fire_rate=rate), cal)
                fire_rate = rate
            have = {act[0] for act, ctx, _ in final if not any(c is not None for c in ctx)}
            prior = None
            if use_prior and levels is not None:
                prior = label_means(levels.mean(axis=0), measured.ids, measured.counts, label_of)
            graded = graded_paths(tokens, true, ordinary, label_of, names, model.label_token_ids, have, cfg,
                                  prior)
            cal.n_graded = len(graded)
            final += graded
        # a swept token that fires and never occurs in the corpus it may learn from: nothing
        # real contradicts it, its sweep activation is the END
        ok = pool.allowed(n) if sweep[n] else None
        for lab, value in sweep[n].items():
            ids = model.label_token_ids(lab)
            if value >= thr and not ok[pool.windows_with(ids)].any():
                final.append(((lab, ids, value), [], value))
                cal.n_tokens_swept += 1
        graph = make_graph(fr, n, final)
        stats = paper_stats(fr, n, [examples[i] for i in ex_of[n]], aug_of[n], proposers, graph, len(paths[n]))
        extra = [(w, pool.windows[w], a) for w, a in zip(top_ids[n], [a for _, a in pos_of[n][len(pos_of[n]) - len(top_ids[n]):]])]
        extra += [(w, pool.windows[w], a) for w, a in seen]
        stats.update({
            "n_extra_top": len(top_ids[n]),
            "n_random_windows": len(rand_of[n]),
            "n_occurrence_windows": len(occ_of[n]),
            "n_path_windows": len(path_ids[n]),
            "extra_train_windows": [int(w) for w, _, _ in extra],
            "n_paths_unique": cal.n_paths_in,
            "n_paths_calibrated": cal.n_calibrated,
            "n_paths_stopped_firing": cal.n_stopped_firing,
            "n_tokens_learnt": cal.n_tokens_learnt,
            "n_contexts_learnt": cal.n_contexts_learnt,
            "n_sweep_candidates": len(sweep[n]),
            "n_tokens_swept": cal.n_tokens_swept,
            "n_graded_tokens": cal.n_graded,
            "n_start_paths": cal.n_start,
            "n_labels_split": cal.n_labels_split,
            "fire_rate": round(fire_rate, 4),
            "token_share": None if np.isnan(share) else round(share, 4),
            "n_tokens_measured": 0 if measured is None else len(measured.ids),
        })
        results[n] = FitResult(
            graph, stats, paper_details(ex_of[n], examples, aug_of[n]) if details else None,
            extra_train=[(int(w), np.asarray(t, dtype=np.int64), np.asarray(a, dtype=np.float32) / a_max)
                         for w, t, a in extra],
        )
    tick()
    return results


def _measured_prompt_tokens(cfg: FitConfig) -> int:
    """Tokens a frequent token is measured with: [BOS, context, t] per real context (for the graded
    prior or split_labels), else the prior's neutral prompt [BOS, mask, t]."""
    use_prior = cfg.graded_prior > 0 and cfg.graded_tokens > 0
    if cfg.token_contexts > 0 and cfg.token_context_length > 0 and (use_prior or cfg.split_labels):
        return cfg.token_contexts * (cfg.token_context_length + 2)
    return 3 if use_prior else 0


def _measured_vocab(cfg: FitConfig, d_vocab: int) -> int:
    """At most how many tokens a layer measures: start_vocab, and up to split_vocab where a neuron
    may pass the split's gate (real contexts measure its token share)."""
    k = cfg.start_vocab
    if cfg.split_labels and cfg.token_contexts > 0 and cfg.token_context_length > 0:
        k = max(k, cfg.split_vocab)
    return min(k, d_vocab) if cfg.start_vocab > 0 else 0


register_fit_method(FitMethod(
    "paper",
    "the paper's fit (prune, saliency, augment, paths) on the training windows alone",
    _fit_paper,
    # SmolLM2, benchmarks/bench_build.py: 1,300-3,750 at layers 0-29 (28,800 at layer 15, where
    # augmented saliency runs long prompts)
    fit_tokens_per_neuron=3_000,
))
register_fit_method(FitMethod(
    "calibrated",
    "the paper's fit on more top windows, then END values and contexts calibrated on real corpus "
    "occurrences of the graph's tokens (firing and not)",
    _fit_calibrated,
    uses_pool=True,
    # SmolLM2, 24 neurons a layer (benchmarks/scoring_table.sh): medians 11,700-35,700 at layers
    # 0-29, most of it the occurrence windows no group shares
    fit_tokens_per_neuron=20_000,
    # the vocabulary sweep ([BOS, prefix, t] for every t), then the frequent tokens measured as the
    # first token ([BOS, t]) and in real contexts ([BOS, context, t]); at most, the rarer ones too
    layer_tokens=lambda cfg, d_vocab: (3 * d_vocab if cfg.sweep_tokens > 0 else 0)
    + ((2 if cfg.start_tokens > 0 else 0) + _measured_prompt_tokens(cfg)) * _measured_vocab(cfg, d_vocab),
))
