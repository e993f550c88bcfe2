"""The token cells of an example, as HTML.

A report of 1,000 neurons holds over a million token cells; rendering each through Jinja2 costs
about 70 us, so this one fixed cell format is filled here instead (a few us a cell) and handed to
the template as Markup. Cells whose true and predicted activations are both below 0.05 (nothing
to shade) carry no values, which keeps pages small. Everything variable in a cell is either a number formatted here or the
token, which goes through `tokens.visible_html` (escaped, whitespace and control characters shown).
"""

from __future__ import annotations

from typing import Sequence

from markupsafe import Markup

from .tokens import visible_html

def _alpha(x: float) -> float:
    return 0.0 if not x > 0.0 else (1.0 if x > 1.0 else x)  # NaN and negatives: no shade


def example_cells(tokens: Sequence[str], acts: Sequence[float], preds: Sequence[float],
                  ids: Sequence[int], pivot: int) -> Markup:
    out = []
    for i, (tok, a, p, tid) in enumerate(zip(tokens, acts, preds, ids)):
        sa, sp = _alpha(a), _alpha(p)
        pv = " pv" if i == pivot else ""
        if not pv and sa < 0.05 and sp < 0.05 and abs(a) < 0.05:
            out.append(f'<span class="t">{visible_html(tok)}</span>')
        else:
            out.append(f'<span class="t{pv}" style="--a:{sa:.2f};--p:{sp:.2f}" '
                       f'title="true {a:.2f}, predicted {p:.2f}, id {int(tid)}">{visible_html(tok)}</span>')
    return Markup("".join(out))
