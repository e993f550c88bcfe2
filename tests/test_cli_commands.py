"""The `n2g` commands and options no other test runs through the command line, against one live
server (the native random model, bearer token and TLS) and checked against values derived another
way: the model run directly, the word tokenizer, the graphs read from the workspace with n2g_fast,
the scores stored at build time, the client library's answers."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from n2g.cli import main
from n2g_servers import NATIVE_MODEL, native_workspace, run_cli, self_signed_cert

TOKEN = "cli-s3cret"
SERVER_NAME = "n2g.test"  # the only name in the server's certificate (not 127.0.0.1, not localhost)


@dataclass
class Server:
    ws: Path
    addr: str
    cert: Path

    def conn(self, token: str | None = TOKEN) -> list[str]:
        """The options that reach it."""
        return ["--server", self.addr, "--tls-ca", str(self.cert), "--tls-server-name", SERVER_NAME,
                *(["--token", token] if token else [])]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    from n2g_service.server import serve

    ws = native_workspace(tmp_path_factory, "cli-commands")
    cert, key = self_signed_cert(ws.parent / "tls", SERVER_NAME)
    running = serve(ws, NATIVE_MODEL, device="cpu", port=0, block=False, token=TOKEN, tls_cert=cert, tls_key=key)
    try:
        yield Server(ws, f"127.0.0.1:{running.port}", cert)
    finally:
        running.stop(0)


@pytest.fixture(scope="module")
def client(srv):
    from n2g.client import N2GClient

    with N2GClient(srv.addr, token=TOKEN, root_certificates=srv.cert, tls_server_name=SERVER_NAME, timeout=60) as c:
        yield c


@pytest.fixture(autouse=True)
def _no_connection_environment(monkeypatch):
    monkeypatch.delenv("N2G_SERVER", raising=False)
    monkeypatch.delenv("N2G_TOKEN", raising=False)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def ok(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    return out


def _local_graphs(ws: Path) -> dict:
    """The workspace's graphs read with n2g_fast (not through any server or client)."""
    import n2g_fast
    from n2g_service.workspace import Workspace

    w = Workspace(ws, mode="read")
    try:
        return {(l, n): n2g_fast.NeuronGraph.from_bytes(b) for l, n, b in w.graph_bytes()}
    finally:
        w.close()


def _record(ws: Path, key):
    from n2g_service.workspace import Workspace

    w = Workspace(ws, mode="read")
    try:
        return w.get_neuron(*key)
    finally:
        w.close()


def _one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------
# tokenize, activations, predict

def test_tokenize_prints_the_word_tokenizers_ids_and_labels(capsys, srv, client):
    from n2g_service.models import WordTokenizer

    tok = WordTokenizer()
    texts = ["The cat sat on the mat.", "love is all you need"]
    got = json.loads(ok(capsys, "tokenize", *texts, "--json", *srv.conn()))
    assert len(got) == len(texts)
    for text, t, lib in zip(texts, got, client.tokenize(texts)):
        ids = [tok.bos_token_id] + tok.encode(text)
        assert t["token_ids"] == ids == lib.token_ids.tolist()
        assert t["tokens"] == tok.convert_ids_to_tokens(ids) == lib.tokens
    # --skip-bos: no BOS in front
    bare = json.loads(ok(capsys, "tokenize", texts[0], "--skip-bos", "--json", *srv.conn()))
    assert bare[0]["token_ids"] == tok.encode(texts[0])
    # the table: one row per token, with its position, id and label
    out = ok(capsys, "tokenize", texts[1], *srv.conn())
    lines = out.splitlines()
    ids = [tok.bos_token_id] + tok.encode(texts[1])
    assert lines[0] == f"{texts[1]!r}: {len(ids)} tokens"
    rows = [l.split() for l in lines[3:]]
    assert [(int(r[0]), int(r[1])) for r in rows] == list(enumerate(ids))
    assert [r[2] for r in rows[1:]] == [s.strip() for s in tok.convert_ids_to_tokens(ids[1:])]


