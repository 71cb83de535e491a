"""SQuAD v1.1 exact match and F1 after a step-budgeted fine-tune (token embedding frozen).

Data: :func:`hf_embcomp.data.squad_v1` (offline: the dev file's first 24 articles train, the last 24 are
scored). Spans are extracted as in transformers' ``run_qa.py`` (best start + end logit, answer <= 30
tokens, inside the context); EM and F1 follow the official v1.1 evaluation script (normalisation: lower
case, drop punctuation, drop articles a/an/the, collapse white space; max over the gold answers; 0-100).
"""

from __future__ import annotations

import collections
import logging
import re
import string
from typing import Any

import datasets
import numpy as np
import transformers

from .. import data
from .context import EvalContext
from ..training.downstream import finetune_and_predict, load_head, train_subset
from .results import result

logger = logging.getLogger(__name__)

MAX_LENGTH, DOC_STRIDE = 384, 128
QUICK_MAX_LENGTH, QUICK_DOC_STRIDE = 256, 64
QUICK_EVAL = 100
MAX_ANSWER_TOKENS = 30
N_BEST = 20


def normalize_answer(s: str) -> str:
    """The official SQuAD v1.1 answer normalisation."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def exact_match(prediction: str, truth: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1(prediction: str, truth: str) -> float:
    """Token-overlap F1 of the normalised strings, in [0, 1]."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Official v1.1 ``exact_match`` and ``f1`` (0-100), each the max over the gold answers of a question,
    averaged over ``references`` (a question without a prediction scores 0)."""
    em = f = 0.0
    for qid, golds in references.items():
        pred = predictions.get(qid, "")
        em += max(exact_match(pred, g) for g in golds)
        f += max(f1(pred, g) for g in golds)
    return {"exact_match": 100 * em / len(references), "f1": 100 * f / len(references)}


def _features(tok: Any, examples: dict[str, list], max_length: int, stride: int, train: bool) -> dict[str, list]:
    """Question + context windows; for training the answer's token span (0, 0 when it is outside the window),
    for evaluation the example id and the context-token offsets (None elsewhere)."""
    enc = tok([q.lstrip() for q in examples["question"]], examples["context"], truncation="only_second",
              max_length=max_length, stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True,
              padding="max_length")
    sample = enc.pop("overflow_to_sample_mapping")
    offsets = enc.pop("offset_mapping")
    if not train:
        enc["example_id"] = [examples["id"][s] for s in sample]
        enc["offset_mapping"] = [[o if sid == 1 else None for o, sid in zip(offs, enc.sequence_ids(i))]
                                 for i, offs in enumerate(offsets)]
        return enc
    enc["start_positions"], enc["end_positions"] = [], []
    for i, offs in enumerate(offsets):
        seq = enc.sequence_ids(i)
        ans = examples["answers"][sample[i]]
        a0 = ans["answer_start"][0]
        a1 = a0 + len(ans["text"][0])
        ctx = [j for j, sid in enumerate(seq) if sid == 1]
        if not ctx or offs[ctx[0]][0] > a0 or offs[ctx[-1]][1] < a1:
            s = e = 0
        else:
            s = next(j for j in ctx if offs[j][1] > a0)
            e = next(j for j in reversed(ctx) if offs[j][0] < a1)
        enc["start_positions"].append(s)
        enc["end_positions"].append(e)
    return enc


def extract_answers(examples: datasets.Dataset, features: datasets.Dataset, start_logits: np.ndarray,
                    end_logits: np.ndarray) -> dict[str, str]:
    """The best-scoring valid span per question (start + end logit, inside the context, <= 30 tokens).

    Args:
        start_logits, end_logits: float [n_features, seq_len].

    Returns:
        question id -> answer text.
    """
    by_example = collections.defaultdict(list)
    for i, eid in enumerate(features["example_id"]):
        by_example[eid].append(i)
    offsets = features["offset_mapping"]
    answers = {}
    for ex in examples:
        best, text = -np.inf, ""
        for i in by_example[ex["id"]]:
            offs = offsets[i]
            for s in np.argsort(start_logits[i])[::-1][:N_BEST]:
                for e in np.argsort(end_logits[i])[::-1][:N_BEST]:
                    if offs[s] is None or offs[e] is None or e < s or e - s + 1 > MAX_ANSWER_TOKENS:
                        continue
                    sc = start_logits[i][s] + end_logits[i][e]
                    if sc > best:
                        best, text = sc, ex["context"][offs[s][0] : offs[e][1]]
        answers[ex["id"]] = text
    return answers


def run(ctx: EvalContext) -> list[dict[str, Any]]:
    """Fine-tune both models on the SQuAD training split under the same budget and seed; EM / F1 on the rest."""
    ds = data.squad_v1(ctx.data_dir)
    dev = ds["validation"].select(range(QUICK_EVAL)) if ctx.quick else ds["validation"]
    max_length, stride = (QUICK_MAX_LENGTH, QUICK_DOC_STRIDE) if ctx.quick else (MAX_LENGTH, DOC_STRIDE)
    tok = ctx.tokenizer()
    train = train_subset(ds["train"], ctx).map(lambda b: _features(tok, b, max_length, stride, True), batched=True,
                                               remove_columns=ds["train"].column_names)
    feats = dev.map(lambda b: _features(tok, b, max_length, stride, False), batched=True,
                    remove_columns=dev.column_names)
    test = feats.remove_columns(["example_id", "offset_mapping"])
    refs = {ex["id"]: ex["answers"]["text"] for ex in dev}
    values = {}
    for which in ("baseline", "compressed"):
        model = load_head(ctx, which, transformers.AutoModelForQuestionAnswering)
        start, end = finetune_and_predict(model, train, test, ctx, transformers.default_data_collator)
        values[which] = squad_scores(extract_answers(dev, feats, start, end), refs)
        del model
    source = data.squad_source(ctx.data_dir)
    dataset = {"id": "rajpurkar/squad", "name": "SQuAD v1.1" + (" (dev articles 25-48)" if source == "dev-split" else ""),
               "config": "plain_text", "split": "validation", "n": len(dev)}
    settings = ctx.settings | {"max_steps": ctx.max_steps, "train_features": len(train), "max_length": max_length,
                               "doc_stride": stride, "frozen_embedding": True, "train_split": source}
    return [result("squad", "squad_v1", "question-answering", dataset, m, values["baseline"][m], values["compressed"][m],
                   True, settings) for m in ("exact_match", "f1")]
