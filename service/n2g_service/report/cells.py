"""The token cells of an example, as HTML.

A report of 1,000 neurons holds over a million token cells; rendering each through Jinja2 costs
about 70 us, so this one fixed cell format is filled here instead (a few us a cell) and handed to
the template as Markup. Cells whose true and predicted activations are both below 0.05 (nothing
to shade) carry no values, which keeps pages small. Everything variable in a cell is either a
number formatted here or the token, which goes through `tokens.visible_html` (escaped, whitespace
and control characters shown).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
from markupsafe import Markup

from .tokens import visible_html

@lru_cache(maxsize=1 << 16)
def _plain(tok: str) -> str:
    return f'<span class="t">{visible_html(tok)}</span>'


def example_cells(tokens: Sequence[str], acts: Sequence[float], preds: Sequence[float],
                  ids: Sequence[int], pivot: int) -> Markup:
    a = np.asarray(acts, dtype=np.float64)
    p = np.asarray(preds, dtype=np.float64)
    sa = np.fmin(np.fmax(a, 0.0), 1.0)  # negatives and NaN: no shade
    sp = np.fmin(np.fmax(p, 0.0), 1.0)
    plain = ((sa < 0.05) & (sp < 0.05) & (np.abs(a) < 0.05)).tolist()
    sa, sp, a, p = sa.tolist(), sp.tolist(), a.tolist(), p.tolist()
    if 0 <= pivot < len(plain):
        plain[pivot] = False
    out = []
    for i, tok in enumerate(tokens):
        if plain[i]:
            out.append(_plain(tok))
            continue
        pv = " pv" if i == pivot else ""
        out.append(f'<span class="t{pv}" style="--a:{sa[i]:.2f};--p:{sp[i]:.2f}" '
                   f'title="true {a[i]:.2f}, predicted {p[i]:.2f}, id {int(ids[i])}">{visible_html(tok)}</span>')
    return Markup("".join(out))