def test_activations_are_the_models_own(capsys, srv, native_model):
    """`n2g activations`: the neuron's values the build recorded on its top examples, and the
    model's hook read directly (raw, and divided by a_max)."""
    import torch

    from n2g_service.models import WordTokenizer

    key = sorted(_local_graphs(srv.ws))[0]
    rec = _record(srv.ws, key)
    other = (key[0], (key[1] + 1) % 128)
    ex = rec.examples["train"][:3]
    spec = [f"{key[0]}:{key[1]}", f"{other[0]}:{other[1]}"]
    got = json.loads(ok(capsys, "activations", "--neurons", *spec,
                        *[a for e in ex for a in ("--tokens", " ".join(map(str, e["token_ids"])))], "--json",
                        *srv.conn()))
    assert got["normalised"] and got["neurons"] == [list(key), list(other)]
    assert len(got["sequences"]) == len(ex)
    for s, e in zip(got["sequences"], ex):
        assert s["token_ids"] == list(e["token_ids"])
        np.testing.assert_allclose(s["activations"][0], e["activations"], atol=2e-4)

    # a text, raw: the model's hook on BOS + the text's tokens, read here with run_with_cache
    text = "the cat sat on the mat. love is all you need"
    ids = [1] + WordTokenizer().encode(text)
    with torch.no_grad():
        _, cache = native_model.bridge.run_with_cache(torch.tensor([ids]))
    want = {k: cache[native_model.hook_name(k[0])][0, :, k[1]].float().numpy() for k in (key, other)}
    raw = json.loads(ok(capsys, "activations", "--neurons", *spec, "--text", text, "--raw", "--json", *srv.conn()))
    assert not raw["normalised"] and raw["sequences"][0]["token_ids"] == ids
    for r, k in enumerate((key, other)):
        np.testing.assert_allclose(raw["sequences"][0]["activations"][r], want[k], rtol=1e-4, atol=1e-5)
    assert np.abs(want[key]).max() > 1e-3  # the values compared are not all zero
    norm = json.loads(ok(capsys, "activations", "--neurons", spec[0], "--text", text, "--json", *srv.conn()))
    assert norm["normalised"] and norm["max_activation"] == pytest.approx([rec.max_activation], rel=1e-6)
    np.testing.assert_allclose(norm["sequences"][0]["activations"][0], want[key] / rec.max_activation,
                               rtol=1e-4, atol=1e-5)
    # the table: one row per token, each neuron's value in its column
    out = ok(capsys, "activations", "--neurons", spec[0], "--text", text, *srv.conn())
    lines = out.splitlines()
    assert lines[0] == f"true sequence 0 ({len(ids)} tokens, normalised)"
    assert lines[1].split() == ["pos", "id", "token", spec[0]]
    rows = [l.split() for l in lines[3:]]
    assert [int(r[1]) for r in rows] == ids
    np.testing.assert_allclose([float(r[-1]) for r in rows], want[key] / rec.max_activation, atol=6e-4)


def test_predict_text_is_predict_on_the_texts_token_ids(capsys, srv, client):
    from n2g_service.models import WordTokenizer

    graphs = _local_graphs(srv.ws)
    keys = sorted(graphs)[:3]
    tok = WordTokenizer()
    # a text the first neuron's graph fires on: its top training example, as text
    rec = _record(srv.ws, keys[0])
    text = tok.decode([i for i in rec.examples["train"][0]["token_ids"] if i != tok.bos_token_id])
    ids = client.tokenize([text])[0].token_ids.tolist()
    spec = [f"{l}:{n}" for l, n in keys]
    by_text = json.loads(ok(capsys, "predict", "--neurons", *spec, "--text", text, "--json", *srv.conn()))
    by_ids = json.loads(ok(capsys, "predict", "--neurons", *spec, "--tokens", " ".join(map(str, ids)), "--json",
                           *srv.conn()))
    [seq] = by_text["sequences"]
    assert seq["token_ids"] == ids == [tok.bos_token_id] + tok.encode(text)
    assert seq["activations"] == by_ids["sequences"][0]["activations"]
    for r, k in enumerate(keys):
        np.testing.assert_allclose(seq["activations"][r], graphs[k].predict([np.array(ids)])[0], atol=1e-6)
    assert max(seq["activations"][0]) > 0  # the graph fires on it: a real comparison
    assert by_text["normalised"] and by_text["neurons"] == [list(k) for k in keys]


