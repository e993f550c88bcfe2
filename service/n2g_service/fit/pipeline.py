"""The stages of the paper's fit (n2g-method.md sections 2 to 5), one small function each.

Every stage gathers the work of all examples of all neurons of one layer into one list of (token
sequence, neuron) jobs and runs it through the fit's shared
:class:`~n2g_service.activations.ActivationRunner`: sequences are batched by length, identical
sequences run once, one hook read gives every neuron of the layer and each row reads the neuron it
belongs to. In order:

1. :func:`original_examples`: activations of the training windows (pivots);
2. :func:`prune_stage`: pruning rounds (all examples advance together);
3. :func:`saliency_stage`: activations of the pruned prompts and their saliency matrices;
4. :func:`augment_stage`: substitutes for the important positions (one full forward to the logits
   for the "model" proposer; one matrix product for the "embedding" proposer), activations of the
   augmented prompts (positive / negative);
5. :func:`augmented_saliency_stage`: saliency of the augmented prompts that hold a firing token;
6. :func:`collect_paths`: the paths of every example, per neuron; :func:`make_graph` inserts them
   into one ``n2g_fast.NeuronGraph``.

Decisions (where the method leaves room):
- normalised activation = activation / a_max x the example's scale factor, for the firing test,
  the activating node's activation and the END value alike (the scale factor restores the level
  the pivot had before pruning);
- augmented prompts inherit the scale factor of their pruned prompt; positive / negative compares
  their pivot activation with the pruned prompt's;
- negatives go to graph building like positives (method doc): only their tokens still above the
  activation threshold make paths, so in practice they add paths only for other firing tokens;
- in an augmented prompt, the tokens before the substituted position are the parent's (causal
  model: same activations, same saliency), so their paths would only repeat the parent's; paths
  (and the saliency they need) are made for the firing tokens from the substituted position on;
- an example whose scaled pivot does not fire (a weak top-k window) makes no paths and is not
  augmented; an example with no positive activation is not pruned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..activations import ActivationRunner
from ..config import FitConfig
from ..models import LoadedModel
from .augment import MLMProposer, important_positions, propose_embedding, propose_model, substitute
from .paths import Path, build_paths, firing_positions
from .prune import Pruned, prune_examples
from .saliency import saliency_batch


@dataclass
class Example:
    """One training window of one neuron, pruned (stages 1 to 3)."""

    neuron: int
    pruned: Pruned
    acts: np.ndarray | None = None  # raw activations on pruned.tokens
    alpha: np.ndarray | None = None
    important: list[int] = field(default_factory=list)


@dataclass
class Augmented:
    """One augmented prompt (stage 4): a pruned prompt with one important token substituted."""

    parent: int  # index into the examples list
    neuron: int
    tokens: list[int]
    position: int
    substitute: int
    proposer: str
    acts: np.ndarray | None = None
    positive: bool = False
    alpha: np.ndarray | None = None


@dataclass
class FitRun:
    """What every stage of one fit call shares: the model, the layer, the neurons and their a_max,
    the settings, and one activation runner (its pass count goes into the stats)."""

    model: LoadedModel
    layer: int
    neurons: list[int]
    a_max: dict[int, float]
    cfg: FitConfig
    runner: ActivationRunner
    mask_id: int
    strings: list[str]

    def run(self, sequences: Sequence[Sequence[int]], neurons: Sequence[int]) -> list[np.ndarray]:
        return self.runner.run(sequences, neurons)


_MLM_CACHE: dict[str, MLMProposer] = {}


def with_bos(tokens: np.ndarray, bos: int) -> np.ndarray:
    t = np.asarray(tokens, dtype=np.int64).ravel()
    if t.size == 0 or t[0] != bos:
        t = np.concatenate([[bos], t]).astype(np.int64)
    return t


def start_run(
    model: LoadedModel, layer: int, neurons: Sequence[int], max_activation: dict[int, float], cfg: FitConfig
) -> FitRun:
    """Validates the layer and neurons and sets up the shared state."""
    layer = int(layer)
    model.hook_name(layer)
    neurons = [int(n) for n in neurons]
    if len(set(neurons)) != len(neurons):
        raise ValueError("neurons must be distinct")
    for n in neurons:
        if not 0 <= n < model.d_mlp:
            raise ValueError(f"neuron {n} out of range (d_mlp = {model.d_mlp})")
    missing = [n for n in neurons if n not in max_activation]
    if missing:
        raise ValueError(f"no max_activation (a_max) given for neurons {missing}")
    return FitRun(
        model=model,
        layer=layer,
        neurons=neurons,
        a_max={n: float(max_activation[n]) for n in neurons},
        cfg=cfg,
        runner=ActivationRunner(model, layer, cfg.batch_tokens),
        mask_id=model.token_id_for(cfg.mask_token),
        strings=model.token_strings(),
    )


def original_examples(
    fr: FitRun, train_examples: dict[int, list[np.ndarray]]
) -> tuple[list[tuple[np.ndarray, int]], list[np.ndarray]]:
    """Stage 1: (window with BOS, neuron) per training window of every neuron with a_max > 0, and
    the neuron's raw activations on it."""
    originals: list[tuple[np.ndarray, int]] = []
    for n in fr.neurons:
        if fr.a_max[n] <= 0:
            continue
        for x in train_examples.get(n, []):
            x = with_bos(x, fr.model.bos_id)
            if x.size >= 2:
                originals.append((x, n))
    return originals, fr.run([x for x, _ in originals], [n for _, n in originals])


