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
                return list(graph.predict(seqs, semantics=semantics))
            return graph.predict([np.asarray(s, dtype=np.int64) for s in seqs], semantics=semantics)

        return predict

    return make


# ---- baselines ------------------------------------------------------------------------------


def token_lookup_fit(train: Sequence[Example]) -> dict[int, float]:
    """Each token id's maximum normalised activation in train (BOS excluded)."""
    table: dict[int, float] = {}
    for tokens, acts in train:
        for t, a in zip(list(tokens)[1:], list(acts)[1:]):
            t, a = int(t), float(a)
            if a > table.get(t, -np.inf):
                table[t] = a
    return table


def token_lookup_predict(table: Mapping[int, float], tokens: Sequence[int]) -> np.ndarray:
    return _token_lookup_batch(_sorted_table(table), [tokens])[0]


def _sorted_table(table: Mapping[int, float]) -> tuple[np.ndarray, np.ndarray]:
    keys = np.array(sorted(table), dtype=np.int64)
    return keys, np.array([table[int(k)] for k in keys], dtype=np.float32)


def _token_lookup_rows(sorted_table: tuple[np.ndarray, np.ndarray], rows: np.ndarray) -> np.ndarray:
    keys, vals = sorted_table
    pred = np.zeros(rows.shape, dtype=np.float32)
    if keys.size and rows.shape[1] > 1:
        body = rows[:, 1:]  # BOS is never predicted
        pos = np.minimum(np.searchsorted(keys, body), keys.size - 1)
        hit = keys[pos] == body
        pred[:, 1:][hit] = vals[pos[hit]]
    return pred


def _token_lookup_batch(sorted_table: tuple[np.ndarray, np.ndarray], seqs) -> list[np.ndarray]:
    if isinstance(seqs, np.ndarray) and seqs.ndim == 2:
        return list(_token_lookup_rows(sorted_table, seqs.astype(np.int64)))
    return [_token_lookup_rows(sorted_table, np.asarray(s, dtype=np.int64)[None, :])[0] for s in seqs]


def _ngram_key(tokens: Sequence[int], i: int, n: int) -> tuple[int, ...]:
    return tuple(int(t) for t in tokens[max(0, i - n) : i + 1])


def ngram_lookup_fit(train: Sequence[Example], n: int = 5) -> dict[tuple[int, ...], float]:
    """Maximum normalised activation per (n preceding tokens, token) in train (BOS excluded)."""
    table: dict[tuple[int, ...], float] = {}
    for tokens, acts in train:
        tokens, acts = list(tokens), list(acts)
        for i in range(1, len(tokens)):
            key = _ngram_key(tokens, i, n)
            a = float(acts[i])
            if a > table.get(key, -np.inf):
                table[key] = a
    return table


def ngram_lookup_predict(table: Mapping[tuple[int, ...], float], tokens: Sequence[int], n: int = 5) -> np.ndarray:
    return _NgramIndex(table, n).predict([tokens])[0]


class _NgramIndex:
    """Vectorised n-gram lookup: every position's key is hashed at once (a polynomial hash over
    uint64, 0 standing for "before the sequence"), and only the positions whose hash is in the
    table are checked exactly against it, so hash collisions can never change a prediction."""

    _MULT = np.random.default_rng(0x6E67).integers(1, 2**63, size=64, dtype=np.uint64) | np.uint64(1)

    def __init__(self, table: Mapping[tuple[int, ...], float], n: int) -> None:
        if n + 1 > self._MULT.size:
            raise ValueError(f"n-gram keys of more than {self._MULT.size} tokens are not supported")
        self.table, self.n = table, n
        self.hashes = np.unique(np.array([self._key_hash(k) for k in table], dtype=np.uint64))

    def _key_hash(self, key: tuple[int, ...]) -> np.uint64:
        h = np.uint64(0)
        with np.errstate(over="ignore"):
            for j, t in enumerate(reversed(key)):
                h += np.uint64(t + 1) * self._MULT[j]
        return h

    def _hash_rows(self, rows: np.ndarray) -> np.ndarray:
        m, length = rows.shape
        padded = np.zeros((m, self.n + length), dtype=np.uint64)
        padded[:, self.n:] = rows.astype(np.uint64) + np.uint64(1)
        h = np.zeros((m, length), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(self.n + 1):
                h += padded[:, self.n - j: self.n - j + length] * self._MULT[j]
        return h

    def predict(self, seqs) -> list[np.ndarray]:
        if isinstance(seqs, np.ndarray) and seqs.ndim == 2:
            return list(self._predict_rows(seqs.astype(np.int64)))
        return [self._predict_rows(np.asarray(s, dtype=np.int64)[None, :])[0] for s in seqs]

    def _predict_rows(self, rows: np.ndarray) -> np.ndarray:
        pred = np.zeros(rows.shape, dtype=np.float32)
        if not self.hashes.size or rows.shape[1] < 2:
            return pred
        h = self._hash_rows(rows)
        hit = np.isin(h, self.hashes)
        hit[:, 0] = False  # BOS is never predicted
        for r, i in zip(*np.nonzero(hit)):
            v = self.table.get(_ngram_key(rows[r], int(i), self.n))
            if v is not None:
                pred[r, i] = v
        return pred


def _token_lookup(art: Artefacts) -> Predictor:
    table = _sorted_table(token_lookup_fit(art.train))
    return lambda seqs: _token_lookup_batch(table, seqs)


def _ngram_lookup(n: int) -> Callable[[Artefacts], Predictor]:
    def make(art: Artefacts) -> Predictor:
        return _NgramIndex(ngram_lookup_fit(art.train, n), n).predict

    return make


register(Method("n2g_all_paths_max", METHOD_TITLES["n2g_all_paths_max"], "n2g", _n2g("all_paths_max"),
                "the stored graph; every matching path, the maximum END value"))
register(Method("n2g_greedy_deepest", METHOD_TITLES["n2g_greedy_deepest"], "n2g", _n2g("greedy_deepest"),
                "the stored graph; the reference code's greedy walk, the deepest END reached"))
register(Method("token_lookup", METHOD_TITLES["token_lookup"], "baseline", _token_lookup,
                "each token's maximum normalised activation in the stored training examples"))
register(Method("ngram_lookup", METHOD_TITLES["ngram_lookup"], "baseline", _ngram_lookup(5),
                "the same keyed by the token and its 5 preceding tokens"))
