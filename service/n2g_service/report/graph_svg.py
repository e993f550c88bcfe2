"""The neuron graph as SVG. `n2g_fast.NeuronGraph.to_svg()` is the renderer (n2g-method.md
section 7); this module is the report's fallback for an n2g_fast that lacks it, drawing the same
picture from the `n2g.graph/v1` JSON: IGNORE nodes dropped, identical labels merged per depth (a
DAG), activating tokens (depth 0, right) red by activation, context tokens blue by importance,
END-bearing nodes with a bold outline, edges from context towards the activating token."""

from __future__ import annotations

from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from .tokens import visible_text

CHAR_W = 7.4  # px per character of 12px monospace
ROW_H = 30
NODE_H = 22
COL_GAP = 46
PAD = 12


def graph_dag(doc: dict[str, Any]) -> tuple[list[list[dict]], set[tuple[tuple[int, str], tuple[int, str]]]]:
    """Columns (one per depth) of merged nodes and the edges between them (child -> parent)."""
    cols: list[dict[str, dict]] = []
    edges: set = set()

    def node(depth: int, label: str) -> dict:
        while len(cols) <= depth:
            cols.append({})
        n = cols[depth].get(label)
        if n is None:
            n = cols[depth][label] = {"label": label, "depth": depth, "value": 0.0, "end": False}
        return n

    stack = [(r, 0, None) for r in reversed(doc.get("roots", []))]
    while stack:
        raw, depth, parent = stack.pop()
        key = parent
        if not raw.get("ignore"):
            n = node(depth, raw.get("label", ""))
            val = raw.get("activation") if depth == 0 else raw.get("importance")
            n["value"] = max(n["value"], float(val or 0.0))
            n["end"] = n["end"] or raw.get("end") is not None
            key = (depth, n["label"])
            if parent is not None:
                edges.add((key, parent))
        for c in reversed(raw.get("children", [])):
            stack.append((c, depth + 1, key))
    return [list(c.values()) for c in cols], edges


def _fill(depth: int, value: float) -> str:
    v = min(max(value, 0.0), 1.0)
    if depth == 0:  # red by activation
        return f"rgb(255,{int(235 - 180 * v)},{int(235 - 180 * v)})"
    return f"rgb({int(235 - 180 * v)},{int(240 - 120 * v)},255)"  # blue by importance


def render_svg(doc: dict[str, Any]) -> str:
    cols, edges = graph_dag(doc)
    title = f"layer {doc.get('layer')} neuron {doc.get('neuron')}"
    if not cols:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="320" height="40" role="img">'
                f'<title>{escape(title)}: empty graph</title>'
                f'<text x="10" y="25" font-family="sans-serif" font-size="13">empty graph</text></svg>')
    widths = [max((CHAR_W * len(visible_text(n["label"])) + 16 for n in col), default=20.0) for col in cols]
    height = PAD * 2 + ROW_H * max(len(c) for c in cols)
    total_w = PAD * 2 + sum(widths) + COL_GAP * (len(cols) - 1)
    # rankdir RL: depth 0 rightmost.
    x_right = total_w - PAD
    pos: dict[tuple[int, str], tuple[float, float, float]] = {}
    for depth, col in enumerate(cols):
        w = widths[depth]
        x0 = x_right - w
        top = (height - ROW_H * len(col)) / 2
        for i, n in enumerate(col):
            pos[(depth, n["label"])] = (x0, top + ROW_H * i + (ROW_H - NODE_H) / 2, w)
        x_right = x0 - COL_GAP
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {total_w:.0f} {height:.0f}" role="img">',
        f"<title>{escape(title)}</title>",
        '<defs><marker id="arr" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
        '<g stroke="#777" stroke-width="1.2" fill="none">',
    ]
    for child, parent in sorted(edges):
        cx, cy, cw = pos[child]
        px, py, _ = pos[parent]
        out.append(f'<line x1="{cx + cw:.1f}" y1="{cy + NODE_H / 2:.1f}" x2="{px:.1f}" y2="{py + NODE_H / 2:.1f}" '
                   f'marker-end="url(#arr)"/>')
    out.append("</g>")
    out.append('<g font-family="DejaVu Sans Mono, monospace" font-size="12">')
    for depth, col in enumerate(cols):
        for n in col:
            x, y, w = pos[(depth, n["label"])]
            shown = visible_text(n["label"])
            what = "activation" if depth == 0 else "importance"
            tip = f"{shown} ({'activating' if depth == 0 else f'context, depth {depth}'}; {what} {n['value']:.2f}" + \
                  ("; END" if n["end"] else "") + ")"
            out.append(
                f'<g class="node"><title>{escape(tip)}</title>'
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{NODE_H}" rx="4" '
                f'fill="{_fill(depth, n["value"])}" stroke="#222" stroke-width="{2.6 if n["end"] else 0.8}"/>'
                f'<text x="{x + w / 2:.1f}" y="{y + NODE_H / 2 + 4:.1f}" text-anchor="middle" '
                f'xml:space="preserve">{escape(shown)}</text></g>')
    out.append("</g></svg>")
    return "\n".join(out)


def graph_svg(graph, doc: dict[str, Any]) -> tuple[str, str]:
    """(svg text, renderer name): n2g_fast's own renderer when it has one and its output is
    well-formed XML (a browser shows a broken image otherwise), else the fallback here."""
    to_svg = getattr(graph, "to_svg", None)
    if to_svg is not None:
        try:
            svg = to_svg()
            ElementTree.fromstring(svg)
            return svg, "n2g_fast"
        except Exception:  # no renderer yet, or a label it does not escape: the fallback draws it
            pass
    return render_svg(doc), "report fallback"