def prune_stage(
    fr: FitRun, originals: list[tuple[np.ndarray, int]], orig_acts: list[np.ndarray]
) -> list[Example]:
    """Stage 2: every window pruned to its pivot's shortest sufficient context."""
    pruned = prune_examples(
        fr.run,
        [(x, a, n) for (x, n), a in zip(originals, orig_acts)],
        lambda toks: [fr.strings[int(t)] for t in toks],
        fr.model.bos_id,
        lambda n: fr.a_max[n],
        fr.cfg,
    )
    return [Example(neuron=n, pruned=p) for (_, n), p in zip(originals, pruned)]


def saliency_stage(fr: FitRun, examples: list[Example]) -> None:
    """Stage 3: activations and saliency of the pruned prompts, and the important positions of
    those whose pivot fires (filled into ``examples``)."""
    cfg = fr.cfg
    acts = fr.run([e.pruned.tokens for e in examples], [e.neuron for e in examples])
    sal_items = []
    for e, a in zip(examples, acts):
        e.acts = a
        norm = a / fr.a_max[e.neuron] * e.pruned.scale
        fire = firing_positions(norm, cfg.activation_threshold)
        upto = max([e.pruned.pivot] + fire) if fire else 0  # nothing fires: nothing to explain
        if fire and cfg.augment_pivot:
            # the pivot's own row (masking the pivot itself) is what augment_pivot reads; masked
            # copies stop before `upto`, so without this it was never computed (alpha 0)
            upto = max(upto, e.pruned.pivot + 1)
        sal_items.append((e.pruned.tokens, e.neuron, a, upto))
    for e, alpha in zip(examples, saliency_batch(fr.run, sal_items, fr.mask_id)):
        e.alpha = alpha
        piv_fires = e.acts[e.pruned.pivot] / fr.a_max[e.neuron] * e.pruned.scale > cfg.activation_threshold
        if piv_fires:
            e.important = important_positions(alpha, e.pruned.pivot, cfg.augment_importance, cfg.augment_pivot)


def augment_stage(fr: FitRun, examples: list[Example]) -> tuple[list[Augmented], list[str]]:
    """Stage 4: augmented prompts with their activations and positive / negative label; also the
    proposers configured (every one, also where nothing was proposed: the stats keep one shape)."""
    cfg, model = fr.cfg, fr.model
    configured = [p for p in ("model", "embedding") if p in cfg.proposers] + (["mlm"] if cfg.mlm_name else [])
    requests = [(ei, k) for ei, e in enumerate(examples) for k in e.important]
    proposals: dict[str, list[list[int]]] = {}
    n_sub = cfg.n_substitutes
    if requests and n_sub > 0:
        req_tokens = [(examples[ei].pruned.tokens, k) for ei, k in requests]
        if "model" in configured:
            proposals["model"] = propose_model(model, req_tokens, n_sub, cfg.batch_tokens)
        if "embedding" in configured:
            originals_ids = [examples[ei].pruned.tokens[k] for ei, k in requests]
            proposals["embedding"] = propose_embedding(model, originals_ids, n_sub)
        if "mlm" in configured:
            mlm = _MLM_CACHE.get(cfg.mlm_name)
            if mlm is None:
                mlm = _MLM_CACHE[cfg.mlm_name] = MLMProposer(cfg.mlm_name, model.device)
            proposals["mlm"] = mlm.propose(model, req_tokens, n_sub)
    augmented: list[Augmented] = []
    for r, (ei, k) in enumerate(requests):
        seen: set[int] = set()
        for proposer, lists in proposals.items():
            for s in lists[r]:
                if s in seen:
                    continue
                seen.add(s)
                e = examples[ei]
                augmented.append(Augmented(ei, e.neuron, substitute(e.pruned.tokens, k, s), k, s, proposer))
    aug_acts = fr.run([a.tokens for a in augmented], [a.neuron for a in augmented])
    for a, act in zip(augmented, aug_acts):
        a.acts = act
        parent = examples[a.parent]
        piv = parent.pruned.pivot
        a.positive = bool(act[piv] >= cfg.augment_positive * parent.acts[piv])
    return augmented, configured


def augmented_saliency_stage(fr: FitRun, examples: list[Example], augmented: list[Augmented]) -> None:
    """Stage 5: saliency of the augmented prompts that hold a firing token at or after the
    substituted position (tokens before it are the parent's: their paths would repeat the
    parent's)."""
    sal_items, sal_owner = [], []
    for ai, a in enumerate(augmented):
        parent = examples[a.parent]
        norm = a.acts / fr.a_max[a.neuron] * parent.pruned.scale
        fire = [i for i in firing_positions(norm, fr.cfg.activation_threshold) if i >= a.position]
        if fire:
            sal_items.append((a.tokens, a.neuron, a.acts, max(fire)))
            sal_owner.append(ai)
    for ai, alpha in zip(sal_owner, saliency_batch(fr.run, sal_items, fr.mask_id)):
        augmented[ai].alpha = alpha


