"""The quick downstream check that ``hf-embcomp compress`` prints and records (``compression_report.json``, key
``check``): one number of the model it wrote beside the uncompressed model's, in seconds.

It is one result of ``hf-embcomp evaluate DIR --quick``, computed by the same code on the same data (no second
metric):

- a model whose source has a causal-LM head: the ``lm`` suite's perplexity on the first
  :data:`~hf_embcomp.evaluation.lm.QUICK_LM_TOKENS` tokens of the Wikipedia text (``evaluate --quick --suite lm
  --tasks wikipedia``);
- any other model (an encoder): the ``sentence`` suite's mean cosine between the compressed and the uncompressed
  model's mean-pooled sentence embeddings of :data:`~hf_embcomp.evaluation.sentence.QUICK_COSINE_SENTENCES` Rotten
  Tomatoes sentences (``evaluate --quick --suite sentence``; that suite runs only for sentence-transformers models,
  the check for every encoder).
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPORT_KEY = "check"
"""Key of the check in ``compression_report.json``."""


def quick_check(model_dir: str | Path, baseline: str | None = None, *, device: str | None = None,
                baseline_model: Any = None) -> dict[str, Any]:
    """Run the check (module docstring) on the compressed repository ``model_dir`` and its source.

    Args:
        model_dir: a folder written by ``hf-embcomp compress``.
        baseline: the uncompressed model (default: ``embedding_compression.source_model`` of its config).
        device: torch device (default: as ``hf-embcomp evaluate``, cuda if available, else cpu).
        baseline_model: the uncompressed model, already loaded from ``baseline`` (saves reading it again, e.g. the
            de-quantisation of a GGUF file); used only where it is what the evaluation would load (its class, float32),
            and then moved to ``device``.

    Returns:
        ``{"suite", "task", "metric", "dataset", "baseline", "compressed", "drop", "higher_is_better", "seconds",
        "same_as"}`` (``same_as``: the ``hf-embcomp evaluate`` command whose row it equals, or None), or
        ``{"skipped": reason}`` when the data it needs is not installed (``hf-embcomp[eval]``) and cannot be fetched.

    Raises:
        ValueError: ``model_dir`` is not a compressed model, or its source cannot be resolved.
    """
    import torch

    from .context import EvalContext, SuiteSkipped

    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ctx = EvalContext.from_dir(str(model_dir), baseline, quick=True, max_steps=10, seed=0, device=device,
                               tasks=("wikipedia",), models={"baseline": baseline_model} if baseline_model else {})
    causal = "causal-lm" in ctx.pretrained_heads()
    try:
        if causal:
            from . import lm

            row = lm.run(ctx)[0]
            same_as = "hf-embcomp evaluate DIR --quick --suite lm --tasks wikipedia"
        else:
            from . import sentence

            row = sentence.embedding_cosine(ctx)
            same_as = "hf-embcomp evaluate DIR --quick --suite sentence" if ctx.is_sentence_transformer() else None
    except (SuiteSkipped, ImportError, FileNotFoundError, subprocess.CalledProcessError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        logger.warning("downstream check skipped: %s", why)
        return {"skipped": f"{why} (install hf-embcomp[eval] for the check's data)"}
    keys = ("suite", "task", "metric", "dataset", "baseline", "compressed", "drop", "higher_is_better")
    return {k: row[k] for k in keys} | {"seconds": round(time.perf_counter() - t0, 1), "same_as": same_as}


def describe(check: dict[str, Any]) -> str:
    """The check as one line of the ``compress`` summary, e.g. ``perplexity 23.76 (uncompressed 22.94) on ...``."""
    if "skipped" in check:
        return f"skipped: {check['skipped']}"
    if check["metric"] == "cosine_to_uncompressed":
        what = (f"sentence cosine to the uncompressed model {check['compressed']:.4f} (uncompressed "
                f"{check['baseline']:.4f}) on {check['dataset']['n']} Rotten Tomatoes sentences")
    else:
        what = (f"{check['metric'].replace('_', ' ')} {check['compressed']:.2f} (uncompressed {check['baseline']:.2f}) "
                f"on {check['dataset']['name']}")
    return f"{what}, {check['seconds']:.1f}s"
