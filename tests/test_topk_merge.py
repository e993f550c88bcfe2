"""TopK.merge through the public binding: a scan split into shards, folded separately and merged in
any order (some through to_bytes / from_arrays / pickle), equals the single pass exactly."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from n2g_fast import N2GError, TopK


def _scan(rng, n_windows: int, tokens: int, n: int):
    # Small integers and -0.0 so ties and signed zeros happen; ids distinct and shuffled so the
    # tie order (smaller window id first) is not the arrival order.
    acts = rng.integers(-3, 4, size=(n_windows, tokens, n)).astype(np.float32)
    acts[rng.random(acts.shape) < 0.1] = -0.0
    mask = rng.random((n_windows, tokens)) < 0.75
    mask[:, 0] = False  # BOS, as the scan does
    ids = rng.permutation(n_windows).astype(np.int64) * 3 + 11
    return acts, mask, ids


def _fold(tk: TopK, scan, lo: int, hi: int, step: int) -> TopK:
    acts, mask, ids = scan
    for s in range(lo, hi, step):
        e = min(s + step, hi)
        tk.update(acts[s:e], ids[s:e], mask[s:e])
    return tk


def _round_trip(tk: TopK, how: int) -> TopK:
    if how == 0:
        return TopK.from_bytes(tk.to_bytes())
    if how == 1:
        ids, scores = tk.top()
        return TopK.from_arrays(ids, scores, tk.max_activation())
    if how == 2:
        return pickle.loads(pickle.dumps(tk))
    return tk


@pytest.mark.parametrize("seed", range(12))
def test_sharded_merge_in_any_order_equals_single_pass(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 60)), int(rng.integers(1, 7))
    n_windows, tokens = int(rng.integers(1, 40)), int(rng.integers(2, 5))
    scan = _scan(rng, n_windows, tokens, n)
    single = _fold(TopK(n, k), scan, 0, n_windows, int(rng.integers(1, 6)))

    cuts = np.unique(np.concatenate([[0, n_windows], rng.integers(0, n_windows + 1, size=rng.integers(0, 6))]))
    pool = [_fold(TopK(n, k), scan, int(lo), int(hi), int(rng.integers(1, 6))) for lo, hi in zip(cuts[:-1], cuts[1:])]
    # Merge random pairs (any order, any grouping), the merged-in side through a random serialised form.
    while len(pool) > 1:
        a = pool.pop(int(rng.integers(len(pool))))
        b = pool.pop(int(rng.integers(len(pool))))
        b.merge(_round_trip(a, int(rng.integers(4))))
        pool.append(b)
    merged = pool[0]

    assert merged.to_bytes() == single.to_bytes()
    ids, scores = merged.top()
    ids1, scores1 = single.top()
    np.testing.assert_array_equal(ids, ids1)
    np.testing.assert_array_equal(scores.view(np.int32), scores1.view(np.int32))  # bit for bit (+0 / -0)
    np.testing.assert_array_equal(merged.max_activation().view(np.int32), single.max_activation().view(np.int32))


def test_merge_keeps_best_and_empty_is_neutral():
    a, b = TopK(2, 2), TopK(2, 2)
    a.update(np.array([[[5.0, 1.0]], [[4.0, 1.0]]], np.float32), np.array([10, 11]))
    b.update(np.array([[[4.0, 2.0]]], np.float32), np.array([3]))
    a.merge(b)
    ids, scores = a.top()
    assert ids.tolist() == [[10, 3], [3, 10]]  # neuron 0: 4.0 tie, window 3 before window 11
    assert scores.tolist() == [[5.0, 4.0], [2.0, 1.0]]
    assert a.max_activation().tolist() == [5.0, 2.0]
    before = a.to_bytes()
    a.merge(TopK(2, 2))
    assert a.to_bytes() == before


def test_merge_and_readers_refuse_bad_input():
    tk = TopK(3, 2)
    with pytest.raises(N2GError, match="same n_neurons and k"):
        tk.merge(TopK(3, 4))
    with pytest.raises(TypeError):
        tk.merge("not a TopK")
    data = _fold(TopK(3, 2), _scan(np.random.default_rng(0), 4, 3, 3), 0, 4, 2).to_bytes()
    with pytest.raises(N2GError, match="magic"):
        TopK.from_bytes(b"nope")
    with pytest.raises(N2GError, match="bytes"):
        TopK.from_bytes(data[:-3])
    corrupt = bytearray(data)
    corrupt[20] ^= 0xFF
    with pytest.raises(N2GError, match="checksum"):
        TopK.from_bytes(bytes(corrupt))
    ids = np.array([[1, 2]], np.int64)
    with pytest.raises(N2GError, match="sorted"):
        TopK.from_arrays(ids, np.array([[1.0, 2.0]], np.float32), np.array([2.0], np.float32))
    with pytest.raises(N2GError, match="a_max"):
        TopK.from_arrays(ids, np.array([[2.0, 1.0]], np.float32), np.array([3.0], np.float32))
    with pytest.raises(N2GError, match="float32"):
        TopK.from_arrays(ids, np.array([[2.0, 1.0]]), np.array([2.0], np.float32))
    with pytest.raises(N2GError, match="rows"):
        TopK.from_arrays(ids, np.array([[2.0, 1.0]], np.float32), np.array([2.0, 1.0], np.float32))


def test_update_window_max_equals_update():
    """Window maxima reduced outside (as a GPU scan does before copying to the host) give the
    same accumulator as the activations themselves."""
    rng = np.random.default_rng(5)
    n, k = 70, 3
    a, b = TopK(n, k), TopK(n, k)
    for start in (0, 6, 13):
        acts = rng.integers(-3, 4, size=(6, 5, n)).astype(np.float32)
        mask = rng.random((6, 5)) < 0.6
        mask[0] = False  # a window with no scored token
        ids = np.arange(start, start + 6, dtype=np.int64)[::-1].copy()
        a.update(acts, ids, mask)
        wmax = np.where(mask[..., None], acts, -np.inf).max(axis=1).astype(np.float32)
        b.update_window_max(wmax, ids)
    assert a.to_bytes() == b.to_bytes()
    before = b.to_bytes()
    with pytest.raises(N2GError, match="NaN"):
        b.update_window_max(np.full((2, n), np.nan, np.float32), np.array([90, 91]))
    with pytest.raises(N2GError, match="float32"):
        b.update_window_max(np.zeros((2, n)), np.array([90, 91]))
    with pytest.raises(N2GError, match="neurons"):
        b.update_window_max(np.zeros((2, n + 1), np.float32), np.array([90, 91]))
    with pytest.raises(N2GError, match="rows"):
        b.update_window_max(np.zeros((2, n), np.float32), np.array([90]))
    assert b.to_bytes() == before
