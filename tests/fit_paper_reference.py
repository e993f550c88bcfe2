"""The fit orchestrator as it stood before the fit methods were split into stages (commit
723e9b6, frozen verbatim): the `paper` method must reproduce its graphs byte for byte
(tests/test_fit_methods.py). Not imported by the service."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from n2g_service.activations import ActivationRunner
from n2g_service.config import FitConfig
from n2g_service.models import LoadedModel
from n2g_service.fit.augment import MLMProposer, important_positions, propose_embedding, propose_model, substitute
from n2g_service.fit.paths import build_paths, firing_positions
from n2g_service.fit.prune import Pruned, prune_examples
from n2g_service.fit.saliency import saliency_batch



@dataclass
class FitResult:
    graph: Any  # n2g_fast.NeuronGraph
    stats: dict = field(default_factory=dict)
    # with fit_neurons(..., details=True): the pruned prompts and augmented prompts, for tests and
    # measurements (``{"examples": [...], "augmented": [...]}``, plain Python values)
    details: dict | None = None


@dataclass
class _Example:
    neuron: int
    pruned: Pruned
    acts: np.ndarray | None = None  # raw activations on pruned.tokens
    alpha: np.ndarray | None = None
    important: list[int] = field(default_factory=list)


@dataclass
class _Augmented:
    parent: int  # index into the examples list
    neuron: int
    tokens: list[int]
    position: int
    substitute: int
    proposer: str
    acts: np.ndarray | None = None
    positive: bool = False
    alpha: np.ndarray | None = None


_MLM_CACHE: dict[str, MLMProposer] = {}


def _with_bos(tokens: np.ndarray, bos: int) -> np.ndarray:
    t = np.asarray(tokens, dtype=np.int64).ravel()
    if t.size == 0 or t[0] != bos:
        t = np.concatenate([[bos], t]).astype(np.int64)
    return t


def fit_neurons(
    model: LoadedModel,
    layer: int,
    neurons: list[int],
    train_examples: dict[int, list[np.ndarray]],
    max_activation: dict[int, float],
    cfg: FitConfig = FitConfig(),
    progress: bool = False,
    details: bool = False,
) -> dict[int, FitResult]:
    """Fits one neuron graph per neuron of ``layer`` from its training examples.

    ``train_examples[n]``: token id arrays, each starting with BOS (prepended when missing).
    ``max_activation[n]``: the neuron's a_max from the dataset scan (must be > 0 to fit).
    ``details=True`` also returns every pruned and augmented prompt in ``FitResult.details``.
    """
    import n2g_fast
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    layer = int(layer)
    model.hook_name(layer)
    neurons = [int(n) for n in neurons]
    if len(set(neurons)) != len(neurons):
        raise ValueError("neurons must be distinct")
    for n in neurons:
        if not 0 <= n < model.d_mlp:
            raise ValueError(f"neuron {n} out of range (d_mlp = {model.d_mlp})")
    runner = ActivationRunner(model, layer, cfg.batch_tokens)
    run = runner.run
    bar = tqdm(total=6, desc=f"fit layer {layer} ({len(neurons)} neurons)", disable=not progress)
    mask_id = model.token_id_for(cfg.mask_token)
    a_max = {n: float(max_activation[n]) for n in neurons}
    strings = model.token_strings()

    # 1. original activations ------------------------------------------------------------------
    originals: list[tuple[np.ndarray, int]] = []
    for n in neurons:
        if a_max[n] <= 0:
            continue
        for x in train_examples.get(n, []):
            x = _with_bos(x, model.bos_id)
            if x.size >= 2:
                originals.append((x, n))
    orig_acts = run([x for x, _ in originals], [n for _, n in originals])
    bar.update()

    # 2. pruning ---------------------------------------------------------------------------------
    pruned = prune_examples(
        run,
        [(x, a, n) for (x, n), a in zip(originals, orig_acts)],
        lambda toks: [strings[int(t)] for t in toks],
        model.bos_id,
        lambda n: a_max[n],
        cfg,
    )
    examples = [_Example(neuron=n, pruned=p) for (_, n), p in zip(originals, pruned)]
    bar.update()

    # 3. pruned prompts: activations, saliency ---------------------------------------------------
    acts = run([e.pruned.tokens for e in examples], [e.neuron for e in examples])
    sal_items = []
    for e, a in zip(examples, acts):
        e.acts = a
        norm = a / a_max[e.neuron] * e.pruned.scale
        fire = firing_positions(norm, cfg.activation_threshold)
        upto = max([e.pruned.pivot] + fire) if fire else 0  # nothing fires: nothing to explain
        sal_items.append((e.pruned.tokens, e.neuron, a, upto))
    for e, alpha in zip(examples, saliency_batch(run, sal_items, mask_id)):
        e.alpha = alpha
        piv_fires = e.acts[e.pruned.pivot] / a_max[e.neuron] * e.pruned.scale > cfg.activation_threshold
        if piv_fires:
            e.important = important_positions(
                alpha, e.pruned.pivot, cfg.augment_importance, cfg.augment_pivot
            )
    bar.update()

    # 4. augmentation --------------------------------------------------------------------------
    requests = [(ei, k) for ei, e in enumerate(examples) for k in e.important]
    proposals: dict[str, list[list[int]]] = {}
    n_sub = cfg.n_substitutes
    if requests and n_sub > 0:
        req_tokens = [(examples[ei].pruned.tokens, k) for ei, k in requests]
        if "model" in cfg.proposers:
            proposals["model"] = propose_model(model, req_tokens, n_sub, cfg.batch_tokens)
        if "embedding" in cfg.proposers:
            originals_ids = [examples[ei].pruned.tokens[k] for ei, k in requests]
            proposals["embedding"] = propose_embedding(model, originals_ids, n_sub)
        if cfg.mlm_name:
            mlm = _MLM_CACHE.get(cfg.mlm_name)
            if mlm is None:
                mlm = _MLM_CACHE[cfg.mlm_name] = MLMProposer(cfg.mlm_name, model.device)
            proposals["mlm"] = mlm.propose(model, req_tokens, n_sub)
    augmented: list[_Augmented] = []
    for r, (ei, k) in enumerate(requests):
        seen: set[int] = set()
        for proposer, lists in proposals.items():
            for s in lists[r]:
                if s in seen:
                    continue
                seen.add(s)
                e = examples[ei]
                augmented.append(
                    _Augmented(ei, e.neuron, substitute(e.pruned.tokens, k, s), k, s, proposer)
                )
    aug_acts = run([a.tokens for a in augmented], [a.neuron for a in augmented])
    for a, act in zip(augmented, aug_acts):
        a.acts = act
        parent = examples[a.parent]
        piv = parent.pruned.pivot
        a.positive = bool(act[piv] >= cfg.augment_positive * parent.acts[piv])
    bar.update()

    # 5. saliency of augmented prompts that hold a firing token -----------------------------------
    sal_items, sal_owner = [], []
    for ai, a in enumerate(augmented):
        parent = examples[a.parent]
        norm = a.acts / a_max[a.neuron] * parent.pruned.scale
        # tokens before the substituted position are the parent's, with the parent's activations
        # and saliency: their paths would repeat the parent's, so only positions >= it count
        fire = [i for i in firing_positions(norm, cfg.activation_threshold) if i >= a.position]
        if fire:
            sal_items.append((a.tokens, a.neuron, a.acts, max(fire)))
            sal_owner.append(ai)
    for ai, alpha in zip(sal_owner, saliency_batch(run, sal_items, mask_id)):
        augmented[ai].alpha = alpha
    bar.update()

    # 6. paths and graphs ------------------------------------------------------------------------
    results: dict[int, FitResult] = {}
    per_neuron_examples: dict[int, list[int]] = {n: [] for n in neurons}
    for ei, e in enumerate(examples):
        per_neuron_examples[e.neuron].append(ei)
    per_neuron_aug: dict[int, list[_Augmented]] = {n: [] for n in neurons}
    for a in augmented:
        per_neuron_aug[a.neuron].append(a)
    for n in neurons:
        graph = n2g_fast.NeuronGraph(model.name, layer, n, model.hook, a_max[n] if a_max[n] > 0 else 0.0)
        n_added = 0
        for ei in per_neuron_examples[n]:
            e = examples[ei]
            norm = e.acts / a_max[n] * e.pruned.scale
            for activating, context, end in build_paths(model, e.pruned.tokens, norm, e.alpha, cfg):
                graph.add_path(activating, context, end)
                n_added += 1
        for a in per_neuron_aug[n]:
            if a.alpha is None:
                continue
            parent = examples[a.parent]
            norm = a.acts / a_max[n] * parent.pruned.scale
            for activating, context, end in build_paths(
                model, a.tokens, norm, a.alpha, cfg,
                inherited_alpha=parent.alpha, inherited_positions=parent.important,
                pivot=parent.pruned.pivot, start=a.position,
            ):
                graph.add_path(activating, context, end)
                n_added += 1
        graph.finalize()
        ex = [examples[ei] for ei in per_neuron_examples[n]]
        aug = per_neuron_aug[n]
        results[n] = FitResult(
            graph=graph,
            stats={
                "n_examples": len(ex),
                "n_paths": int(graph.n_paths),
                "n_paths_added": n_added,
                "n_nodes": int(graph.n_nodes),
                "n_important": [len(e.important) for e in ex],
                "n_augmented_positive": sum(1 for a in aug if a.positive),
                "n_augmented_negative": sum(1 for a in aug if not a.positive),
                "augmented_by_proposer": {
                    p: {"positive": sum(1 for a in aug if a.proposer == p and a.positive),
                        "negative": sum(1 for a in aug if a.proposer == p and not a.positive)}
                    for p in proposals
                },
                "prune_lengths": [e.pruned.context_len for e in ex],
                "pruned_tokens": [len(e.pruned.tokens) for e in ex],
                "scale_factors": [round(e.pruned.scale, 6) for e in ex],
                "trajectories": [[[c, round(v, 6)] for c, v in e.pruned.trajectory] for e in ex],
            },
        )
    if details:
        for n in neurons:
            results[n].details = {
                "examples": [
                    {
                        "tokens": list(e.pruned.tokens),
                        "pivot": e.pruned.pivot,
                        "context_len": e.pruned.context_len,
                        "scale": e.pruned.scale,
                        "original_pivot_act": e.pruned.original_pivot_act,
                        "truncated_pivot_act": e.pruned.truncated_pivot_act,
                        "acts": e.acts.tolist(),
                        "alpha": e.alpha.tolist(),
                        "important": list(e.important),
                    }
                    for e in (examples[ei] for ei in per_neuron_examples[n])
                ],
                "augmented": [
                    {
                        "example": per_neuron_examples[n].index(a.parent),
                        "tokens": list(a.tokens),
                        "position": a.position,
                        "substitute": a.substitute,
                        "proposer": a.proposer,
                        "positive": a.positive,
                        "acts": a.acts.tolist(),
                        "has_alpha": a.alpha is not None,
                    }
                    for a in per_neuron_aug[n]
                ],
            }
    seconds = (time.perf_counter() - t0) / max(len(neurons), 1)
    for r in results.values():
        r.stats["seconds"] = seconds
        r.stats["forward_passes_shared"] = runner.n_forward
    bar.update()
    bar.close()
    return results