def _hand_made_workspace(path: Path) -> None:
    """One layer-0 graph, 0:1, where the two semantics part: "a" alone ends at .9, "a" after "b"
    ends (deeper) at .3. On "b a", all_paths_max takes the larger END (.9), greedy_deepest the
    deepest (.3)."""
    import n2g_fast
    from n2g_service.workspace import NeuronRecord, Workspace

    ws = Workspace(path, create=True, model="test/hand-made", corpus="hand-made", hook="blocks.{l}.mlp.hook_post")
    ws.set_meta("token_strings", json.dumps([chr(97 + i) for i in range(26)]))
    g = n2g_fast.NeuronGraph("test/hand-made", 0, 1, "blocks.0.mlp.hook_post", 2.0)
    g.add_path(("a", [0], 0.9), [], 0.9)
    g.add_path(("a", [0], 0.3), [("b", [1], 0.5)], 0.3)
    g.finalize()
    ws.put_neuron(NeuronRecord(0, 1, 2.0, g.to_bytes(), {"train": [], "test": []}, {}, {}))
    ws.close()


def test_predict_semantics(capsys, srv, tmp_path):
    # on graphs made to tell the semantics apart (locally: graphs need no model)
    _hand_made_workspace(tmp_path / "hand")
    where = ("--workspace", tmp_path / "hand")
    base = ("predict", "--neurons", "0:1", "--tokens", "1 0", "--tokens", "0", "--json", *where)
    default = json.loads(ok(capsys, *base))
    greedy = json.loads(ok(capsys, *base, "--semantics", "greedy_deepest"))
    paths = json.loads(ok(capsys, *base, "--semantics", "all_paths_max"))
    assert [s["activations"] for s in greedy["sequences"]] == [[[0.0, pytest.approx(0.3)]], [[pytest.approx(0.9)]]]
    assert [s["activations"] for s in paths["sequences"]] == [[[0.0, pytest.approx(0.9)]], [[pytest.approx(0.9)]]]
    assert default["sequences"] == paths["sequences"]
    assert greedy["semantics"] == "greedy_deepest" and paths["semantics"] == "all_paths_max"
    # through the server: the semantics asked is the one used, on every neuron
    graphs = _local_graphs(srv.ws)
    keys = sorted(graphs)
    seqs = [np.array(e["token_ids"]) for e in _record(srv.ws, keys[0]).examples["test"][:2]] + [np.array([1, 5, 9])]
    tokens = [a for s in seqs for a in ("--tokens", ",".join(map(str, s)))]
    for semantics in ("greedy_deepest", "all_paths_max"):
        got = json.loads(ok(capsys, "predict", "--neurons", *[f"{l}:{n}" for l, n in keys], *tokens,
                            "--semantics", semantics, "--json", *srv.conn()))
        assert got["semantics"] == semantics
        for r, k in enumerate(keys):
            want = graphs[k].predict(seqs, semantics=semantics)
            for s, seq in enumerate(got["sequences"]):
                np.testing.assert_allclose(seq["activations"][r], want[s], atol=1e-6)
    out = ok(capsys, "predict", "--neurons", "0:1", "--tokens", "1 0", "--semantics", "greedy_deepest", *where)
    assert out.splitlines()[0] == "predicted sequence 0 (2 tokens, normalised, greedy_deepest)"
    assert [float(l.split()[-1]) for l in out.splitlines()[3:]] == [0.0, 0.3]


# ---------------------------------------------------------------------------------------------
# graph files, eval of chosen neurons, search by role

def _dot_statements(dot: str) -> tuple[str, dict[str, str], list[tuple[str, str]]]:
    """(graph name, {node id: label}, edges) of a DOT digraph, which must be well formed: one
    `digraph "name" { ... }`, balanced braces, every edge between declared nodes."""
    m = re.fullmatch(r'\s*digraph\s+"([^"]*)"\s*\{(.*)\}\s*', dot, re.S)
    assert m, dot[:200]
    body = m.group(2)
    depth = 0
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', body):  # braces outside quoted strings
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    nodes = {n: json.loads(f'"{lab}"') for n, lab in re.findall(r'^\s*(n\d+)\s*\[label="((?:[^"\\]|\\.)*)"', body, re.M)}
    edges = re.findall(r"^\s*(n\d+)\s*->\s*(n\d+)\s*;", body, re.M)
    assert all(a in nodes and b in nodes for a, b in edges)
    return m.group(1), nodes, edges


