"""Batched hooked forward passes with early stop.

Reading a layer's neurons never runs the blocks after it nor the unembedding: the hook on the
deepest layer asked for raises :class:`_StopForward`, which unwinds the forward pass right there.
All functions run under ``torch.no_grad()`` on the model's device and take token ids as a
``LongTensor [batch, tokens]`` (or anything ``torch.as_tensor`` accepts).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .models import LoadedModel


class _StopForward(Exception):
    """Raised from the deepest hook to end the forward pass early."""


# Tokens fed to forward passes by this process (every pass of the pipeline goes through this
# module), for measuring what a fit costs: read with forward_tokens().
_FORWARD = {"tokens": 0, "passes": 0}


def forward_tokens() -> tuple[int, int]:
    """(tokens, forward passes) run so far by this process."""
    return _FORWARD["tokens"], _FORWARD["passes"]


class Stopped(Exception):
    """A forward pass not run because the work it belongs to was cancelled (see `stop_when`)."""


# Every forward pass starts in _count: the one place a cancelled build is stopped within a neuron
# group, not only between groups (a group can hold the model for minutes on a CPU).
_STOP: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("n2g_stop", default=None)


@contextlib.contextmanager
def stop_when(check: Callable[[], bool] | None):
    """Within the block, a forward pass raises `Stopped` once `check()` is true (None: never)."""
    token = _STOP.set(check)
    try:
        yield
    finally:
        _STOP.reset(token)


def _count(toks: torch.Tensor) -> torch.Tensor:
    stop = _STOP.get()
    if stop is not None and stop():
        raise Stopped()
    _FORWARD["tokens"] += int(toks.numel())
    _FORWARD["passes"] += 1
    return toks


def _as_tokens(model: LoadedModel, tokens: torch.Tensor | np.ndarray | Sequence) -> torch.Tensor:
    t = torch.as_tensor(tokens, dtype=torch.long)
    if t.ndim == 1:
        t = t[None, :]
    if t.ndim != 2:
        raise ValueError(f"tokens must be [batch, tokens], got shape {tuple(t.shape)}")
    return t.to(model.device)


def layer_activations(
    model: LoadedModel,
    tokens: torch.Tensor | np.ndarray,
    layers: Iterable[int],
) -> dict[int, torch.Tensor]:
    """Neuron activations of each layer asked: ``{layer: [batch, tokens, d_mlp]}`` (float32).

    One forward pass; it stops inside the hook of the deepest layer asked.
    """
    return layer_reductions(model, tokens, layers, lambda act: act.detach().float())


def layer_reductions(
    model: LoadedModel,
    tokens: torch.Tensor | np.ndarray,
    layers: Iterable[int],
    reduce: Callable[[torch.Tensor], Any],
    autocast_dtype: torch.dtype | None = None,
) -> dict[int, Any]:
    """``{layer: reduce(activations)}`` for each layer asked, from one forward pass that stops
    inside the hook of the deepest layer. ``reduce`` runs in the hook, on the model's device, so
    only what it returns outlives the pass (the scan keeps ``[batch, d_mlp]`` window maxima
    instead of ``[batch, tokens, d_mlp]``). ``autocast_dtype`` (bf16/fp16) runs the pass under
    ``torch.autocast``."""
    layers = sorted({int(l) for l in layers})
    if not layers:
        return {}
    toks = _count(_as_tokens(model, tokens))
    deepest = layers[-1]
    store: dict[int, Any] = {}

    def make_hook(layer: int):
        def hook_fn(act: torch.Tensor, hook=None) -> None:
            store[layer] = reduce(act)
            if layer == deepest:
                raise _StopForward

        return hook_fn

    fwd_hooks = [(model.hook_name(l), make_hook(l)) for l in layers]
    autocast = (torch.autocast(device_type=toks.device.type, dtype=autocast_dtype)
                if autocast_dtype is not None else contextlib.nullcontext())
    with torch.no_grad(), autocast:
        try:
            model.bridge.run_with_hooks(toks, fwd_hooks=fwd_hooks, return_type=None)
        except _StopForward:
            pass
    missing = [l for l in layers if l not in store]
    if missing:
        raise RuntimeError(f"hooks of layers {missing} were not called ({model.hook})")
    return store


def forward_to_layer(model: LoadedModel, tokens: torch.Tensor | np.ndarray, layer: int) -> None:
    """A bare forward pass that stops at ``layer``'s neurons and keeps nothing: the throughput
    limit the scan is measured against."""
    layer_reductions(model, tokens, [layer], lambda act: None)


def neuron_activations(
    model: LoadedModel,
    layer: int,
    tokens: torch.Tensor | np.ndarray,
    neurons: torch.Tensor | np.ndarray | Sequence[int],
) -> torch.Tensor:
    """``[batch, tokens]``: row b holds neuron ``neurons[b]`` of ``layer`` on ``tokens[b]``."""
    acts = layer_activations(model, tokens, [layer])[int(layer)]
    idx = torch.as_tensor(neurons, dtype=torch.long, device=acts.device)
    if idx.ndim != 1 or idx.shape[0] != acts.shape[0]:
        raise ValueError("neurons must be a 1-D tensor with one neuron per row of tokens")
    b, t, _ = acts.shape
    return acts.gather(2, idx.view(b, 1, 1).expand(b, t, 1)).squeeze(2)


def next_token_logits(
    model: LoadedModel,
    tokens: torch.Tensor | np.ndarray,
    layer: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Full forward pass to the logits ``[batch, tokens, d_vocab]``; with ``layer`` also that
    layer's activations ``[batch, tokens, d_mlp]`` read on the way (else ``None``)."""
    toks = _count(_as_tokens(model, tokens))
    store: dict[str, torch.Tensor] = {}

    def hook_fn(act: torch.Tensor, hook=None) -> None:
        store["acts"] = act.detach().float()

    hooks = [] if layer is None else [(model.hook_name(layer), hook_fn)]
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(toks, fwd_hooks=hooks, return_type="logits")
    return logits.float(), store.get("acts")


