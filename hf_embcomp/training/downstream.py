"""The step-budgeted fine-tune shared by the GLUE and SQuAD suites (``transformers.Trainer``)."""

from __future__ import annotations

import logging
import tempfile
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import transformers

if TYPE_CHECKING:  # the evaluation suites call in here; no import back at run time
    from ..evaluation.context import EvalContext

logger = logging.getLogger(__name__)

BATCH_SIZE = 16
LEARNING_RATE = 1e-4
"""Adam learning rate of every fine-tune (linear decay, 10 % warm-up): high enough to learn something in a
few hundred steps, the same for the baseline and the compressed model."""


def load_head(ctx: EvalContext, which: str, auto_class: type, **kwargs: Any) -> transformers.PreTrainedModel:
    """Load a model with a fresh task head, seeded so both models start their head from the same seed,
    with the input token embedding frozen (``requires_grad=False``) - for the compressed model that keeps
    it compressed; the baseline's is frozen too so both fine-tunes train the same parameters."""
    transformers.set_seed(ctx.seed)
    tok = ctx.tokenizer()
    model = ctx.load(which, auto_class, pad_token_id=tok.pad_token_id, **kwargs)
    model.get_input_embeddings().requires_grad_(False)
    return model


def train_subset(ds: datasets.Dataset, ctx: EvalContext) -> datasets.Dataset:
    """The examples a fine-tune can see within its budget: a fixed-seed shuffle, first max_steps x batch."""
    return ds.shuffle(seed=ctx.seed).select(range(min(len(ds), ctx.max_steps * BATCH_SIZE)))


def finetune_and_predict(
    model: transformers.PreTrainedModel,
    train: datasets.Dataset,
    test: datasets.Dataset,
    ctx: EvalContext,
    collator: Any = None,
) -> Any:
    """Fine-tune ``model`` for ``ctx.max_steps`` steps on ``train`` (tokenized), then predict ``test``.

    Returns:
        ``Trainer.predict(test).predictions`` (numpy array or tuple of arrays, as the head returns).
    """
    with tempfile.TemporaryDirectory(prefix="hf-embcomp-ft-") as out:
        args = transformers.TrainingArguments(
            output_dir=out,
            max_steps=ctx.max_steps,
            per_device_train_batch_size=BATCH_SIZE,
            per_device_eval_batch_size=64,
            learning_rate=LEARNING_RATE,
            warmup_steps=0.1,
            seed=ctx.seed,
            data_seed=ctx.seed,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            eval_strategy="no",
            use_cpu=ctx.device == "cpu",
            dataloader_num_workers=0,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=train, processing_class=ctx.tokenizer(),
                                       data_collator=collator)
        trainer.train()
        pred = trainer.predict(test).predictions
    return pred if isinstance(pred, tuple) else np.asarray(pred)
