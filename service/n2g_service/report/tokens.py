"""Token strings for the report: decoding token ids without the model when possible, and making
every character of a token visible and safe (spaces, newlines, tabs, control bytes, invisible
Unicode) before Jinja2's autoescape turns the result into HTML."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Sequence

from markupsafe import Markup, escape

# Characters drawn as a visible glyph instead of themselves.
_GLYPHS = {" ": "·", "\n": "⏎", "\r": "␍", "\t": "⇥"}
EMPTY_TOKEN = "∅"


@lru_cache(maxsize=1 << 16)
def _invisible(ch: str) -> bool:
    """Whether the character is shown as its code: n2g_fast decides, so the report and the graph
    drawings agree on every character (Python's own Unicode tables are older than the crate's)."""
    import n2g_fast

    return 0xD800 <= ord(ch) <= 0xDFFF or n2g_fast.visible(ch) != ch  # (a lone surrogate cannot cross)


def _hex(ch: str) -> str:
    cp = ord(ch)
    return f"\\x{cp:02x}" if cp < 0x100 else f"U+{cp:04X}"


@lru_cache(maxsize=1 << 16)
def visible_segments(text: str) -> tuple[tuple[str, str], ...]:
    """Splits a token into (kind, shown) runs; kind is "" (plain text), "ws" (a whitespace glyph)
    or "hex" (an invisible or unprintable character, shown as its code)."""
    if text == "":
        return (("hex", EMPTY_TOKEN),)
    out: list[tuple[str, str]] = []
    plain: list[str] = []
    for ch in text:
        glyph = _GLYPHS.get(ch)
        kind = "ws" if glyph else ("hex" if _invisible(ch) else "")
        if not kind:
            plain.append(ch)
            continue
        if plain:
            out.append(("", "".join(plain)))
            plain = []
        out.append((kind, glyph or _hex(ch)))
    if plain:
        out.append(("", "".join(plain)))
    return tuple(out)


@lru_cache(maxsize=1 << 16)
def visible_text(text: str) -> str:
    """The token as plain visible text (for attributes, SVG labels): still needs escaping."""
    return "".join(s for _, s in visible_segments(text))


@lru_cache(maxsize=1 << 16)
def visible_html(text: str) -> Markup:
    """The token as escaped HTML with the substituted characters marked up (Jinja filter `tok`):
    whitespace glyphs as <i>, codes of invisible characters as <i class="x">."""
    parts = []
    for kind, shown in visible_segments(text):
        if kind == "ws":  # short markup: a report holds a million tokens
            parts.append(f"<i>{escape(shown)}</i>")
        elif kind:
            parts.append(f'<i class="x">{escape(shown)}</i>')
        else:
            parts.append(str(escape(shown)))
    return Markup("".join(parts))


class TokenTexts:
    """Strings for token ids. Order of preference: strings stored with the example (`tokens`),
    a vocabulary stored in the workspace (meta `token_strings`: a JSON list indexed by id), the
    model's tokenizer through `n2g_service.models` (imported lazily, only if needed and allowed),
    and finally the id itself shown as `#id`."""

    def __init__(self, ws, model_name: str | None, *, use_model: bool = True):
        self._ws = ws
        self._model_name = model_name
        self._use_model = use_model
        self._vocab: list[str] | None = None
        self._decode = None  # callable: list[int] -> list[str]
        self._tried = False
        self._cache: dict[int, str] = {}
        self.source = "stored with the examples"
        self.note: str | None = None

    def _resolve(self) -> None:
        if self._tried:
            return
        self._tried = True
        raw = self._ws.get_meta("token_strings")
        if raw:
            self._vocab = json.loads(raw)
            self.source = "the workspace's stored vocabulary"
            return
        if self._use_model and self._model_name:
            try:
                from n2g_service import models  # lazy: loads torch / transformers

                if hasattr(models, "load_tokenizer"):
                    tok = models.load_tokenizer(self._model_name)
                    self._decode = lambda ids: [tok.decode([i]) for i in ids]
                else:
                    loaded = models.load_model(self._model_name, device="cpu")
                    self._decode = loaded.decode_tokens
                self.source = f"the tokenizer of {self._model_name}"
                return
            except Exception as e:  # no model installed, no hub, unknown name ...
                self.note = f"token strings unavailable ({type(e).__name__}: {e}); showing token ids"
        else:
            self.note = "token strings not stored in this workspace; showing token ids"
        self.source = "token ids (no strings available)"

    def strings(self, ids: Sequence[int], stored: Sequence[str] | None = None) -> list[str]:
        if stored is not None and len(stored) == len(ids):
            return [str(s) for s in stored]
        self._resolve()
        ids = [int(i) for i in ids]
        if self._vocab is not None:
            n = len(self._vocab)
            return [self._vocab[i] if 0 <= i < n else f"#{i}" for i in ids]
        if self._decode is not None:
            missing = sorted({i for i in ids if i not in self._cache})
            if missing:
                for i, s in zip(missing, self._decode(missing)):
                    self._cache[i] = s
            return [self._cache[i] for i in ids]
        return [f"#{i}" for i in ids]


def example_tokens(texts: TokenTexts, example: dict[str, Any]) -> list[str]:
    return texts.strings(example["token_ids"], example.get("tokens"))
