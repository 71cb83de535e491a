"""Knowledge-distillation fine-tune of a compressed token embedding (the second step of Distilled
Embedding, Lioutas et al., 2020; usable on any compressed checkpoint).

The student is the compressed model; the teacher is the uncompressed source. Only the compressed
embedding's floating-point tensors train (the input embedding and the tied output projection share them;
integer codes and every other weight stay frozen), with ``transformers.Trainer`` and the loss

    L = kd_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - kd_weight) * LM loss,

the KL averaged over token positions. The paper's KD details (output- vs embedding-level, T, weight)
are not public (../shared/docs/methods.md §3): this project uses output-level KD on the teacher's logits.

Data: real text cut into blocks of ``seq_len`` tokens. With ``--data wikipedia`` the first
:data:`hf_embcomp.evaluation.lm.LM_TOKENS` tokens (the project's perplexity evaluation slice) are never
used; the next ``heldout_tokens`` are the held-out slice on which the perplexity before / after is
reported; training blocks come after both.

CLI: ``hf-embcomp distill DIR --teacher MODEL [--data wikipedia|FILE.txt] --output OUT``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported inside the functions: `hf-embcomp --help` imports this module
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
        from . import data as data_mod

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

    from .evaluation.lm import perplexity

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


def trainable_embedding_parameters(student: torch.nn.Module) -> int:
    """Freeze everything but the compressed embedding's floating-point tensors
    (:func:`hf_embcomp.finetune.trainable_parts` ``"embedding_only"``); returns how many scalars train.

    Raises:
        ValueError: the compressed embedding has no floating-point tensor.
    """
    from .finetune import trainable_parts

    n = trainable_parts(student, "embedding_only").model_trainable
    if n == 0:
        raise ValueError("this compressed embedding has no floating-point tensor to fine-tune.")
    return n


def distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    blocks: torch.Tensor,
    *,
    temperature: float = 2.0,
    kd_weight: float = 0.5,
    batch_size: int = 4,
    max_steps: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    quiet: bool = False,
) -> list[dict[str, float]]:
    """Fine-tune the compressed embedding of ``student`` (a causal LM, in place) by KD from ``teacher``.

    Args:
        student: an hf-embcomp causal LM (``EmbCompForCausalLM``); only its compressed embedding trains.
        teacher: the uncompressed model (same vocabulary), frozen.
        blocks: int64 [n, L] training token blocks.
        temperature, kd_weight: T and the weight of the KD term (1 - kd_weight weighs the LM loss).

    Returns:
        Trainer's log history (loss, kd, lm per logging step).

    Raises:
        ValueError: vocabularies differ, or nothing to train.
    """
    import torch
    from transformers import Trainer, TrainingArguments

    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"student vocabulary {student.config.vocab_size} != teacher {teacher.config.vocab_size}.")
    trainable_embedding_parameters(student)
    teacher.eval().requires_grad_(False)
    dataset = [{"input_ids": b, "labels": b} for b in blocks]
    parts: dict[str, list[float]] = {"kd": [], "lm": []}

    class KDTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(input_ids=inputs["input_ids"], labels=inputs["labels"])
            with torch.no_grad():
                t_logits = teacher(input_ids=inputs["input_ids"].to(teacher.device)).logits.to(out.logits.device)
            kd = kd_loss(out.logits, t_logits, temperature)
            parts["kd"].append(float(kd.detach()))
            parts["lm"].append(float(out.loss.detach()))
            loss = kd_weight * kd + (1.0 - kd_weight) * out.loss
            return (loss, out) if return_outputs else loss

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch_size,
            max_steps=max_steps,
            learning_rate=lr,
            lr_scheduler_type="linear",
            warmup_steps=max(1, max_steps // 20),
            weight_decay=0.0,
            logging_steps=max(1, max_steps // 10),
            save_strategy="no",
            report_to=[],
            seed=seed,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=quiet,
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        trainer = KDTrainer(model=student, args=args, train_dataset=dataset)
        trainer.train()
    student.eval()
    history = [h for h in trainer.state.log_history if "loss" in h]
    step = max(1, max_steps // 10)
    for i, h in enumerate(history):
        lo, hi = i * step, (i + 1) * step
        h["kd"] = sum(parts["kd"][lo:hi]) / max(1, len(parts["kd"][lo:hi]))
        h["lm"] = sum(parts["lm"][lo:hi]) / max(1, len(parts["lm"][lo:hi]))
    return history


def load_compressed(path: str | Path) -> torch.nn.Module:
    """A compressed causal LM from a folder written by ``hf-embcomp compress`` (package classes, float32).

    Raises:
        ValueError: not an hf-embcomp folder, or not a causal LM.
    """
    import torch

    from .hub_code.configuration_embcomp import EmbCompConfig
    from .hub_code.modeling_embcomp import ENTRY_AUTO_CLASSES, ENTRY_CLASSES

    cfg = EmbCompConfig.from_pretrained(str(path))
    arch = (cfg.architectures or [None])[0]
    if getattr(cfg, "model_type", None) != "embcomp" or arch not in ENTRY_CLASSES:
        raise ValueError(f"{path} is not a model compressed by hf-embcomp.")
    if ENTRY_AUTO_CLASSES[arch] != "AutoModelForCausalLM":
        raise ValueError(f"distill needs a causal LM with a tied head; {path} is a {arch}.")
    return ENTRY_CLASSES[arch].from_pretrained(str(path), config=cfg, dtype=torch.float32)


def cmd_distill(args: argparse.Namespace) -> int:
    import torch

    from .cards import render_card
    from .core import fidelity
    from .evaluation.lm import needs_bos
    from .io import atomic_output_dir, attach_side_files, load_model, prepare_for_save, read_report, side_files

    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ValueError(f"output folder {out} exists and is not empty; choose another --output or pass --overwrite.")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    student = load_compressed(args.model)
    src = load_model(args.teacher, gguf_file=args.gguf_file)
    teacher, tok = src.model, src.tokenizer  # GGUF sources load as float32 already (and refuse .float())
    ids = text_tokens(tok, args.data)
    held, blocks = split_tokens(ids, args.data, args.heldout_tokens, args.seq_len)
    bos = needs_bos(tok)
    ppl_teacher = heldout_perplexity(teacher, held, args.seq_len, bos)
    ppl_before = heldout_perplexity(student, held, args.seq_len, bos)
    n_train = trainable_embedding_parameters(student)
    history = distill(student, teacher, blocks, temperature=args.temperature, kd_weight=args.kd_weight,
                      batch_size=args.batch_size, max_steps=args.max_steps, lr=args.lr, seed=args.seed,
                      quiet=args.quiet)
    ppl_after = heldout_perplexity(student, held, args.seq_len, bos)
    seconds = time.perf_counter() - t0

    report = read_report(args.model) if (Path(args.model) / "compression_report.json").is_file() else {}
    with torch.no_grad():
        e = teacher.get_input_embeddings().weight.float().cpu()
        fid = fidelity(e, student.get_compressed_embedding().reconstruct().float().cpu())
    report["distillation"] = {
        "teacher": src.label,
        "data": args.data,
        "loss": f"{args.kd_weight} * T^2 KL(teacher_T || student_T) + {1 - args.kd_weight} * LM",
        "temperature": args.temperature,
        "kd_weight": args.kd_weight,
        "steps": args.max_steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "learning_rate": args.lr,
        "train_tokens_seen": args.max_steps * args.batch_size * args.seq_len,
        "train_tokens_available": int(blocks.numel()),
        "trained_parameters": n_train,
        "heldout_tokens": int(held.numel()),
        "heldout_perplexity_teacher": ppl_teacher,
        "heldout_perplexity_before": ppl_before,
        "heldout_perplexity_after": ppl_after,
        "fidelity_after": fid,
        "seconds": round(seconds, 1),
        "log": history,
    }
    files = {k: v for k, v in side_files(Path(args.model)).items() if not k.endswith(".py")}
    files["compression_report.json"] = (json.dumps(report, indent=2) + "\n").encode()
    if "method" in report:
        files["README.md"] = render_card(student.config, report).encode()
    attach_side_files(student, files)
    prepare_for_save(student)
    with atomic_output_dir(out, overwrite=args.overwrite) as tmp:
        student.save_pretrained(tmp)
    print("\n".join([
        f"hf-embcomp distill: {args.model} -> {out}",
        f"  teacher           {report['distillation']['teacher']}",
        (f"  trained           {n_train:,} embedding parameters, {args.max_steps} steps x {args.batch_size} x "
         f"{args.seq_len} tokens"),
        f"  held-out ppl      {ppl_before:.2f} -> {ppl_after:.2f} (teacher {ppl_teacher:.2f}; {held.numel()} tokens)",
        f"  row cosine        mean {fid['row_cosine_mean']:.4f} vs the teacher's embedding",
        f"  time              {seconds:.0f}s",
    ]))
    return 0


def register(subparsers: Any) -> None:
    """Add the ``distill`` sub-command."""
    p = subparsers.add_parser("distill", help="fine-tune a compressed embedding by knowledge distillation from its teacher")
    p.add_argument("model", help="compressed model folder (from hf-embcomp compress; a causal LM)")
    p.add_argument("--teacher", required=True, help="the uncompressed source: folder, Hub id or .gguf file")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --teacher")
    p.add_argument("--data", default="wikipedia",
                   help="'wikipedia' (gensim articles; the first 20,000 tokens, the evaluation slice, are never "
                        "used) or a UTF-8 text file")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--temperature", type=float, default=2.0, help="KD temperature T (default 2)")
    p.add_argument("--kd-weight", type=float, default=0.5, help="weight of the KD term; 1 - it weighs the LM loss")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training block and eval window")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--heldout-tokens", type=int, default=4096, help="held-out tokens for the before/after perplexity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_distill)
