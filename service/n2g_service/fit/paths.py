"""Path building (n2g-method.md section 5).

For every token i of an example (original or augmented) whose normalised activation times the
example's scale factor exceeds activation_threshold (BOS never counts):

- the path starts with token i (activating element: its label, every id with that label, and the
  scaled normalised activation);
- walking back j = i-1 .. 1, token j is context when alpha[j, i] > importance_threshold, or, for an
  augmented example, when it was important at that position in the original example
  (alpha_original[j, i] > importance_threshold, or j is one of the original's important positions
  for the pivot when i is the pivot); otherwise it is IGNORE (``None``);
- the path is cut after its last context token (BOS is never context) and closed by an END holding
  the scaled normalised activation of token i.

The importance stored on a context element is the larger of the example's and the inherited
alpha, clipped to [0, 1].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..config import FitConfig
from ..models import LoadedModel

Path = tuple[tuple[str, list[int], float], list, float]


def firing_positions(norm_acts: np.ndarray, threshold: float) -> list[int]:
    """Positions i >= 1 with norm_acts[i] > threshold (norm_acts already scaled)."""
    return [i for i in range(1, len(norm_acts)) if float(norm_acts[i]) > threshold]


def build_paths(
    model: LoadedModel,
    tokens: Sequence[int],
    norm_acts: np.ndarray,
    alpha: np.ndarray,
    cfg: FitConfig = FitConfig(),
    inherited_alpha: np.ndarray | None = None,
    inherited_positions: Sequence[int] = (),
    pivot: int | None = None,
    start: int = 1,
) -> list[Path]:
    """The paths of one example (``norm_acts`` = activation / a_max x scale), for the firing tokens
    at positions >= ``start``."""
    labels = model.token_labels()
    tau = cfg.importance_threshold
    inherited = set(int(p) for p in inherited_positions)
    paths: list[Path] = []
    for i in firing_positions(norm_acts, cfg.activation_threshold):
        if i < start:
            continue
        elems: list = []
        last_ctx = -1
        for j in range(i - 1, 0, -1):
            imp = float(alpha[j, i])
            is_ctx = imp > tau
            if inherited_alpha is not None:
                inh = float(inherited_alpha[j, i])
                if inh > tau or (pivot is not None and i == pivot and j in inherited):
                    is_ctx = True
                imp = max(imp, inh)
            if is_ctx:
                lab = labels[int(tokens[j])]
                elems.append((lab, model.label_token_ids(lab), float(min(max(imp, 0.0), 1.0))))
                last_ctx = len(elems)
            else:
                elems.append(None)
        lab = labels[int(tokens[i])]
        act = float(norm_acts[i])
        paths.append(((lab, model.label_token_ids(lab), act), elems[: max(last_ctx, 0)], act))
    return paths
