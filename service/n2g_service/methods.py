"""The registry of evaluation methods: everything that predicts a neuron's normalised activations.

Evaluation, the report and the API loop over this registry instead of naming methods, so a method
added later (another N2G preset, another baseline) is scored on every test set by registering it
here (the way SAELens registers SAE architectures)::

    register(Method("my_method", "My method", "n2g", lambda art: my_predictor(art)))

A method turns one built neuron's stored artefacts (:class:`Artefacts`: its graph and its stored
training examples) into a :data:`Predictor`: a function from token sequences (each starting with
BOS) to one array of predicted normalised activations per sequence. Every method sees the same
artefacts: the baselines are fitted on ``examples["train"]`` exactly as stored (whatever windows
the fit used), so the comparison stays fair.

Baselines are keyed on token ids (n2g-method.md section 8): the same as the reference's raw token
strings for every token whose string is unique, and exact for byte-level pieces that print alike.
The 5-gram key is the token and its 5 preceding tokens (6 ids; near the start of a sequence, the
tokens that exist, BOS included). BOS (position 0) is never fitted; predictions there are 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from n2g.vocab import METHOD_TITLES  # the built-in methods' ids and titles, shared with the client

__all__ = [
    "Example", "Artefacts", "Predictor", "Method", "register", "unregister", "get", "all_methods", "method_ids",
    "baseline_ids", "token_lookup_fit", "token_lookup_predict", "ngram_lookup_fit",
    "ngram_lookup_predict",
]

Example = tuple[Sequence[int], Sequence[float]]  # (token ids with BOS, normalised activations)
Predictor = Callable[[Sequence[Sequence[int]]], list[np.ndarray]]


@dataclass
class Artefacts:
    """What a method may use of one built neuron: its stored graph and training examples."""

    layer: int
    neuron: int
    train: list[Example]
    graph_bytes: bytes | None = None
    _graph: Any = field(default=None, repr=False)

    @property
    def graph(self):
        """The stored ``n2g_fast.NeuronGraph`` (loaded once)."""
        if self._graph is None:
            if self.graph_bytes is None:
                raise ValueError(f"neuron {self.layer}/{self.neuron} has no stored graph")
            import n2g_fast

            self._graph = n2g_fast.NeuronGraph.from_bytes(self.graph_bytes)
        return self._graph

    @classmethod
    def from_graph(cls, graph: Any, train: Sequence[Example], layer: int = -1, neuron: int = -1) -> "Artefacts":
        return cls(layer, neuron, list(train), None, graph)

    @classmethod
    def from_record(cls, rec: Any) -> "Artefacts":
        """From a ``workspace.NeuronRecord`` read with its examples."""
        train = rec.examples.get("train") if rec.examples else None
        if train is None:
            raise ValueError(f"neuron {rec.layer}/{rec.neuron}: no stored training examples (read it with examples)")
        pairs = [(np.asarray(e["token_ids"], dtype=np.int64), np.asarray(e["activations"], dtype=np.float32))
                 for e in train]
        return cls(rec.layer, rec.neuron, pairs, rec.graph_bytes)


@dataclass(frozen=True)
class Method:
    """One evaluation method. ``family`` is "n2g" or "baseline": every method that is not a
    baseline is compared neuron by neuron with every baseline."""

    id: str
    title: str
    family: str
    make_predictor: Callable[[Artefacts], Predictor]
    description: str = ""

    def __post_init__(self) -> None:
        if not self.id or not self.id.replace("_", "").isalnum():
            raise ValueError(f"method id must be letters, digits and underscores, got {self.id!r}")
        if self.family not in ("n2g", "baseline"):
            raise ValueError(f"method family must be 'n2g' or 'baseline', got {self.family!r}")

    @property
    def is_baseline(self) -> bool:
        return self.family == "baseline"


_REGISTRY: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Adds a method (registration order is report order). Re-using an id needs ``replace=True``."""
    if method.id in _REGISTRY and not replace:
        raise ValueError(f"method {method.id!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[method.id] = method
    return method


def unregister(method_id: str) -> Method:
    """Removes a method (for tests and for replacing a preset); returns it."""
    try:
        return _REGISTRY.pop(method_id)
    except KeyError:
        raise ValueError(f"unknown method {method_id!r}; known: {list(_REGISTRY)}") from None


def get(method_id: str) -> Method:
    try:
        return _REGISTRY[method_id]
    except KeyError:
        raise ValueError(f"unknown method {method_id!r}; known: {list(_REGISTRY)}") from None


def all_methods() -> list[Method]:
    return list(_REGISTRY.values())


def method_ids() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def baseline_ids() -> tuple[str, ...]:
    return tuple(m.id for m in _REGISTRY.values() if m.is_baseline)


# ---- N2G ------------------------------------------------------------------------------------


def _n2g(semantics: str) -> Callable[[Artefacts], Predictor]:
    def make(art: Artefacts) -> Predictor:
        graph = art.graph

        def predict(seqs):
            if isinstance(seqs, np.ndarray) and seqs.ndim == 2:
                return np.asarray(graph.predict(seqs, semantics=semantics), dtype=np.float32)
            return graph.predict([np.asarray(s, dtype=np.int64) for s in seqs], semantics=semantics)

        return predict

    return make


# ---- baselines ------------------------------------------------------------------------------


# one random odd multiplier per key position: the key hash is a polynomial over uint64
_MULT = np.random.default_rng(0x6E67).integers(1, 2**63, size=64, dtype=np.uint64) | np.uint64(1)


def _key_rows(rows: np.ndarray, n: int) -> np.ndarray:
    """int64 [m, len - 1, n + 1] for int64 rows [m, len]: the key of each position >= 1, the n
    tokens before it and the token, -1 standing for "before the sequence" (n = 0: the token)."""
    padded = np.concatenate([np.full((rows.shape[0], n), -1, np.int64), rows], axis=1)
    return np.lib.stride_tricks.sliding_window_view(padded, n + 1, axis=1)[:, 1:]


def _hash_keys(keys: np.ndarray) -> np.ndarray:
    """uint64 [K] for keys [K, n + 1]; ids shift by 1 so that "before the sequence" adds 0."""
    width = keys.shape[1]
    if width > _MULT.size:
        raise ValueError(f"n-gram keys of more than {_MULT.size} tokens are not supported")
    h = np.zeros(len(keys), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for c in range(width):  # column c holds the token width - 1 - c positions back
            h += (keys[:, c] + 1).astype(np.uint64) * _MULT[width - 1 - c]
    return h


def _max_per_key(train: Sequence[Example], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct keys of every position of train but BOS (int64 [K, n + 1]) and the maximum
    normalised activation seen at each (float64 [K])."""
    by_length: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for tokens, a in train:
        t = np.asarray(tokens, dtype=np.int64).ravel()
        if t.size > 1:
            by_length.setdefault(t.size, []).append((t, np.asarray(a, dtype=np.float64).ravel()[1: t.size]))
    if not by_length:
        return np.zeros((0, n + 1), np.int64), np.zeros(0, np.float64)
    keys = np.concatenate([_key_rows(np.stack([t for t, _ in rows]), n).reshape(-1, n + 1)
                           for rows in by_length.values()])
    acts = np.concatenate([a for rows in by_length.values() for _, a in rows])
    # group by hash, then check that each group holds one key (else the exact, slower row sort)
    _, first, inverse = np.unique(_hash_keys(keys), return_index=True, return_inverse=True)
    uniq = keys[first]
    if not (uniq[inverse] == keys).all():
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    best = np.full(len(uniq), -np.inf)
    np.maximum.at(best, inverse.ravel(), acts)
    return uniq, best


def token_lookup_fit(train: Sequence[Example]) -> dict[int, float]:
    """Each token id's maximum normalised activation in train (BOS excluded)."""
    keys, best = _max_per_key(train, 0)
    return dict(zip(keys[:, 0].tolist(), best.tolist()))


def token_lookup_predict(table: Mapping[int, float], tokens: Sequence[int]) -> np.ndarray:
    return _token_lookup_batch(_dense_table(table), [tokens])[0]


def _dense(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Token lookup as a float32 array indexed by token id, up to the largest id (0 where none)."""
    lut = np.zeros(int(ids.max()) + 1 if ids.size else 0, dtype=np.float32)
    lut[ids] = values
    return lut


def _dense_table(table: Mapping[int, float]) -> np.ndarray:
    """Token lookup as an array indexed by token id: 0 (no prediction) for ids not in the table."""
    ids = np.fromiter(table.keys(), dtype=np.int64, count=len(table))
    return _dense(ids, np.fromiter(table.values(), dtype=np.float64, count=len(table)))


def _lookup(lut: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """lut[ids], 0 for ids past its end (ids the table never saw)."""
    if not lut.size:
        return np.zeros(ids.shape, dtype=lut.dtype)
    inside = ids < lut.size
    return np.where(inside, lut[np.where(inside, ids, 0)], lut.dtype.type(0))


def _token_lookup_rows(lut: np.ndarray, rows: np.ndarray) -> np.ndarray:
    pred = np.zeros(rows.shape, dtype=np.float32)
    if rows.shape[1] > 1:
        pred[:, 1:] = _lookup(lut, rows[:, 1:])  # BOS is never predicted
    return pred


def _token_lookup_batch(lut: np.ndarray, seqs) -> np.ndarray | list[np.ndarray]:
    if isinstance(seqs, np.ndarray) and seqs.ndim == 2:
        return _token_lookup_rows(lut, seqs.astype(np.int64))
    return [_token_lookup_rows(lut, np.asarray(s, dtype=np.int64)[None, :])[0] for s in seqs]


def ngram_lookup_fit(train: Sequence[Example], n: int = 5) -> dict[tuple[int, ...], float]:
    """Maximum normalised activation per (n preceding tokens, token) in train (BOS excluded)."""
    return _NgramIndex.fit(train, n).as_dict()


def ngram_lookup_predict(table: Mapping[tuple[int, ...], float], tokens: Sequence[int], n: int = 5) -> np.ndarray:
    return _NgramIndex.from_table(table, n).predict([tokens])[0]


class _NgramIndex:
    """Vectorised n-gram lookup. Keys are rows of n + 1 token ids (-1 before the sequence), kept
    sorted by their hashes; a position is looked up by its hash and then compared with the key
    exactly, and keys whose hash another key shares are looked up in a dict instead, so a hash
    collision can never change a prediction."""

    _SEEN_BITS = 20

    def __init__(self, keys: np.ndarray, values: np.ndarray, n: int) -> None:
        self.n = n
        hashes = _hash_keys(keys)
        order = np.argsort(hashes, kind="stable")
        self.hashes, self.keys, self.values = hashes[order], keys[order], np.asarray(values, np.float64)[order]
        shared = np.zeros(len(order), dtype=bool)
        same = self.hashes[1:] == self.hashes[:-1]
        shared[1:] |= same
        shared[:-1] |= same
        self.shared = {tuple(k): float(v) for k, v in zip(self.keys[shared].tolist(), self.values[shared])}
        self.shared_hashes = np.unique(self.hashes[shared])
        # a one-hash Bloom filter on the top bits of the hash: most positions that match no key
        # are ruled out by one array read, and only the rest are searched for
        self.seen = np.zeros(1 << self._SEEN_BITS, dtype=bool)
        self.seen[self.hashes >> np.uint64(64 - self._SEEN_BITS)] = True

    @classmethod
    def fit(cls, train: Sequence[Example], n: int) -> "_NgramIndex":
        keys, best = _max_per_key(train, n)
        return cls(keys, best, n)

    @classmethod
    def from_table(cls, table: Mapping[tuple[int, ...], float], n: int) -> "_NgramIndex":
        rows = [(-1,) * (n + 1 - len(k)) + tuple(k) for k in table]
        keys = np.array(rows, dtype=np.int64).reshape(len(rows), n + 1)
        return cls(keys, np.array(list(table.values()), dtype=np.float64), n)

    def as_dict(self) -> dict[tuple[int, ...], float]:
        """Keys as tuples of the ids that exist (no padding), as ``ngram_lookup_fit`` returns them."""
        return {tuple(t for t in k if t >= 0): float(v) for k, v in zip(self.keys.tolist(), self.values.tolist())}

    def predict(self, seqs) -> np.ndarray | list[np.ndarray]:
        if isinstance(seqs, np.ndarray) and seqs.ndim == 2:
            return self._predict_rows(seqs.astype(np.int64))
        return [self._predict_rows(np.asarray(s, dtype=np.int64)[None, :])[0] for s in seqs]

    def _predict_rows(self, rows: np.ndarray) -> np.ndarray:
        pred = np.zeros(rows.shape, dtype=np.float32)
        if not self.hashes.size or rows.shape[1] < 2:
            return pred
        m, length = rows.shape
        flat = _key_rows(rows, self.n).reshape(-1, self.n + 1)  # BOS, position 0, is never predicted
        h = _hash_keys(flat)
        where = np.flatnonzero(self.seen[h >> np.uint64(64 - self._SEEN_BITS)])
        h, flat = h[where], flat[where]
        pos = np.minimum(np.searchsorted(self.hashes, h), self.hashes.size - 1)
        hit = (self.hashes[pos] == h) & (self.keys[pos] == flat).all(axis=1)
        out = np.zeros(m * (length - 1), dtype=np.float32)
        out[where[hit]] = self.values[pos[hit]]
        if self.shared:
            for i in np.flatnonzero(np.isin(h, self.shared_hashes)):
                out[where[i]] = self.shared.get(tuple(flat[i].tolist()), 0.0)
        pred[:, 1:] = out.reshape(m, length - 1)
        return pred


def _token_lookup(art: Artefacts) -> Predictor:
    keys, best = _max_per_key(art.train, 0)
    lut = _dense(keys[:, 0], best)
    return lambda seqs: _token_lookup_batch(lut, seqs)


def _ngram_lookup(n: int) -> Callable[[Artefacts], Predictor]:
    def make(art: Artefacts) -> Predictor:
        return _NgramIndex.fit(art.train, n).predict

    return make


register(Method("n2g_all_paths_max", METHOD_TITLES["n2g_all_paths_max"], "n2g", _n2g("all_paths_max"),
                "the stored graph; every matching path, the maximum END value"))
register(Method("n2g_greedy_deepest", METHOD_TITLES["n2g_greedy_deepest"], "n2g", _n2g("greedy_deepest"),
                "the stored graph; the reference code's greedy walk, the deepest END reached"))
register(Method("token_lookup", METHOD_TITLES["token_lookup"], "baseline", _token_lookup,
                "each token's maximum normalised activation in the stored training examples"))
register(Method("ngram_lookup", METHOD_TITLES["ngram_lookup"], "baseline", _ngram_lookup(5),
                "the same keyed by the token and its 5 preceding tokens"))
