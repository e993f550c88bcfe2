"""Corpus loading and token windows (n2g-method.md section 1).

Corpus specs accepted by :func:`load_texts`:
- ``"fortunes"`` (default): the Debian ``fortunes`` package (``/usr/share/games/fortunes``), one
  text per record (records are separated by lines holding only ``%``; ``.dat`` index files and
  ``.u8`` copies are skipped; files are read in sorted order, so the corpus is deterministic);
- a path to a ``.txt`` file (one text), a ``.jsonl`` file (one text per line: a JSON string or an
  object with a ``"text"`` field) or a directory searched recursively for both (sorted);
- ``"hf:<dataset>"`` or ``"hf:<dataset>:<split>"``: a Hugging Face dataset's ``text`` column
  (needs the ``datasets`` package and the hub).

Windows (:func:`make_windows`): every text is tokenised on its own (no BOS), texts are joined
into one stream with a separator between them (``"\\n\\n"`` encoded by the model's tokenizer: a
document boundary reads as a paragraph break, which is also a sentence end for pruning), the
stream is cut into consecutive chunks of ``window_tokens - 1`` tokens, and the model's BOS is
prepended to every chunk. So every window starts with BOS, as every prompt of the reference does,
and a window may start inside a text. A last chunk shorter than ``window_tokens - 1`` is dropped.
"""

from __future__ import annotations

import codecs
import json
import os
import stat
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .models import LoadedModel
from .workspace import utf8_text

from n2g.vocab import DEFAULT_CORPUS  # noqa: E402
FORTUNES_DIR = Path(os.environ.get("N2G_FORTUNES_DIR", "/usr/share/games/fortunes"))
DEFAULT_SEPARATOR = "\n\n"


def _fortune_records(text: str) -> list[str]:
    records, cur = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            rec = "\n".join(cur).strip()
            if rec:
                records.append(rec)
            cur = []
        else:
            cur.append(line)
    rec = "\n".join(cur).strip()
    if rec:
        records.append(rec)
    return records


