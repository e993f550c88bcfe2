"""The work of one fit group: fit and evaluate a group of neurons of one layer from their scan rows
(n2g-method.md sections 2 to 8), returning the records to commit. Runs wherever the executor runs
it (this process or a Ray actor); the runner alone writes them to the workspace.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np

from ..workspace import NeuronRecord
from .request import BuildRequest


def _examples(tokens: np.ndarray, acts: np.ndarray) -> list[dict[str, Any]]:
    return [{"token_ids": t.tolist(), "activations": [round(float(x), 6) for x in a]} for t, a in zip(tokens, acts)]


def compute_group(model, layer: int, neurons: list[int], windows: np.ndarray, max_activation: list[float],
                  top_window_ids: list[list[int]], req: BuildRequest, job_id: str | None,
                  heldout: np.ndarray | None = None) -> list[NeuronRecord]:
    """Fits and evaluates a group of neurons of one layer from their scan rows (a_max and top
    window ids, one per neuron); returns the records without committing them. ``heldout``: the
    windows no fit may learn from (the evaluation's ordinary text)."""
    from ..activations import shared_activations

    # the fit asks for the true activations of the training windows again: read them back
    with shared_activations():
        return _compute_group(model, layer, neurons, windows, max_activation, top_window_ids, req, job_id, heldout)


def _compute_group(model, layer, neurons, windows, max_activation, top_window_ids, req, job_id, heldout):
    from ..activations import ActivationRunner, forward_tokens
    from ..evaluate import evaluate_neuron, split_train_test
    from ..fit import fit_neurons

    t0 = time.perf_counter()
    tokens0 = forward_tokens()[0]
    amax = {n: float(a) for n, a in zip(neurons, max_activation)}
    ex_tokens: dict[int, np.ndarray] = {}
    for n, ids in zip(neurons, top_window_ids):
        ids = np.asarray(ids, dtype=np.int64)
        ex_tokens[n] = windows[ids[ids >= 0][: min(req.scan.k, 2 * req.eval.n_train)]]  # the paper's windows
    # True activations of every neuron on its examples: one runner for the group, so windows that
    # several neurons share run once and the passes are full.
    seqs = [t for n in neurons for t in ex_tokens[n]]
    owners = [n for n in neurons for _ in ex_tokens[n]]
    acts = iter(ActivationRunner(model, layer, req.fit.batch_tokens).run(seqs, owners))
    # a neuron that never fires on the corpus (a_max <= 0) has nothing for a graph to explain: it
    # gets an empty graph and its raw activations (no fires), not a fit
    live = [n for n in neurons if amax[n] > 0]
    scale = {n: amax[n] if amax[n] > 0 else 1.0 for n in neurons}
    ex_acts = {n: np.array([next(acts) for _ in ex_tokens[n]], dtype=np.float32).reshape(ex_tokens[n].shape) / scale[n]
               for n in neurons}
    splits = {n: split_train_test(len(ex_tokens[n]), req.eval.n_train, req.eval.seed, layer, n) for n in neurons}
    train = {n: [ex_tokens[n][i] for i in splits[n][0]] for n in neurons}
    tops = {n: np.asarray(ids, dtype=np.int64) for n, ids in zip(neurons, top_window_ids)}
    extra = None
    with contextlib.suppress(ImportError):
        from ..fit import training_pool

        # the paper's train + test windows are the first 2 x n_train ranks; further ranks (a scan
        # with k above that) are extra training windows for a fit method that learns from more
        n_paper = {n: int((tops[n] >= 0).sum().clip(max=min(req.scan.k, 2 * req.eval.n_train))) for n in neurons}
        extra = training_pool(windows, tops, neurons, min(n_paper.values()),
                              {n: tops[n][: n_paper[n]][splits[n][1]].tolist() for n in neurons},
                              heldout if heldout is not None else ())
    fitted = {}
    if live:
        train_live, amax_live = {n: train[n] for n in live}, {n: amax[n] for n in live}
        fitted = (fit_neurons(model, layer, live, train_live, amax_live, req.fit, extra=extra) if extra is not None
                  else fit_neurons(model, layer, live, train_live, amax_live, req.fit))
    seconds = (time.perf_counter() - t0) / len(neurons)
    fit_tokens = (forward_tokens()[0] - tokens0) / len(neurons)
    records = []
    for n in neurons:
        tr, te = splits[n]
        result = fitted[n] if n in fitted else _dead_result(model, layer, n, amax[n])
        train_pairs = [(ex_tokens[n][i], ex_acts[n][i]) for i in tr] + [(t, a) for _, t, a in result.extra_train]
        test_pairs = [(ex_tokens[n][i], ex_acts[n][i]) for i in te]
        metrics = evaluate_neuron(result.graph, train_pairs, test_pairs, req.eval)
        stats = dict(result.stats)
        stats["seconds_per_neuron_in_group"] = seconds
        stats["fit_tokens"] = fit_tokens  # forward-pass tokens a neuron of the group cost
        examples = {
            "layer": layer, "neuron": n, "max_activation": amax[n],
            # + the windows the fit learnt from beyond them: the baselines are fitted on the same
            "train": _examples(ex_tokens[n][tr], ex_acts[n][tr])
            + _examples([t for _, t, _ in result.extra_train], [a for _, _, a in result.extra_train]),
            "test": _examples(ex_tokens[n][te], ex_acts[n][te]),
        }
        records.append(NeuronRecord(layer, n, amax[n], result.graph.to_bytes(), examples, stats, metrics, job_id))
    return records


def _dead_result(model, layer: int, neuron: int, amax: float):
    import n2g_fast

    from ..fit import FitResult

    graph = n2g_fast.NeuronGraph(model.name, layer, neuron, model.hook, amax)
    graph.finalize()
    return FitResult(graph, {"dead": True, "n_paths": 0, "n_nodes": 0})
