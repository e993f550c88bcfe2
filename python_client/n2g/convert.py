"""Protobuf <-> n2g's plain values, both directions, for every RPC: the one place that knows the
wire format. The clients turn call arguments into requests and responses into `n2g.types`
results; the server's servicer turns requests into the application layer's arguments and its
results into responses. Enum names come from `n2g.vocab`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Callable

import grpc
import numpy as np

from . import types as T
from . import vocab
from .types import Key, N2GError
from .v1 import n2g_pb2 as pb


# ---------------------------------------------------------------------------------------------
# Enums: vocabulary names <-> proto numbers (PREFIX_NAME, e.g. JOB_STATE_RUNNING <-> "running")

def _enum_map(enum, prefix: str, names: tuple[str, ...]) -> dict[str, int]:
    return {n: enum.Value(prefix + n.upper()) for n in names}


JOB_STATE = _enum_map(pb.JobState, "JOB_STATE_", vocab.JOB_STATES)
SEMANTICS = _enum_map(pb.Semantics, "SEMANTICS_", vocab.SEMANTICS)
ROLE = _enum_map(pb.Role, "ROLE_", vocab.ROLES)
PAIR_KIND = _enum_map(pb.PairKind, "PAIR_KIND_", vocab.PAIR_KINDS)


def _invalid(message: str) -> N2GError:
    return N2GError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _name(mapping: dict[str, int], number: int, what: str, default: str | None) -> str | None:
    """The vocabulary name of a proto enum number; 0 (UNSPECIFIED) is `default`."""
    if number == 0:
        return default
    for name, n in mapping.items():
        if n == number:
            return name
    raise _invalid(f"unknown {what} {number}: use one of {', '.join(k.upper() for k in mapping)}")


def _number(mapping: dict[str, int], name: str | None) -> int:
    return 0 if not name else mapping[name]


# ---------------------------------------------------------------------------------------------
# Small messages

def key(k: pb.NeuronKey) -> Key:
    return (k.layer, k.neuron)


def key_pb(k: Key) -> pb.NeuronKey:
    return pb.NeuronKey(layer=int(k[0]), neuron=int(k[1]))


def _keys_pb(keys) -> list[pb.NeuronKey]:
    return [key_pb(k) for k in keys or ()]


def _token_ids_pb(seqs) -> list[pb.TokenIds]:
    return [pb.TokenIds(ids=[int(x) for x in np.asarray(s).ravel()]) for s in (seqs or [])]


def _token_ids(msgs) -> list[list[int]]:
    return [list(m.ids) for m in msgs]


def _job(r: pb.Job) -> T.Job:
    return T.Job(r.id, _name(JOB_STATE, r.state, "job state", "unknown") or "unknown", r.total, r.done, r.error,
                 r.created_at, r.updated_at, json.loads(r.request_json) if r.request_json else {}, r.orphaned)


def _job_pb(j: T.Job) -> pb.Job:
    return pb.Job(id=j.id, state=JOB_STATE.get(j.state, 0), total=j.total, done=j.done, error=j.error or "",
                  created_at=j.created_at, updated_at=j.updated_at, request_json=json.dumps(j.request, sort_keys=True),
                  orphaned=j.orphaned)


def _scores(rs) -> list[T.MethodScore]:
    return [T.MethodScore(s.method, s.precision, s.recall, s.f1) for s in rs]


def _scores_pb(scores: list[T.MethodScore]) -> list[pb.MethodScore]:
    return [pb.MethodScore(method=s.method, precision=s.precision, recall=s.recall, f1=s.f1) for s in scores]


def _summary(s) -> T.GraphSummary:
    return T.GraphSummary(key(s.key), s.max_activation, s.n_nodes, s.n_paths, list(s.activating), list(s.context),
                          s.job_id, s.created_at, _scores(s.scores))


def _summary_pb(s: T.GraphSummary) -> pb.GraphSummary:
    return pb.GraphSummary(key=key_pb(s.key), max_activation=s.max_activation, n_nodes=s.n_nodes,
                           n_paths=s.n_paths, activating=s.activating, context=s.context, job_id=s.job_id,
                           created_at=s.created_at, scores=_scores_pb(s.scores))


def _node(n) -> T.GraphNode:
    return T.GraphNode(n.label, list(n.token_ids), n.ignore, n.importance,
                       n.activation if n.HasField("activation") else None, n.end if n.HasField("end") else None,
                       [_node(c) for c in n.children])


def _node_pb(n: T.GraphNode) -> pb.GraphNode:
    out = pb.GraphNode(label=n.label, token_ids=n.token_ids, ignore=n.ignore, importance=n.importance,
                       children=[_node_pb(c) for c in n.children])
    if n.activation is not None:
        out.activation = n.activation
    if n.end is not None:
        out.end = n.end
    return out


def _pair(p) -> T.Pair:
    return T.Pair(key(p.a), key(p.b), _name(PAIR_KIND, p.kind, "pair kind", vocab.DEFAULT_PAIR_KIND),
                  p.activating_overlap, p.context_overlap)


def _pair_pb(p: T.Pair) -> pb.Pair:
    return pb.Pair(a=key_pb(p.a), b=key_pb(p.b), kind=PAIR_KIND[p.kind], activating_overlap=p.activating_overlap,
                   context_overlap=p.context_overlap)


# ---------------------------------------------------------------------------------------------
# Results: response -> types (client) and types -> response (server)

def _model_info(r) -> T.ModelInfo:
    lim = r.limits
    return T.ModelInfo(
        model=r.model, loaded=r.loaded, n_layers=r.n_layers, d_mlp=r.d_mlp, d_vocab=r.d_vocab, hook=r.hook,
        device=r.device, workspace=r.workspace, corpus=r.corpus,
        layers=[T.LayerStatus(x.layer, x.scanned, x.neurons_built) for x in r.layers], neurons_built=r.neurons_built,
        limits=T.Limits(**{f: getattr(lim, f) for f in T.Limits.__dataclass_fields__}),
        server_version=r.server_version, semantics=list(r.semantics), default_semantics=r.default_semantics,
        n_ctx=r.n_ctx)


def _model_info_pb(m: T.ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        model=m.model, loaded=m.loaded, n_layers=m.n_layers, d_mlp=m.d_mlp, d_vocab=m.d_vocab, hook=m.hook,
        device=m.device, workspace=m.workspace, corpus=m.corpus,
        layers=[pb.LayerStatus(layer=x.layer, scanned=x.scanned, neurons_built=x.neurons_built) for x in m.layers],
        neurons_built=m.neurons_built, limits=pb.Limits(**asdict(m.limits)), server_version=m.server_version,
        semantics=m.semantics, default_semantics=m.default_semantics, n_ctx=m.n_ctx)


def _tokenized(r) -> list[T.TokenizedText]:
    return [T.TokenizedText(np.asarray(s.token_ids, dtype=np.int64), list(s.tokens)) for s in r.sequences]


def _tokenized_pb(items: list[T.TokenizedText]) -> pb.TokenizeResponse:
    return pb.TokenizeResponse(sequences=[pb.Sequence(token_ids=[int(x) for x in t.token_ids], tokens=t.tokens)
                                          for t in items])


def _job_event(r) -> T.JobEvent:
    return T.JobEvent(_job(r.job), r.stage, r.done, r.total, r.message,
                      key(r.last_neuron) if r.HasField("last_neuron") else None, r.elapsed_s, r.eta_s or None)


def _job_event_pb(e: T.JobEvent) -> pb.JobEvent:
    out = pb.JobEvent(job=_job_pb(e.job), stage=e.stage, done=e.done, total=e.total, message=e.message,
                      elapsed_s=e.elapsed_s, eta_s=e.eta_s or 0.0)
    if e.last_neuron is not None:
        out.last_neuron.CopyFrom(key_pb(e.last_neuron))
    return out


def _graph(r) -> T.Graph:
    return T.Graph(_summary(r.summary), r.model, r.hook, [_node(n) for n in r.roots], r.dot, r.svg, r.json,
                   json.loads(r.stats_json or "{}"), json.loads(r.metrics_json or "{}"),
                   json.loads(r.examples_json) if r.examples_json else None)


def _graph_pb(g: T.Graph) -> pb.Graph:
    return pb.Graph(summary=_summary_pb(g.summary), model=g.model, hook=g.hook, roots=[_node_pb(n) for n in g.roots],
                    dot=g.dot, svg=g.svg, json=g.json, stats_json=json.dumps(g.stats, sort_keys=True),
                    metrics_json=json.dumps(g.metrics, sort_keys=True),
                    examples_json=json.dumps(g.examples) if g.examples is not None else "")


def _activations(r) -> T.Activations:
    n = len(r.neurons)
    ids, toks, vals = [], [], []
    for s in r.sequences:
        t = np.asarray(s.token_ids, dtype=np.int64)
        ids.append(t)
        toks.append(list(s.tokens))
        vals.append(np.asarray(s.activations, dtype=np.float32).reshape(n, len(t)))
    return T.Activations([key(k) for k in r.neurons], ids, toks, vals, r.normalised,
                         np.asarray(r.max_activation, dtype=np.float32), r.semantics)


def _activations_pb(a: T.Activations) -> pb.ActivationsResponse:
    resp = pb.ActivationsResponse(neurons=_keys_pb(a.neurons), normalised=a.normalised,
                                  max_activation=[float(x) for x in a.max_activation], semantics=a.semantics)
    for ids, labels, v in zip(a.token_ids, a.tokens, a.values):
        seq = resp.sequences.add()
        seq.token_ids.extend(int(x) for x in ids)
        seq.tokens.extend(labels)
        seq.activations.extend(np.ascontiguousarray(v, dtype=np.float32).ravel().tolist())
    return resp


def _layer_keyed(summary: Any) -> Any:
    """The summary as the server made it, keyed by layer number (JSON made the keys strings)."""
    if isinstance(summary, dict) and all(isinstance(k, str) and k.isdigit() for k in summary):
        return {int(k): v for k, v in summary.items()}
    return summary


def _evaluation(r) -> T.Evaluation:
    return T.Evaluation(
        [T.NeuronEvaluation(key(n.key), _scores(n.scores), json.loads(n.metrics_json or "{}")) for n in r.neurons],
        [T.LayerEvaluation(l.layer, l.n_neurons, _scores(l.scores)) for l in r.layers],
        r.table, _layer_keyed(json.loads(r.summary_json)) if r.summary_json else None, r.report,
        json.loads(r.report_json) if r.report_json else None)


def _evaluation_pb(e: T.Evaluation) -> pb.EvaluateResponse:
    return pb.EvaluateResponse(
        neurons=[pb.NeuronEvaluation(key=key_pb(n.key), scores=_scores_pb(n.scores),
                                     metrics_json=json.dumps(n.metrics, sort_keys=True)) for n in e.neurons],
        layers=[pb.LayerEvaluation(layer=l.layer, n_neurons=l.n_neurons, scores=_scores_pb(l.scores))
                for l in e.layers],
        table=e.table, summary_json=json.dumps(e.summary, sort_keys=True) if e.summary is not None else "",
        report=e.report, report_json=json.dumps(e.details, sort_keys=True) if e.details is not None else "")


def _similar(r) -> T.Similar:
    return T.Similar([_pair(p) for p in r.similar], [_pair(p) for p in r.subset],
                     [T.Neighbour(key(n.key), n.score, n.activating_overlap, n.context_overlap) for n in r.neighbours])


def _similar_pb(s: T.Similar) -> pb.FindSimilarResponse:
    return pb.FindSimilarResponse(
        similar=[_pair_pb(p) for p in s.similar], subset=[_pair_pb(p) for p in s.subset],
        neighbours=[pb.Neighbour(key=key_pb(n.key), score=n.score, activating_overlap=n.activating_overlap,
                                 context_overlap=n.context_overlap) for n in s.neighbours])


def _in_context(r) -> T.InContextResult:
    return T.InContextResult([T.InContextNeuron(key(n.key), list(n.shared), n.fraction) for n in r.neurons], r.total)


def _in_context_pb(x: T.InContextResult) -> pb.ListInContextNeuronsResponse:
    return pb.ListInContextNeuronsResponse(
        neurons=[pb.InContextNeuron(key=key_pb(n.key), shared=n.shared, fraction=n.fraction) for n in x.neurons],
        total=x.total)


# ---------------------------------------------------------------------------------------------
# Requests: call arguments -> request (client) and request -> arguments (server)
#
# The arguments are plain values: neurons as (layer, neuron) tuples, token ids as lists of ints,
# enums as vocabulary names (None = the server's default). Both sides use the same keyword names,
# which are the parameters of the application layer's methods (n2g_service.app.N2GApp).

_RUN_FIELDS = ("executor", "ray_address", "precision")  # strings: "" = the default


def _build_args(r, *, with_job_id: bool = True) -> dict[str, Any]:
    out = dict(layers=list(r.layers), layer_spec=r.layer_spec or None, neurons=list(r.neurons) or None,
               sample=r.sample or None, seed=r.seed, group_size=r.group_size or None, k=r.k or None,
               window_tokens=r.window_tokens or None, config_json=r.config_json or None,
               workers=r.workers or None, worker_threads=r.worker_threads or None,
               shard_windows=r.shard_windows or None,
               **{f: getattr(r, f) or None for f in _RUN_FIELDS})
    if with_job_id:
        out["job_id"] = r.job_id or None
    return out


def _build_pb(layers, layer_spec, neurons, sample, seed, group_size, k, window_tokens, config_json, executor,
              ray_address, workers, worker_threads, precision, shard_windows, job_id=None):
    return pb.StartBuildRequest(layers=list(layers or []), layer_spec=layer_spec or "", neurons=list(neurons or []),
                                sample=sample or 0, seed=seed, group_size=group_size or 0, k=k or 0,
                                window_tokens=window_tokens or 0, config_json=config_json or "", job_id=job_id or "",
                                executor=executor or "", ray_address=ray_address or "", workers=workers or 0,
                                worker_threads=worker_threads or 0,
                                precision=precision or "", shard_windows=shard_windows or 0)


def _plan(r) -> T.BuildPlan:
    return T.BuildPlan(list(r.layers), r.neurons, r.neurons_built, r.scan_shards, r.scan_tokens, r.fit_groups,
                       r.total_seconds or None, r.summary, json.loads(r.plan_json) if r.plan_json else {})


def _plan_pb(p: T.BuildPlan) -> pb.BuildPlan:
    return pb.BuildPlan(layers=p.layers, neurons=p.neurons, neurons_built=p.neurons_built, scan_shards=p.scan_shards,
                        scan_tokens=p.scan_tokens, fit_groups=p.fit_groups, total_seconds=p.total_seconds or 0.0,
                        summary=p.summary, plan_json=json.dumps(p.details, sort_keys=True))


def _search_pb(clauses, limit):
    out = []
    for tok, role in clauses:
        c = pb.SearchClause(role=_number(ROLE, role))
        if isinstance(tok, (int, np.integer)):
            c.token_id = int(tok)
        else:
            c.label = str(tok)
        out.append(c)
    return pb.SearchRequest(clauses=out, limit=limit)


def _search_args(r) -> dict[str, Any]:
    clauses = []
    for i, c in enumerate(r.clauses):
        try:
            role = _name(ROLE, c.role, "role", vocab.DEFAULT_ROLE)
        except N2GError as e:
            raise _invalid(f"clause {i}: {e.message}") from None
        which = c.WhichOneof("token")
        if which is None:
            raise _invalid(f"clause {i} has no token: set label or token_id")
        clauses.append((c.label if which == "label" else c.token_id, role))
    return dict(clauses=clauses, limit=r.limit)


@dataclass(frozen=True)
class Op:
    """One RPC: `name` is the method of the clients and of the application layer, `rpc` the gRPC
    method. `request`/`args` convert call arguments to and from the request message;
    `result`/`result_pb` convert the result (for a stream: one element) to and from the reply."""
    name: str
    rpc: str
    stream: bool
    request: Callable[..., Any]
    args: Callable[[Any], dict[str, Any]]
    result: Callable[[Any], Any]
    result_pb: Callable[[Any], Any]


def _op(name, rpc, request, args, result, result_pb, stream=False) -> Op:
    return Op(name, rpc, stream, request, args, result, result_pb)


OPS: dict[str, Op] = {op.name: op for op in (
    _op("model_info", "GetModelInfo", lambda: pb.GetModelInfoRequest(), lambda r: {}, _model_info, _model_info_pb),
    _op("tokenize", "Tokenize",
        lambda texts, token_ids, skip_bos: pb.TokenizeRequest(texts=list(texts or []),
                                                              token_ids=_token_ids_pb(token_ids), skip_bos=skip_bos),
        lambda r: dict(texts=list(r.texts), token_ids=_token_ids(r.token_ids), skip_bos=r.skip_bos),
        _tokenized, _tokenized_pb),
    _op("start_build", "StartBuild", _build_pb, _build_args, _job, _job_pb),
    _op("plan_build", "PlanBuild", _build_pb, lambda r: _build_args(r, with_job_id=False), _plan, _plan_pb),
    _op("get_job", "GetJob", lambda job_id: pb.GetJobRequest(job_id=job_id), lambda r: dict(job_id=r.job_id),
        _job, _job_pb),
    _op("cancel_job", "CancelJob", lambda job_id: pb.CancelJobRequest(job_id=job_id),
        lambda r: dict(job_id=r.job_id), _job, _job_pb),
    _op("list_jobs", "ListJobs",
        lambda states, limit: pb.ListJobsRequest(states=[JOB_STATE[s] for s in states or ()], limit=limit),
        lambda r: dict(states=[_name(JOB_STATE, s, "job state", None) for s in r.states if s] or None, limit=r.limit),
        lambda r: T.ListResult([_job(j) for j in r.jobs], r.total),
        lambda jobs: pb.ListJobsResponse(jobs=[_job_pb(j) for j in jobs], total=jobs.total)),
    _op("watch_job", "WatchJob", lambda job_id: pb.WatchJobRequest(job_id=job_id), lambda r: dict(job_id=r.job_id),
        _job_event, _job_event_pb, stream=True),
    _op("list_graphs", "ListGraphs",
        lambda layers, limit, offset: pb.ListGraphsRequest(layers=list(layers or []), limit=limit, offset=offset),
        lambda r: dict(layers=list(r.layers) or None, limit=r.limit, offset=r.offset),
        lambda r: T.ListResult([_summary(s) for s in r.graphs], r.total),
        lambda graphs: pb.ListGraphsResponse(graphs=[_summary_pb(s) for s in graphs], total=graphs.total)),
    _op("graph", "GetGraph",
        lambda layer, neuron, structure, dot, svg, json, examples: pb.GetGraphRequest(
            neuron=key_pb((layer, neuron)), include_structure=structure, include_dot=dot, include_svg=svg,
            include_json=json, include_examples=examples),
        lambda r: dict(layer=r.neuron.layer if r.HasField("neuron") else None,
                       neuron=r.neuron.neuron if r.HasField("neuron") else None,
                       structure=r.include_structure, dot=r.include_dot, svg=r.include_svg, json=r.include_json,
                       examples=r.include_examples),
        _graph, _graph_pb),
    _op("predict", "Predict",
        lambda neurons, texts, token_ids, semantics, skip_bos: pb.PredictRequest(
            neurons=_keys_pb(neurons), texts=list(texts or []), token_ids=_token_ids_pb(token_ids),
            semantics=_number(SEMANTICS, semantics), skip_bos=skip_bos),
        lambda r: dict(neurons=[key(k) for k in r.neurons], texts=list(r.texts), token_ids=_token_ids(r.token_ids),
                       semantics=_name(SEMANTICS, r.semantics, "semantics", None), skip_bos=r.skip_bos),
        _activations, _activations_pb),
    _op("activations", "GetActivations",
        lambda neurons, texts, token_ids, normalise, skip_bos: pb.GetActivationsRequest(
            neurons=_keys_pb(neurons), texts=list(texts or []), token_ids=_token_ids_pb(token_ids),
            normalise=normalise, skip_bos=skip_bos),
        lambda r: dict(neurons=[key(k) for k in r.neurons], texts=list(r.texts), token_ids=_token_ids(r.token_ids),
                       normalise=r.normalise, skip_bos=r.skip_bos),
        _activations, _activations_pb),
    _op("evaluate", "Evaluate",
        lambda neurons, layers, eval_config_json, test_sets, compute_heldout: pb.EvaluateRequest(
            neurons=_keys_pb(neurons), layers=list(layers or []), eval_config_json=eval_config_json or "",
            test_sets=test_sets, compute_heldout=compute_heldout),
        lambda r: dict(neurons=[key(k) for k in r.neurons] or None, layers=list(r.layers) or None,
                       eval_config_json=r.eval_config_json or None, test_sets=r.test_sets,
                       compute_heldout=r.compute_heldout),
        _evaluation, _evaluation_pb),
    _op("search", "Search", _search_pb, _search_args, lambda r: T.SearchResult([key(k) for k in r.neurons], r.total),
        lambda s: pb.SearchResponse(neurons=_keys_pb(s.neurons), total=s.total)),
    _op("in_context_neurons", "ListInContextNeurons", lambda limit: pb.ListInContextNeuronsRequest(limit=limit),
        lambda r: dict(limit=r.limit), _in_context, _in_context_pb),
    _op("similar", "FindSimilar",
        lambda layer, neuron, threshold, k: pb.FindSimilarRequest(neuron=key_pb((layer, neuron)),
                                                                  threshold=threshold or 0.0, k=k or 0),
        lambda r: dict(layer=r.neuron.layer if r.HasField("neuron") else None,
                       neuron=r.neuron.neuron if r.HasField("neuron") else None,
                       threshold=r.threshold or None, k=r.k or None),
        _similar, _similar_pb),
    _op("pairs", "StreamPairs",
        lambda kind, threshold, batch_size: pb.StreamPairsRequest(kind=_number(PAIR_KIND, kind),
                                                                  threshold=threshold or 0.0,
                                                                  batch_size=batch_size or 0),
        lambda r: dict(kind=_name(PAIR_KIND, r.kind, "pair kind", None), threshold=r.threshold or None,
                       batch_size=r.batch_size or None),
        lambda r: [_pair(p) for p in r.pairs], lambda batch: pb.PairBatch(pairs=[_pair_pb(p) for p in batch]),
        stream=True),
    _op("export", "ExportGraphs",
        lambda layers, examples: pb.ExportGraphsRequest(layers=list(layers or []), include_examples=examples),
        lambda r: dict(layers=list(r.layers) or None, examples=r.include_examples),
        lambda r: T.ExportedNeuron(key(r.key), r.graph_json, r.examples_json),
        lambda e: pb.ExportedNeuron(key=key_pb(e.key), graph_json=e.graph_json, examples_json=e.examples_json),
        stream=True),
    _op("report", "GetReport", lambda layers: pb.GetReportRequest(layers=list(layers or [])),
        lambda r: dict(layers=list(r.layers) or None),
        lambda r: T.ReportChunk(r.data, r.total_bytes, r.filename),
        lambda c: pb.ReportChunk(data=c.data, total_bytes=c.total_bytes, filename=c.filename), stream=True),
)}

BY_RPC: dict[str, Op] = {op.rpc: op for op in OPS.values()}
