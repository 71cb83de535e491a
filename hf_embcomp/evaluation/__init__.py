"""Evaluate a compressed model against its uncompressed source on real data.

Suites (each a module with ``run(ctx) -> list[result]``):

- ``fidelity``: row cosine, relative Frobenius error, cosine by token-frequency bucket.
- ``lm``: causal-LM perplexity / masked-LM pseudo-perplexity on Wikipedia and Penn Treebank.
- ``glue``: SST-2, MRPC, RTE, CoLA, STS-B fine-tuned under a step budget, token embedding frozen.
- ``squad``: SQuAD v1.1 exact match / F1 after a step-budgeted fine-tune.
- ``sentence``: sentence-embedding cosine to the uncompressed model, Rotten Tomatoes linear probe, zero-shot
  GLUE STS-B dev (Spearman x100 of the cosine, as sentence-transformers reports it).

The results file layout is documented in :mod:`hf_embcomp.evaluation.results` and docs/results-schema.md.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from .results import SCHEMA_VERSION, load_results, new_results, validate_results, write_results

if TYPE_CHECKING:
    from .context import EvalContext, SuiteSkipped

logger = logging.getLogger(__name__)

SUITES = ("fidelity", "lm", "glue", "squad", "sentence")
"""Suite names, in the order they run."""


def evaluate(
    model_dir: str,
    baseline: str | None = None,
    suites: tuple[str, ...] | list[str] = SUITES,
    *,
    quick: bool = False,
    max_steps: int | None = None,
    seed: int = 0,
    data_dir: str | None = None,
    device: str | None = None,
    tasks: tuple[str, ...] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Evaluate the compressed ``model_dir`` and its source side by side.

    Args:
        model_dir: a folder written by ``hf-embcomp compress``.
        baseline: the uncompressed model to compare with (default: ``embedding_compression.source_model``).
        suites: any of :data:`SUITES`.
        quick: small fixed subsets in every suite.
        max_steps: fine-tuning steps for GLUE / SQuAD (default 200, ``quick`` 10).
        seed: seed of fine-tunes, splits and classifier heads (the same for both models).
        data_dir: folder with ``glue/`` and ``squad/`` (default: ../shared/data beside the repo, else the Hub).
        device: torch device (default: cuda if available, else cpu).
        tasks: restrict the glue suite to these GLUE tasks and the lm suite to these corpora (``wikipedia``,
            ``ptb``); default: all.

    Returns:
        (results document, {skipped suite: reason}).

    Raises:
        ValueError: unknown suite, a folder that is not a compressed model, an unresolvable source.
    """
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    import torch
    from tqdm.auto import tqdm

    from .context import EvalContext, SuiteSkipped
    from .glue import TASKS
    from .lm import CORPORA

    known = (*TASKS, *CORPORA)
    bad_tasks = [t for t in tasks or () if t not in known]
    if bad_tasks:
        raise ValueError(f"unknown task(s) {', '.join(bad_tasks)}; choose from {', '.join(known)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    steps = max_steps if max_steps is not None else (10 if quick else 200)
    ctx = EvalContext.from_dir(str(model_dir), baseline, quick=quick, max_steps=steps, seed=seed, data_dir=data_dir,
                               device=device, tasks=tasks)
    doc = new_results(str(model_dir), ctx.baseline.name, ctx.block, device)
    skipped: dict[str, str] = {}
    bar = tqdm(suites, desc="evaluate", unit="suite")
    for suite in bar:
        bar.set_description(f"evaluate: {suite}")
        module = importlib.import_module(f".{suite}", __name__)
        try:
            doc["results"].extend(module.run(ctx))
        except SuiteSkipped as e:
            logger.warning("suite %s skipped: %s", suite, e)
            skipped[suite] = str(e)
    validate_results(doc)
    return doc, skipped


__all__ = ["SCHEMA_VERSION", "SUITES", "EvalContext", "SuiteSkipped", "evaluate", "load_results", "validate_results",
           "write_results"]


def __getattr__(name: str) -> Any:
    """``EvalContext`` and ``SuiteSkipped`` are imported on first use (they need torch and transformers;
    ``hf-embcomp --help`` imports this package)."""
    if name in ("EvalContext", "SuiteSkipped"):
        from . import context

        return getattr(context, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
