"""Typed configs with the paper's defaults (n2g-method.md).

Every config is a frozen dataclass with ``to_dict()`` / ``from_dict()`` so that a build can store
the exact settings it used next to its results and read them back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

T = TypeVar("T", bound="_Config")


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _same_kind(value: Any, default: Any) -> bool:
    """Whether `value` has the type of a setting whose default is `default` (an int passes for a
    float; a bool never passes for a number). Settings without a plain default are not checked."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    return True


class _Config:
    """Shared (de)serialisation for the frozen config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any] | None) -> T:
        """Builds a config from a mapping; missing keys take the defaults, unknown keys are an error."""
        data = dict(data or {})
        names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
        kwargs = {}
        for k, v in data.items():
            if isinstance(names[k].default, tuple) and v is not None:
                v = tuple(v)
            if v is not None and not _same_kind(v, names[k].default):  # e.g. {"k": "x"} from JSON
                raise ValueError(f"{cls.__name__}.{k} must be {_KINDS[type(names[k].default)]}, got {v!r:.40}")
            kwargs[k] = v
        return cls(**kwargs)


@dataclass(frozen=True)
class ScanConfig(_Config):
    """Dataset scan (section 1): top-k windows and a_max per neuron."""

    k: int = 20
    window_tokens: int = 64
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("ScanConfig.k must be >= 1")
        if self.window_tokens < 2:
            raise ValueError("ScanConfig.window_tokens must be >= 2 (BOS + at least one token)")
        if not 1 <= self.batch_size <= 1 << 16:
            raise ValueError(f"ScanConfig.batch_size must be from 1 to {1 << 16}, got {self.batch_size}")


@dataclass(frozen=True)
class FitConfig(_Config):
    """Pruning, saliency, augmentation and path building (sections 2 to 5), and the fit method.

    ``method`` names a registered fit method (``n2g_service.fit.fit_methods()``): "paper" is the
    paper's fit on the training windows alone; "calibrated" also learns from further top windows
    and from real corpus occurrences of the graph's tokens (the calibration fields below, which
    "paper" ignores). :func:`n2g_service.fit.preset` gives each method's preset. The default,
    "calibrated", measured better on held-out neurons (the first 16 live odd ids >= 1001 of layers
    0, 1, 3, 1,000 held-out windows; ``benchmarks/bench_fit_methods.py --per-layer 16 --ordinary
    1000``): ordinary-text F1 .74 / .45 / .33 vs the paper's .42 / .26 / .12, Pearson r .64 / .45 /
    .37 vs .17 / .08 / .05, paper-protocol F1 .97 / .70 / .49 vs .85 / .64 / .43."""

    method: str = "calibrated"
    # pruning (section 2)
    prune_threshold: float = 0.5  # truncated pivot activation >= this x original
    max_prune_starts: int = 30  # at most this many candidate starts
    prune_batch: int = 4  # candidates per round (per example)
    post_context: int = 5  # tokens kept after the pivot
    # the reference tries every length first, then only every 5th
    prune_dense: int = 10  # lengths 1..prune_dense are all tried
    prune_stride: int = 5  # then every prune_stride-th length
    # graph building (section 5)
    importance_threshold: float = 0.75
    activation_threshold: float = 0.5
    # augmentation (section 4)
    augment_importance: float = 0.8
    n_substitutes: int = 5  # per proposer and important position
    augment_positive: float = 0.5  # positive if pivot act >= this x original
    # also substitute the pivot itself when alpha[e, e] >= augment_importance (the method doc
    # augments context positions k < e only; this is an option, off by default)
    augment_pivot: bool = False
    proposers: tuple[str, ...] = ("model", "embedding")
    mlm_name: str | None = None  # Hugging Face fill-mask model (adds the "mlm" proposer)
    # saliency (section 3): "auto", "pad" (the reference), "bos", "eos", "unk", "id:<int>" or a
    # text that encodes to exactly one token (e.g. " the"). "auto" = " the" where it is one plain
    # token, else the padding token: SmolLM2's pad is the chat token <|im_end|>, which is not
    # neutral; " the" scored layer-1 F1 .69 vs .66 for pad on held-out neurons (odd ids >= 1001).
    mask_token: str = "auto"
    # forward passes: most tokens (rows x padded length) per batch
    batch_tokens: int = 4096
    # "calibrated" only. More positives: the training windows plus up to extra_top further top
    # windows of the scan (ranks after the paper's train + test windows), through the whole fit.
    # Held-out neurons (odd ids >= 1001, layers 1 / 3, ordinary-text F1): 20 -> .45 / .33,
    # 40 -> .52 / .35, 80 -> .54 / .38; but on the 24 sampled neurons a layer of the scoring
    # table 80 gave .50 / .33 against 20's .52 / .32, for 55-60% more forward tokens a neuron:
    # no gain that holds up, so 20 stays.
    extra_top: int = 20
    # Ordinary windows: a seeded random sample of random_windows usable corpus windows (the same
    # for every neuron of a layer: one shared pass), where the neuron fires at all the levels and
    # rates it has on ordinary text. 512 (the sample is shared by a layer's neurons) against 128:
    # dev neurons (odd ids >= 1001, 16 a layer, 1,000 held-out windows), layers 0 / 1 / 3:
    # ordinary-text F1 +.027 / +.013 / -.013, Pearson r +.000 / +.024 / +.026 (16 of 16 better at
    # 1 and 3), fewer false fires, paper protocol +.000 / +.007 / -.019; but the scoring table's 24
    # neurons a layer (CPU) gave F1 .82 / .51 / .32 against .82 / .52 / .32, r +.00 / +.01 / +.02,
    # and token lookup, fitted on the same windows, gained more (layer 0 .70 -> .73; paired
    # +.11 -> +.09): no F1 gain that holds up, for 2.4x the windows each neuron calibrates on.
    random_windows: int = 128
    # Real occurrences: per activating label of the fitted graph, up to occurrence_windows corpus
    # windows holding it (at most max_occurrence_windows per neuron), run through the model.
    occurrence_windows: int = 8
    max_occurrence_windows: int = 192
    # Path occurrences: a firing path (a context path above all) that the windows above match at
    # fewer than calibrate_min_support tokens gets up to occurrence_windows windows where it
    # matches (among path_candidates holding its token), at most max_path_windows per neuron
    # (0: none, the default; see fire_rate_from for what 128 measured).
    max_path_windows: int = 0
    path_candidates: int = 2048
    # A path (or learnt context) matched at >= calibrate_min_support occurrence tokens takes the
    # mean true activation there as its END, on the firing side only if >= calibrate_fire_rate of
    # them fire; tokens that fire in the training windows without a path get one (learn_tokens);
    # an over-firing token learns context tokens at offsets 1..context_offsets that separate its
    # firing occurrences from the rest.
    # Vocabulary sweep: every token t in the neutral prompt [BOS, mask token, t]; tokens at or
    # above sweep_threshold x a_max (at most sweep_tokens, highest first) are candidates whose
    # real occurrences are drawn too; one that never occurs in the usable corpus keeps a path
    # (END = its sweep activation) when that fires. 0 tokens: no sweep.
    sweep_tokens: int = 256
    sweep_threshold: float = 0.4
    calibrate_min_support: int = 4
    # A lower rate trades ordinary-text precision for top-window recall. Dev neurons (odd ids
    # >= 1001, 16 a layer), 0.25 against 0.4: ordinary-text F1 -.035 / -.027 / -.009 at layers
    # 0 / 1 / 3 (CPU), +.014 / -.001 / -.004 at layers 7 / 15 / 29 (H200); paper protocol +.01 /
    # +.08 / +.07 at 7 / 15 / 29; false fires +.1 / +.5 / +.2 per 1k at 1 / 15 / 29. 0.3 at
    # layers 0 / 1 / 3 (before split_vocab): F1 +.003 / -.001 / .000.
    calibrate_fire_rate: float = 0.4
    # Per neuron (0: off): the fire rate becomes fire_rate_f1 x the firing F1 that its graph,
    # calibrated at calibrate_fire_rate, scores on the windows it learnt from (at least
    # fire_rate_floor), and the calibration runs again at that rate. Including a path that fires
    # at rate p raises F1 exactly when p > F1 / 2, so half the F1 a neuron reaches is its best
    # rate (Lipton et al. 2014): a neuron that is a function of its token keeps ~0.45, a neuron
    # whose graph reaches F1 .4 takes its paths down to 0.2. Dev neurons (odd ids >= 1001, 16 a
    # layer, 1,000 held-out windows; CPU), 0.5 against off: ordinary-text F1 +.004 / +.023 / +.002
    # / .000 / +.001 at layers 0 / 1 / 3 / 7 / 15, Pearson r within .003; paper protocol +.001 /
    # +.013 / .000 / .000 / +.074 (layer 15: .20 -> .27, 7 better, 0 worse; token lookup .19),
    # false fires +.6 per 1k at layer 15 (1.4 -> 2.0). Rates chosen: .21-.50 at layer 7, .20-.41
    # at 15; at layers 3 and 7 almost no score moved (1 or 2 neurons at 3, none at 7: their paths
    # rarely have the support a rate needs).
    # With fire_rate_floor 0.3: layers 0 / 1 / 3 / 7 as with 0.2 (ordinary-text F1 +.004 / +.024 /
    # +.002 / .000 against off, paper protocol +.001 / +.013 / .000 / .000), layer 15 paper
    # protocol .20 -> .27 (7 better, 0 worse), false fires +.3 per 1k (1.4 -> 1.7), ordinary-text
    # F1 +.004: most of the gain for half the false fires. Better or equal on every dev layer, so
    # it is the default. Capping the rate at calibrate_fire_rate (only ever lower) lost dev F1
    # (-.004 / -.022 at layers 0 / 1): the raised rates carry the gains there. The scoring table's
    # 24 neurons a layer (CPU, against the H200 build with it off): paper protocol .19 -> .22 at
    # layer 15 and .39 -> .47 at 29 (token lookup .22 / .40), false fires 0.5 -> 0.6 / 0.6 -> 0.9
    # per 1k; layers 0, 3, 7 the same within .01; layer 1 ordinary-text F1 .52 -> .49 (3 of 24
    # neurons worse; one .80 -> .29 over a few fires: at its rate, .405, its path for rand stops).
    fire_rate_f1: float = 0.5
    fire_rate_floor: float = 0.3
    # Where a path's fire rate and END are measured: "ordinary" = on the ordinary and occurrence
    # windows (not chosen for the neuron's activation) when they hold >= calibrate_min_support of
    # its matches, else on all; "all" = on the top windows too. "ordinary" with path windows
    # (max_path_windows 128) gave dev neurons (odd ids >= 1001) ordinary-text F1 +.04 / +.03 at
    # layers 1 / 3, +.00 at 0 and 7, paper-protocol F1 -.01 to -.02, fewer false fires; on the
    # scoring table's 24 neurons a layer it lost paper-protocol F1 at depth (layer 7 .40 -> .28,
    # layer 29 .39 -> .26) and ordinary F1 at 7 and 29: so "all" and no path windows stay.
    # Measured again with today's default (fire_rate_f1): "ordinary" without path windows, dev
    # neurons (32 a layer at 0 / 1 / 3, 16 at 7 and 15): ordinary-text F1 -.001 / +.006 / +.002 /
    # -.004 / -.003 (0 / 3 / 2 / 1 / 0 neurons better, 1 / 1 / 1 / 1 / 2 worse, the rest the same),
    # Pearson r +.009 at 1, paper protocol .000 / -.001 / .000 / -.016 / -.019 (2 and 3 worse at 7
    # and 15, none better); with path windows 128 at 1 / 3:
    # -.004 / -.017, paper protocol -.017 / -.021. It fixes what it should (a token that fires in
    # the top windows and not in its occurrences, e.g. " very" 20 of 21 against 0 of 10, then
    # learns the firing context) but on too few neurons to pay for the recall it costs at depth.
    fire_rate_from: str = "all"
    learn_tokens: bool = True
    context_offsets: int = 3
    # Graded tokens: below the firing threshold a graph says nothing, so its predictions cannot
    # follow the neuron's ordinary level (the correlation score). Up to graded_tokens labels seen
    # at >= graded_min_support tokens of the ordinary and occurrence windows, with a mean
    # normalised activation >= graded_floor from 0 and no token path yet, get a token path whose END is
    # that mean (kept below the threshold: they never fire), most variance explained first
    # (count x mean^2). Search, similarity and drawings leave paths that cannot fire out.
    # 2048 against 512 on dev neurons (odd ids >= 1001): Pearson r .64 -> .67 / .45 -> .47 /
    # .37 -> .39 at layers 0 / 1 / 3 (token lookup .65 / .20 / .20), every firing metric the same
    # (graded paths never fire); graphs 3.5x larger (13 -> 45 KB a graph on the table's layers).
    graded_tokens: int = 2048
    graded_floor: float = 0.01
    graded_min_support: int = 1
    # A measured prior for the graded levels (calibrate.graded_paths; 0: none): the start_vocab
    # most frequent tokens, each measured after real corpus prefixes (below); per neuron, a line
    # from a label's measured value to its mean in the windows counts as graded_prior occurrences
    # of that mean and gives the labels the windows never showed a level. Dev neurons (odd ids
    # >= 1001, 1,000 held-out windows), Pearson r at layers 0 / 1 / 3: no prior .672 / .467 / .392;
    # the neutral prompt [BOS, mask token, t], weight 1: .770 / .512 / .423 (16/0 neurons better
    # at each layer); 4 real prefixes of 8 tokens, weight 1: .780 / .526 / .443, weight 2: .782 /
    # .530 / .448, weight 4: .782 / .529 / .448 (8 prefixes, weight 1: .781 / .527 / .446). With
    # the neutral prompt more weight lost (layer 0, [BOS, t] as the prior: .5 -> .750, 1 -> .749,
    # 2 -> .746, 8 -> .733): the real contexts measure a token's usual level better. Fires unchanged.
    graded_prior: float = 2.0
    # Real contexts: each of the start_vocab most frequent tokens t measured after token_contexts
    # real corpus prefixes [BOS, token_context_length tokens of a usable window, t] (seeded, the
    # same for the layer; never a window the pool excludes), one pass a prefix for the layer. The
    # graded prior takes the mean over them (0 contexts: the neutral prompt [BOS, mask token, t]);
    # split_labels counts each as one occurrence of the token.
    token_contexts: int = 4
    token_context_length: int = 8
    # Token paths decided per token id (calibrate.split_labels): a label stands for several ids
    # (" the", "The", "the"), which a neuron can treat apart; the ids that fire alone get a token
    # path of their own, the others keep the label's below the threshold. Only for a neuron whose
    # variance over the real contexts the token explains for >= split_min_token_share
    # (calibrate.token_share): where context decides, per-id evidence (a few occurrences and 4
    # contexts) is too thin. Dev neurons (odd ids >= 1001, 1,000 held-out windows), ordinary-text
    # F1 at layers 0 / 1 / 3: without .738 / .454 / .332; every neuron split .773 / .415 / .320
    # (layer 0: 7 neurons better, 0 worse; layer 1: 0 better, 6 worse, false fires +.02 / 1k); the share was
    # .93-.99 for 15 of 16 layer-0 neurons, .43-.86 at layer 1: at .9, layer 0 as split, layers
    # 1 and 3 as without. A token-level corpus table per id scores .80 on the layer-0 dev neurons,
    # per label .72 (benchmarks/bench_token_ceiling.py, corpus tokens / corpus labels).
    split_labels: bool = True
    split_min_token_share: float = 0.9
    # For a neuron the split runs on, the corpus tokens of frequency ranks start_vocab..split_vocab
    # are measured too (first token and real contexts; one more pass a prompt, made for a layer
    # only once one of its neurons passes the gate): there the token decides, and the rarer ids
    # (the 8,192 most frequent tokens are 92% of the corpus's tokens, the other 20,818 the rest)
    # get per-id evidence, start paths and a prior. Layer-0 dev neurons (odd ids >= 1001, 1,000
    # held-out windows): ordinary-text F1 .77 -> .80 (11 better, 0 worse), Pearson r .78 -> .82 (15
    # better, 0 worse), paper-protocol F1 .97 -> .98. At layers 1 and 3 (no dev neuron past the
    # gate) measuring them for every neuron moved F1 by nothing and r by +.01 for twice the time a
    # neuron on a CPU, so the other neurons keep start_vocab.
    split_vocab: int = 65536
    # Start tokens: the first token after BOS sees nothing else, so the neuron's activation there
    # is measured for the start_vocab most frequent corpus tokens ([BOS, t], one pass per layer);
    # up to start_tokens labels it fires on there (most frequent first) get a path [label, BOS],
    # and the other stages learn from positions >= 2. 0 tokens: none.
    start_tokens: int = 2048
    start_vocab: int = 8192
    calibration_seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ValueError("FitConfig.method must name a fit method (e.g. 'paper', 'calibrated')")
        if min(self.extra_top, self.random_windows, self.occurrence_windows, self.max_occurrence_windows,
               self.max_path_windows, self.path_candidates,
               self.context_offsets, self.sweep_tokens, self.graded_tokens, self.start_tokens,
               self.start_vocab, self.split_vocab, self.token_contexts, self.token_context_length) < 0:
            raise ValueError("FitConfig: extra_top, random_windows, occurrence_windows, "
                             "max_occurrence_windows, max_path_windows, path_candidates, context_offsets, sweep_tokens, graded_tokens, start_tokens, "
                             "start_vocab, split_vocab, token_contexts and token_context_length must be >= 0")
        # Upper bounds, so that no setting can ask for more windows, tokens or passes than a machine
        # holds (each is far past any value measured; a model's vocabulary is under 2^20 tokens).
        for name, hi in (("extra_top", 1000), ("random_windows", 8192), ("occurrence_windows", 1024),
                         ("max_occurrence_windows", 8192), ("max_path_windows", 8192), ("path_candidates", 1 << 16),
                         ("context_offsets", 64), ("sweep_tokens", 1 << 20), ("graded_tokens", 1 << 20),
                         ("start_tokens", 1 << 20), ("start_vocab", 1 << 20), ("split_vocab", 1 << 20),
                         ("token_contexts", 64), ("token_context_length", 512), ("max_prune_starts", 1024),
                         ("prune_batch", 1024), ("post_context", 4096), ("n_substitutes", 256),
                         ("batch_tokens", 1 << 20), ("calibrate_min_support", 1 << 20),
                         ("graded_min_support", 1 << 20)):
            if getattr(self, name) > hi:
                raise ValueError(f"FitConfig.{name} must be at most {hi}, got {getattr(self, name)}")
        for name in ("importance_threshold", "activation_threshold", "augment_importance", "augment_positive",
                     "sweep_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:  # NaN fails too
                raise ValueError(f"FitConfig.{name} must be between 0 and 1, got {getattr(self, name)!r}")
        if not 0.0 <= self.prune_threshold < float("inf"):  # above 1: no shorter context passes
            raise ValueError(f"FitConfig.prune_threshold must be a finite number >= 0, got {self.prune_threshold!r}")
        if self.calibration_seed < 0:
            raise ValueError("FitConfig.calibration_seed must be 0 or more")
        if self.calibrate_min_support < 1 or self.graded_min_support < 1:
            raise ValueError("FitConfig: calibrate_min_support and graded_min_support must be >= 1")
        if not 0.0 <= self.calibrate_fire_rate <= 1.0:
            raise ValueError("FitConfig.calibrate_fire_rate must be between 0 and 1")
        if not (0.0 <= self.fire_rate_f1 <= 1.0 and 0.0 <= self.fire_rate_floor <= 1.0):  # NaN fails too
            raise ValueError("FitConfig: fire_rate_f1 and fire_rate_floor must be between 0 and 1")
        if self.fire_rate_from not in ("ordinary", "all"):
            raise ValueError(f"FitConfig.fire_rate_from must be 'ordinary' or 'all', got {self.fire_rate_from!r}")
        if not 0.0 <= self.split_min_token_share <= 1.0:  # NaN fails too
            raise ValueError(f"FitConfig.split_min_token_share must be between 0 and 1, got {self.split_min_token_share!r}")
        if not self.graded_prior >= 0.0:  # NaN fails too
            raise ValueError(f"FitConfig.graded_prior must be >= 0, got {self.graded_prior!r}")
        if not 0.0 <= self.graded_floor <= 1.0:  # NaN fails too
            raise ValueError("FitConfig.graded_floor must be between 0 and 1")
        unknown = set(self.proposers) - {"model", "embedding", "mlm"}
        if unknown:
            raise ValueError(f"FitConfig.proposers: unknown {sorted(unknown)}; use model, embedding, mlm")
        if self.max_prune_starts < 1 or self.prune_batch < 1:
            raise ValueError("FitConfig: max_prune_starts and prune_batch must be >= 1")
        if self.post_context < 0 or self.n_substitutes < 0:
            raise ValueError("FitConfig: post_context and n_substitutes must be >= 0")
        if self.prune_stride < 1 or self.prune_dense < 1:
            raise ValueError("FitConfig: prune_dense and prune_stride must be >= 1")
        if self.batch_tokens < 64:
            raise ValueError("FitConfig.batch_tokens must be >= 64")


MAX_BOOTSTRAP = 10_000
MIN_BOOTSTRAP = 100  # resamples: fewer cannot place the percentiles of a 95% interval


@dataclass(frozen=True)
class EvalConfig(_Config):
    """Evaluation protocol (sections 8 and 8b)."""

    n_train: int = 10
    seed: int = 0  # train/test split of each neuron's top windows; detection negatives
    fire_threshold: float = 0.5
    # ordinary text (8b): a fixed, seeded sample of corpus windows that no fit sees; at most half
    # of the corpus windows. Fixed for a workspace once recorded (a build excludes it from the scan).
    ordinary_windows: int = 2000
    heldout_seed: int = 0
    # layer means and paired comparisons: percentile bootstrap over neurons
    n_bootstrap: int = 1000
    confidence: float = 0.95
    # forward passes for the true activations on the ordinary windows: most tokens per batch
    batch_tokens: int = 8192

    def __post_init__(self) -> None:
        import math

        if self.n_train < 1:
            raise ValueError("EvalConfig.n_train must be >= 1")
        t = self.fire_threshold
        # activations are normalised by the neuron's top activation: past 1 nothing would fire
        if not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= 1:
            raise ValueError(f"EvalConfig.fire_threshold must be a finite number from 0 to 1, got {t!r}")
        if self.seed < 0 or self.heldout_seed < 0:
            raise ValueError("EvalConfig: seed and heldout_seed must be 0 or more")
        if self.ordinary_windows < 1:
            raise ValueError("EvalConfig.ordinary_windows must be >= 1")
        # each interval resamples n_bootstrap x neurons values: bounded so one request cannot
        # take minutes and gigabytes (10,000 is already far past what a 95% interval needs), and
        # from below so the percentiles exist (with 1 or 2 resamples an "interval" could lie
        # beside its own mean)
        if not MIN_BOOTSTRAP <= self.n_bootstrap <= MAX_BOOTSTRAP:
            raise ValueError(f"EvalConfig.n_bootstrap must be from {MIN_BOOTSTRAP} to {MAX_BOOTSTRAP}, got "
                             f"{self.n_bootstrap}")
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"EvalConfig.confidence must be from 0.5 to 1 (exclusive), got {self.confidence!r}")
        if self.batch_tokens < 1:
            raise ValueError("EvalConfig.batch_tokens must be >= 1")
