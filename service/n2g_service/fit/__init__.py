"""N2G fit: pruning, saliency, augmentation, paths, trie (n2g-method.md sections 2 to 5).

:func:`fit_neurons` fits several neurons of one layer together with the fit method that
``FitConfig.method`` names (:mod:`.methods`: ``paper``, ``calibrated``; :func:`preset` gives each
method's settings). The stages are in :mod:`.pipeline` (the paper's) and :mod:`.calibrate`
(learning from more windows and from real occurrences). Every graph's stats record the method and
the settings it was built with (``stats["method"]``, ``stats["fit_config"]``).

``stats["seconds"]`` is the wall time of the call divided by the number of neurons (work is
shared between neurons).
"""

from __future__ import annotations

import time

import numpy as np

from ..config import FitConfig
from ..models import LoadedModel
from .calibrate import TrainingPool, training_pool
from .methods import FitMethod, FitResult, fit_method, fit_methods, preset, register_fit_method
from .pipeline import start_run

__all__ = [
    "FitMethod", "FitResult", "TrainingPool", "fit_method", "fit_methods", "fit_neurons", "preset",
    "register_fit_method", "scan_k", "training_pool",
]


def scan_k(cfg: FitConfig, n_train: int, default: int) -> int:
    """Top windows a neuron's scan must keep for ``cfg``'s method: the paper's 2 x n_train (train
    + test), plus ``extra_top`` for a method that learns from further top windows; at least
    ``default``."""
    method = fit_method(cfg.method)
    return max(int(default), 2 * int(n_train) + (int(cfg.extra_top) if method.uses_pool else 0))


def fit_neurons(
    model: LoadedModel,
    layer: int,
    neurons: list[int],
    train_examples: dict[int, list[np.ndarray]],
    max_activation: dict[int, float],
    cfg: FitConfig = FitConfig(),
    progress: bool = False,
    details: bool = False,
    extra: TrainingPool | None = None,
) -> dict[int, FitResult]:
    """Fits one neuron graph per neuron of ``layer`` with the method ``cfg.method``.

    ``train_examples[n]``: token id arrays, each starting with BOS (prepended when missing).
    ``max_activation[n]``: the neuron's a_max from the dataset scan (must be > 0 to fit).
    ``extra``: corpus windows a method may learn from beyond ``train_examples`` (the held-out
    and test windows marked in it are never used); "paper" ignores it. The windows a method
    learnt from come back in ``FitResult.extra_train``.
    ``details=True`` also returns every pruned and augmented prompt in ``FitResult.details``.
    """
    from tqdm.auto import tqdm

    method = fit_method(cfg.method)
    t0 = time.perf_counter()
    fr = start_run(model, layer, neurons, max_activation, cfg)
    bar = tqdm(total=method.n_stages, desc=f"fit layer {fr.layer} ({len(fr.neurons)} neurons, {method.name})",
               disable=not progress)
    try:
        results = method.fit(fr, train_examples, extra, bar, details)
    finally:
        bar.close()
    seconds = (time.perf_counter() - t0) / max(len(fr.neurons), 1)
    settings = cfg.to_dict()
    for r in results.values():
        r.stats["method"] = method.name
        r.stats["fit_config"] = dict(settings)
        r.stats["seconds"] = seconds
        r.stats["forward_passes_shared"] = fr.runner.n_forward
    return results
