"""Compress and evaluate a grid of (method, ratio) cells, resumably, and draw the Pareto plot.

Layout of the sweep folder::

    OUT/<method>-x<ratio>/model/              the compressed repository
    OUT/<method>-x<ratio>/eval_results.json   its results (schema: hf_embcomp.evaluation.results)
    OUT/pareto.png                            one panel per metric: ratio (log x) vs value, a line per method,
                                              the uncompressed value as a dashed horizontal line

A cell whose ``eval_results.json`` exists and validates is not recomputed. The uncompressed baseline's
embedding matrix and perplexities are computed once per process and reused by every cell
(:func:`hf_embcomp.evaluation.context.clear_baseline_memo`); fine-tuned baselines (glue, squad) are not.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..io import Source, save_compressed
from . import evaluate
from .results import RESULTS_FILE, load_results, write_results

logger = logging.getLogger(__name__)

PLOT_FILE = "pareto.png"


def cell_dir(out: Path, method: str, ratio: float) -> Path:
    """Folder of one (method, ratio) cell: ``OUT/<method>-x<ratio>``."""
    return out / f"{method}-x{ratio:g}"


def run_sweep(
    load_source: Callable[[], Source],
    methods: list[str],
    ratios: list[float],
    out: str | Path,
    suites: tuple[str, ...],
    hyperparameters: dict[str, Any] | None = None,
    **evaluate_kwargs: Any,
) -> list[dict[str, Any]]:
    """Compress the source with every method at every ratio and evaluate each cell.

    Args:
        load_source: returns the loaded source model; called once, only if some cell must be computed.
        methods: registered method names.
        ratios: compression ratios vs fp32.
        out: the sweep folder (created).
        suites: evaluation suites for every cell.
        hyperparameters: method hyper-parameters (e.g. ``{"epochs": 3}``), each given to the methods whose
            config has that field; a key no method has raises ValueError.
        **evaluate_kwargs: passed to :func:`hf_embcomp.evaluation.evaluate` (quick, max_steps, ...).

    Returns:
        The results documents of all cells, in grid order.

    Raises:
        ValueError / RatioError / CompressionError: from compress or evaluate (the finished cells stay).
    """
    import hf_embcomp

    import dataclasses

    from ..methods import get_method

    hp = dict(hyperparameters or {})
    fields = {m: {f.name for f in dataclasses.fields(get_method(m).config_class)} for m in methods}
    unused = sorted(k for k in hp if not any(k in f for f in fields.values()))
    if unused:
        raise ValueError(f"hyper-parameter(s) {unused} belong to none of the methods {methods}; check --hp.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    docs, src = [], None
    for method, ratio in tqdm([(m, r) for m in methods for r in ratios], desc="sweep", unit="cell"):
        cell = cell_dir(out, method, ratio)
        path = cell / RESULTS_FILE
        if path.is_file():
            try:
                docs.append(load_results(path))
                logger.info("%s: done before, not recomputed", cell.name)
                continue
            except ValueError as e:
                logger.warning("%s: unreadable results (%s), recomputing", cell.name, e)
        src = src or load_source()
        model = hf_embcomp.compress(
            src.model, method, ratio,
            source=src.label,
            source_revision=src.revision, source_dtype=src.embedding_dtype, source_embedding_bytes=src.embedding_bytes,
            tokenizer=src.tokenizer, source_folder=str(src.folder) if src.folder else None,
            **{k: v for k, v in hp.items() if k in fields[method]},
        )
        save_compressed(model, cell / "model", overwrite=True)
        del model
        doc, skipped = evaluate(str(cell / "model"), suites=suites, **evaluate_kwargs)
        for suite, why in skipped.items():
            logger.warning("%s: suite %s skipped: %s", cell.name, suite, why)
        write_results(doc, path)
        docs.append(doc)
    return docs


def plot_sweep(docs: list[dict[str, Any]], path: str | Path) -> Path:
    """The Pareto plot: a panel per (suite, task, metric), x = compression ratio (log), y = the compressed
    model's value (log for perplexities), one line per method, the uncompressed value as a dashed horizontal line.

    Raises:
        ValueError: no results to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str, str], dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    baseline: dict[tuple[str, str, str], float] = {}
    for doc in docs:
        for r in doc["results"]:
            key = (r["suite"], r["task"], r["metric"])
            series[key][doc["method"]].append((doc["compression_ratio"], r["compressed"]))
            baseline.setdefault(key, r["baseline"])
    if not series:
        raise ValueError("no results to plot")
    n = len(series)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (key, by_method) in zip(axes.flat, sorted(series.items())):
        for method, pts in sorted(by_method.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.axhline(baseline[key], color="black", linestyle="--", linewidth=1, label="uncompressed")
        ax.set_xscale("log")
        if "perplexity" in key[2]:  # spans 20 .. 1e5 between methods
            ax.set_yscale("log")
        ax.set_xlabel("compression ratio (vs fp32)")
        ax.set_title(f"{key[0]} / {key[1]}", fontsize=10)
        ax.set_ylabel(key[2])
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
