"""What a build is asked to do: the request (`BuildRequest`: layers, neurons, scan, fit and
evaluation settings, how it runs), its progress events, the neurons it covers and the work sizes
for a device. Shared by the runner, the executors and the job queue.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from n2g.layers import parse_layers  # one layer grammar for clients and server

from ..config import EvalConfig, FitConfig, ScanConfig

EXECUTORS = ("inprocess", "ray")
PRECISIONS = ("float32", "bfloat16", "float16")
# fit sizes on a GPU: many more neurons a group and tokens a forward pass than on a CPU
GPU_GROUP_SIZE = 64
GPU_MAX_GROUP_SIZE = 512
GPU_MAX_BATCH_TOKENS = 1 << 18
GPU_SCAN_BATCH = 256


class BuildCancelled(Exception):
    """Raised inside the runner when the job's cancel event is set."""


@dataclass
class BuildRequest:
    layers: list[int] | str  # layer ids, or a spec: "all", "0-5", "0,2,4-6" (resolved per model)
    neurons: list[int] | None = None  # the same neuron indices in every layer asked
    sample: int | None = None  # or a seeded random sample of live neurons per layer
    seed: int = 0
    group_size: int = 0  # neurons fitted together (shared forward passes); 0: sized to the device (8 on a CPU)
    scan: ScanConfig = field(default_factory=ScanConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # how the plan runs (none of these change a result)
    executor: str = "inprocess"  # inprocess | ray
    ray_address: str | None = None  # None: start a local Ray cluster
    workers: int = 0  # Ray actors (0: one per GPU, else 1; more than the GPUs share them); ignored in-process
    worker_threads: int = 0  # torch threads per CPU actor (0: the CPU count / workers)
    shard_windows: int = 1024  # corpus windows per scan shard
    precision: str = "float32"  # scan forward passes: float32 | bfloat16 | float16 (for GPUs)

    _RUN_DEFAULTS = {"executor": "inprocess", "ray_address": None, "workers": 0, "worker_threads": 0,
                     "shard_windows": 1024, "precision": "float32"}

    def to_dict(self) -> dict[str, Any]:
        d = {
            "layers": self.layers if isinstance(self.layers, str) else list(self.layers),
            "neurons": self.neurons, "sample": self.sample, "seed": self.seed,
            "group_size": self.group_size, "scan": self.scan.to_dict(), "fit": self.fit.to_dict(),
            "eval": self.eval.to_dict(),
        }
        # written only when set, so a request stored before these existed compares equal
        for k, default in self._RUN_DEFAULTS.items():
            if getattr(self, k) != default:
                d[k] = getattr(self, k)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BuildRequest":
        layers = d["layers"]
        return cls(
            layers=layers if isinstance(layers, str) else list(layers), neurons=d.get("neurons"),
            sample=d.get("sample"), seed=d.get("seed", 0),
            group_size=d.get("group_size", 8), scan=ScanConfig.from_dict(d.get("scan", {})),
            fit=FitConfig.from_dict(d.get("fit", {})), eval=EvalConfig.from_dict(d.get("eval", {})),
            **{k: d.get(k, default) for k, default in cls._RUN_DEFAULTS.items()},
        )

    def resolved_layers(self, n_layers: int) -> list[int]:
        return parse_layers(self.layers, n_layers)

    def validate(self, n_layers: int, d_mlp: int) -> None:
        if isinstance(self.layers, (list, tuple)) and not self.layers:
            raise ValueError("no layers asked: give at least one layer")
        self.resolved_layers(n_layers)
        if (self.neurons is None) == (self.sample is None):
            raise ValueError("give either neurons (explicit indices) or sample (a count per layer), not both or neither")
        if self.neurons is not None:
            if not self.neurons:
                raise ValueError("the neuron list is empty")
            for n in self.neurons:
                if not 0 <= n < d_mlp:
                    raise ValueError(f"neuron {n} out of range: layers have neurons 0..{d_mlp - 1}")
        if self.sample is not None and not 1 <= self.sample <= d_mlp:
            raise ValueError(f"sample must be between 1 and {d_mlp}, got {self.sample}")
        if self.group_size < 0:
            raise ValueError("group_size must be at least 1 (or 0: sized to the device)")
        if self.executor not in EXECUTORS:
            raise ValueError(f"unknown executor {self.executor!r}; use one of {list(EXECUTORS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; use one of {list(PRECISIONS)}")
        if self.shard_windows < 1:
            raise ValueError("shard_windows must be at least 1")
        if self.workers < 0 or self.worker_threads < 0:
            raise ValueError("workers and worker_threads must be >= 0 (0 = automatic)")


@dataclass
class BuildEvent:
    """One progress event; `stage` is corpus | scan | merge | fit | done (of vocab.BUILD_STAGES).
    `done`/`total` count the stage's items (windows for the scan, neurons for the fit); `eta_s` is the stage's
    remaining time at this run's rate (None until measurable). ``partial``: progress inside a
    unit that is not committed yet (a kill now loses it; a resumed build scans it again)."""
    stage: str
    done: int
    total: int
    message: str = ""
    layer: int | None = None
    neuron: int | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    partial: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def plan_neurons(req: BuildRequest, max_activation: dict[int, np.ndarray]) -> list[tuple[int, int]]:
    """The (layer, neuron) keys a request covers. A sample draws among live neurons only
    (a_max > 0): a neuron that never fires on the corpus has nothing for a graph to explain."""
    keys: list[tuple[int, int]] = []
    for layer in sorted(max_activation):
        if req.neurons is not None:
            keys.extend((layer, n) for n in sorted(set(req.neurons)))
            continue
        live = np.flatnonzero(max_activation[layer] > 0)
        rng = np.random.default_rng([req.seed, layer])
        chosen = rng.choice(live, size=min(req.sample, live.size), replace=False)
        keys.extend((layer, int(n)) for n in sorted(chosen))
    return keys


def device_sizes(model_dims: dict[str, int], device: str, free_bytes: int | None, req: BuildRequest) -> dict[str, int]:
    """Work sizes for a device: neurons a fit group, tokens a fit forward pass, windows a scan
    batch. On a CPU the request's. On a GPU the fit's batches take about a quarter of the free
    memory (activations of one layer at a time: no gradients), groups grow so their passes stay
    full, and scan batches grow to 256 windows; an explicit group_size is kept."""
    if not device.startswith("cuda"):
        return {"group_size": req.group_size or 8, "batch_tokens": req.fit.batch_tokens,
                "scan_batch": req.scan.batch_size}
    d_model, d_mlp = model_dims.get("d_model", 1024), model_dims.get("d_mlp", 4096)
    heads, t = model_dims.get("n_heads", 16), req.scan.window_tokens
    per_token = 4 * (16 * d_model + 4 * d_mlp + 2 * heads * t)  # float32 bytes alive a token
    free = free_bytes if free_bytes else 16 * 2**30
    batch_tokens = int(min(max(free // 4 // per_token, req.fit.batch_tokens), GPU_MAX_BATCH_TOKENS))
    # a neuron's fit runs about 40 windows of examples per stage: enough neurons to fill a pass
    group = req.group_size or int(min(max(batch_tokens // (40 * t), GPU_GROUP_SIZE), GPU_MAX_GROUP_SIZE))
    return {"group_size": group, "batch_tokens": batch_tokens, "scan_batch": max(req.scan.batch_size, GPU_SCAN_BATCH)}


def model_dims(model) -> dict[str, int]:
    cfg = model.bridge.cfg
    return {k: int(getattr(cfg, k)) for k in ("d_model", "d_mlp", "n_heads") if getattr(cfg, k, None)}


def resolve_fit_sizes(req: BuildRequest, device: str) -> tuple[int, int]:
    """(neurons a fit group, tokens a forward pass) on ``device`` (see :func:`device_sizes`)."""
    s = device_sizes({}, device, None, req)
    return s["group_size"], s["batch_tokens"]
