"""Type stubs for the `n2g_fast` extension (Rust core of n2g).

Names follow n2g-method.md: activating token (depth 0, a child of the trie root), context token,
IGNORE element, END (closes a path and holds the normalised activation).
All errors raised by the core are `N2GError` (a `ValueError` subclass) with a message saying what
to fix; the core never panics across the FFI.

Token ids are non-negative ints below 2**32. Batch calls release the GIL and run on the module's
own thread pool (size: RAYON_NUM_THREADS, else the CPU count), never on rayon's global pool; a fork
handler gives a forked child (e.g. `multiprocessing` with the fork start method) a fresh pool, so
forking after a batch call is safe. Should the system refuse every thread, batch calls raise
N2GError ("could not start n2g_fast's thread pool: ...") rather than run elsewhere.
"""

import os
from typing import Literal, Sequence

import numpy as np
import numpy.typing as npt

__version__: str
Semantics = Literal["all_paths_max", "greedy_deepest"]
Role = Literal["activating", "context", "either"]
GRAPH_SCHEMA: str  # "n2g.graph/v1"

class N2GError(ValueError): ...

def visible(label: str) -> str:
    """`label` as the drawings and the report show tokens: space '·', newline '⏎', CR '␍', tab
    '⇥', other invisible characters (Unicode Cc Cf Cs Co Cn Zl Zp Zs, and letters that draw blank
    such as U+3164) as \\xNN / U+XXXX, empty as '∅'."""

