"""Fine-tune all-MiniLM-L6-v2 on SST-2 with transformers.Trainer: uncompressed vs 25x-compressed token embedding.

Both models get the same steps, seed, data order, learning rate and task-head initialisation; both keep
their token embedding frozen (the compressed one is frozen by default; pass --train-embeddings to train
the dense one and the compressed one's real-valued parts instead). The compressed model is loaded from
its saved folder with ``trust_remote_code=True`` exactly as a Hub user would, and its fine-tuned
checkpoint is checked to store the same embedding bytes as before training.

    python examples/finetune_glue_with_trainer.py --steps 300
    python examples/finetune_glue_with_trainer.py --steps 2 --train-limit 32 --eval-limit 32   # smoke test

Data: SST-2 (GLUE) from ../shared/data/glue (or --data-dir; the Hub's nyu-mll/glue where a network exists).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

import hf_embcomp
from hf_embcomp.data import glue_task
from hf_embcomp.training.parts import stored_embedding
from hf_embcomp.io import read_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimiser steps for each model (default 300)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=64, help="max tokens per sentence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratio", type=float, default=25.0, help="compression ratio vs fp32 (default 25)")
    p.add_argument("--method", default=None,
                   help="compression method (default: lighttoken if registered, else svd)")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                   help="method hyper-parameter override, e.g. --hp epochs=2 (JSON values)")
    p.add_argument("--train-limit", type=int, default=None, help="use at most this many training sentences")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N dev sentences (default all 872)")
    p.add_argument("--train-embeddings", action="store_true",
                   help="also train the token embeddings (dense: its weight; compressed: its real-valued parts)")
    p.add_argument("--data-dir", default=None, help="folder holding glue/SST-2/{train,dev}.tsv")
    p.add_argument("--output-dir", default="sst2-embcomp", help="where the models and results.json are written")
    p.add_argument("--compressed-dir", default=None,
                   help="reuse a compressed MiniLM folder (e.g. from an earlier run) instead of compressing again")
    return p.parse_args(argv)


def hyperparameters(items: list[str]) -> dict:
    out = {}
    for item in items:
        k, _, v = item.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def finetune(name: str, path: Path, remote: bool, tokenizer, train, dev, args: argparse.Namespace,
             out: Path) -> tuple[float, transformers.PreTrainedModel, Trainer]:
    """Load ``path`` with a fresh 2-way head (seeded), train ``args.steps`` steps, return dev accuracy."""
    transformers.set_seed(args.seed)  # same head initialisation for both models
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, trust_remote_code=remote)
    if hf_embcomp.is_compressed(model):
        hf_embcomp.trainable_parts(model, "real" if args.train_embeddings else "none")
    else:
        model.get_input_embeddings().requires_grad_(args.train_embeddings)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    targs = TrainingArguments(
        output_dir=str(out / f"{name}-trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64, learning_rate=args.lr, warmup_steps=0.1, weight_decay=0.01, seed=args.seed,
        data_seed=args.seed, report_to="none", save_strategy="no", logging_steps=max(1, args.steps // 5),
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer))
    t0 = time.perf_counter()
    trainer.train()
    logits = trainer.predict(dev).predictions
    acc = float((np.argmax(logits, axis=-1) == np.asarray(dev["label"])).mean())
    print(f"{name:>12}: dev accuracy {acc:.4f}  ({n_train:,} trainable parameters, {time.perf_counter() - t0:.0f}s)")
    return acc, model, trainer


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    method = args.method or ("lighttoken" if "lighttoken" in hf_embcomp.METHODS else "svd")

    # 1. the source model (the embedded all-MiniLM-L6-v2) and its compressed version, saved as a Hub repo
    src = hf_embcomp.load_model(None)
    tok = src.tokenizer
    if args.compressed_dir:
        compressed_dir = Path(args.compressed_dir)
        small = transformers.AutoModel.from_pretrained(compressed_dir, trust_remote_code=True)
        rep = read_report(compressed_dir)
        method = rep["method"]
    else:
        compressed_dir = out / f"minilm-{method}-{args.ratio:g}x"
        small = hf_embcomp.compress(src.model, method, args.ratio, tokenizer=tok, source_folder=str(src.folder),
                                    **hyperparameters(args.hp))
        hf_embcomp.save_compressed(small, compressed_dir, overwrite=True)
        rep = small.compression_report
    print(f"compressed with {method} {json.dumps(rep['hyperparameters'])}: {rep['compression_ratio']:.1f}x, "
          f"row cosine {rep['fidelity']['row_cosine_mean']:.4f}")
    before = stored_embedding(compressed_dir, small)

    # 2. the same SST-2 data, in the same order, for both models
    ds = glue_task("sst2", args.data_dir)
    train = ds["train"].shuffle(seed=args.seed)
    train = train.select(range(min(len(train), args.train_limit or args.steps * args.batch_size)))
    dev = ds["validation"]
    if args.eval_limit:
        dev = dev.select(range(min(len(dev), args.eval_limit)))
    def enc(batch: dict) -> dict:
        return tok(batch["sentence"], truncation=True, max_length=args.max_length)

    train = train.map(enc, batched=True, remove_columns=["sentence"])
    dev = dev.map(enc, batched=True, remove_columns=["sentence"])

    # 3. fine-tune both under the same budget
    acc_dense, _, _ = finetune("uncompressed", src.folder, False, tok, train, dev, args, out)
    acc_small, model, trainer = finetune(f"{method} {rep['compression_ratio']:.0f}x", compressed_dir, True, tok, train,
                                         dev, args, out)

    # 4. the fine-tuned compressed checkpoint: still compressed, same stored embedding
    finetuned_dir = out / f"minilm-{method}-{args.ratio:g}x-sst2"
    trainer.save_model(str(finetuned_dir))
    after = stored_embedding(finetuned_dir, model)
    same_layout = {k: v[:3] for k, v in before.items()} == {k: v[:3] for k, v in after.items()}
    same_bytes = before == after
    print(f"fine-tuned checkpoint {finetuned_dir}: embedding layout unchanged {same_layout}, "
          f"bytes unchanged {same_bytes} ({sum(v[2] for v in after.values()):,} bytes)")
    result = {
        "task": "sst2", "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "train_examples": len(train), "dev_examples": len(dev), "method": method,
        "compression_ratio": rep["compression_ratio"], "hyperparameters": rep["hyperparameters"],
        "train_embeddings": args.train_embeddings, "accuracy_uncompressed": acc_dense,
        "accuracy_compressed": acc_small, "embedding_layout_unchanged": same_layout,
        "embedding_bytes_unchanged": same_bytes, "finetuned_dir": str(finetuned_dir),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"SST-2 dev accuracy after {args.steps} steps: uncompressed {acc_dense:.4f}, "
          f"{method} {rep['compression_ratio']:.1f}x {acc_small:.4f} ({acc_small - acc_dense:+.4f})")
    return result


if __name__ == "__main__":
    main()