def run_paper_stages(
    fr: FitRun, train_examples: dict[int, list[np.ndarray]], bar: Any = None
) -> tuple[list[Example], list[Augmented], list[str]]:
    """Stages 1 to 5 (``bar``: a tqdm bar advanced once per stage)."""
    tick = bar.update if bar is not None else (lambda: None)
    originals, orig_acts = original_examples(fr, train_examples)
    tick()
    examples = prune_stage(fr, originals, orig_acts)
    tick()
    saliency_stage(fr, examples)
    tick()
    augmented, proposers = augment_stage(fr, examples)
    tick()
    augmented_saliency_stage(fr, examples, augmented)
    tick()
    return examples, augmented, proposers


def by_neuron(fr: FitRun, examples: list[Example], augmented: list[Augmented]):
    """Example indices and augmented prompts of each neuron, in fit order."""
    ex: dict[int, list[int]] = {n: [] for n in fr.neurons}
    for ei, e in enumerate(examples):
        ex[e.neuron].append(ei)
    aug: dict[int, list[Augmented]] = {n: [] for n in fr.neurons}
    for a in augmented:
        aug[a.neuron].append(a)
    return ex, aug


def collect_paths(fr: FitRun, examples: list[Example], augmented: list[Augmented]) -> dict[int, list[Path]]:
    """Stage 6: the paths of every neuron: its examples' first, then its augmented prompts', in
    fit order."""
    model, cfg = fr.model, fr.cfg
    ex_of, aug_of = by_neuron(fr, examples, augmented)
    out: dict[int, list[Path]] = {}
    for n in fr.neurons:
        paths: list[Path] = []
        for ei in ex_of[n]:
            e = examples[ei]
            norm = e.acts / fr.a_max[n] * e.pruned.scale
            paths.extend(build_paths(model, e.pruned.tokens, norm, e.alpha, cfg))
        for a in aug_of[n]:
            if a.alpha is None:
                continue
            parent = examples[a.parent]
            norm = a.acts / fr.a_max[n] * parent.pruned.scale
            paths.extend(build_paths(
                model, a.tokens, norm, a.alpha, cfg,
                inherited_alpha=parent.alpha, inherited_positions=parent.important,
                pivot=parent.pruned.pivot, start=a.position,
            ))
        out[n] = paths
    return out


def make_graph(fr: FitRun, neuron: int, paths: Sequence[Path]):
    """One finalized ``n2g_fast.NeuronGraph`` holding ``paths``."""
    import n2g_fast

    a_max = fr.a_max[neuron]
    graph = n2g_fast.NeuronGraph(fr.model.name, fr.layer, neuron, fr.model.hook, a_max if a_max > 0 else 0.0)
    for activating, context, end in paths:
        graph.add_path(activating, context, end)
    graph.finalize()
    return graph


def paper_stats(
    fr: FitRun, neuron: int, examples: list[Example], augmented: list[Augmented], proposers: list[str],
    graph: Any, n_added: int,
) -> dict[str, Any]:
    """The per-neuron stats of stages 1 to 6 (``examples`` / ``augmented``: this neuron's)."""
    aug = augmented
    return {
        "n_examples": len(examples),
        "n_paths": int(graph.n_paths),
        "n_paths_added": n_added,
        "n_nodes": int(graph.n_nodes),
        "n_important": [len(e.important) for e in examples],
        "n_augmented_positive": sum(1 for a in aug if a.positive),
        "n_augmented_negative": sum(1 for a in aug if not a.positive),
        "augmented_by_proposer": {
            p: {"positive": sum(1 for a in aug if a.proposer == p and a.positive),
                "negative": sum(1 for a in aug if a.proposer == p and not a.positive)}
            for p in proposers
        },
        "prune_lengths": [e.pruned.context_len for e in examples],
        "pruned_tokens": [len(e.pruned.tokens) for e in examples],
        "scale_factors": [round(e.pruned.scale, 6) for e in examples],
        "trajectories": [[[c, round(v, 6)] for c, v in e.pruned.trajectory] for e in examples],
    }


def paper_details(ex_indices: list[int], examples: list[Example], augmented: list[Augmented]) -> dict[str, Any]:
    """Every pruned and augmented prompt of one neuron, as plain Python values."""
    return {
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
            for e in (examples[ei] for ei in ex_indices)
        ],
        "augmented": [
            {
                "example": ex_indices.index(a.parent),
                "tokens": list(a.tokens),
                "position": a.position,
                "substitute": a.substitute,
                "proposer": a.proposer,
                "positive": a.positive,
                "acts": a.acts.tolist(),
                "has_alpha": a.alpha is not None,
            }
            for a in augmented
        ],
    }
