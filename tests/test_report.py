"""The static HTML report (issue 5), checked in a real browser.

A workspace of a few hand-made neurons (graphs built with n2g_fast.NeuronGraph, tokens full of
special characters) is written as a report, then the index and a neuron page are opened in
headless Chromium (Debian's `chromium`), driven by Playwright: the test fails on any console
error, uncaught exception, failed load
or JavaScript dialog, on any request whose URL is not file://, when the graph SVG or a plot is
missing or has no rendered size, and when a special character is not escaped and shown visibly.
Screenshots go to tests/artifacts/report/ (or $N2G_ARTIFACTS); their paths are printed.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import n2g_fast
from n2g_service.report import write_report
from n2g_service.report.tokens import visible_segments, visible_text
from n2g_service.workspace import NeuronRecord, Workspace

ARTIFACTS = Path(os.environ.get("N2G_ARTIFACTS", Path(__file__).parent / "artifacts" / "report"))

# id -> token string; the hard cases of issue 5.
VOCAB = [
    "<|endoftext|>", " the", "<script>alert(1)</script>", "\"quoted\" & 'single'", "\n", "\t", " ", "  ",
    "naïve", "日本語", "\x07", "\x00", "\u200b", "\ufffd", "cat", " dog", ".", "</span><b>x</b>",
    "{{ jinja }}", "Ġbyte", "\r\n", "a\tb c",
    " שלום", " 1", " -", " 2", " עולם",  # right-to-left words among neutrals
]
ID = {s: i for i, s in enumerate(VOCAB)}
MODEL = "test/hand-made"
HOOK = "blocks.{l}.mlp.hook_post"


def _graph(layer: int, neuron: int, paths) -> n2g_fast.NeuronGraph:
    g = n2g_fast.NeuronGraph(MODEL, layer, neuron, HOOK.format(l=layer), 2.5)
    for act, ctx, end in paths:
        g.add_path((act, [ID[act]], end), [None if c is None else (c, [ID[c]], 0.9) for c in ctx], end)
    g.finalize()
    return g


def _example(ids: list[int], g: n2g_fast.NeuronGraph, with_tokens: bool) -> dict:
    acts = [round(float(x), 4) for x in g.predict([ids])[0]]
    acts = [min(1.0, a * 0.9 + 0.05 * (i % 3)) for i, a in enumerate(acts)]  # "true" differs a little
    ex = {"token_ids": ids, "activations": acts}
    if with_tokens:
        ex["tokens"] = [VOCAB[i] for i in ids]
    return ex


def _metrics(f1: float) -> dict:
    return {m: {"precision": min(1.0, f1 + d), "recall": max(0.0, f1 - d), "f1": max(0.0, f1 - 2 * d), "tp": 3, "fp": 1, "fn": 2}
            for m, d in (("n2g_all_paths_max", 0.0), ("n2g_greedy_deepest", 0.02), ("token_lookup", 0.1), ("ngram_lookup", 0.2))}


NEURONS = {
    (0, 3): [("<script>alert(1)</script>", ["\"quoted\" & 'single'", None, "\t"], 0.9), ("\n", [" "], 0.7)],
    (0, 7): [("naïve", ["日本語", "\x07"], 1.0), ("\x00", [], 0.6), ("\u200b", ["\ufffd"], 0.8)],
    (1, 2): [("</span><b>x</b>", ["{{ jinja }}", "Ġbyte"], 0.85), ("  ", ["\r\n"], 0.55), ("naïve", ["日本語"], 0.7)],
    (1, 5): [("cat", [" the"], 0.95), (" dog", [" the", None, "."], 0.75), ("a\tb c", [], 0.5), ("\n", [" "], 0.6)],
}
SEQUENCES = [
    [ID[" the"], ID["cat"], ID["."], ID["\n"], ID[" "], ID["\n"], ID["\"quoted\" & 'single'"], ID["\t"], ID["<|endoftext|>"],
     ID["\"quoted\" & 'single'"], ID["<script>alert(1)</script>"]],
    [ID["日本語"], ID["\x07"], ID["naïve"], ID["\x00"], ID["\ufffd"], ID["\u200b"], ID[" dog"], ID[" the"], ID["."], ID[" dog"],
     ID[" שלום"], ID[" 1"], ID[" -"], ID[" 2"], ID[" עולם"], ID["."]],
    [ID["Ġbyte"], ID["{{ jinja }}"], ID["</span><b>x</b>"], ID["\r\n"], ID["  "], ID["a\tb c"], ID["cat"], ID[" the"], ID["cat"]],
]


def make_workspace(path: Path) -> Workspace:
    ws = Workspace(path, create=True, model=MODEL, corpus="hand-made <corpus> & \"quotes\"", hook=HOOK)
    # A stored vocabulary serves the neurons whose examples carry no token strings.
    ws.set_meta("token_strings", json.dumps(VOCAB))
    ws.create_job("job1", {"layers": [0, 1], "sample": 2, "eval": {"n_train": 10, "seed": 0}, "scan": {"k": 20}}, 4)
    ws.update_job("job1", state="succeeded")
    for i, ((layer, neuron), paths) in enumerate(sorted(NEURONS.items())):
        g = _graph(layer, neuron, paths)
        exs = [_example(s, g, with_tokens=(i % 2 == 0)) for s in SEQUENCES]
        # as the fit writes them: per example [[context tokens kept, normalised pivot activation], ...]
        traj = [[[k, min(1.0, 0.15 + 0.12 * k / (1 + layer))] for k in range(0, 8 + 4 * layer, 2)] for _ in range(3)]
        ws.put_neuron(NeuronRecord(
            layer, neuron, 2.5, g.to_bytes(), {"train": exs[:2], "test": exs[2:]},
            {"n_train_examples": 2, "n_paths": g.n_paths, "prune_seconds": 0.01, "trajectories": traj},
            _metrics(0.5 + 0.1 * i)))
    return ws


# -- unit checks on the token display ----------------------------------------------------------
def test_visible_tokens():
    assert visible_text(" the") == "·the"
    assert visible_text("\n") == "⏎" and visible_text("\t") == "⇥" and visible_text("\r\n") == "␍⏎"
    assert visible_text("\x07") == "\\x07" and visible_text("\x00") == "\\x00"
    assert visible_text("\u200b") == "U+200B" and visible_text("\u00a0") == "\\xa0"
    assert visible_text("naïve 日本語") == "naïve·日本語"
    assert visible_text("") == "∅"
    assert [k for k, _ in visible_segments("a\tb")] == ["", "ws", ""]
    # the report and the drawings agree on every character: letters that draw blank, and characters
    # Python's Unicode tables (older than n2g_fast's) call unassigned
    for text in ("\u3164\u115f\u1160\uffa0\u2800\u034f", "\U0001fa75\U0001f6dc\u0cf3\U00011f00\U0002b739",
                 "a\x00b\u202e c\u2028"):
        assert visible_text(text) == n2g_fast.visible(text), text
    assert visible_text("\u3164") == "U+3164" and visible_text("\U0001fa75") == "\U0001fa75"
    assert visible_text("\ud800") == "U+D800"  # a lone surrogate (n2g_fast takes none) is a code too


def test_trajectory_formats():
    from n2g_service.report.plots import mean_trajectory, neuron_trajectories

    pairs = neuron_trajectories({"trajectories": [[[0, 0.1], [2, 0.5], [4, 0.9]], [[0, 0.3], [1, 0.7]], []]})
    assert len(pairs) == 2 and pairs[0][0].tolist() == [0, 2, 4]
    dicts = neuron_trajectories({"trajectories": [{"context_tokens": [0, 2], "activations": [0.2, 0.4]}]})
    assert dicts[0][1].tolist() == [0.2, 0.4]
    assert neuron_trajectories({"trajectory": [0.1, 0.2, 0.3]})[0][0].tolist() == [0, 1, 2]
    xs, ys, n = mean_trajectory(pairs, min_cover=0.5)
    assert n == 2 and xs.tolist() == [0, 1, 2, 3, 4]
    assert ys[0] == pytest.approx(0.2) and ys[1] == pytest.approx((0.3 + 0.7) / 2)


def test_neighbours_equal_brute_force():
    import random

    from n2g_service.report.similarity import neighbours

    rng = random.Random(1)
    words, ctx_words = "abcdefghij", "klmnopqrst"
    graphs, labels = {}, {}
    for i in range(60):
        act = rng.sample(words, rng.randint(1, 3))
        ctx = rng.sample(ctx_words, rng.randint(0, 3))
        g = n2g_fast.NeuronGraph(MODEL, 0, i, HOOK, 1.0)
        for j, a in enumerate(act):
            g.add_path((a, [ord(a)], 0.9), [(c, [ord(c)], 0.9) for c in ctx[j:j + 1]] if j < len(ctx) else [], 0.9)
        g.finalize()
        graphs[(0, i)] = g
        labels[(0, i)] = (frozenset(g.activating_labels()), frozenset(g.context_labels()))

    def ov(a, b):
        return len(a & b) / max(len(a), len(b), 1)

    got = neighbours(list(graphs), [g.to_bytes() for g in graphs.values()], 5)
    for key, (a, c) in labels.items():
        brute = sorted((-(ov(a, oa) + ov(c, oc)) / 2, o) for o, (oa, oc) in labels.items()
                       if o != key and ov(a, oa) + ov(c, oc) > 0)[:5]
        assert [-s for s, _ in brute] == pytest.approx([n[1] for n in got[key]], abs=1e-6)
        # the same neighbours up to the order of equal scores: every one scoring strictly more than
        # the fifth is listed (brute holds negated scores, so "more" is "less" here)
        assert {o for s, o in brute if s < brute[-1][0]} <= {n[0] for n in got[key]}


def test_report_files_and_escaping(tmp_path):
    make_workspace(tmp_path / "ws")
    index = write_report(tmp_path / "ws", tmp_path / "out", use_model_tokenizer=False)
    assert index == tmp_path / "out" / "index.html" and index.exists()
    out = index.parent
    pages = sorted(p.name for p in (out / "neurons").glob("*.html"))
    assert pages == ["0_3.html", "0_7.html", "1_2.html", "1_5.html"]
    for name in ("f1_per_layer", "f1_distribution", "trajectory_per_layer"):
        ET.parse(out / "plots" / f"{name}.svg")  # well-formed SVG
    for svg in (out / "graphs").glob("*.svg"):
        text = svg.read_text(encoding="utf-8")
        ET.fromstring(text)  # well-formed: no raw control characters, markup escaped
        assert "<script" not in text
    g03 = (out / "graphs" / "0_3.svg").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in g03 and "⏎" in g03 and "⇥" in g03
    g07 = (out / "graphs" / "0_7.svg").read_text(encoding="utf-8")
    assert "naïve" in g07 and "日本語" in g07 and "\x07" not in g07 and "\x00" not in g07
    assert ("\\x07" in g07 or "␇" in g07) and ("\\x00" in g07 or "␀" in g07)  # either convention is visible
    html = (out / "neurons" / "0_3.html").read_text(encoding="utf-8")
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert '&#34;quoted&#34;<i>·</i>&amp;<i>·</i>&#39;single&#39;' in html
    html = (out / "neurons" / "1_2.html").read_text(encoding="utf-8")
    assert "</span><b>x</b>" not in html and "&lt;/span&gt;&lt;b&gt;x&lt;/b&gt;" in html
    assert '{{<i>·</i>jinja<i>·</i>}}' in html
    idx = index.read_text(encoding="utf-8")
    assert "hand-made &lt;corpus&gt; &amp; &#34;quotes&#34;" in idx
    assert "http://" not in idx and "https://" not in idx
    # A second write into the same folder replaces the report.
    assert write_report(tmp_path / "ws", tmp_path / "out", use_model_tokenizer=False) == index


def test_a_page_shows_the_strongest_training_windows(tmp_path):
    """A neuron learnt from hundreds of windows (the calibrated fit) shows its MAX_SHOWN_EXAMPLES
    strongest training windows, highest first, and says how many it stored."""
    from n2g_service.report import MAX_SHOWN_EXAMPLES

    ws = Workspace(tmp_path / "ws", create=True, model=MODEL, corpus="c", hook=HOOK)
    ws.set_meta("token_strings", json.dumps(VOCAB))
    g = _graph(0, 1, NEURONS[(1, 5)])
    n = MAX_SHOWN_EXAMPLES + 17
    peaks = [round(0.011 * i + 0.003, 3) for i in range(n)]  # distinct maxima, stored weakest first
    train = [{"token_ids": [ID["cat"], ID[" dog"]], "activations": [0.0, p]} for p in peaks]
    ws.put_neuron(NeuronRecord(0, 1, 2.5, g.to_bytes(), {"train": train, "test": train[:3]}, {"n_paths": g.n_paths},
                               _metrics(0.5)))
    out = write_report(tmp_path / "ws", tmp_path / "out", use_model_tokenizer=False).parent
    html = (out / "neurons" / "0_1.html").read_text(encoding="utf-8")
    assert f"train (the {MAX_SHOWN_EXAMPLES} strongest of {n} windows)" in html and "test (3)" in html
    assert html.count('data-split="train"') == MAX_SHOWN_EXAMPLES and html.count('data-split="test"') == 3
    shown = [float(x) for x in re.findall(r'data-split="train"><span class="exh">max true ([0-9.]+)', html)]
    want = sorted(peaks, reverse=True)[:MAX_SHOWN_EXAMPLES]
    assert shown == pytest.approx(want, abs=0.006)  # as printed (rounded)


# Characters that draw nothing (or reorder text) and U+FFFE / U+FFFF, which XML forbids.
INVISIBLE = ["\u200b", "\u00a0", "\u202e", "\ufeff", "\u0085", "\u2028", "\ufffe", "\uffff", "\x7f"]


def test_n2g_fast_svg_shows_invisible_characters():
    """n2g_fast's renderer (issue 5: special characters shown visibly in SVGs too): well-formed
    XML, and no invisible character left raw in a label."""
    g = n2g_fast.NeuronGraph(MODEL, 0, 0, HOOK, 1.0)
    for i, ch in enumerate(INVISIBLE):
        g.add_path((f"a{ch}b", [i], 0.9), [(f"{ch}", [100 + i], 0.9)], 0.9)
    svg = g.to_svg()
    ET.fromstring(svg)
    assert [ch for ch in INVISIBLE if ch in svg] == [], "n2g_fast.NeuronGraph.to_svg leaves these raw"


def test_report_without_strings_shows_ids(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    ws.set_meta("token_strings", "")  # no vocabulary: neurons without stored strings show ids
    index = write_report(tmp_path / "ws", tmp_path / "out", use_model_tokenizer=False)
    html = (index.parent / "neurons" / "0_7.html").read_text(encoding="utf-8")  # stored without strings
    assert f"#{ID['naïve']}" in html and "showing token ids" in html


def test_empty_workspace(tmp_path):
    Workspace(tmp_path / "ws", create=True, model=MODEL, corpus="c", hook=HOOK)
    index = write_report(tmp_path / "ws", tmp_path / "out", use_model_tokenizer=False)
    assert "no evaluated neurons" in index.read_text(encoding="utf-8")


# -- the browser ---------------------------------------------------------------------------------
class Browser:
    """Headless Chromium driven by Playwright (the system's Chromium: Playwright's own browser
    download is not reachable here). Records what a page reports while it is open: uncaught
    exceptions, console errors and warnings, failed loads, dialogs, and every URL it requests."""

    def __init__(self, pw):
        exe = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            pytest.fail("Chromium not found: install Debian's `chromium` (make setup does)")
        self.browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu",
                                                                     "--disable-dev-shm-usage"])
        self.page = self.browser.new_page(viewport={"width": 1280, "height": 900})
        self.errors: list[str] = []
        self.requested: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(f"exception: {e}"))
        self.page.on("console", lambda m: m.type in ("error", "assert", "warning")
                     and self.errors.append(f"console.{m.type}: {m.text}"))
        self.page.on("requestfailed", lambda r: self.errors.append(f"load failed: {r.url} {r.failure}"))
        self.page.on("dialog", lambda d: (self.errors.append(f"dialog opened: {d.message}"), d.dismiss()))
        self.page.on("request", lambda r: self.requested.append(r.url))

    def open(self, url: str) -> None:
        self.errors.clear()
        self.requested.clear()
        self.page.goto(url, wait_until="load")
        self.eval("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

    def eval(self, expr: str):
        return self.page.evaluate(expr)

    def problems(self) -> tuple[list[str], list[str]]:
        """(errors, URLs requested that are not file://) since the last open()."""
        return list(self.errors), [u for u in self.requested if not u.startswith("file://")]

    def screenshot(self, path: Path, max_height: int = 5000) -> Path:
        # Through the DevTools session: Page.screenshot waits for web fonts, which Debian's
        # headless Chromium never reports as loaded for file:// pages.
        import base64

        path.parent.mkdir(parents=True, exist_ok=True)
        cdp = self.page.context.new_cdp_session(self.page)
        h = cdp.send("Page.getLayoutMetrics")["cssContentSize"]["height"]
        shot = cdp.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1280, "height": min(int(h) + 1, max_height), "scale": 1}})
        cdp.detach()
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        self.browser.close()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = Browser(pw)
        try:
            yield b
        finally:
            b.close()


