"""The static HTML report of a workspace (issue 5; n2g-method.md sections 7-9).

`write_report(workspace, out_dir)` writes a site that opens from disk with no server and no network:

    out_dir/index.html            model, corpus, hook, settings, per-layer table, plots, neuron list
    out_dir/neurons/L_N.html      one page per built neuron
    out_dir/graphs/L_N.svg        the neuron's graph (n2g_fast.NeuronGraph.to_svg)
    out_dir/plots/*.svg           matplotlib plots (Agg, SVG)
    out_dir/static/report.css|js  local assets (no CDN)

Pages come from the Jinja2 templates in `templates/` with autoescaping on; every token string goes
through `tokens.visible_html` so whitespace, control bytes and invisible characters are shown.
The report reads the workspace only; it never needs the model, unless token strings are stored
nowhere in the workspace, in which case the tokenizer is loaded lazily (see `tokens.TokenTexts`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Collection

import numpy as np

from n2g.vocab import DEFAULT_SEMANTICS, SEMANTICS

from ..methods import all_methods
from ..workspace import Workspace
from . import plots
from .cells import example_cells
from .similarity import SCORE, neighbours
from .tokens import TokenTexts, example_tokens, visible_html, visible_text

__all__ = ["write_report", "METHODS"]

METHODS = {m.id: m.title for m in all_methods()}  # the evaluation's registry (methods.py)
TOP_TOKENS = 6
# a neuron page shows at most this many windows of a split (the strongest first): the calibrated
# fit learns from ~300 windows a neuron, most of them ordinary text where it is silent
MAX_SHOWN_EXAMPLES = 30
MARKER = ".n2g-report"
_HERE = Path(__file__).parent


def _env():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True,  # every template is HTML
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["tok"] = visible_html
    env.filters["vis"] = visible_text
    env.filters["num"] = _num
    return env


def _num(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if isinstance(d, dict):
        for k in sorted(d):
            out.extend(_flatten(d[k], f"{prefix}.{k}" if prefix else str(k)))
    else:
        out.append((prefix, json.dumps(d) if isinstance(d, (list, dict)) else _num(d, 4)))
    return out


def _scalar_stats(stats: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for k in sorted(stats):
        v = stats[k]
        if k in plots.TRAJECTORY_KEYS:
            continue
        if isinstance(v, (list, tuple)):
            rows.append((k, f"list of {len(v)}") if len(v) > 24 or any(isinstance(e, (list, dict)) for e in v)
                        else (k, ", ".join(_num(e, 3) for e in v)))
        elif isinstance(v, dict):
            rows.extend(_flatten(v, k))
        else:
            rows.append((k, _num(v, 4)))
    return rows


def _settings(ws: Workspace) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    meta = [(k, v) for k, v in ws.meta_items()
            if k not in ("model", "corpus", "hook", "token_strings") and len(v) <= 400]
    jobs = ws.list_jobs()
    done = [j for j in jobs if j.state == "succeeded"] or jobs
    request = _flatten(done[-1].request) if done else []
    return meta, request


def _page_name(layer: int, neuron: int) -> str:
    return f"{layer}_{neuron}"


def _top_activating(doc: dict[str, Any]) -> list[str]:
    roots = sorted(doc.get("roots", []), key=lambda r: -(r.get("activation") or 0.0))
    seen: list[str] = []
    for r in roots:
        if r.get("label") not in seen:
            seen.append(r.get("label", ""))
    return seen


def _sparkline(trajs: list[tuple[np.ndarray, np.ndarray]], w: int = 260, h: int = 80) -> dict[str, Any] | None:
    if not trajs:
        return None
    xmax = max(float(x[-1]) for x, _ in trajs) or 1.0
    ymax = max(1.0, max(float(y.max()) for _, y in trajs))
    ymin = min(0.0, min(float(y.min()) for _, y in trajs))
    lines = []
    for x, y in trajs:
        pts = " ".join(f"{4 + (w - 8) * xi / xmax:.1f},{h - 4 - (h - 8) * (yi - ymin) / (ymax - ymin):.1f}"
                       for xi, yi in zip(x, y))
        lines.append(pts)
    return {"w": w, "h": h, "lines": lines, "xmax": int(xmax), "ymax": ymax}


def _prepare_out(out: Path) -> None:
    """Creates out_dir; clears the parts of an earlier report written there (never other files)."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / MARKER).exists():
        for sub in ("neurons", "graphs", "plots", "static"):
            shutil.rmtree(out / sub, ignore_errors=True)
    for sub in ("neurons", "graphs", "plots"):
        (out / sub).mkdir(exist_ok=True)
    shutil.copytree(_HERE / "static", out / "static", dirs_exist_ok=True)
    (out / MARKER).write_text("written by n2g_service.report; `n2g report` may replace this folder's report files\n")