def logits_at(
    model: LoadedModel,
    tokens: torch.Tensor | np.ndarray,
    rows: Sequence[int],
    positions: Sequence[int],
) -> torch.Tensor:
    """Logits ``[len(rows), d_vocab]`` at (rows[j], positions[j]) only.

    The forward pass stops at the final norm's output; the unembedding runs on the rows asked
    alone (the full ``[batch, tokens, d_vocab]`` logits are never built).
    """
    toks = _count(_as_tokens(model, tokens))
    store: dict[str, torch.Tensor] = {}

    def hook_fn(act: torch.Tensor, hook=None) -> None:
        store["h"] = act.detach()
        raise _StopForward

    with torch.no_grad():
        try:
            model.bridge.run_with_hooks(toks, fwd_hooks=[("ln_final.hook_out", hook_fn)], return_type=None)
        except _StopForward:
            pass
        r = torch.as_tensor(list(rows), dtype=torch.long, device=toks.device)
        p = torch.as_tensor(list(positions), dtype=torch.long, device=toks.device)
        if "h" not in store:  # no final-norm hook: full logits
            return model.bridge(toks)[r, p].float()
        return model.bridge.unembed(store["h"][r, p]).float()


_SHARED: list[dict | None] = [None]


@contextlib.contextmanager
def shared_activations():
    """A block in which every :class:`ActivationRunner` remembers the (layer, sequence, neuron)
    activations it ran and reads them back when asked again (the build reads a group's true
    activations on its examples, then the fit asks for those of the training windows again)."""
    prev = _SHARED[0]
    _SHARED[0] = {} if prev is None else prev
    try:
        yield
    finally:
        _SHARED[0] = prev


class ActivationRunner:
    """Runs many (token sequence, neuron) jobs of one layer in few, full forward passes.

    Sequences of different lengths are sorted by length and right-padded inside a batch (causal
    attention: padding after a token never changes its activation, and no attention mask is
    passed). Identical sequences are run once and every neuron asked of them is read from that
    one pass.
    """

    def __init__(self, model: LoadedModel, layer: int, batch_tokens: int = 4096) -> None:
        self.model = model
        self.layer = int(layer)
        self.batch_tokens = int(batch_tokens)
        self.n_forward = 0
        self.n_rows = 0

    def run(
        self, sequences: Sequence[Sequence[int]], neurons: Sequence[int]
    ) -> list[np.ndarray]:
        """One float32 array (len(sequence),) per job: neuron ``neurons[j]`` on ``sequences[j]``.

        Inside :func:`shared_activations`, jobs already run in that block are read back instead
        of being run again."""
        if len(sequences) != len(neurons):
            raise ValueError("one neuron per sequence")
        cache = _SHARED[0]
        if cache is None:
            return self._run(sequences, neurons)
        base = (id(self.model), self.layer)
        keys = [(base, np.asarray(s, dtype=np.int64).tobytes(), int(n)) for s, n in zip(sequences, neurons)]
        out: list[np.ndarray | None] = [None if (hit := cache.get(k)) is None else hit.copy() for k in keys]
        todo = [j for j, o in enumerate(out) if o is None]
        if todo:
            got = self._run([sequences[j] for j in todo], [neurons[j] for j in todo])
            for j, g in zip(todo, got):
                cache[keys[j]] = g
                out[j] = g.copy()
        return out  # type: ignore[return-value]

    def _run(self, sequences: Sequence[Sequence[int]], neurons: Sequence[int]) -> list[np.ndarray]:
        rows: dict[tuple[int, ...], int] = {}
        uniq: list[tuple[int, ...]] = []
        job_row = []
        for seq in sequences:
            key = tuple(int(t) for t in seq)
            r = rows.get(key)
            if r is None:
                r = rows[key] = len(uniq)
                uniq.append(key)
            job_row.append(r)
        wanted: dict[int, list[int]] = {}
        for j, r in enumerate(job_row):
            wanted.setdefault(r, []).append(j)
        out: list[np.ndarray | None] = [None] * len(sequences)
        order = sorted(range(len(uniq)), key=lambda r: len(uniq[r]))
        start = 0
        pad = self.model.pad_id
        while start < len(order):
            # grow the batch while (rows x longest length) fits the token budget
            end = start + 1
            while end < len(order) and (end + 1 - start) * len(uniq[order[end]]) <= self.batch_tokens:
                end += 1
            chunk = order[start:end]
            t_max = len(uniq[chunk[-1]])
            batch = np.full((len(chunk), t_max), pad, dtype=np.int64)
            for i, r in enumerate(chunk):
                batch[i, : len(uniq[r])] = uniq[r]
            acts = layer_activations(self.model, torch.from_numpy(batch), [self.layer])[self.layer]
            self.n_forward += 1
            self.n_rows += len(chunk)
            # gather every (row, neuron) pair asked of this chunk at once
            sel_rows, sel_neurons, sel_jobs = [], [], []
            for i, r in enumerate(chunk):
                for j in wanted[r]:
                    sel_rows.append(i)
                    sel_neurons.append(int(neurons[j]))
                    sel_jobs.append(j)
            ri = torch.as_tensor(sel_rows, device=acts.device)
            ni = torch.as_tensor(sel_neurons, device=acts.device)
            got = acts[ri, :, ni].cpu().numpy()  # [jobs, t_max]
            for k, j in enumerate(sel_jobs):
                out[j] = got[k, : len(sequences[j])].astype(np.float32, copy=True)
            start = end
        return out  # type: ignore[return-value]
