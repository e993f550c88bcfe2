"""The results of n2g calls: plain dataclasses shared by the client library, the local client
and the server's application layer (which returns them; the servicer turns them into protobuf).
Importable without torch or the service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from .vocab import JOB_FINAL

Key = tuple[int, int]


class N2GError(Exception):
    """A failed call: `code` is the gRPC status code, `message` the server's explanation.
    `retry_after` (seconds) is set when the server was busy rather than the request wrong: the
    same call may succeed after that long (sent as google.rpc.RetryInfo; the clients wait and
    retry it within the call's deadline)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def code_name(self) -> str:
        return self.code.name


# ---------------------------------------------------------------------------------------------
# Results

@dataclass(frozen=True)
class Limits:
    """Request-size limits of a server (0 = none); past one, a call is RESOURCE_EXHAUSTED. Every
    size a request can set is checked against these before any work starts."""
    max_texts: int = 1024
    max_tokens_per_sequence: int = 4096
    max_total_tokens: int = 262_144
    max_neurons: int = 65_536
    max_neuron_tokens: int = 8_000_000  # 32 MB of float32 activations back
    max_message_bytes: int = 64 << 20
    max_build_neurons: int = 100_000


@dataclass(frozen=True)
class LayerStatus:
    layer: int
    scanned: bool
    neurons_built: int


@dataclass(frozen=True)
class ModelInfo:
    model: str
    loaded: bool
    n_layers: int
    d_mlp: int
    d_vocab: int
    hook: str
    device: str
    workspace: str
    corpus: str
    layers: list[LayerStatus]
    neurons_built: int
    limits: Limits
    server_version: str
    semantics: list[str]
    default_semantics: str
    n_ctx: int = 0  # the longest token sequence the model reads (0 when unknown)


@dataclass(frozen=True)
class TokenizedText:
    token_ids: np.ndarray  # int64 [n_tokens]
    tokens: list[str]


@dataclass(frozen=True)
class Job:
    id: str
    state: str  # queued | running | succeeded | failed | cancelled
    total: int
    done: int
    error: str
    created_at: float
    updated_at: float
    request: dict[str, Any]
    # queued or running, but no process holds the workspace to run it (its server or build
    # stopped); `n2g serve` with the model resumes it when it opens the workspace
    orphaned: bool = False

    @property
    def finished(self) -> bool:
        return self.state in JOB_FINAL


@dataclass(frozen=True)
class JobEvent:
    job: Job
    stage: str  # one of vocab.BUILD_STAGES: state | corpus | scan | merge | fit | done | failed | cancelled
    done: int
    total: int
    message: str
    last_neuron: Key | None
    elapsed_s: float
    eta_s: float | None = None  # seconds left in this stage at this run's rate

    def __str__(self) -> str:  # one line for a progress printer (`wait_job(id, progress=print)`)
        count = f" {self.done}/{self.total}" if self.total else ""
        return f"[{self.job.id}] {self.stage}{count}: {self.message}"


@dataclass(frozen=True)
class MethodScore:
    method: str
    precision: float
    recall: float
    f1: float


@dataclass(frozen=True)
class GraphSummary:
    key: Key
    max_activation: float
    n_nodes: int
    n_paths: int
    activating: list[str]
    context: list[str]
    job_id: str
    created_at: float
    scores: list[MethodScore]


@dataclass(frozen=True)
class GraphNode:
    label: str
    token_ids: list[int]
    ignore: bool
    importance: float
    activation: float | None
    end: float | None
    children: list["GraphNode"]


@dataclass(frozen=True)
class Graph:
    summary: GraphSummary
    model: str
    hook: str
    roots: list[GraphNode]
    dot: str
    svg: str
    json: str
    stats: dict[str, Any]
    metrics: dict[str, Any]
    examples: dict[str, Any] | None

    @property
    def key(self) -> Key:
        return self.summary.key


@dataclass(frozen=True)
class Activations:
    """Activations of `neurons` on each input sequence: `values[s]` is float32
    [len(neurons), len(token_ids[s])]."""
    neurons: list[Key]
    token_ids: list[np.ndarray]
    tokens: list[list[str]]
    values: list[np.ndarray]
    normalised: bool
    max_activation: np.ndarray
    semantics: str = ""

    def padded(self, fill: float = 0.0) -> np.ndarray:
        """[neuron, sequence, position], `fill` past each sequence's end."""
        t = max((len(s) for s in self.token_ids), default=0)
        out = np.full((len(self.neurons), len(self.values), t), fill, dtype=np.float32)
        for i, v in enumerate(self.values):
            out[:, i, : v.shape[1]] = v
        return out

    def of(self, layer: int, neuron: int) -> list[np.ndarray]:
        """One neuron's activations, one array per sequence."""
        r = self.neurons.index((layer, neuron))
        return [v[r] for v in self.values]


@dataclass(frozen=True)
class NeuronEvaluation:
    key: Key
    scores: list[MethodScore]
    metrics: dict[str, Any]


@dataclass(frozen=True)
class LayerEvaluation:
    layer: int
    n_neurons: int
    scores: list[MethodScore]


@dataclass(frozen=True)
class Evaluation:
    neurons: list[NeuronEvaluation]
    layers: list[LayerEvaluation]
    table: str
    summary: Any
    report: str = ""  # with test_sets: every method on the three test sets, with intervals
    details: dict[str, Any] | None = None  # with test_sets: every score of that report


class ListResult(list):
    """A listing's items (at most the call's limit), and ``total``: how many matched before it."""

    def __init__(self, items=(), total: int | None = None):
        super().__init__(items)
        self.total = len(self) if total is None else int(total)


@dataclass(frozen=True)
class SearchResult:
    neurons: list[Key]
    total: int


@dataclass(frozen=True)
class Pair:
    a: Key  # for a subset pair: the neuron with the smaller sets
    b: Key
    kind: str  # similar | subset
    activating_overlap: float
    context_overlap: float


@dataclass(frozen=True)
class Neighbour:
    key: Key
    score: float  # mean of the two overlaps
    activating_overlap: float
    context_overlap: float


@dataclass(frozen=True)
class InContextNeuron:
    key: Key
    shared: list[str]  # labels among both its activating and its context tokens
    fraction: float    # shared / activating labels


@dataclass(frozen=True)
class InContextResult:
    neurons: list[InContextNeuron]  # ranked: most shared labels first
    total: int


@dataclass(frozen=True)
class Similar:
    similar: list[Pair]
    subset: list[Pair]
    neighbours: list[Neighbour]


@dataclass(frozen=True)
class ExportedNeuron:
    key: Key
    graph_json: str
    examples_json: str


@dataclass(frozen=True)
class ReportChunk:
    """One piece of a report archive (a zip) as it streams."""
    data: bytes
    total_bytes: int
    filename: str


@dataclass(frozen=True)
class BuildPlan:
    """A dry run of a build request: its units, what is left to do, and a time estimate."""
    layers: list[int]
    neurons: int
    neurons_built: int
    scan_shards: int
    scan_tokens: int
    fit_groups: int
    total_seconds: float | None
    summary: str
    details: dict[str, Any]
