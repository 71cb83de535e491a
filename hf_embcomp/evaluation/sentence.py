"""Sentence embeddings: agreement with the uncompressed model, a sentiment linear probe, and zero-shot STS-B.

Sentences are the Rotten Tomatoes sentences of the vader-sentiment sdist (:func:`hf_embcomp.data.rotten_tomatoes`,
fixed-seed split). Embeddings are mean-pooled last hidden states over the attention mask, L2-normalised
(as all-MiniLM-L6-v2 / all-mpnet-base-v2 do).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import data, progress
from .context import EvalContext, SuiteSkipped
from .results import result

logger = logging.getLogger(__name__)

SPLIT = (3000, 1500)
"""(train, test) sentences of the Rotten Tomatoes probe; ``--quick``: :data:`QUICK_SPLIT`."""
QUICK_SPLIT = (500, 200)
COSINE_SENTENCES = 1500
"""Test sentences compared between the two models; ``--quick``: :data:`QUICK_COSINE_SENTENCES`."""
QUICK_COSINE_SENTENCES = 200
DATASET = {"id": "vader-sentiment/rotten-tomatoes", "name": "Rotten Tomatoes sentences (Hutto & Gilbert, 2014)"}
QUICK_STSB_PAIRS = 200
"""STS-B dev pairs scored with ``--quick`` (all 1,500 otherwise)."""
STSB = {"id": "glue/stsb", "name": "GLUE STS-B"}


def stsb_pairs(quick: bool = False) -> tuple[list[str], list[str], list[float]] | None:
    """(sentences 1, sentences 2, gold similarity in [0, 5]) of the GLUE STS-B dev split (../shared/data/glue),
    the first :data:`QUICK_STSB_PAIRS` with ``quick``; None when the GLUE data is not available."""
    try:
        dev = data.glue_task("stsb")["validation"]
    except (FileNotFoundError, OSError, ValueError) as e:
        logger.warning("STS-B skipped: %s", e)
        return None
    n = min(len(dev), QUICK_STSB_PAIRS) if quick else len(dev)
    return list(dev["sentence1"][:n]), list(dev["sentence2"][:n]), [float(x) for x in dev["label"][:n]]


def stsb_spearman(model: torch.nn.Module, tokenizer: Any, pairs: tuple[list[str], list[str], list[float]]) -> float:
    """Zero-shot STS-B: Spearman correlation x100 between the cosine of the two sentences' embeddings
    (:func:`encode`) and the gold similarity (as sentence-transformers' EmbeddingSimilarityEvaluator reports)."""
    from scipy.stats import spearmanr

    a = encode(model, tokenizer, pairs[0], desc="STS-B: sentence 1")
    b = encode(model, tokenizer, pairs[1], desc="STS-B: sentence 2")
    return float(100 * spearmanr((a * b).sum(1), pairs[2]).correlation)


@torch.no_grad()
def encode(model: torch.nn.Module, tokenizer: Any, sentences: list[str], batch_size: int = 64, max_length: int = 128,
           desc: str = "encoding") -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings of the first ``max_length`` tokens (at most the model's
    ``max_position_embeddings``).

    Returns:
        float32 [len(sentences), hidden_size].
    """
    device = next(model.parameters()).device
    max_length = min(max_length, getattr(model.config, "max_position_embeddings", None) or max_length)
    out = []
    for i in tqdm(range(0, len(sentences), batch_size), desc=desc, unit="batch", disable=progress.disabled()):
        enc = tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
    return torch.cat(out).numpy()


def probe_accuracy(train_x: np.ndarray, train_y: list[int], test_x: np.ndarray, test_y: list[int], seed: int = 0) -> float:
    """Test accuracy of a scikit-learn LogisticRegression fitted on frozen embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score

    clf = LogisticRegression(max_iter=2000, random_state=seed).fit(train_x, train_y)
    return float(accuracy_score(test_y, clf.predict(test_x)))


def _split(ctx: EvalContext) -> tuple[data.LabelledSentences, data.LabelledSentences, int]:
    """(train, test, number of test sentences compared) of the probe for ``ctx.quick``."""
    n_train, n_test = QUICK_SPLIT if ctx.quick else SPLIT
    train, test = data.rotten_tomatoes(n_train, n_test, ctx.seed)
    return train, test, min(QUICK_COSINE_SENTENCES if ctx.quick else COSINE_SENTENCES, n_test)


def _cosine_result(ctx: EvalContext, baseline: np.ndarray, compressed: np.ndarray, n: int) -> dict[str, Any]:
    """The ``embedding_cosine`` result: mean cosine of the first ``n`` rows of two [N, h] L2-normalised arrays."""
    cos = float((baseline[:n] * compressed[:n]).sum(1).mean())
    return result("sentence", "embedding_cosine", "sentence-similarity", DATASET | {"split": "test", "n": n},
                  "cosine_to_uncompressed", 1.0, cos, True, ctx.settings)


def embedding_cosine(ctx: EvalContext) -> dict[str, Any]:
    """The ``embedding_cosine`` result of :func:`run` alone (only the compared test sentences are encoded, no
    probe), for any encoder: what ``hf-embcomp compress`` prints as its check (:mod:`.check`)."""
    _, test, n_cos = _split(ctx)
    tok = ctx.tokenizer()
    emb = {}
    for which in ("baseline", "compressed"):
        model = ctx.load(which)
        emb[which] = encode(model, tok, list(test.sentences[:n_cos]), desc=f"sentence: {which} test")
        del model
    return _cosine_result(ctx, emb["baseline"], emb["compressed"], n_cos)


def run(ctx: EvalContext) -> list[dict[str, Any]]:
    """Mean cosine between compressed and uncompressed embeddings of the same sentences, and the probe
    accuracy of each model.

    Raises:
        SuiteSkipped: the model is not a sentence-embedding model (no ``modules.json``).
    """
    if not ctx.is_sentence_transformer():
        raise SuiteSkipped(f"{ctx.compressed.name} is not a sentence-transformers model (no modules.json)")
    train, test, n_cos = _split(ctx)
    n_train, n_test = len(train.sentences), len(test.sentences)
    tok = ctx.tokenizer()
    pairs = stsb_pairs(ctx.quick)
    emb, sts = {}, {}
    for which in ("baseline", "compressed"):
        model = ctx.load(which)
        emb[which] = (encode(model, tok, list(train.sentences), desc=f"sentence: {which} train"),
                      encode(model, tok, list(test.sentences), desc=f"sentence: {which} test"))
        if pairs is not None:
            sts[which] = stsb_spearman(model, tok, pairs)
        del model
    acc = {w: probe_accuracy(e[0], list(train.labels), e[1], list(test.labels), ctx.seed) for w, e in emb.items()}
    out = [
        _cosine_result(ctx, emb["baseline"][1], emb["compressed"][1], n_cos),
        result("sentence", "sentiment_probe", "text-classification", DATASET | {"split": "test", "n": n_test}, "accuracy",
               acc["baseline"], acc["compressed"], True, ctx.settings | {"train": n_train, "probe": "LogisticRegression"}),
    ]
    if pairs is not None:
        out.append(result("sentence", "stsb_zero_shot", "sentence-similarity",
                          STSB | {"split": "validation", "n": len(pairs[2])}, "spearman_x100", sts["baseline"],
                          sts["compressed"], True, ctx.settings | {"similarity": "cosine", "pooling": "mean"}))
    return out