class TopK:
    """Per-neuron top-k accumulator for the dataset scan (n2g-method.md section 1).

    Keeps, for each of `n_neurons` neurons, the k windows with the largest activation (a window's
    score is its maximum over tokens) and a_max (the largest activation seen anywhere).
    n_neurons * k is at most 2**30 (N2GError beyond). Window ids are >= 0 (-1 pads top());
    negative ids, and uint64 ids above 2**63 - 1, raise N2GError. An input array that cannot be
    copied (e.g. a broadcast view far larger than memory) raises MemoryError.
    """

    def __init__(self, n_neurons: int, k: int = 20) -> None: ...
    @property
    def n_neurons(self) -> int: ...
    @property
    def k(self) -> int: ...
    def update(
        self,
        activations: npt.NDArray[np.float32],  # [batch, tokens, n_neurons], C-contiguous
        window_ids: npt.NDArray[np.int64],  # [batch]
        token_mask: npt.NDArray[np.bool_] | None = None,  # [batch, tokens]; False = not scored (BOS, padding)
    ) -> None:
        """Folds one batch in. Releases the GIL and runs in parallel over neurons.

        A window with every token masked is not scored. A non C-contiguous array is copied once.
        NaN activations raise N2GError and the batch is not applied. Window ids are not
        deduplicated across batches."""
    def update_window_max(
        self,
        window_max: npt.NDArray[np.float32],  # [batch, n_neurons]
        window_ids: npt.NDArray[np.int64],  # [batch]
    ) -> None:
        """Folds in window scores reduced elsewhere, e.g. on the GPU so that only
        [batch, n_neurons] crosses to the host: window_max[w, j] = neuron j's largest activation
        over window w's scored tokens, -inf where none was scored, e.g.
        `acts.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)`. Same result as
        `update` on those activations (up to the sign of a zero maximum, which a device
        reduction may pick differently). NaN raises N2GError and the batch is not applied."""
    def max_activation(self) -> npt.NDArray[np.float32]:
        """[n_neurons]; -inf for a neuron that saw no token."""
    def top(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """(window_ids [n_neurons, k], scores [n_neurons, k]), best first (higher score, ties by
        smaller window id); -1 / -inf pad."""
    def merge(self, other: TopK) -> None:
        """Folds in `other`'s result in place, as if its windows had been folded into this one.

        For shards of one scan (disjoint window ids): folding each shard into its own TopK and
        merging them in any order and grouping gives exactly the single-pass result, bit for bit
        (the order on (score, window id) is total, and a_max is the max under IEEE total order,
        so +0.0 beats -0.0 whatever the order). Windows seen by both sides would count twice.
        Raises N2GError if n_neurons or k differ (nothing changes). Releases the GIL."""
    def to_bytes(self) -> bytes:
        """Versioned, checksummed binary form (magic b"N2TK", version 1, little-endian;
        16 + 8 * n_neurons + 12 * n_neurons * k + 4 bytes)."""
    @staticmethod
    def from_bytes(data: bytes) -> TopK:
        """Reads `to_bytes` output exactly; N2GError on a wrong magic, an unknown version, a wrong
        length, a bad checksum or contents that break the accumulator's invariants."""
    @staticmethod
    def from_arrays(
        window_ids: npt.NDArray[np.int64],  # [n_neurons, k], as top() gives
        scores: npt.NDArray[np.float32],  # [n_neurons, k], as top() gives
        max_activation: npt.NDArray[np.float32],  # [n_neurons], as max_activation() gives
    ) -> TopK:
        """Rebuilds an accumulator from its result arrays (exact: merging it equals merging the
        original). N2GError unless rows are sorted best first, padded with -1 / -inf after the
        filled slots, free of NaN, and max_activation equals each row's best score (-inf for an
        empty row)."""
    def __getstate__(self) -> bytes: ...  # pickle / copy: the to_bytes form
    def __setstate__(self, state: bytes) -> None: ...
    def __getnewargs__(self) -> tuple[int, int]: ...

ContextElement = tuple[str, Sequence[int], float] | None  # (label, token_ids, importance); None = IGNORE

class NeuronGraph:
    """The trie of one neuron (n2g-method.md sections 5 and 6)."""

    def __init__(self, model: str, layer: int, neuron: int, hook: str, max_activation: float) -> None: ...
    model: str
    layer: int
    neuron: int
    hook: str
    max_activation: float
    def add_path(
        self,
        activating: tuple[str, Sequence[int], float],
        context: Sequence[ContextElement],
        end: float,
    ) -> None:
        """Inserts one path. `activating` = (label, token_ids, normalised activation) of token i;
        `context` runs backwards from token i-1 (nearest first); trailing IGNOREs are cut; `end` is
        the normalised activation stored on the END. A node keeps the max importance / activation
        / end value seen. `token_ids` are every vocabulary id whose normalised label is `label`;
        nodes are keyed by label, and their id sets are unioned. The arguments are read before
        the graph is touched, so a `context` iterator may use the graph (or another thread may)."""
    def finalize(self) -> None:
        """Merges sibling sub-paths under IGNORE children and drops children that are neither END
        nodes nor parents of one (n2g-method.md section 5). Idempotent; predict, to_json and
        to_bytes call it implicitly, and so does everything else that reads the trie
        (activating_labels, context_labels, n_nodes, n_paths, to_dot, to_svg, ==).

        Nested IGNORE siblings can multiply the trie exponentially: a merge that would pass
        max(1,000,000, 8 x the nodes before) nodes raises N2GError and leaves the graph as it was
        (so every read of it raises; from_json, from_bytes and the store's readers raise too).

        Precisely (the reference's merge_ignores, values folded by max): top-down, at every node N
        with an IGNORE child G, each other child C of N has its children (whole subtrees) merged
        into G's children (same label -> same node, max value/END, union of ids; C's own END is
        not copied), and C is dropped unless it holds an END. Then N's remaining children, G
        included, are processed the same way."""
    def predict(
        self,
        token_id_sequences: Sequence[Sequence[int]] | Sequence[npt.NDArray[np.integer]] | npt.NDArray[np.integer],
        semantics: Semantics = "all_paths_max",
        *,
        vocab_size: int | None = None,
    ) -> list[npt.NDArray[np.float32]]:
        """One array of predicted normalised activations per sequence (0 where nothing matches).
        "greedy_deepest": the reference code's walk (exact child, else IGNORE, else stop; the
        deepest END reached). "all_paths_max": every matching path, exact or IGNORE at each step;
        the maximum END value.

        Input: a 2-D integer array [sequences, tokens], or a list of lists / 1-D integer arrays
        (ragged allowed; an empty list gives []). Negative ids, ids >= 2**32 and, when
        `vocab_size` is given, ids >= vocab_size raise N2GError naming sequence and position
        (vocab_size >= 2**32 admits every id). More than 2**31 ids or sequences in one call raise
        N2GError. Where sibling nodes share an id, greedy takes the first by label, all-paths
        takes all."""
    def activating_labels(self) -> list[str]:
        """Sorted labels of the activating tokens on paths that can fire (an END >= 0.5 at or
        below them): what the graph says the neuron fires on. Graded paths (ENDs below 0.5) are
        in to_json() and predictions only."""
    def context_labels(self) -> list[str]:
        """Distinct sorted labels of the context tokens on paths that can fire (IGNORE excluded)."""
    @property
    def n_nodes(self) -> int: ...
    @property
    def n_paths(self) -> int: ...
    def to_json(self) -> str:
        """The `n2g.graph/v1` document (export format of the foundation issue)."""
    @staticmethod
    def from_json(text: str) -> NeuronGraph:
        """Reads an `n2g.graph/v1` document (N2GError saying what is wrong otherwise). Children may
        come in any order; token ids are sorted and deduplicated; a root's importance is unused.
        `"ignore": true` alone makes a node IGNORE: any label is accepted there and read as
        "<IGNORE>" (other tools write their own); IGNORE nodes must still have no token_ids and
        end null, and roots cannot be IGNORE. Reading re-applies the IGNORE merge (finalize), so
        the graph read back is the canonical form: its to_json may differ from the text read
        (merged paths, the "<IGNORE>" label) and is what this module writes for that graph."""
    def to_bytes(self) -> bytes:
        """Versioned, checksummed binary form (what the workspace stores)."""
    @staticmethod
    def from_bytes(data: bytes) -> NeuronGraph:
        """Reads `to_bytes` output (header, length and CRC-32 checked). A blob flagged finalized
        is taken as merged: checking that on every read cost 2.5x a store's load time."""
    def to_dot(self) -> str:
        """Graphviz DOT (n2g-method.md section 7): IGNORE dropped, same label at the same depth
        merged into one node, activating tokens red by activation, context tokens blue by
        importance, END nodes bold, rankdir RL, edges drawn from context towards activating.
        Paths that cannot fire (every END on them below 0.5) are not drawn. At most 64
        activating labels are drawn, the highest activation first, with the context hanging from
        them; the title then says how many were left out.
        Labels shown as the report shows tokens: space '·', newline '⏎', CR '␍', tab '⇥', other
        invisible characters (Unicode Cc Cf Cs Co Cn Zl Zp Zs) as \\xNN / U+XXXX, empty as '∅'."""
    def to_svg(self) -> str:
        """The same drawing as standalone SVG, laid out in Rust (no Graphviz needed): one column
        per depth, activating tokens rightmost."""
    def __eq__(self, other: object) -> bool:
        """Same metadata and the same finalized trie."""
    def __reduce__(self) -> tuple[object, tuple[bytes]]:
        """Pickles through to_bytes, so graphs cross process boundaries."""

Key = tuple[int, int]  # (layer, neuron)
PairResult = tuple[Key, Key, float, float]  # (a, b, activating_overlap, context_overlap)

class GraphStore:
    """Many neuron graphs keyed by (layer, neuron) (issue 3): batched prediction, search,
    similarity and a versioned, checksummed store file.

    Thread-safe: queries share a read lock and run without the GIL (several threads can query at
    once); add/remove take the write lock, also without the GIL. Graphs go in and out as copies.
    The search index and the last all-pairs result are built on first use and dropped by any
    change.

    Memory: graphs are held packed, 16 bytes per node (label and token-id set interned once per
    store as one symbol; value, END, child offset), one allocation per graph; predictions walk
    that form directly (no per-graph compiled copy). `heap_bytes()` gives the accounted size."""

    def __init__(self) -> None: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: Key) -> bool: ...
    def keys(self) -> list[Key]:
        """Sorted."""
    def add(self, graph: NeuronGraph) -> None:
        """Adds a finalized copy under (graph.layer, graph.neuron), replacing any graph there."""
    def add_bytes(self, blobs: Sequence[bytes]) -> None:
        """Adds graphs given as NeuronGraph.to_bytes() blobs (what the workspace stores),
        decoded in parallel without the GIL. All or nothing: a bad blob raises N2GError naming
        its index and adds none."""
    @staticmethod
    def from_bytes_list(blobs: Sequence[bytes]) -> GraphStore: ...
    def remove(self, key: Key) -> None:
        """N2GError for an unknown key."""
    def get(self, key: Key) -> NeuronGraph:
        """A copy; N2GError for an unknown key."""
    def heap_bytes(self) -> int:
        """Bytes the graphs hold in memory: packed nodes, map entries and the shared symbol
        tables (lazily built search index and allocator overhead not counted)."""
    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the store file atomically (temporary file + rename). Format version 2: magic
        "N2GSTORE", version, graph count, payload length, CRC-32 over header and payload, then
        the packed form (names, labels, symbols numbered in order of first use, then each graph's
        words sorted by key), so loading is checking and copying."""
    @staticmethod
    def load(path: str | os.PathLike[str]) -> GraphStore:
        """Reads format versions 2 and 1 (earlier builds: a list of to_bytes() blobs). Every
        graph invariant is checked. Refuses a missing, truncated, corrupt or newer-version file
        with N2GError."""
    def to_bytes(self) -> bytes:
        """The store file's content."""
    @staticmethod
    def from_bytes(data: bytes) -> GraphStore: ...
    def predict(
        self,
        keys: Sequence[Key],
        token_id_sequences: Sequence[Sequence[int]] | Sequence[npt.NDArray[np.integer]] | npt.NDArray[np.integer],
        semantics: Semantics = "all_paths_max",
        *,
        vocab_size: int | None = None,
    ) -> npt.NDArray[np.float32]:
        """[len(keys), n_sequences, n_tokens] float32 predictions (same semantics as
        NeuronGraph.predict). Sequences must be rectangular: a 2-D integer array, or lists / 1-D
        arrays of one length; ragged input raises N2GError (pad on the right: a prediction at
        position i reads tokens 0..i only, so right padding never changes real positions). Empty
        keys or sequences, unknown keys, negative / too large / (with vocab_size)
        out-of-vocabulary ids raise N2GError. A key may repeat; an output of more than 2**31
        values raises N2GError (predict in batches), one numpy cannot allocate MemoryError. Runs
        on all cores without the GIL, looking each token up once in the activating tokens of all
        requested graphs."""
    def search(self, clauses: Sequence[tuple[int | str, Role]]) -> list[Key]:
        """Keys of graphs matching every clause, sorted. An int matches nodes whose token-id set
        holds it, a str matches node labels exactly. "activating" = depth-0 nodes, "context" =
        context nodes (IGNORE never matches), "either" = both. Only nodes on paths that can fire
        count (an END >= 0.5, the paper's threshold, at or below them): paths that carry a graded
        level below it are not what a graph fires on. No clause: N2GError."""
    def in_context_neurons(self, limit: int | None = None) -> list[tuple[Key, list[str], float]]:
        """Graphs with an activating label that is also one of their context labels (the paper's
        in-context / repeated-token neurons): (key, shared labels sorted, fraction = shared /
        activating labels), ranked by number of shared labels, then fraction, then key."""
    def similar_pairs(self, threshold: float = 0.9) -> list[PairResult]:
        """Pairs with |A n A'| / max(|A|, |A'|) >= threshold and the same for context-label sets
        (node labels on paths that can fire, as search counts them, IGNORE excluded; denominators at least 1, so graphs without context tokens
        never pair). (a, b) with a < b; overlaps as defined. threshold in (0, 1]; one below
        float32's range counts as the smallest positive float32 (any shared label qualifies)."""
    def subset_pairs(self, threshold: float = 0.9) -> list[PairResult]:
        """Pairs with |A n A'| / min(|A|, |A'|) >= threshold for both sets that are not similar
        pairs: (subset_key, superset_key, activating_overlap, context_overlap) with overlaps by
        min; the subset side is the graph with fewer labels (|A| + |C|), ties by key."""
    def neighbours(self, key: Key, k: int = 10) -> list[tuple[Key, float, float, float]]:
        """Up to k graphs sharing at least one label with `key`'s graph: (key, score,
        activating_overlap, context_overlap), overlaps by max as in similar_pairs and score =
        their mean (1.0 = identical label sets); best first, ties by key; score > 0 only."""