SIZE = "(e => { const r = e.getBoundingClientRect(); return [r.width, r.height, e.complete === undefined ? true : e.complete, e.naturalWidth === undefined ? 1 : e.naturalWidth]; })"


def test_report_in_chromium(tmp_path, browser):
    make_workspace(tmp_path / "ws")
    index = write_report(tmp_path / "ws", tmp_path / "out", use_model_tokenizer=False)
    shots = []

    # -- index -------------------------------------------------------------------------------
    browser.open(index.as_uri())
    errors, remote = browser.problems()
    assert errors == [], errors
    assert remote == [], f"requests leaving file://: {remote}"
    requested = browser.requested
    assert any(u.endswith("report.css") for u in requested) and any(u.endswith("report.js") for u in requested)
    plots = browser.eval(f"Array.from(document.querySelectorAll('img.plot')).map({SIZE})")
    assert len(plots) == 3
    for w, h, complete, natural in plots:
        assert complete and natural > 0 and w > 100 and h > 50, plots
    assert browser.eval("document.querySelectorAll('#neurons tbody tr').length") == 4
    assert browser.eval("document.querySelectorAll('#layer-table tbody tr').length") == 2
    assert browser.eval("document.querySelectorAll('script').length") == 1
    top = browser.eval("document.querySelector('#neurons tbody tr td:last-child').textContent")
    assert "<script>alert(1)</script>" in top and "⏎" in top  # shown as text, visibly
    shots.append(browser.screenshot(ARTIFACTS / "index.png"))
    # sort by F1 (descending on the second click), then filter
    browser.eval("document.querySelectorAll('#neurons thead th')[2].click()")
    browser.eval("document.querySelectorAll('#neurons thead th')[2].click()")
    f1 = browser.eval("Array.from(document.querySelectorAll('#neurons tbody tr')).map(r => parseFloat(r.cells[2].textContent))")
    assert f1 == sorted(f1, reverse=True) and f1[0] > f1[-1]
    browser.eval("(() => { const q = document.getElementById('q'); q.value = 'U+200b'; q.dispatchEvent(new Event('input')); })()")
    visible = browser.eval("Array.from(document.querySelectorAll('#neurons tbody tr')).filter(r => !r.hidden).map(r => r.dataset.search)")
    assert len(visible) == 1 and visible[0].startswith("0.7 ")
    assert browser.eval("document.getElementById('count').textContent") == "1 of 4 neurons"
    browser.eval("(() => { const q = document.getElementById('q'); q.value = ''; q.dispatchEvent(new Event('input'));"
                 " const s = document.getElementById('layer-filter'); s.value = '1'; s.dispatchEvent(new Event('change')); })()")
    assert browser.eval("Array.from(document.querySelectorAll('#neurons tbody tr')).filter(r => !r.hidden).length") == 2
    assert browser.problems()[0] == []

    # -- a neuron page -------------------------------------------------------------------------
    for page in ("0_3", "0_7"):
        browser.open((index.parent / "neurons" / f"{page}.html").as_uri())
        errors, remote = browser.problems()
        assert errors == [], errors
        assert remote == [], remote
        w, h, complete, natural = browser.eval(f"{SIZE}(document.getElementById('graph'))")
        assert complete and natural > 0 and w > 50 and h > 20, (page, w, h, complete, natural)
        assert browser.eval("document.querySelectorAll('script').length") == 1
        assert browser.eval("document.querySelectorAll('.ex').length") == 3
        assert browser.eval("document.querySelectorAll('.ex .t').length") == sum(map(len, SEQUENCES))
        assert browser.eval("document.querySelectorAll('svg.spark polyline').length") == 3
        assert browser.eval("document.querySelectorAll('ol.neigh a').length") >= 1
        text = browser.eval("Array.from(document.querySelectorAll('.ex')).map(e => e.textContent).join('|')")
        for shown in ("<script>alert(1)</script>", "\"quoted\"·&·'single'", "⏎", "⇥", "·the", "naïve", "日本語",
                      "\\x07", "\\x00", "U+200B", "\ufffd", "␍⏎", "a⇥b·c", "</span><b>x</b>", "{{·jinja·}}"):
            assert shown in text, shown
        for raw in ("\x07", "\x00", "\u200b", "\t"):
            assert raw not in text, repr(raw)
        # cells stand in token order, right-to-left words too (each cell is its own bidi island)
        lefts = browser.eval("Array.from(document.querySelectorAll('.ex')).map(e => Array.from(e.querySelectorAll('.t'))"
                             ".map(t => t.getBoundingClientRect().left))")
        assert all(row == sorted(row) for row in lefts), lefts
        shots.append(browser.screenshot(ARTIFACTS / f"neuron_{page}.png"))
    # the graph SVG alone (its labels are escaped and visible in the rendered image too)
    browser.open((index.parent / "graphs" / "0_3.svg").as_uri())
    assert browser.problems() == ([], [])
    labels = browser.eval("document.documentElement.textContent")
    assert "<script>alert(1)</script>" in labels and "⏎" in labels
    assert browser.eval("document.querySelectorAll('script').length") == 0
    shots.append(browser.screenshot(ARTIFACTS / "graph_0_3.png", max_height=900))
    for s in shots:
        assert s.stat().st_size > 5000
        print(f"screenshot: {s}")
