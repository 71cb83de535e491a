"""GLUE dev-set scores after a step-budgeted fine-tune (token embedding frozen), baseline and compressed.

Metrics (scikit-learn / scipy, as GLUE defines them): SST-2, RTE, QNLI accuracy; MRPC F1 and accuracy;
CoLA Matthews correlation; STS-B Pearson and Spearman correlation. ``--quick`` scores the first
:data:`QUICK_EVAL` dev examples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import transformers
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from .. import data
from .context import EvalContext
from ..training.downstream import finetune_and_predict, load_head, train_subset
from .results import result

logger = logging.getLogger(__name__)

QUICK_EVAL = 200
MAX_LENGTH = 128

METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda y, p: float(accuracy_score(y, p)),
    "f1": lambda y, p: float(f1_score(y, p)),
    "matthews_correlation": lambda y, p: float(matthews_corrcoef(y, p)),
    "pearson": lambda y, p: float(pearsonr(y, p).statistic),
    "spearmanr": lambda y, p: float(spearmanr(y, p).statistic),
}
"""metric name -> f(labels, predictions)."""

TASKS: dict[str, tuple[tuple[str, ...], int, tuple[str, ...], str]] = {
    "sst2": (("sentence",), 2, ("accuracy",), "GLUE SST-2"),
    "mrpc": (("sentence1", "sentence2"), 2, ("f1", "accuracy"), "GLUE MRPC"),
    "rte": (("sentence1", "sentence2"), 2, ("accuracy",), "GLUE RTE"),
    "cola": (("sentence",), 2, ("matthews_correlation",), "GLUE CoLA"),
    "stsb": (("sentence1", "sentence2"), 1, ("pearson", "spearmanr"), "GLUE STS-B"),
}
"""task -> (text columns, num_labels (1 = regression), metrics, name). QNLI has no train file offline."""


def score(task: str, labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """The task's metrics from dev labels and the head's outputs ([n, num_labels] logits)."""
    _, num_labels, metrics, _ = TASKS[task]
    pred = logits[:, 0] if num_labels == 1 else logits.argmax(-1)
    return {m: METRICS[m](labels, pred) for m in metrics}


def run_task(ctx: EvalContext, task: str) -> list[dict[str, Any]]:
    """Fine-tune both models on ``task`` under the same budget and seed, and score the dev set."""
    cols, num_labels, metrics, name = TASKS[task]
    ds = data.glue_task(task, ctx.data_dir)
    dev = ds["validation"].select(range(min(QUICK_EVAL, len(ds["validation"])))) if ctx.quick else ds["validation"]
    tok = ctx.tokenizer()

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return tok(*(batch[c] for c in cols), truncation=True, max_length=MAX_LENGTH)

    train = train_subset(ds["train"], ctx).map(encode, batched=True, remove_columns=list(cols))
    test = dev.map(encode, batched=True, remove_columns=list(cols))
    values = {}
    for which in ("baseline", "compressed"):
        model = load_head(ctx, which, transformers.AutoModelForSequenceClassification, num_labels=num_labels)
        logits = finetune_and_predict(model, train, test, ctx)
        values[which] = score(task, np.asarray(dev["label"]), logits)
        del model
    dataset = {"id": "nyu-mll/glue", "name": name, "config": task, "split": "validation", "n": len(dev)}
    settings = ctx.settings | {"max_steps": ctx.max_steps, "train_examples": len(train), "frozen_embedding": True}
    return [result("glue", task, "text-classification", dataset, m, values["baseline"][m], values["compressed"][m], True,
                   settings) for m in metrics]


def run(ctx: EvalContext) -> list[dict[str, Any]]:
    """Every task of ``ctx.tasks`` (default: all of :data:`TASKS`)."""
    tasks = [t for t in ctx.tasks if t in TASKS] if ctx.tasks else TASKS
    return [r for t in tasks for r in run_task(ctx, t)]
