"""The `n2g` command line. Local commands work on a workspace directory and import the service
lazily, so `n2g --help` and the remote commands never load torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # same as n2g_service.models.DEFAULT_MODEL
DEFAULT_CORPUS = "fortunes"


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="scan the corpus and build (and evaluate) neuron graphs")
    p.add_argument("--workspace", required=True, type=Path, help="workspace directory (created if missing)")
    p.add_argument("--model", default=None, help=f"model name (default {DEFAULT_MODEL}, offline)")
    p.add_argument("--corpus", default=None,
                   help="'fortunes' (default), a .txt/.jsonl file or directory, or hf:<dataset>")
    p.add_argument("--layers", type=int, nargs="+", required=True, help="layers to build")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--neurons", type=int, nargs="+", help="neuron indices (in every layer asked)")
    g.add_argument("--sample", type=int, help="a seeded random sample of this many live neurons per layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-size", type=int, default=8, help="neurons fitted together (shared forward passes)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--k", type=int, default=None, help="top-k examples per neuron (default 20)")
    p.add_argument("--window-tokens", type=int, default=None, help="tokens per corpus window (default 64)")


def _cmd_build(args) -> int:
    from tqdm import tqdm

    from n2g_service.config import ScanConfig
    from n2g_service.jobs import BuildRequest, run_build
    from n2g_service.models import load_model
    from n2g_service.workspace import Workspace

    ws_model = None
    if (args.workspace / "n2g.sqlite").exists():
        ws_model = Workspace(args.workspace).model_name
    model_name = args.model or ws_model or DEFAULT_MODEL
    model = load_model(model_name, device=args.device)
    ws = Workspace(args.workspace, create=True, model=model_name,
                   corpus=args.corpus or (None if ws_model else DEFAULT_CORPUS), hook=model.hook)
    if ws.corpus is None:
        ws.set_meta("corpus", args.corpus or DEFAULT_CORPUS)
    scan_kw = {}
    if args.k is not None:
        scan_kw["k"] = args.k
    if args.window_tokens is not None:
        scan_kw["window_tokens"] = args.window_tokens
    req = BuildRequest(layers=args.layers, neurons=args.neurons, sample=args.sample, seed=args.seed,
                       group_size=args.group_size, scan=ScanConfig(**scan_kw))
    bar = None

    def progress(ev):
        nonlocal bar
        if ev.stage == "fit":
            if bar is None:
                bar = tqdm(total=ev.total, initial=ev.done, desc="building neurons", unit="neuron")
            bar.n = ev.done
            bar.set_postfix_str(ev.message[-40:])
            bar.refresh()
        elif ev.stage != "done":
            print(f"[{ev.stage}] {ev.message}", file=sys.stderr)

    try:
        keys = run_build(ws, model, req, progress=progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    print(f"built {len(keys)} neurons in {args.workspace}")
    return 0


def _cmd_eval(args) -> int:
    from n2g_service.evaluate import format_table, summarise
    from n2g_service.workspace import Workspace

    ws = Workspace(args.workspace)
    rows = [{"layer": r.layer, "neuron": r.neuron, "metrics": r.metrics}
            for r in ws.iter_neurons(with_examples=False)]
    if not rows:
        print(f"error: no neurons built in {args.workspace}", file=sys.stderr)
        return 2
    summary = summarise(rows)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"model {ws.model_name}, corpus {ws.corpus}, hook {ws.hook}")
        print(format_table(summary))
    return 0


def _cmd_export(args) -> int:
    from n2g_service.workspace import Workspace

    ws = Workspace(args.workspace)
    (args.out / "graphs").mkdir(parents=True, exist_ok=True)
    (args.out / "examples").mkdir(parents=True, exist_ok=True)
    n = 0
    for rec in ws.iter_neurons():
        name = f"{rec.layer}_{rec.neuron}.json"
        (args.out / "graphs" / name).write_text(rec.graph().to_json())
        (args.out / "examples" / name).write_text(json.dumps(rec.examples))
        n += 1
    print(f"exported {n} neurons to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="n2g", description="Neuron to Graph: build, evaluate and serve neuron graphs")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_build(sub)
    p = sub.add_parser("eval", help="print the per-layer precision/recall/F1 table of a workspace")
    p.add_argument("--workspace", required=True, type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("export", help="write graphs/L_N.json and examples/L_N.json for every built neuron")
    p.add_argument("--workspace", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    return parser


COMMANDS = {"build": _cmd_build, "eval": _cmd_eval, "export": _cmd_export}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except Exception as e:  # a clear one-line error for the known failure kinds
        from_ws = type(e).__name__ == "WorkspaceError"
        if from_ws:
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
