"""``hf-embcomp evaluate`` and ``hf-embcomp sweep``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..cli import UserError
from .results import RESULTS_FILE


def _csv(s: str | None) -> tuple[str, ...] | None:
    return tuple(x.strip() for x in s.split(",") if x.strip()) if s else None


def format_table(doc: dict[str, Any], skipped: dict[str, str] | None = None) -> str:
    """The results as an aligned text table: suite, task, metric, n, baseline, compressed, drop."""
    head = ("suite", "task", "metric", "n", "baseline", "compressed", "drop")
    rows = [head] + [
        (r["suite"], r["task"], r["metric"], str(r["dataset"]["n"]), f"{r['baseline']:.4f}", f"{r['compressed']:.4f}",
         f"{r['drop']:+.4f}")
        for r in doc["results"]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    title = f"hf-embcomp evaluate: {doc['model']} ({doc['method']}, {doc['compression_ratio']:.2f}x) vs {doc['source_model']}"
    lines = [title]
    for row in rows:
        lines.append("  " + "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    lines.append("  drop > 0 is a loss (baseline - compressed; compressed - baseline for perplexity and error)")
    lines += [f"  {s}: skipped ({why})" for s, why in (skipped or {}).items()]
    return "\n".join(lines)


def _check_common(args: argparse.Namespace) -> None:
    """Reject a bad --max-steps or --data-dir before any model is loaded."""
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1 (got {args.max_steps})")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UserError(f"--data-dir {args.data_dir} is not a folder")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import SUITES, evaluate, write_results

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a model folder (no config.json); pass a folder written by hf-embcomp compress")
    suites = _csv(args.suite) or SUITES
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise UserError(f"unknown suite {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    _check_common(args)
    doc, skipped = evaluate(str(model_dir), args.baseline, suites, quick=args.quick, max_steps=args.max_steps,
                            seed=args.seed, data_dir=args.data_dir, device=args.device, tasks=_csv(args.tasks))
    out = write_results(doc, args.output or model_dir / RESULTS_FILE)
    print(format_table(doc, skipped))
    print(f"  results written to {out}")
    return 0


def _ratios(s: str) -> list[float]:
    try:
        ratios = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--ratios expects numbers separated by commas, e.g. 5,10,25 (got {s!r})") from None
    if not ratios or min(ratios) <= 1:
        raise UserError(f"--ratios must be numbers > 1 (got {s!r})")
    return ratios


def format_sweep(docs: list[dict[str, Any]]) -> str:
    """One row per cell (method, ratio) and one for the uncompressed model; a column per metric."""
    keys = list(dict.fromkeys((r["suite"], r["task"], r["metric"]) for d in docs for r in d["results"]))
    head = ["method", "ratio"] + [f"{t}/{m}" for _, t, m in keys]
    base = {(r["suite"], r["task"], r["metric"]): r["baseline"] for d in docs for r in d["results"]}
    rows = [head, ["uncompressed", "1"] + [f"{base[k]:.4f}" for k in keys]]
    for d in docs:
        vals = {(r["suite"], r["task"], r["metric"]): r["compressed"] for r in d["results"]}
        rows.append([d["method"], f"{d['compression_ratio']:.1f}"] + [f"{vals[k]:.4f}" if k in vals else "-" for k in keys])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def cmd_sweep(args: argparse.Namespace) -> int:
    import hf_embcomp
    from hf_embcomp.io import load_model

    from . import SUITES
    from .sweep import PLOT_FILE, plot_sweep, run_sweep

    methods = list(_csv(args.methods) or ())
    unknown = [m for m in methods if m not in hf_embcomp.METHODS]
    if not methods or unknown:
        raise UserError(f"unknown method {', '.join(unknown) or '(none)'}; choose from {', '.join(sorted(hf_embcomp.METHODS))}")
    suites = _csv(args.suite) or ()
    bad = [s for s in suites if s not in SUITES]
    if not suites or bad:
        raise UserError(f"unknown suite {', '.join(bad) or '(none)'}; choose from {', '.join(SUITES)}")
    _check_common(args)
    from hf_embcomp.cli import _hp_args

    out = Path(args.output_dir)
    docs = run_sweep(lambda: load_model(args.model, gguf_file=args.gguf_file), methods, _ratios(args.ratios), out,
                     suites, hyperparameters=_hp_args(args.hp), quick=args.quick, max_steps=args.max_steps,
                     seed=args.seed, data_dir=args.data_dir, device=args.device, tasks=_csv(args.tasks))
    png = plot_sweep(docs, out / PLOT_FILE)
    print(f"hf-embcomp sweep: {docs[0]['source_model']} -> {out}")
    print(format_sweep(docs))
    print(f"  plot: {png}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``evaluate`` (and ``sweep``) to the ``hf-embcomp`` sub-commands."""
    p = sub.add_parser("evaluate", help="evaluate a compressed model against its uncompressed source on real data")
    p.add_argument("model_dir", metavar="DIR", help="a folder written by hf-embcomp compress")
    p.add_argument("--baseline", default=None,
                   help="uncompressed model to compare with (default: the source recorded in DIR's config)")
    p.add_argument("--suite", default=None, help="comma-separated: fidelity,lm,glue,squad,sentence (default: all)")
    p.add_argument("--tasks", default=None, help="only these GLUE tasks (sst2,mrpc,rte,cola,stsb) and lm corpora (wikipedia,ptb); default: all")
    p.add_argument("--quick", action="store_true", help="small fixed subsets in every suite (minutes on a CPU)")
    p.add_argument("--max-steps", type=int, default=None, help="fine-tuning steps for glue/squad (default 200; --quick 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of fine-tunes and splits, the same for both models (default 0)")
    p.add_argument("--data-dir", default=None,
                   help="folder with glue/<TASK>/*.tsv and squad/dev-v1.1.json (default: ../shared/data if present, else the Hub)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--output", "-o", default=None, help=f"results JSON (default: DIR/{RESULTS_FILE})")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sweep", help="compress and evaluate a grid of methods x ratios; draw the Pareto plot")
    p.add_argument("model", nargs="?", default=None,
                   help="local folder, Hub id, or .gguf file (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside MODEL")
    p.add_argument("--methods", default="svd", help="comma-separated method names (default: svd)")
    p.add_argument("--hp", action="append", metavar="KEY=VALUE",
                   help="a method hyper-parameter for every method that has it (e.g. --hp epochs=3); repeatable")
    p.add_argument("--ratios", default="5,10,25,50,100", help="comma-separated compression ratios (default: 5,10,25,50,100)")
    p.add_argument("--suite", default="fidelity,sentence", help="comma-separated suites (default: fidelity,sentence)")
    p.add_argument("--tasks", default=None, help="only these GLUE tasks and lm corpora")
    p.add_argument("--quick", action="store_true", help="small fixed subsets in every suite")
    p.add_argument("--max-steps", type=int, default=None, help="fine-tuning steps for glue/squad")
    p.add_argument("--seed", type=int, default=0, help="seed of fine-tunes and splits (default 0)")
    p.add_argument("--data-dir", default=None, help="folder with glue/ and squad/ (default: ../shared/data if present)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--output-dir", "-o", required=True,
                   help="sweep folder: one sub-folder per cell, finished cells are not recomputed; pareto.png")
    p.set_defaults(func=cmd_sweep)
