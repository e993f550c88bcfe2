"""Hooked activations (early stop, batching) and the dataset scan (top-k in n2g_fast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from n2g_service.activations import ActivationRunner, layer_activations, neuron_activations
from n2g_service.config import ScanConfig
from n2g_service.scan import scan_layers


def _full_run(model, toks, layers):
    """Reference: the whole forward pass, reading the layers with plain hooks."""
    got = {}
    hooks = [(model.hook_name(l), (lambda l: lambda x, hook: got.__setitem__(l, x.detach().clone()))(l)) for l in layers]
    with torch.no_grad():
        model.bridge.run_with_hooks(torch.as_tensor(toks), fwd_hooks=hooks)
    return got


def test_layer_activations_shapes_and_values(native_model, native_windows):
    toks = torch.as_tensor(native_windows[:5])
    acts = layer_activations(native_model, toks, [1, 0])
    assert sorted(acts) == [0, 1]
    for a in acts.values():
        assert a.shape == (5, 32, 128) and a.dtype == torch.float32
    ref = _full_run(native_model, toks, [0, 1])
    for l in (0, 1):
        assert torch.allclose(acts[l], ref[l], atol=1e-6)


def test_forward_stops_after_deepest_layer(native_model, native_windows):
    toks = torch.as_tensor(native_windows[:3])
    calls = []
    spies = [(name, (lambda name: lambda x, hook: calls.append(name))(name))
             for name in ("blocks.0.hook_out", "blocks.1.hook_in", "blocks.1.attn.hook_pattern",
                          "blocks.1.mlp.hook_post", "ln_final.hook_in", "unembed.hook_in")]
    with native_model.bridge.hooks(fwd_hooks=spies):
        layer_activations(native_model, toks, [0])
        assert calls == []  # nothing after block 0's MLP ran, not even block 0's residual output
        layer_activations(native_model, toks, [0, 1])
    assert "blocks.1.hook_in" in calls and "blocks.1.attn.hook_pattern" in calls
    assert "ln_final.hook_in" not in calls and "unembed.hook_in" not in calls
    assert "blocks.1.mlp.hook_post" in calls  # its own hook point does fire
    # no hook of ours is left behind
    out = layer_activations(native_model, toks, [1])
    assert out[1].shape == (3, 32, 128)


def test_neuron_activations_gathers_per_row(native_model, native_windows):
    toks = torch.as_tensor(native_windows[:4])
    neurons = torch.tensor([3, 100, 3, 7])
    got = neuron_activations(native_model, 1, toks, neurons)
    full = layer_activations(native_model, toks, [1])[1]
    assert got.shape == (4, 32)
    for b in range(4):
        assert torch.equal(got[b], full[b, :, neurons[b]])


def test_runner_pads_dedups_and_matches(native_model, native_windows):
    runner = ActivationRunner(native_model, 0, batch_tokens=64)
    seqs = [native_windows[0][:5], native_windows[1][:17], native_windows[0][:5], native_windows[2][:9]]
    neurons = [1, 2, 3, 4]
    out = runner.run(seqs, neurons)
    assert [len(o) for o in out] == [5, 17, 5, 9]
    assert runner.n_rows == 3  # the repeated sequence ran once
    for s, n, o in zip(seqs, neurons, out):
        ref = layer_activations(native_model, torch.as_tensor(s)[None], [0])[0][0, :, n].numpy()
        np.testing.assert_allclose(o, ref, atol=1e-5)


def test_scan_matches_brute_force(native_model, native_windows):
    w = native_windows[:40]
    scans = scan_layers(native_model, w, [0, 1], ScanConfig(k=5, batch_size=16), progress=False)
    assert sorted(scans) == [0, 1]
    full = _full_run(native_model, torch.as_tensor(w), [0, 1])
    for l, s in scans.items():
        a = full[l].numpy()[:, 1:, :]  # BOS masked
        per_window = a.max(axis=1)  # [n, d_mlp]
        np.testing.assert_allclose(s.max_activation, per_window.max(axis=0), rtol=1e-5, atol=1e-6)
        assert s.top_window_ids.shape == (128, 5) and s.top_scores.shape == (128, 5)
        for n in (0, 17, 127):
            expect = np.argsort(-per_window[:, n], kind="stable")[:5]
            assert s.top_window_ids[n].tolist() == expect.tolist()
            np.testing.assert_allclose(s.top_scores[n], per_window[expect, n], rtol=1e-5, atol=1e-6)
            assert np.all(np.diff(s.top_scores[n]) <= 0)


def test_scan_pads_when_few_windows(native_model, native_windows):
    s = scan_layers(native_model, native_windows[:3], [1], ScanConfig(k=5, batch_size=2), progress=False)[1]
    assert (s.top_window_ids[:, 3:] == -1).all() and np.isneginf(s.top_scores[:, 3:]).all()
    assert set(s.top_window_ids[:, :3].ravel().tolist()) <= {0, 1, 2}


def test_logits_at_matches_full_logits(native_model, native_windows):
    from n2g_service.activations import logits_at, next_token_logits

    toks = torch.as_tensor(native_windows[:3, :10])
    full, acts = next_token_logits(native_model, toks, layer=1)
    assert full.shape == (3, 10, native_model.d_vocab) and acts.shape == (3, 10, 128)
    got = logits_at(native_model, toks, [0, 2, 2], [9, 0, 4])
    for j, (r, p) in enumerate([(0, 9), (2, 0), (2, 4)]):
        torch.testing.assert_close(got[j], full[r, p], atol=1e-5, rtol=1e-5)


def test_scan_of_a_shard_with_excluded_windows(native_model, native_windows):
    """A shard's windows keep their corpus ids; excluded windows are never run nor ranked."""
    w = native_windows[10:40]
    ids = np.arange(10, 40)
    excluded = {12, 15, 33, 99}
    s = scan_layers(native_model, w, [1], ScanConfig(k=4, batch_size=7), progress=False, window_ids=ids,
                    exclude=excluded)[1]
    keep = ~np.isin(ids, list(excluded))
    per_window = _full_run(native_model, torch.as_tensor(w[keep]), [1])[1].numpy()[:, 1:, :].max(axis=1)
    np.testing.assert_allclose(s.max_activation, per_window.max(axis=0), rtol=1e-5, atol=1e-6)
    for n in (0, 64, 127):
        expect = ids[keep][np.argsort(-per_window[:, n], kind="stable")[:4]]
        assert s.top_window_ids[n].tolist() == expect.tolist()
    assert not np.isin(s.top_window_ids, list(excluded)).any()
    with pytest.raises(ValueError, match="one id per window"):
        scan_layers(native_model, w, [1], progress=False, window_ids=ids[:3])
    with pytest.raises(ValueError, match="unknown precision"):
        scan_layers(native_model, w, [1], progress=False, precision="int8")


