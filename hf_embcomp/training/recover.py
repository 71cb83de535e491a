"""Recovery: a short knowledge-distillation fine-tune of a compressed model from its uncompressed teacher,
after any method, that keeps the result only if held-out text says it is better.

What trains (the stored format and bytes never change):

- the compressed embedding's real-valued tensors (LightToken's decoder, GPTQ's group scales and minimums, SVD's
  factors ...); integer codes are buffers and stay fixed;
- optionally (``lora_rank > 0``) LoRA adapters (Hu et al., 2021, through ``peft``) on every ``nn.Linear`` of the
  backbone, merged back into the backbone's weights at the end, so the saved model has the source's layout and
  size and needs no peft to load.

The lifecycle (:func:`recover`): score the student on held-out text -> snapshot its weights -> (wrap LoRA) ->
distil (:func:`hf_embcomp.training.distill.distill`, step and time budgets) -> (merge LoRA) -> score again ->
keep the better of the two. The held-out score is the causal LM's perplexity (lower is better) or, for an
encoder, the mean cosine of its mean-pooled last hidden states to the teacher's (higher is better), on text
the training never sees (:func:`hf_embcomp.training.distill.split_tokens`).

CLI: ``hf-embcomp recover DIR --teacher MODEL -o OUT`` (:mod:`hf_embcomp.training.cli`).

Tried and not kept (SmolLM2 gptq 25x, LoRA rank 8, relative lr 1e-2, LoRA lr 5e-4, 4 x 128-token blocks; held-out
perplexity 36.61 before, teacher 23.28):

- bfloat16 autocast (an AMX CPU): 60 steps 210.6 s -> 180.5 s, held-out 34.30 -> 34.23. A bare forward + backward
  halves, but a recovery step does not (bf16 flash-attention backward, casts and the compressed embedding's gather
  backward stay); 15 % did not earn a flag.
- a head-side refit first (the embedding's real-valued tensors fitted to KL(softmax(h E^T) || softmax(h E_hat^T))
  on 32,768 cached hidden states of the head, plus 10 x the relative squared error of the input rows; 300 steps,
  3.4 min): 36.61 -> 34.33 on its own, 34.07 after 60 recovery steps more (7.2 min in all), against 33.47 for
  120 recovery steps (7.3 min). Without the input term the refit makes the model worse (first 4,096 Wikipedia
  tokens 32.82 -> 38.68): a tied row is also the first layer's input.
- encoders (all-MiniLM-L6-v2, lighttoken 100x, STS-B dev 84.72 before; 180 s, embedding only): the per-token
  hidden-state MSE used here 84.03, the MSE of normalised mean-pooled embeddings 84.55, that plus matching the
  batch's cosine-similarity matrix 84.57 - no loss tried raises STS-B at 100x.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..auto import Probe
from ..hub_code.embcomp_body import ggml_modules
from .distill import distill, steps_run
from .parts import compressed_embedding, trainable_parts
from .refit import relative_lr_groups

logger = logging.getLogger(__name__)


@dataclass
class RecoveryResult:
    """What :func:`recover` did.

    Attributes:
        kept: ``"recovered"`` (the fine-tuned weights are in the model) or ``"original"`` (the fine-tune did not
            beat the model on held-out text; its weights were restored bit for bit).
        metric: ``"held-out perplexity"`` (lower is better) or ``"held-out sentence cosine"`` (higher is better).
        before, after, teacher: the held-out score of the student before and after the fine-tune, and the teacher's.
        steps: optimiser steps run; ``max_steps`` unless the time budget stopped it earlier.
        trained_parameters: scalars that trained (embedding tensors + LoRA adapters).
        lora_rank: LoRA rank on the backbone (0: none).
        seconds: wall time of the fine-tune (scoring excluded).
        log: the trainer's loss history.
    """

    kept: str
    metric: str
    before: float
    after: float
    teacher: float
    steps: int
    trained_parameters: int
    lora_rank: int
    seconds: float
    heldout_tokens: int
    log: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def lora_targets(model: nn.Module) -> list[str]:
    """Full names of the backbone's ``nn.Linear`` modules (the compressed embedding's own excluded)."""
    emb = compressed_embedding(model)
    inside = {id(m) for m in emb.modules()}
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in inside]


def embedding_groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """AdamW groups for the compressed embedding's trainable tensors: one per tensor, learning rate
    ``lr * RMS(tensor)`` (a relative step size; a zero tensor gets ``lr``)."""
    return relative_lr_groups([p for p in compressed_embedding(model).parameters() if p.requires_grad], lr)


def _wrap_lora(model: nn.Module, rank: int, seed: int) -> nn.Module:
    """``model`` with LoRA adapters of ``rank`` on :func:`lora_targets` (peft); only the adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - peft is in the train / test extras
        raise ImportError("LoRA recovery needs peft: pip install 'hf-embcomp[train]' (or pass --lora-rank 0).") from e
    targets = lora_targets(model)
    if not targets:
        raise ValueError("the backbone has no nn.Linear layer to put LoRA adapters on; pass --lora-rank 0.")
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, bias="none")
    return get_peft_model(model, cfg)


