"""``hf-embcomp recover`` (alias ``distill``): recovery after any method (:mod:`hf_embcomp.training.recover`).

Loads the compressed folder and its uncompressed teacher, fine-tunes, and writes a new folder only with the
better model: the recovered one, or the original unchanged when held-out text says the fine-tune did not help
(the command says which). ``compression_report.json`` gets a ``recovery`` entry; stored bytes never change.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def _stored_dtype(folder: Path) -> str | None:
    """The ``dtype`` config.json records for the saved body (None if not recorded)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("dtype")
    except (OSError, ValueError):
        return None


def cmd_recover(args: argparse.Namespace) -> int:
    import torch

    from ..body import state_dict_bytes
    from ..cards import render_card
    from ..core import fidelity
    from ..evaluation.lm import needs_bos
    from ..hub_code.embcomp_body import ggml_modules
    from ..io import atomic_output_dir, attach_side_files, load_model, prepare_for_save, read_report, side_files
    from ..progress import quiet as quiet_progress
    from .distill import load_compressed, split_tokens, text_tokens
    from .recover import recover

    out, folder = Path(args.output), Path(args.model)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ValueError(f"output folder {out} exists and is not empty; choose another --output or pass --overwrite.")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes}.")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    body_dtype = _stored_dtype(folder)
    with quiet_progress(args.quiet):
        student = load_compressed(folder)
        blocks_before = len(ggml_modules(student))
        src = load_model(args.teacher, gguf_file=args.gguf_file)
        teacher, tok = src.model, src.tokenizer  # GGUF sources load as float32 already (and refuse .float())
        ids = text_tokens(tok, args.data)
        held, blocks = split_tokens(ids, args.data, args.heldout_tokens, args.seq_len)
        bos = needs_bos(tok) if teacher.get_output_embeddings() is not None else None
        res = recover(student, teacher, blocks, held, lora_rank=args.lora_rank, train_embedding=not args.no_embedding,
                      max_steps=args.max_steps, max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
                      lr=args.lr, lora_lr=args.lora_lr, batch_size=args.batch_size, temperature=args.temperature, kd_weight=args.kd_weight,
                      eval_window=args.eval_window, bos_id=bos, seed=args.seed, quiet=args.quiet)
    report = read_report(folder) if (folder / "compression_report.json").is_file() else {}
    with torch.no_grad():
        e = teacher.get_input_embeddings().weight.float().cpu()
        fid = fidelity(e, student.get_compressed_embedding().reconstruct().float().cpu())
    report["recovery"] = {
        "teacher": src.label,
        "data": args.data,
        "loss": (f"{args.kd_weight} * T^2 KL(teacher_T || student_T) + {1 - args.kd_weight} * LM"
                 if res.metric == "held-out perplexity" else "MSE of the last hidden states"),
        "temperature": args.temperature,
        "kd_weight": args.kd_weight,
        "trained": (["compressed embedding (real-valued tensors)"] if not args.no_embedding else [])
                   + ([f"LoRA rank {args.lora_rank} on the backbone's linear layers, merged"] if args.lora_rank else []),
        "max_steps": args.max_steps,
        "max_minutes": args.max_minutes,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "embedding_relative_lr": args.lr,
        "lora_lr": args.lora_lr if args.lora_rank else None,
        "train_tokens_seen": res.steps * args.batch_size * args.seq_len,
        "train_tokens_available": int(blocks.numel()),
        **{k: v for k, v in res.as_dict().items() if k != "log"},
        "fidelity_after": fid,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "log": res.log,
    }
    # A body kept as GGUF blocks that the merged LoRA changed is dense after recover (dequantize_body): saved in
    # bfloat16, the precision class hf-embcomp gives a quantised GGUF body it cannot keep as blocks.
    changed = blocks_before and not ggml_modules(student)
    if changed:
        body_dtype = "bfloat16"
        report["recovery"]["body"] = (f"the {blocks_before} linear layers kept as GGUF blocks were changed by the "
                                      "merged LoRA: the body is saved dense in bfloat16")
    if body_dtype and body_dtype != "float32":
        student.to(getattr(torch, body_dtype))  # the body is saved in the precision it came in
    if changed and report.get("model_bytes"):
        stored = state_dict_bytes(student)
        report.update(body_dtype="bfloat16", body_format=None, model_bytes=stored,
                      model_compression_ratio=report["source_model_bytes"] / stored)
    files = {k: v for k, v in side_files(folder).items() if not k.endswith(".py")}
    files["compression_report.json"] = (json.dumps(report, indent=2) + "\n").encode()
    if "method" in report:
        files["README.md"] = render_card(student.config, report).encode()
    attach_side_files(student, files)
    prepare_for_save(student)
    with atomic_output_dir(out, overwrite=args.overwrite) as tmp:
        student.save_pretrained(tmp)
    verdict = ("recovered" if res.kept == "recovered" else
               "the fine-tune did not improve it: the ORIGINAL weights were saved unchanged")
    print("\n".join([
        f"hf-embcomp recover: {folder} -> {out}",
        f"  teacher           {src.label}",
        (f"  trained           {res.trained_parameters:,} parameters, {res.steps} steps x {args.batch_size} x "
         f"{args.seq_len} tokens in {res.seconds:.0f}s"),
        f"  {res.metric:<17} {res.before:.4g} -> {res.after:.4g} (teacher {res.teacher:.4g}; {res.heldout_tokens} tokens)",
        f"  kept              {verdict}",
        *([f"  body              {report['recovery']['body']}"] if changed else []),
        f"  row cosine        mean {fid['row_cosine_mean']:.4f} vs the teacher's embedding",
    ]))
    return 0


def register(subparsers: Any) -> None:
    """Add the ``recover`` sub-command (alias ``distill``)."""
    p = subparsers.add_parser(
        "recover", aliases=["distill"],
        help="recover quality after compression: knowledge distillation from the uncompressed teacher, kept only if "
             "held-out text improves")
    p.add_argument("model", help="compressed model folder (from hf-embcomp compress; causal LM or encoder)")
    p.add_argument("--teacher", required=True, help="the uncompressed source: folder, Hub id or .gguf file")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --teacher")
    p.add_argument("--data", default="wikipedia",
                   help="'wikipedia' (gensim articles; the first 20,000 tokens, the evaluation slice, are never "
                        "used) or a UTF-8 text file")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="also train LoRA adapters of this rank on the backbone's linear layers, merged back at the "
                        "end (default 0: the compressed embedding only)")
    p.add_argument("--no-embedding", action="store_true",
                   help="keep the compressed embedding's tensors fixed (train LoRA adapters only)")
    p.add_argument("--temperature", type=float, default=2.0, help="KD temperature T (default 2)")
    p.add_argument("--kd-weight", type=float, default=0.5, help="weight of the KD term; 1 - it weighs the LM loss")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training block (default 128)")
    p.add_argument("--eval-window", type=int, default=512, help="tokens per window of the held-out perplexity")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=200, help="optimiser steps (the schedule's length; default 200)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this many minutes of training")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="step size of the compressed embedding's tensors relative to their magnitude (AdamW at "
                        "lr x RMS of each tensor; default 1e-3)")
    p.add_argument("--lora-lr", type=float, default=1e-4, help="AdamW learning rate of the LoRA adapters (default 1e-4)")
    p.add_argument("--heldout-tokens", type=int, default=4096, help="held-out tokens for the before/after score")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_recover)
