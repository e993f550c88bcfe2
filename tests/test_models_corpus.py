"""Models (loading, hooks, tokens, labels) and corpus (texts, windows)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from n2g_service.config import EvalConfig, FitConfig, ScanConfig
from n2g_service.corpus import load_texts, make_windows
from n2g_service.labels import normalise_token


# ---- configs -----------------------------------------------------------------------------------
def test_config_defaults_and_round_trip():
    assert (ScanConfig().k, ScanConfig().window_tokens, ScanConfig().batch_size) == (20, 64, 16)
    f = FitConfig()
    assert (f.prune_threshold, f.max_prune_starts, f.prune_batch, f.post_context) == (0.5, 30, 4, 5)
    assert (f.importance_threshold, f.activation_threshold, f.augment_importance) == (0.75, 0.5, 0.8)
    assert (f.n_substitutes, f.augment_positive, f.proposers, f.mlm_name, f.mask_token) == (
        5, 0.5, ("model", "embedding"), None, "auto")
    assert (EvalConfig().n_train, EvalConfig().seed, EvalConfig().fire_threshold) == (10, 0, 0.5)
    for cfg in (ScanConfig(k=3), FitConfig(proposers=("embedding",), mask_token=" the"), EvalConfig(seed=4)):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert type(cfg).from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        FitConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError):
        FitConfig(proposers=("bert",))


# ---- labels ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "token,label",
    [(" The", "the"), ("The", "the"), (" the", "the"), ("the", "the"), (" HTML", "HTML"),
     ("A", "A"), (" A", "a"), (" .", " ."), (".", "."), ("\n", "\n"), (" ", " "), (" 42", " 42"),
     ("’s", "’s"), (" don't", "don't")],
)
def test_normalise_token(token, label):
    assert normalise_token(token) == label


# ---- native model ------------------------------------------------------------------------------
def test_native_model_facts(native_model):
    m = native_model
    assert (m.n_layers, m.d_mlp) == (2, 128)
    assert m.d_vocab == len(m.tokenizer) == m.bridge.cfg.d_vocab
    assert m.hook == "mlp.hook_post" and m.hook_name(1) == "blocks.1.mlp.hook_post"
    with pytest.raises(ValueError):
        m.hook_name(2)
    ids = m.encode("The cat sat on the mat.\nA dog")
    assert m.bos_id not in ids
    assert m.decode_tokens(ids) == ["the", " cat", " sat", " on", " the", " mat", ".", "\n", "a", " dog"]
    labels = m.token_labels()
    assert len(labels) == m.d_vocab
    the_ids = m.label_token_ids("the")
    assert len(the_ids) == 3 and all(labels[i] == "the" for i in the_ids)
    assert {m.decode_tokens([i])[0] for i in the_ids} == {"the", " the", " The"}
    assert m.label_token_ids("no such label") == []
    assert m.token_id_for("pad") == m.pad_id and m.token_id_for("bos") == m.bos_id
    assert m.token_id_for(" the") == m.encode(" the")[0] and m.token_id_for("id:7") == 7
    # "auto" picks the plain token " the" when it is a single token of the vocabulary
    assert m.token_id_for("auto") == m.encode(" the")[0] != m.pad_id
    with pytest.raises(ValueError):
        m.token_id_for(" the cat")
    assert m.pad_id in m.special_ids() and m.bos_id in m.special_ids()


def test_native_solu_reads_hook_mid():
    from n2g_service.activations import layer_activations
    from n2g_service.models import native_random_model

    m = native_random_model(act_fn="solu_ln", seed=1)
    assert m.hook == "mlp.hook_mid" and m.hook_name(0) == "blocks.0.mlp.ln.hook_in"
    toks = torch.tensor([[m.bos_id] + m.encode("the cat sat on the mat")])
    mid = layer_activations(m, toks, [0])[0]
    # SoLU = x * softmax(x) over neurons, before the LayerNorm that hook_post would see
    pre = {}
    m.bridge.run_with_hooks(toks, fwd_hooks=[("blocks.0.mlp.hook_pre", lambda x, hook: pre.setdefault("x", x))])
    x = pre["x"]
    assert torch.allclose(mid, x * torch.softmax(x, dim=-1), atol=1e-5)
    post = native_random_model(act_fn="solu_ln", seed=1, hook="mlp.hook_post")
    assert not torch.allclose(layer_activations(post, toks, [0])[0], mid)


# ---- corpus ------------------------------------------------------------------------------------
def test_fortunes_corpus():
    texts = load_texts("fortunes")
    assert len(texts) > 10_000
    assert all(t.strip() and t == t.strip() for t in texts[:2000])
    assert not any(line.strip() == "%" for t in texts[:2000] for line in t.splitlines())
    assert load_texts()[:50] == texts[:50]  # the default, deterministic


def test_corpus_paths(tmp_path):
    (tmp_path / "a.txt").write_text("first text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "second"}\n"third"\n\n')
    (tmp_path / "ignored.csv").write_text("x")
    assert load_texts(str(tmp_path)) == ["first text", "second", "third"]
    assert load_texts(str(tmp_path / "a.txt")) == ["first text"]
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(ValueError, match="text"):
        load_texts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError):
        load_texts(str(tmp_path / "missing"))


def test_corpus_files_that_cannot_be_read_as_text_are_refused_with_where(tmp_path):
    import codecs

    d = tmp_path
    (d / "bom8.jsonl").write_bytes(codecs.BOM_UTF8 + b'{"text": "caf\xc3\xa9"}\n')
    (d / "utf16.txt").write_bytes("tea for two".encode("utf-16"))  # with its byte-order mark
    assert load_texts(str(d / "bom8.jsonl")) == ["café"] and load_texts(str(d / "utf16.txt")) == ["tea for two"]
    # line ends read as text mode read them: CRLF and CR become LF (no stray "\r" tokens)
    (d / "crlf.txt").write_bytes(b"one\r\ntwo\rthree\n")
    (d / "mac.jsonl").write_bytes(b'"a"\r"b"\r\n"c"')
    assert load_texts(str(d / "crlf.txt")) == ["one\ntwo\nthree\n"] and load_texts(str(d / "mac.jsonl")) == ["a", "b", "c"]
    # the line of a bad byte in UTF-16 counts characters, not 0x0a bytes (U+010A holds one)
    (d / "u16bad.txt").write_bytes(codecs.BOM_UTF16_LE + "\u010a\u010a\n".encode("utf-16-le") + b"\x00\xdc")
    with pytest.raises(ValueError, match=r"u16bad.txt:2: not UTF-16"):
        load_texts(str(d / "u16bad.txt"))
    # bytes that are not UTF-8 (a binary file, Latin-1) were decoded into replacement characters
    (d / "latin1.jsonl").write_bytes(b'"fine"\n"na\xefve"\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xef at offset 10\)"):
        load_texts(str(d / "latin1.jsonl"))
    (d / "noise.txt").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=r"noise.txt:\d+: not UTF-8"):
        load_texts(str(d / "noise.txt"))
    (d / "surrogate.jsonl").write_text('"ok"\n{"text": "a\\ud800b"}\n')
    with pytest.raises(ValueError, match=r"surrogate.jsonl:2: the text holds a lone surrogate U\+D800"):
        load_texts(str(d / "surrogate.jsonl"))
    (d / "deep.jsonl").write_text("[" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"deep.jsonl:1: (JSON nested too deeply|not JSON)"):
        load_texts(str(d / "deep.jsonl"))
    # a pipe would block the build for ever; a link loop is not an "unknown corpus"
    os.mkfifo(d / "pipe.txt")
    with pytest.raises(ValueError, match="not a regular file"):
        load_texts(str(d / "pipe.txt"))
    (d / "loop.txt").symlink_to(d / "loop.txt")
    with pytest.raises(FileNotFoundError, match="leads nowhere"):
        load_texts(str(d / "loop.txt"))


def test_make_windows(native_model):
    m = native_model
    texts = ["the cat sat on the mat.", "a dog", "the man said no " * 5]
    w = make_windows(m, texts, window_tokens=8)
    assert w.dtype == np.int64 and w.shape[1] == 8
    assert (w[:, 0] == m.bos_id).all()
    sep = m.encode("\n\n")
    stream = m.encode(texts[0]) + sep + m.encode(texts[1]) + sep + m.encode(texts[2])
    assert w.shape[0] == len(stream) // 7
    assert w[:, 1:].ravel().tolist() == stream[: w.shape[0] * 7]
    assert make_windows(m, texts, window_tokens=8, max_windows=2).shape == (2, 8)
    with pytest.raises(ValueError, match=r"holds 1 tokens, fewer than one window of 8"):
        make_windows(m, ["the"], window_tokens=8)


# ---- real default model ------------------------------------------------------------------------
@pytest.mark.real_model
def test_real_model_facts(real_model):
    from n2g_service.activations import next_token_logits
    from n2g_service.models import DEFAULT_MODEL

    m = real_model
    assert m.name == DEFAULT_MODEL
    assert (m.n_layers, m.d_mlp, m.d_vocab) == (30, 1536, 49152)
    assert (m.bos_id, m.pad_id) == (1, 2)
    assert m.hook_name(29) == "blocks.29.mlp.hook_post"
    ids = m.encode("The capital of France is")
    assert ids[0] != m.bos_id
    assert m.decode_tokens(ids) == ["The", " capital", " of", " France", " is"]
    logits, acts = next_token_logits(m, torch.tensor([[m.bos_id] + ids]), layer=3)
    assert m.decode_tokens([int(logits[0, -1].argmax())]) == [" Paris"]
    assert acts.shape == (1, 6, 1536)
    # labels: " The", "The", " the", "the" share one node
    labels = m.token_labels()
    the = m.label_token_ids("the")
    assert {m.decode_tokens([i])[0] for i in the} >= {" The", "The", " the", "the"}
    assert all(labels[i] == "the" for i in the)
    # byte-level pieces print readably and stay distinct
    strings = m.token_strings()
    assert strings[111] == "\\xa1"  # the lone byte 0xA1 (piece "¡")
    assert [i for i, t in enumerate(strings) if "\ufffd" in t] == [24211]  # the U+FFFD token itself
    assert m.decode_tokens(m.encode(" naïve “quote”")) and "".join(m.decode_tokens(m.encode(" naïve"))) == " naïve"


@pytest.mark.real_model
def test_the_default_model_is_converted_once_and_read_back_the_same(real_model, tmp_path, monkeypatch, caplog):
    """transformers parses the GGUF three times and maps its tensor names in Python (most of a
    load); the first load keeps the de-quantised model in the cache folder and later loads read
    that: the same tokenizer, weights and activations. A damaged cache is converted again, and a
    cache that cannot be written costs time, never the load."""
    import transformers

    from n2g_service.activations import layer_activations
    from n2g_service.models import _save_converted, converted_gguf_dir, load_model, smollm2_gguf_path

    gguf_reads = []
    real_from_pretrained = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *a, **kw):
        gguf_reads.extend([kw["gguf_file"]] if kw.get("gguf_file") else [])
        return real_from_pretrained(cls, *a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    monkeypatch.setenv("N2G_CACHE_DIR", str(tmp_path / "cache"))
    folder = converted_gguf_dir(smollm2_gguf_path())
    assert folder.parent == tmp_path / "cache" and not folder.exists()

    def same_as_real(m) -> None:
        tok, ref = m.tokenizer, real_model.tokenizer
        assert len(tok) == len(ref) and tok.convert_ids_to_tokens(list(range(len(ref)))) == \
            ref.convert_ids_to_tokens(list(range(len(ref))))
        for text in ("The capital of France is", " naïve “quote” 東京 🙂\n\t x", "<|im_end|>", ""):
            assert m.encode(text) == real_model.encode(text)
        assert (m.bos_id, m.pad_id, m.mask_id, m.n_layers, m.d_mlp) == \
            (real_model.bos_id, real_model.pad_id, real_model.mask_id, real_model.n_layers, real_model.d_mlp)
        got, want = m.bridge.state_dict(), real_model.bridge.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        tokens = np.array([[m.bos_id] + real_model.encode("Tom said that the dog was happy")])
        a, b = layer_activations(m, tokens, [0, 29]), layer_activations(real_model, tokens, [0, 29])
        assert all(torch.equal(a[layer], b[layer]) for layer in (0, 29))

    killed = folder.parent / f".{folder.name}.999999999.tmp"  # a conversion killed half-way
    (killed / "part").mkdir(parents=True)
    same_as_real(load_model(device="cpu"))  # converts and keeps it
    assert len(gguf_reads) == 1 and (folder / "model.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # nothing half-written beside it
    same_as_real(load_model(device="cpu"))  # reads the folder: no GGUF parse
    assert len(gguf_reads) == 1

    with open(folder / "model.safetensors", "r+b") as f:  # damaged: converted again
        f.truncate(1000)
    with caplog.at_level("WARNING", logger="n2g.models"):
        same_as_real(load_model(device="cpu"))
    assert len(gguf_reads) == 2 and "could not be read" in caplog.text
    assert (folder / "model.safetensors").stat().st_size > 100_000_000

    blocker = tmp_path / "not-a-folder"  # a cache that cannot be written: a warning, no error
    blocker.write_text("x")
    caplog.clear()
    with caplog.at_level("WARNING", logger="n2g.models"):
        _save_converted(blocker / folder.name, real_model.tokenizer, None)
    assert "could not cache" in caplog.text and "N2G_CACHE_DIR" in caplog.text and blocker.read_text() == "x"