def test_bfloat16_scan_checked_against_float32(native_model, native_windows):
    from n2g_service.scan import compare_precision

    same = compare_precision(native_model, native_windows[:64], [0, 1], "float32", ScanConfig(k=5))
    assert same["max_rel_amax_error"] == 0.0 and same["topk_overlap"] == 1.0
    bf = compare_precision(native_model, native_windows[:64], [0, 1], "bfloat16", ScanConfig(k=5))
    assert 0.0 < bf["max_rel_amax_error"] < 0.05  # bf16 keeps 8 bits of mantissa
    assert bf["topk_overlap"] > 0.8


def test_runner_reads_back_shared_activations(native_model, native_windows):
    from n2g_service.activations import shared_activations

    seqs = [native_windows[3], native_windows[4][:9], native_windows[5]]
    fresh = ActivationRunner(native_model, 1).run(seqs, [7, 7, 9])
    with shared_activations():
        first = ActivationRunner(native_model, 1)
        a = first.run(seqs[:2], [7, 7])
        second = ActivationRunner(native_model, 1)
        b = second.run(seqs, [7, 7, 9])
        assert first.n_rows == 2 and second.n_rows == 1  # only the new job ran
        b[0][:] = -1  # callers get copies: the block's store is not changed through them
        c = ActivationRunner(native_model, 1).run(seqs[:1], [7])
    assert np.array_equal(c[0], a[0])
    for x, y in zip(b[1:], fresh[1:]):
        np.testing.assert_allclose(x, y, atol=1e-6)
    outside = ActivationRunner(native_model, 1)
    outside.run(seqs[:1], [7])
    assert outside.n_rows == 1  # nothing is remembered outside the block