def recover(
    student: nn.Module,
    teacher: nn.Module,
    blocks: torch.Tensor,
    heldout: torch.Tensor,
    *,
    lora_rank: int = 0,
    train_embedding: bool = True,
    max_steps: int = 200,
    max_seconds: float | None = None,
    lr: float = 1e-3,
    lora_lr: float = 1e-4,
    batch_size: int = 4,
    temperature: float = 2.0,
    kd_weight: float = 0.5,
    eval_window: int = 512,
    bos_id: int | None = None,
    seed: int = 0,
    quiet: bool = False,
) -> RecoveryResult:
    """Fine-tune ``student`` (in place) by KD from ``teacher`` and keep the result only if it scores better on
    ``heldout`` (module docstring).

    Args:
        student: an hf-embcomp model (causal LM or encoder), float32, on the teacher's device.
        teacher: the uncompressed source model (same vocabulary), frozen.
        blocks: int64 [n, L] training token blocks (never overlapping ``heldout``).
        heldout: int64 [N] held-out token ids.
        lora_rank: rank of LoRA adapters on the backbone's linear layers, merged back at the end (0: none).
        train_embedding: train the compressed embedding's real-valued tensors.
        max_steps, max_seconds: step budget (the schedule's length) and wall-time budget in seconds.
        lr: the compressed embedding's step size relative to each tensor's magnitude: AdamW with learning rate
            ``lr * RMS(tensor)`` per tensor (a group scale of 0.01 and one of 1 both move ~lr of their size per
            step); linear decay, 5 % warm-up.
        lora_lr: AdamW learning rate of the LoRA adapters.
        eval_window: tokens per window of the held-out perplexity (``bos_id`` first when given).

    Returns:
        A :class:`RecoveryResult`; the student holds the kept weights, in eval mode.

    Raises:
        ValueError: nothing would train (``lora_rank`` 0 and no real-valued embedding tensor, or
            ``train_embedding`` False), vocabularies differ, or ``lora_rank`` < 0.
    """
    if lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0, got {lora_rank}.")
    held = Probe(teacher, ids=heldout, bos_id=bos_id, label="held-out", window=eval_window)
    score_teacher = held.score(teacher)
    before = held.score(student)
    snapshot = {k: v.detach().clone() for k, v in student.state_dict().items()}
    emb_flag = compressed_embedding(student).trainable

    parts = trainable_parts(student, "embedding_only")
    if not train_embedding:
        student.requires_grad_(False)
    if lora_rank == 0 and (not train_embedding or parts.model_trainable == 0):
        raise ValueError("nothing to train: this compressed embedding has no real-valued tensor (or "
                         "--no-embedding was given); pass --lora-rank R to train LoRA adapters on the backbone.")
    model = _wrap_lora(student, lora_rank, seed) if lora_rank else student
    if lora_rank and train_embedding:  # peft froze everything but its adapters
        for p in compressed_embedding(student).parameters():
            p.requires_grad_(p.is_floating_point())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    groups = embedding_groups(student, lr)
    in_emb = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_emb]
    groups += [{"params": rest, "lr": lora_lr}] if rest else []

    t0 = time.perf_counter()
    log = distill(model, teacher, blocks, temperature=temperature, kd_weight=kd_weight, batch_size=batch_size,
                  max_steps=max_steps, max_seconds=max_seconds, lr=lora_lr, param_groups=groups, seed=seed,
                  quiet=quiet)
    seconds = time.perf_counter() - t0
    if lora_rank:
        model.merge_and_unload()  # the adapters are folded into the backbone's weights, in place
    student.requires_grad_(False)
    after = held.score(student)

    kept = "recovered"
    if not held.better(after, before):
        student.load_state_dict(snapshot)
        kept = "original"
        logger.warning("recovery did not improve the %s (%.4g -> %.4g): the original weights are kept.",
                       held.metric, before, after)
    elif lora_rank and any(not m.matches_blocks() for m in ggml_modules(student).values()):
        student.dequantize_body()  # the merged adapters changed a body kept as GGUF blocks: plain Linear layers now
        logger.warning("the merged LoRA adapters changed the body kept as GGUF blocks: it is dense now (saved in the "
                       "model's dtype).")
    compressed_embedding(student).set_trainable(emb_flag)
    student.eval()
    return RecoveryResult(kept=kept, metric=held.metric, before=before, after=after, teacher=score_teacher,
                          steps=steps_run(log, max_steps), trained_parameters=n_train, lora_rank=lora_rank,
                          seconds=round(seconds, 1), heldout_tokens=int(heldout.numel()), log=log)
