"""Embedding fidelity: how close the reconstruction E_hat is to E, overall and by token frequency."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .. import data
from ..core import fidelity
from ..frequency import token_counts
from .context import EvalContext
from .results import result

logger = logging.getLogger(__name__)

FREQUENCY_BUCKETS: tuple[tuple[str, int, int | None], ...] = (
    ("unseen", 0, 0),
    ("1-9", 1, 9),
    ("10-99", 10, 99),
    ("100-999", 100, 999),
    ("1000+", 1000, None),
)
"""(name, lowest count, highest count or None) of the token-frequency buckets, counts on the Wikipedia text."""

__all__ = ["FREQUENCY_BUCKETS", "cosine_by_bucket", "run", "token_counts"]


def cosine_by_bucket(original: torch.Tensor, reconstructed: torch.Tensor, counts: torch.Tensor) -> dict[str, tuple[float, int]]:
    """Mean row cosine of E vs E_hat within each of :data:`FREQUENCY_BUCKETS`.

    Args:
        original, reconstructed: float [V, d].
        counts: int [V] token counts.

    Returns:
        bucket name -> (mean cosine, number of rows); empty buckets are left out.
    """
    cos = torch.nn.functional.cosine_similarity(original.double(), reconstructed.double(), dim=1, eps=1e-12)
    out = {}
    for name, lo, hi in FREQUENCY_BUCKETS:
        sel = counts >= lo
        if hi is not None:
            sel &= counts <= hi
        if int(sel.sum()):
            out[name] = (float(cos[sel].mean()), int(sel.sum()))
    return out


def run(ctx: EvalContext) -> list[dict[str, Any]]:
    """Row cosine (mean, 1st percentile), relative Frobenius error and cosine by frequency bucket.

    The baseline is E against itself (cosine 1, error 0), so ``drop`` is the fidelity lost.
    """
    E = ctx.embedding_matrix("baseline")
    E_hat = ctx.embedding_matrix("compressed")
    V = E.shape[0]
    fid = fidelity(E, E_hat)
    matrix = {"id": ctx.baseline.name, "name": "token-embedding matrix", "split": None, "n": V}
    out = [
        result("fidelity", "embedding", "feature-extraction", matrix, "row_cosine_mean", 1.0, fid["row_cosine_mean"], True, ctx.settings),
        result("fidelity", "embedding", "feature-extraction", matrix, "row_cosine_p01", 1.0, fid["row_cosine_p01"], True, ctx.settings),
        result("fidelity", "embedding", "feature-extraction", matrix, "relative_frobenius_error", 0.0,
               fid["relative_frobenius_error"], False, ctx.settings),
    ]
    articles = data.wiki_articles()
    if ctx.quick:
        articles = articles[:10]
    counts = token_counts(ctx.tokenizer(), [f"{t}\n{b}" for t, b in articles], V)
    for name, (cos, n) in cosine_by_bucket(E, E_hat, counts).items():
        ds = {"id": "gensim/enwiki-shortened", "name": f"tokens seen {name} times in {len(articles)} Wikipedia articles",
              "config": name, "split": None, "n": n}
        out.append(result("fidelity", f"frequency_{name}", "feature-extraction", ds, "row_cosine_mean", 1.0, cos, True,
                          ctx.settings | {"articles": len(articles)}))
    return out