def test_graph_dot_and_json_out_write_the_graph(capsys, srv, client, tmp_path):
    graphs = _local_graphs(srv.ws)
    key = max(graphs, key=lambda k: graphs[k].n_nodes)  # the richest graph
    g = graphs[key]
    dot, js = tmp_path / "out" / "g.dot", tmp_path / "out" / "g.json"
    code, out, err = run(capsys, "graph", *key, "--dot", dot, "--json-out", js, *srv.conn())
    assert code == 0, err
    assert f"wrote {dot}" in err and f"wrote {js}" in err
    assert out.splitlines()[0].startswith(f"neuron {key[0]}:{key[1]} of ")
    # the JSON file: the graph as the workspace holds it, and as the library returns it
    assert js.read_text() == g.to_json() == client.graph(*key, json=True).json
    doc = json.loads(js.read_text())
    assert doc["schema"] == "n2g.graph/v1" and (doc["layer"], doc["neuron"]) == key
    # the DOT file: well formed, one node per activating and per context label, edges between them
    assert dot.read_text() == g.to_dot()
    name, nodes, edges = _dot_statements(dot.read_text())
    act, ctx = g.activating_labels(), g.context_labels()
    assert name == f"n2g_{key[0]}_{key[1]}" and len(nodes) == len(act) + len(ctx) and edges
    words = [lab for lab in act + ctx if lab.isalpha()]
    assert words and all(w in nodes.values() for w in words)
    assert sorted(nodes.values()).count(words[0]) == (act + ctx).count(words[0])
    # one file asked, one file written
    only = tmp_path / "only"
    assert run(capsys, "graph", *key, "--json-out", only / "g.json", *srv.conn())[0] == 0
    assert [p.name for p in only.iterdir()] == ["g.json"] and (only / "g.json").read_text() == g.to_json()
    assert run(capsys, "graph", *key, "--dot", only / "g.dot", *srv.conn())[0] == 0
    assert (only / "g.dot").read_text() == g.to_dot()