def load_fortunes(directory: str | Path = FORTUNES_DIR) -> list[str]:
    """Every record of every fortune file in ``directory`` (top level only, sorted)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(
            f"fortunes not found at {d}: install the Debian package (apt-get install fortunes)"
        )
    texts: list[str] = []
    for f in sorted(d.iterdir()):
        if not f.is_file() or f.suffix in (".dat", ".u8") or f.name.startswith("."):
            continue
        texts.extend(_fortune_records(f.read_text(encoding="utf-8", errors="replace")))
    if not texts:
        raise ValueError(f"no fortune records found in {d}")
    return texts


class CorpusError(ValueError):
    """A corpus that cannot be read as text (a caller's mistake, not a bug: said in one line)."""


def _read_file(path: Path) -> str:
    """A corpus file's text. Regular files only (a FIFO would block a build for ever, a device
    never ends); UTF-8, or UTF-16/32 with a byte-order mark; any other bytes are refused with
    where they are, not decoded into replacement characters and built on silently. Line ends
    become "\\n" (as text-mode reading did)."""
    name = utf8_text(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise CorpusError(f"corpus file {name} is not a regular file (a pipe, a device, ...): give a file")
        data = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"corpus file {name} cannot be read ({e.strerror or e})") from None
    for bom, codec in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
                       (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            break
    else:
        codec = "utf-8"
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as e:
        line = data[: e.start].decode(codec, "replace").count("\n") + 1
        raise CorpusError(f"corpus file {name}:{line}: not {codec.upper().replace('-SIG', '')} text (byte "
                          f"0x{data[e.start]:02x} at offset {e.start}): convert the file to UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_jsonl(path: Path) -> list[str]:
    out = []
    name = utf8_text(path)
    for n, line in enumerate(_read_file(path).split("\n"), 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{name}:{n}: not JSON ({e})") from None
        except RecursionError:
            raise CorpusError(f"{name}:{n}: JSON nested too deeply") from None
        if isinstance(obj, dict):
            obj = obj.get("text")
        if not isinstance(obj, str):
            raise CorpusError(f'{name}:{n}: expected a JSON string or an object with a "text" string')
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's "\\ud800" escapes decode to a lone surrogate
            raise CorpusError(f"{name}:{n}: the text holds a lone surrogate U+{ord(obj[e.start]):04X}, not "
                              "valid Unicode text") from None
        out.append(obj)
    return out


def _load_path(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
        if not files:
            raise CorpusError(f"no .txt or .jsonl files under {utf8_text(path)}")
        texts: list[str] = []
        for f in files:
            texts.extend(_load_path(f))
        return texts
    if path.suffix == ".txt":
        return [_read_file(path)]
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    raise CorpusError(f"unsupported corpus file {utf8_text(path)}: use .txt, .jsonl or a directory of them")


def canonical_spec(spec: str) -> str:
    """The spec a workspace records: a path made absolute (a build resumed from another folder
    reads the same files), a named corpus as it is."""
    if spec == "fortunes" or spec.startswith("hf:"):
        return spec
    try:
        spec.encode("utf-8")
    except UnicodeEncodeError:  # a file name in another encoding: it could not be recorded and found again
        raise CorpusError(f"corpus path {utf8_text(spec)} is not UTF-8: rename it") from None
    return str(Path(spec).expanduser().absolute())


def _load_hf(spec: str) -> list[str]:
    rest = spec[3:]
    name, _, split = rest.partition(":")
    if not name:
        raise ValueError("give a dataset name after hf:, e.g. hf:NeelNanda/pile-10k")
    try:
        import datasets  # type: ignore
    except ImportError as e:
        raise RuntimeError("hf: corpora need the `datasets` package (pip install datasets)") from e
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise RuntimeError(f"could not load dataset {name!r} from the Hugging Face hub: {e}") from e
    if "text" not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if isinstance(t, str) and t.strip()]


def load_texts(spec: str = DEFAULT_CORPUS) -> list[str]:
    """The corpus named by ``spec`` as a list of texts (see the module docstring)."""
    if spec == "fortunes":
        return load_fortunes()
    if spec.startswith("hf:"):
        return _load_hf(spec)
    path = Path(spec).expanduser()
    if not path.exists() and os.path.lexists(path):
        raise FileNotFoundError(f"corpus {utf8_text(spec)!r} is a link that leads nowhere (broken, or a loop)")
    if path.exists():
        texts = _load_path(path)
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise CorpusError(f"corpus {utf8_text(spec)} holds no text")
        return texts
    raise FileNotFoundError(
        f"unknown corpus {utf8_text(spec)!r}: use 'fortunes', a path to .txt/.jsonl files, or 'hf:<dataset>'"
    )


def make_windows(
    model: LoadedModel,
    texts: Sequence[str] | Iterable[str],
    window_tokens: int = 64,
    separator: str = DEFAULT_SEPARATOR,
    max_windows: int | None = None,
) -> np.ndarray:
    """``int64 [n_windows, window_tokens]``: BOS + ``window_tokens - 1`` tokens of the text stream."""
    if window_tokens < 2:
        raise ValueError("window_tokens must be >= 2")
    body = window_tokens - 1
    sep = model.encode(separator) if separator else []
    stream: list[int] = []
    need = None if max_windows is None else max_windows * body
    texts = list(texts)
    step = 2048
    for i in range(0, len(texts), step):
        for ids in model.encode_batch(texts[i : i + step]):
            if not ids:
                continue
            if stream:
                stream.extend(sep)
            stream.extend(ids)
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise CorpusError(f"the corpus holds {len(stream)} tokens, fewer than one window of {window_tokens} "
                         f"(BOS + {body}): give a larger corpus or fewer --window-tokens")
    arr = np.asarray(stream[: n * body], dtype=np.int64).reshape(n, body)
    bos = np.full((n, 1), model.bos_id, dtype=np.int64)
    return np.ascontiguousarray(np.concatenate([bos, arr], axis=1))
