"""Knowledge distillation from the uncompressed teacher: the training step of ``hf-embcomp recover``
(:mod:`hf_embcomp.training.recover`) and the second step of Distilled Embedding (Lioutas et al., 2020).

The student is the compressed model; the teacher is the uncompressed source. Whatever has ``requires_grad``
trains (recovery chooses: the compressed embedding's real-valued tensors, LoRA adapters on the backbone);
integer codes are buffers and never train. ``transformers.Trainer`` runs the loop with the loss

- causal LM: ``kd_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - kd_weight) * LM loss``,
  the KL averaged over token positions (output-level KD on the teacher's logits; the paper's KD details are not
  public, ../shared/docs/methods.md §3);
- encoder: the mean squared error between the student's and the teacher's last hidden states, per coordinate.

Data: real text cut into blocks of ``seq_len`` tokens. With ``--data wikipedia`` the first
:data:`hf_embcomp.evaluation.lm.LM_TOKENS` tokens (the project's perplexity evaluation slice) are never
used; the next ``heldout_tokens`` are the held-out slice on which the score before / after is
reported; training blocks come after both.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported inside the functions: `hf-embcomp --help` imports the CLI module
    import torch

logger = logging.getLogger(__name__)

SKIPPED_EVAL_TOKENS = 20_000
"""Leading Wikipedia tokens never trained on (= ``hf_embcomp.evaluation.lm.LM_TOKENS``, the test slice)."""


def text_tokens(tokenizer: Any, data: str) -> torch.Tensor:
    """Token ids (int64 [N], no special tokens) of ``data``: ``"wikipedia"`` or a UTF-8 text file path.

    Raises:
        ValueError: the path does not exist or holds too little text.
    """
    import torch

    if data == "wikipedia":
        from .. import data as data_mod

        text = data_mod.wiki_text()
    else:
        p = Path(data)
        if not p.is_file():
            raise ValueError(f"--data {data}: not 'wikipedia' and not a text file.")
        text = p.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def split_tokens(ids: torch.Tensor, data: str, heldout_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out ids, training blocks int64 [n, seq_len]); skips the evaluation slice for Wikipedia.

    Raises:
        ValueError: not enough text for one training block after the held-out slice.
    """
    skip = SKIPPED_EVAL_TOKENS if data == "wikipedia" else 0
    if ids.numel() < skip + heldout_tokens + 2 * seq_len:
        skip = 0  # a short corpus (tests): keep a held-out slice and train on the rest
    held = ids[skip : skip + heldout_tokens]
    rest = ids[skip + heldout_tokens :]
    n = rest.numel() // seq_len
    if n < 1:
        raise ValueError(f"not enough text: {ids.numel()} tokens for a held-out slice of {heldout_tokens} and "
                         f"blocks of {seq_len}; lower --heldout-tokens or --seq-len.")
    return held, rest[: n * seq_len].reshape(n, seq_len)


def heldout_perplexity(model: torch.nn.Module, ids: torch.Tensor, window: int, bos_id: int | None = None) -> float:
    """Causal-LM perplexity of ``ids`` in strided windows (:func:`hf_embcomp.evaluation.lm.perplexity`)."""
    import torch

    from ..evaluation.lm import perplexity

    was = model.training
    model.eval()
    with torch.no_grad():
        ppl, _, _ = perplexity(model, ids, window=window, stride=max(1, window // 2), bos_id=bos_id,
                               desc="held-out ppl")
    model.train(was)
    return ppl


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), summed over the vocabulary and averaged over positions."""
    import torch.nn.functional as F

    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, v).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, v).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean squared error per coordinate between float [B, L, d] last hidden states (the encoder KD loss)."""
    return (student_hidden.float() - teacher_hidden.float()).pow(2).mean()


def distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    blocks: torch.Tensor,
    *,
    temperature: float = 2.0,
    kd_weight: float = 0.5,
    batch_size: int = 4,
    max_steps: int = 100,
    max_seconds: float | None = None,
    lr: float = 1e-3,
    param_groups: list[dict[str, Any]] | None = None,
    seed: int = 0,
    quiet: bool = False,
) -> list[dict[str, float]]:
    """Train whatever ``requires_grad`` in ``student`` (in place) by KD from ``teacher`` (module docstring).

    Args:
        student: an hf-embcomp model (a causal LM or an encoder); set what trains before calling
            (:func:`hf_embcomp.training.parts.trainable_parts`, LoRA adapters).
        teacher: the uncompressed model (same vocabulary), frozen.
        blocks: int64 [n, L] training token blocks.
        temperature, kd_weight: T and the weight of the KD term (1 - kd_weight weighs the LM loss); causal only.
        max_steps: optimiser steps (the linear schedule's length).
        max_seconds: stop after this much wall time (seconds) even if fewer steps ran; None: no limit.
        lr: AdamW learning rate (linear decay, 5 % warm-up) of every trainable parameter, unless
        param_groups: AdamW parameter groups (``{"params": [...], "lr": ...}``) that set each group's own rate;
            they must cover every trainable parameter.

    Returns:
        Trainer's log history (loss, kd, lm per logging step; ``step`` the last step of each).

    Raises:
        ValueError: vocabularies differ, or nothing trains.
    """
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"student vocabulary {student.config.vocab_size} != teacher {teacher.config.vocab_size}.")
    if not any(p.requires_grad for p in student.parameters()):
        raise ValueError("nothing to train: no parameter of the student has requires_grad.")
    teacher.eval().requires_grad_(False)
    causal = teacher.get_output_embeddings() is not None
    dataset = [{"input_ids": b, "labels": b} for b in blocks]
    parts: dict[str, list[float]] = {"kd": [], "lm": []}

    class KDTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]
            if causal:
                out = model(input_ids=ids, labels=inputs["labels"])
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids.to(teacher.device)).logits.to(out.logits.device)
                kd = kd_loss(out.logits, t_logits, temperature)
                lm = out.loss
                loss = kd_weight * kd + (1.0 - kd_weight) * lm
            else:
                out = model(input_ids=ids, output_hidden_states=True)
                with torch.no_grad():
                    t_h = teacher(input_ids=ids.to(teacher.device), output_hidden_states=True).hidden_states[-1]
                kd = loss = hidden_mse(out.hidden_states[-1], t_h.to(out.hidden_states[-1].device))
                lm = torch.zeros(())
            parts["kd"].append(float(kd.detach()))
            parts["lm"].append(float(lm.detach()))
            return (loss, out) if return_outputs else loss

    class TimeBudget(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if max_seconds is not None and time.perf_counter() - self.t0 > max_seconds:
                logger.info("time budget of %.0f s reached after %d steps", max_seconds, state.global_step)
                control.should_training_stop = True
            return control

    logging_steps = max(1, max_steps // 10)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch_size,
            max_steps=max_steps,
            learning_rate=lr,
            lr_scheduler_type="linear",
            warmup_steps=max(1, max_steps // 20),
            weight_decay=0.0,
            logging_steps=logging_steps,
            save_strategy="no",
            report_to=[],
            seed=seed,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=quiet,
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        optimizers = (None, None)
        if param_groups is not None:
            covered = {id(p) for g in param_groups for p in g["params"]}
            missing = [n for n, p in student.named_parameters() if p.requires_grad and id(p) not in covered]
            if missing:
                raise ValueError(f"param_groups leave trainable parameters out: {missing[:3]} ...")
            optimizers = (torch.optim.AdamW(param_groups, lr=lr, weight_decay=0.0), None)
        trainer = KDTrainer(model=student, args=args, train_dataset=dataset, callbacks=[TimeBudget()],
                            optimizers=optimizers)
        if quiet:  # without tqdm, Trainer prints every log dict instead
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        trainer.train()
    student.eval()
    history = [h for h in trainer.state.log_history if "loss" in h]
    for i, h in enumerate(history):
        lo, hi = i * logging_steps, (i + 1) * logging_steps
        h["kd"] = sum(parts["kd"][lo:hi]) / max(1, len(parts["kd"][lo:hi]))
        h["lm"] = sum(parts["lm"][lo:hi]) / max(1, len(parts["lm"][lo:hi]))
    if not history and parts["kd"]:  # stopped by the time budget before the first log
        history = [{"step": len(parts["kd"]), "kd": sum(parts["kd"]) / len(parts["kd"]),
                    "lm": sum(parts["lm"]) / len(parts["lm"])}]
    return history


def steps_run(history: list[dict[str, float]], max_steps: int) -> int:
    """Optimiser steps a :func:`distill` run made (fewer than ``max_steps`` when the time budget stopped it)."""
    return int(max((h.get("step", 0) for h in history), default=0)) or max_steps


def load_compressed(path: str | Path) -> torch.nn.Module:
    """A compressed model (causal LM or encoder) from a folder written by hf-embcomp, package classes, float32.

    Raises:
        ValueError: not an hf-embcomp folder.
    """
    import torch

    from ..hub_code.configuration_embcomp import EmbCompConfig
    from ..hub_code.modeling_embcomp import ENTRY_CLASSES

    cfg = EmbCompConfig.from_pretrained(str(path))
    arch = (cfg.architectures or [None])[0]
    if getattr(cfg, "model_type", None) != "embcomp" or arch not in ENTRY_CLASSES:
        raise ValueError(f"{path} is not a model compressed by hf-embcomp; compress it first (hf-embcomp compress).")
    return ENTRY_CLASSES[arch].from_pretrained(str(path), config=cfg, dtype=torch.float32)