def _mean_scores(summaries, keys) -> dict[str, dict[str, dict[str, float]]]:
    """Per layer and method, the means of the per-neuron scores stored at build time."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for layer in sorted({k[0] for k in keys}):
        chosen = [s for s in summaries if s.key in keys and s.key[0] == layer]
        methods = {m.method for s in chosen for m in s.scores}
        out[str(layer)] = {
            m: {"precision": float(np.mean([x.precision for s in chosen for x in s.scores if x.method == m])),
                "recall": float(np.mean([x.recall for s in chosen for x in s.scores if x.method == m])),
                "f1": float(np.mean([x.f1 for s in chosen for x in s.scores if x.method == m])),
                "n_neurons": len(chosen)} for m in methods}
    return out


def _flat(doc: dict) -> dict:
    return {(layer, m, k): v for layer, ms in doc.items() for m, vs in ms.items() for k, v in vs.items()}


def test_eval_neurons_scores_exactly_the_neurons_asked(capsys, srv, client):
    summaries = list(client.list_graphs())
    by_layer = {}
    for s in summaries:
        by_layer.setdefault(s.key[0], []).append(s.key)

    def f1(key):
        return next(m.f1 for s in summaries if s.key == key for m in s.scores if m.method == "n2g_all_paths_max")

    asked = [*by_layer[0][1:3], max(by_layer[1], key=f1)]
    want = _mean_scores(summaries, asked)
    every = _mean_scores(summaries, [s.key for s in summaries])
    assert want["0"] != every["0"] and want["1"] != every["1"]  # leaving out the others changes the scores
    spec = [f"{l}:{n}" for l, n in asked]
    paper = json.loads(ok(capsys, "eval", "--neurons", *spec, "--paper-only", "--json", *srv.conn()))
    assert _flat(paper) == pytest.approx(_flat(want))
    both = json.loads(ok(capsys, "eval", "--neurons", *reversed(spec), "--json", *srv.conn()))
    assert _flat(both["paper"]) == pytest.approx(_flat(want))
    counts = {(r["layer"], r["method"]): r["n_neurons"] for r in both["test_sets"]["layers"]
              if r["test_set"] == "paper"}
    assert counts and all(n == sum(1 for k in asked if k[0] == layer) for (layer, _), n in counts.items())
    code, out, err = run(capsys, "eval", "--neurons", "0:127", *srv.conn())
    assert code == 1 and _one_error_line(err).startswith("error: NOT_FOUND")


def test_search_by_context_and_either_role(capsys, srv, client):
    graphs = _local_graphs(srv.ws)
    act = {k: set(g.activating_labels()) for k, g in graphs.items()}
    ctx = {k: set(g.context_labels()) for k, g in graphs.items()}
    labels = sorted(set().union(*act.values(), *ctx.values()))

    def having(label, *roles):
        return [list(k) for k in sorted(graphs) if any(label in r[k] for r in roles)]

    # labels whose answers tell the roles apart: a context label whose neurons are neither those
    # holding it as activating nor those holding it in either role, and a label held in each role
    # by different graphs (so that "either" is neither role alone)
    c_label = max((x for x in labels if having(x, ctx) not in (having(x, act), having(x, act, ctx))),
                  key=lambda x: len(having(x, ctx)))
    e_label = next(x for x in labels if having(x, act) and having(x, ctx)
                   and having(x, act, ctx) not in (having(x, act), having(x, ctx)))
    assert 0 < len(having(c_label, ctx)) < len(graphs)
    found = json.loads(ok(capsys, "search", "--context", c_label, "--json", *srv.conn()))
    assert found == {"neurons": having(c_label, ctx), "total": len(having(c_label, ctx))}
    found = json.loads(ok(capsys, "search", "--either", e_label, "--json", *srv.conn()))
    assert found == {"neurons": having(e_label, act, ctx), "total": len(having(e_label, act, ctx))}
    # clauses combine: every one must hold
    both = [k for k in having(e_label, act) if k in having(c_label, ctx)]
    found = json.loads(ok(capsys, "search", "--activating", e_label, "--context", c_label, "--json", *srv.conn()))
    assert found["neurons"] == both
    # the text output lists the same neurons
    out = ok(capsys, "search", "--either", e_label, *srv.conn())
    assert out.splitlines()[0] == f"{len(having(e_label, act, ctx))} neuron(s)"
    assert [l.strip() for l in out.splitlines()[1:]] == [f"{l}:{n}" for l, n in having(e_label, act, ctx)]


# ---------------------------------------------------------------------------------------------
# a detached build, watched and shown

def _json_values(text: str) -> list:
    dec, i, out = json.JSONDecoder(), 0, []
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        v, i = dec.raw_decode(text, i)
        out.append(v)
    return out


def test_build_detach_then_jobs_watch_and_show(capsys, srv, client):
    import dataclasses

    from n2g_service.workspace import Workspace

    built = {g.key for g in client.list_graphs()}
    new = [n for n in range(100, 128) if (0, n) not in built][:6]
    assert len(new) == 6
    job_id = "cli-detached"
    out = ok(capsys, "build", "--layers", "0", "--neurons", *new, "--group-size", "1", "--detach", "--job-id", job_id,
             *srv.conn())
    assert out == f"{job_id}\n"  # the id alone, and the command returns at once
    shown = json.loads(ok(capsys, "jobs", "show", job_id, "--json", *srv.conn()))
    assert shown["id"] == job_id and shown["request"]["neurons"] == new and shown["request"]["layers"] == [0]
    assert shown["state"] in ("queued", "running")  # detached: the job goes on without the command
    code, out, err = run(capsys, "jobs", "watch", job_id, "--json", *srv.conn())
    assert code == 0, err
    *events, final = _json_values(out)
    assert events and events[-1]["stage"] == "done" and events[-1]["job"] == final
    assert events[0]["job"]["state"] in ("queued", "running")  # watched live, not after the fact
    fits = [e["done"] for e in events if e["stage"] == "fit"]
    assert fits and fits == sorted(fits) and fits[-1] == 6
    assert final["id"] == job_id and final["state"] == "succeeded" and final["done"] == final["total"] == 6
    # what it built is there: for the server and in the workspace itself
    assert {(0, n) for n in new} <= {g.key for g in client.list_graphs()}
    w = Workspace(srv.ws, mode="read")
    try:
        assert {(0, n) for n in new} <= set(w.built_keys())
        assert {w.get_neuron(0, n).job_id for n in new} == {job_id}
    finally:
        w.close()
    # `jobs show`: the job as the client library gets it, field by field
    shown = json.loads(ok(capsys, "jobs", "show", job_id, "--json", *srv.conn()))
    assert shown == json.loads(json.dumps(dataclasses.asdict(client.get_job(job_id))))
    assert shown == final
    out = ok(capsys, "jobs", "show", job_id, *srv.conn())
    row = out.splitlines()[2].split()
    assert row[:3] == [job_id, "succeeded", "6/6"]
    code, out, err = run(capsys, "jobs", "show", "no-such-job", *srv.conn())
    assert code == 1 and "NOT_FOUND" in _one_error_line(err) and "no-such-job" in err


# ---------------------------------------------------------------------------------------------
# connection options and environment variables

def test_token_option(capsys, srv, client):
    n = client.model_info().neurons_built
    code, out, err = run(capsys, "info", "--json", *srv.conn(token=None))
    assert code == 1 and out == "" and _one_error_line(err).startswith("error: UNAUTHENTICATED: ")
    assert "missing credentials" in err
    code, out, err = run(capsys, "graph", "--json", *srv.conn(token="not-it"))
    assert code == 1 and out == "" and _one_error_line(err).startswith("error: UNAUTHENTICATED: ")
    assert "invalid bearer token" in err
    info = json.loads(ok(capsys, "info", "--json", *srv.conn()))
    assert info["neurons_built"] == n and info["loaded"] and info["model"] == NATIVE_MODEL


def test_tls_options(capsys, srv, tmp_path):
    # --tls-server-name: the certificate names n2g.test only, not the address dialled
    code, out, err = run(capsys, "info", "--server", srv.addr, "--tls-ca", srv.cert, "--token", TOKEN,
                         "--timeout", "1")
    assert code == 1 and _one_error_line(err).startswith("error: UNAVAILABLE")
    # a name the certificate does not hold: the hint is about TLS (it said "needs --tls")
    code, out, err = run(capsys, "info", "--server", srv.addr, "--tls-ca", srv.cert, "--tls-server-name",
                         "other.example", "--token", TOKEN, "--timeout", "1")
    assert code == 1 and "--tls-server-name" in _one_error_line(err) and "needs --tls)" not in err
    # a --tls-ca that is no certificate: said at once, in one line (gRPC failed each handshake later)
    (tmp_path / "not.pem").write_text("hello\n")
    code, out, err = run(capsys, "info", "--server", srv.addr, "--tls-ca", tmp_path / "not.pem", "--timeout", "1")
    assert code == 2 and "holds no PEM certificate" in _one_error_line(err)
    # --tls-ca: the CA given is the one trusted (another certificate for the same name is not)
    other, _ = self_signed_cert(tmp_path / "other", SERVER_NAME)
    code, out, err = run(capsys, "info", "--server", srv.addr, "--tls-ca", other, "--tls-server-name", SERVER_NAME,
                         "--token", TOKEN, "--timeout", "1")
    assert code == 1 and _one_error_line(err).startswith("error: UNAVAILABLE")
    # no TLS option: plain text to a TLS port fails
    code, out, err = run(capsys, "info", "--server", srv.addr, "--token", TOKEN, "--timeout", "1")
    assert code == 1 and _one_error_line(err).startswith("error: UNAVAILABLE")
    assert json.loads(ok(capsys, "info", "--json", *srv.conn()))["workspace"] == str(srv.ws.resolve())
    # --tls: TLS with the system's root certificates (gRPC's, which GRPC_DEFAULT_SSL_ROOTS_FILE_PATH
    # names, read once a process: hence subprocesses)
    tls = ("info", "--json", "--server", srv.addr, "--tls", "--tls-server-name", SERVER_NAME, "--token", TOKEN,
           "--timeout", "5")
    p = run_cli(*tls, extra_env={"GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(srv.cert)})
    assert json.loads(p.stdout)["workspace"] == str(srv.ws.resolve())
    p = run_cli(*tls, check=False, extra_env={"GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(other)})
    # one line (gRPC's core logged a line per failed handshake before it), saying what to check
    line = _one_error_line(p.stderr)
    assert p.returncode == 1 and p.stdout == "" and line.startswith("error: UNAVAILABLE")
    assert "CERTIFICATE_VERIFY_FAILED" in line and "--tls-ca" in line and "needs --tls)" not in line


def test_environment_variables(capsys, srv, client, tmp_path, monkeypatch):
    from n2g_service.workspace import Workspace

    n = client.model_info().neurons_built
    tls = ("--tls-ca", str(srv.cert), "--tls-server-name", SERVER_NAME)
    # $N2G_SERVER and $N2G_TOKEN stand for --server and --token
    p = run_cli("info", "--json", *tls, extra_env={"N2G_SERVER": srv.addr, "N2G_TOKEN": TOKEN})
    info = json.loads(p.stdout)
    assert info["workspace"] == str(srv.ws.resolve()) and info["neurons_built"] == n and info["loaded"]
    # the token sent is $N2G_TOKEN's (a wrong one is refused as wrong, not as missing) ...
    p = run_cli("info", *tls, check=False, extra_env={"N2G_SERVER": srv.addr, "N2G_TOKEN": "not-it"})
    assert p.returncode == 1 and "UNAUTHENTICATED" in _one_error_line(p.stderr) and "invalid bearer token" in p.stderr
    # ... unless --token gives one
    monkeypatch.setenv("N2G_SERVER", srv.addr)
    monkeypatch.setenv("N2G_TOKEN", "not-it")
    assert json.loads(ok(capsys, "info", "--json", "--token", TOKEN, *tls))["neurons_built"] == n
    # an explicit --workspace wins over $N2G_SERVER
    other = Workspace(tmp_path / "other", create=True, model=NATIVE_MODEL, corpus="other-corpus", hook="mlp.hook_post")
    other.close()
    local = json.loads(ok(capsys, "info", "--json", "--workspace", tmp_path / "other"))
    assert local["workspace"] == str((tmp_path / "other").resolve())
    assert local["corpus"] == "other-corpus" and local["neurons_built"] == 0 and not local["loaded"]
    p = run_cli("info", "--json", "--workspace", str(tmp_path / "other"), extra_env={"N2G_SERVER": srv.addr})
    assert json.loads(p.stdout) == local
    # both given explicitly are refused, whatever $N2G_SERVER says (it quietly took --workspace
    # when --server equalled $N2G_SERVER); neither given says what to give
    code, out, err = run(capsys, "info", "--workspace", tmp_path / "other", *srv.conn())
    assert code == 2 and _one_error_line(err) == "error: give --server or --workspace, not both\n"
    monkeypatch.delenv("N2G_SERVER")
    code, out, err = run(capsys, "info", "--workspace", tmp_path / "other", *srv.conn())
    assert code == 2 and _one_error_line(err) == "error: give --server or --workspace, not both\n"
    code, out, err = run(capsys, "info")
    assert code == 2 and "give --server HOST:PORT (or set N2G_SERVER) or --workspace DIR" in _one_error_line(err)
    monkeypatch.setenv("N2G_SERVER", "  ")  # blank is unset (it was dialled as a host name)
    code, out, err = run(capsys, "info")
    assert code == 2 and "give --server HOST:PORT (or set N2G_SERVER) or --workspace DIR" in _one_error_line(err)


def test_version_names_one_version_for_the_cli_the_server_and_the_extension(capsys, client):
    """`n2g --version`: the package and its Rust extension, each the version its manifest
    declares (a stale extension build shows there), and the server reports the same one."""
    import tomllib

    import n2g_fast

    root = Path(__file__).resolve().parents[1]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    crate = tomllib.loads((root / "n2g_fast" / "Cargo.toml").read_text())["package"]["version"]
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"n2g {declared} (n2g_fast {crate})"
    assert n2g_fast.__version__ == crate == declared
    assert client.model_info().server_version == declared
