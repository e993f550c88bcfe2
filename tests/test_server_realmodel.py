"""The issue's end-to-end test on the default model (SmolLM2-135M-Instruct): a real `n2g serve`
builds a few layer-0 neurons through the client while progress streams; the server is killed
with SIGKILL mid-build and restarted; the job resumes with no neuron lost or built twice; then
predict, search, similar, graph/SVG and evaluate over RPC equal the local API."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from n2g.client import N2GClient
from n2g_servers import ServerProcess

pytestmark = pytest.mark.real_model

N_NEURONS = 4


def _fortunes_corpus(path: Path, n: int = 300) -> Path:
    """The first n fortunes (Debian's package, which `make` installs) as a JSONL corpus."""
    from n2g_service.corpus import load_fortunes

    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in load_fortunes()[:n]))
    return path


def test_kill_resume_then_rpc_equals_local(tmp_path):
    import n2g_fast
    from n2g_service.workspace import Workspace

    corpus = _fortunes_corpus(tmp_path / "fortunes.jsonl")
    ws_dir = tmp_path / "ws"
    args = ("--corpus", str(corpus), "--device", "cpu")
    srv = ServerProcess(ws_dir, *args).start()
    srv2 = None
    try:
        srv.wait_ready(timeout=240)
        client = N2GClient(srv.address, timeout=120)
        job = client.start_build([0], sample=N_NEURONS, group_size=1, seed=3)
        events: list = []
        result: dict = {}

        def watch():  # one wait_job call across the crash: it reconnects to the restarted server
            try:
                result["job"] = client.wait_job(job.id, progress=events.append, timeout=600)
            except Exception as e:  # noqa: BLE001
                result["error"] = e

        watcher = threading.Thread(target=watch)
        watcher.start()
        deadline = time.monotonic() + 400
        while not any(e.stage == "fit" and e.last_neuron is not None for e in events):
            assert time.monotonic() < deadline, f"no neuron committed in time:\n{srv.log()[-3000:]}"
            assert watcher.is_alive(), result
            time.sleep(0.05)
        srv.kill()  # SIGKILL in the middle of the build

        ws = Workspace(ws_dir)
        before = {(r.layer, r.neuron): r.created_at for r in ws.iter_neurons(with_examples=False)}
        stored = ws.get_job(job.id)
        assert stored.state == "running" and 1 <= len(before) < N_NEURONS, (stored, before)
        stages_before = [e.stage for e in events]
        assert "scan" in stages_before and "fit" in stages_before

        srv2 = ServerProcess(ws_dir, *args, port=srv.port).start()  # same address: the watcher reconnects
        srv2.wait_ready(timeout=240)
        watcher.join(600)
        assert "error" not in result, result.get("error")
        final = result["job"]
        assert final.state == "succeeded" and final.done == final.total == N_NEURONS, final
        assert any("resuming" in line for line in srv2.log().splitlines())

        recs = {(r.layer, r.neuron): r for r in ws.iter_neurons(with_examples=False)}
        assert len(recs) == N_NEURONS and all(l == 0 for l, _ in recs)  # none lost, none twice
        for key, created in before.items():  # built before the kill: kept, not rebuilt
            assert recs[key].created_at == created and recs[key].job_id == job.id
        assert all(r.job_id == job.id for r in recs.values())
        assert [k for k in recs] == sorted(recs)

        # --- over RPC == the local API ----------------------------------------------------------
        client2 = N2GClient(srv2.address, timeout=120)
        keys = sorted(recs)
        graphs = {(l, n): n2g_fast.NeuronGraph.from_bytes(b) for l, n, b in ws.graph_bytes()}
        store = n2g_fast.GraphStore()
        for g in graphs.values():
            store.add(g)
        rec = ws.get_neuron(*keys[0])
        seqs = [e["token_ids"] for e in rec.examples["test"]]
        for semantics in ("all_paths_max", "greedy_deepest"):
            pred = client2.predict(keys, token_ids=seqs, semantics=semantics)
            for r, k in enumerate(keys):
                for s, want in enumerate(graphs[k].predict(seqs, semantics=semantics)):
                    np.testing.assert_allclose(pred.values[s][r], want, atol=1e-6)
        text = "Why did the chicken cross the road? To get to the other side."
        toks = client2.tokenize([text])[0]
        assert toks.tokens[0] == "<|im_start|>"
        pred = client2.predict(keys, [text])
        for r, k in enumerate(keys):
            np.testing.assert_allclose(pred.values[0][r], graphs[k].predict([toks.token_ids])[0], atol=1e-6)
        true = client2.activations([keys[0]], token_ids=seqs[:2])
        for s in range(2):
            np.testing.assert_allclose(true.values[s][0], rec.examples["test"][s]["activations"], atol=1e-3)
        label = graphs[keys[0]].activating_labels()[0]
        for role in ("activating", "either"):
            assert client2.search([(label, role)]).neurons == sorted(tuple(k) for k in store.search([(label, role)]))
        assert keys[0] in client2.search([(label, "activating")]).neurons
        for kind, fn in (("similar", store.similar_pairs), ("subset", store.subset_pairs)):
            got = [(p.a, p.b) for p in client2.pairs(kind, threshold=0.5)]
            assert got == [(tuple(a), tuple(b)) for a, b, *_ in fn(0.5)]
        sim = client2.similar(*keys[0], k=5)
        assert [n.key for n in sim.neighbours] == [tuple(o) for o, *_ in store.neighbours(keys[0], 5)]
        g = client2.graph(*keys[0], svg=True, dot=True, json=True)
        assert g.svg == graphs[keys[0]].to_svg() and g.json == graphs[keys[0]].to_json()
        assert g.dot == graphs[keys[0]].to_dot()
        ev = client2.evaluate()
        assert {n.key: n.metrics for n in ev.neurons} == {k: ws.get_neuron(*k).metrics for k in keys}
        from n2g_service.evaluate import format_table, summarise

        assert ev.table == format_table(summarise(
            [{"layer": k[0], "neuron": k[1], "metrics": ws.get_neuron(*k).metrics} for k in keys]))
    finally:
        srv.stop()
        if srv2 is not None:
            srv2.stop()