def write_report(workspace_path: str | Path, out_dir: str | Path, *, use_model_tokenizer: bool = True,
                 neighbours_k: int = 8, semantics: str | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 layers: Collection[int] | None = None) -> Path:
    """Writes the static report of a workspace into `out_dir`; returns the path of index.html.

    use_model_tokenizer: when no token strings are stored in the workspace, load the model's
    tokenizer (lazily, via n2g_service.models) to show them; False shows token ids instead.
    semantics: the N2G prediction semantics used to shade predicted activations (default: the
    build's eval setting, else "all_paths_max").
    progress: called as progress(pages_written, pages_total) after each neuron page.
    layers: only these layers' neurons (a whole model's report is best made a few layers at a
    time); their similar neurons are found among them.
    """
    t0 = time.perf_counter()
    ws = Workspace(workspace_path)
    out = Path(out_dir)
    _prepare_out(out)
    env = _env()
    meta_rows, request_rows = _settings(ws)
    semantics = semantics or DEFAULT_SEMANTICS
    if semantics not in SEMANTICS:
        raise ValueError(f"unknown semantics {semantics!r}: use one of {', '.join(SEMANTICS)}")
    default_method = f"n2g_{semantics}"
    texts = TokenTexts(ws, ws.model_name, use_model=use_model_tokenizer)

    # -- pass 1: graphs, metrics, stats (no examples) -------------------------------------------
    rows: list[dict[str, Any]] = []
    labels: dict[tuple[int, int], tuple[frozenset, frozenset]] = {}
    blobs: list[bytes] = []
    per_layer: dict[int, dict[str, list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
    f1s: dict[str, list[float]] = defaultdict(list)
    traj_by_layer: dict[int, list] = defaultdict(list)
    for rec in ws.iter_neurons(with_examples=False, layers=layers):
        key = (rec.layer, rec.neuron)
        g = rec.graph()
        doc = json.loads(g.to_json())
        act, ctx = g.activating_labels(), g.context_labels()
        labels[key] = (frozenset(act), frozenset(ctx))
        blobs.append(rec.graph_bytes)
        (out / "graphs" / f"{_page_name(*key)}.svg").write_text(g.to_svg(), encoding="utf-8")
        for method, m in (rec.metrics or {}).items():
            if isinstance(m, dict) and "f1" in m:
                per_layer[rec.layer][method].append(m)
                f1s[method].append(float(m["f1"]))
        traj_by_layer[rec.layer].extend(plots.neuron_trajectories(rec.stats or {}))
        f1 = {m: (rec.metrics.get(m) or {}).get("f1") for m in METHODS}
        top = _top_activating(doc)[:TOP_TOKENS]
        rows.append({
            "layer": rec.layer, "neuron": rec.neuron, "page": _page_name(*key), "f1": f1,
            "n_act": len(act), "n_ctx": len(ctx), "top": top, "max_activation": rec.max_activation,
            "search": " ".join(visible_text(t) for t in top).lower(),
        })

    # -- per-layer table and plots -------------------------------------------------------------
    layer_table: dict[int, dict[str, dict[str, float]]] = {}
    for layer in sorted(per_layer):
        layer_table[layer] = {}
        for method, ms in per_layer[layer].items():
            layer_table[layer][method] = {
                q: float(np.mean([float(m.get(q, 0.0)) for m in ms])) for q in ("precision", "recall", "f1")
            } | {"n": len(ms)}
    plots.plot_f1_per_layer(layer_table, out / "plots" / "f1_per_layer.svg")
    plots.plot_f1_distribution(f1s, out / "plots" / "f1_distribution.svg")
    curves = {l: c for l, t in traj_by_layer.items() if (c := plots.mean_trajectory(t)) is not None}
    plots.plot_trajectories(curves, out / "plots" / "trajectory_per_layer.svg")

    # -- most similar neurons ------------------------------------------------------------------
    neigh = neighbours([(r["layer"], r["neuron"]) for r in rows], blobs, neighbours_k)
    similarity_note = f"n2g_fast.GraphStore.neighbours: {SCORE}"
    blobs.clear()

    # -- pass 2: one page per neuron -------------------------------------------------------------
    page_tpl = env.get_template("neuron.html.j2")
    order = [(r["layer"], r["neuron"]) for r in rows]
    position = {k: i for i, k in enumerate(order)}
    known = position.keys()
    written = 0
    for rec in ws.iter_neurons(with_examples=True, layers=layers):
        key = (rec.layer, rec.neuron)
        if key not in position:  # committed by a build running meanwhile: in the next report
            continue
        g = rec.graph()
        splits = []
        for split in ("train", "test"):
            exs = (rec.examples or {}).get(split) or []
            stored = len(exs)
            if stored > MAX_SHOWN_EXAMPLES:  # a calibrated fit learns from ~300 windows: its strongest
                exs = sorted(exs, key=lambda e: -max(e["activations"], default=0.0))[:MAX_SHOWN_EXAMPLES]
            preds = g.predict([e["token_ids"] for e in exs], semantics=semantics) if exs else []
            shown = []
            for e, p in zip(exs, preds):
                toks = example_tokens(texts, e)
                acts = e["activations"]
                pivot = int(np.argmax(acts)) if len(acts) else -1
                shown.append({
                    "cells": example_cells(toks, acts, p.tolist(), e["token_ids"], pivot),
                    "pivot": pivot, "max_true": max(acts) if acts else 0.0,
                    "max_pred": float(p.max()) if len(p) else 0.0,
                })
            splits.append((split, shown, stored))
        idx = position.get(key, -1)
        page = page_tpl.render(
            root="../", title=f"Neuron {rec.layer}.{rec.neuron}", rec=rec, model=ws.model_name or "?",
            page=_page_name(*key),
            prev=_page_name(*order[idx - 1]) if idx > 0 else None,
            next=_page_name(*order[idx + 1]) if 0 <= idx < len(order) - 1 else None,
            methods=METHODS, metrics=rec.metrics or {},
            stats=_scalar_stats(rec.stats or {}), splits=splits, semantics=semantics,
            act_labels=sorted(labels[key][0]), ctx_labels=sorted(labels[key][1]),
            neighbours=[{"layer": l, "neuron": n, "score": s, "act": oa, "ctx": oc,
                         "page": _page_name(l, n) if (l, n) in known else None}
                        for (l, n), s, oa, oc in neigh.get(key, [])],
            similarity_note=similarity_note,
            trajectory=_sparkline(plots.neuron_trajectories(rec.stats or {})),
            token_note=texts.note,
        )
        (out / "neurons" / f"{_page_name(*key)}.html").write_text(page, encoding="utf-8")
        written += 1
        if progress is not None:
            progress(written, len(order))

    index = out / "index.html"
    index.write_text(env.get_template("index.html.j2").render(
        root="", title="n2g report", model=ws.model_name or "?", corpus=ws.corpus or "?", hook=ws.hook or "?",
        meta=meta_rows, request=request_rows, methods=METHODS, layer_table=layer_table, rows=rows,
        default_method=default_method, similarity_note=similarity_note,
        token_source=texts.source, token_note=texts.note, n_neurons=len(rows),
        generated=time.strftime("%Y-%m-%d %H:%M:%S"), seconds=time.perf_counter() - t0,
    ), encoding="utf-8")
    return index
