"""Compress a model's token embedding, save it as a Hub repository, reload it as a user would, and evaluate.

Evaluation (quick, offline): embedding fidelity (row cosine, relative Frobenius error), and for the
sentence encoder the agreement of mean-pooled sentence embeddings with the uncompressed model plus a
logistic-regression sentiment probe on SST-2 sentences (frozen embeddings) for both models.

    python examples/compress_and_evaluate.py                                  # MiniLM, SVD 8x
    python examples/compress_and_evaluate.py --method lighttoken --ratio 25 --hp epochs=3
    python examples/compress_and_evaluate.py --n-train 64 --n-test 32         # smoke test

For the full evaluation suites (GLUE fine-tunes, SQuAD, perplexity) use ``hf-embcomp evaluate``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from transformers import AutoModel

import hf_embcomp
from hf_embcomp.data import glue_task


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local folder or Hub id (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--method", default="svd", help=f"one of {sorted(hf_embcomp.METHODS)} (default svd)")
    p.add_argument("--ratio", type=float, default=8.0, help="compression ratio vs fp32 (default 8)")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="method hyper-parameter (JSON value)")
    p.add_argument("--n-train", type=int, default=2000, help="SST-2 train sentences for the probe")
    p.add_argument("--n-test", type=int, default=872, help="SST-2 dev sentences for the probe and the agreement")
    p.add_argument("--output-dir", default="compressed-model", help="where the compressed repository is written")
    return p.parse_args(argv)


@torch.no_grad()
def encode(model: torch.nn.Module, tokenizer, sentences: list[str], batch_size: int = 64) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings, float32 [N, hidden]."""
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).float())
    return torch.cat(out).numpy()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    hp = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.hp)}
    src = hf_embcomp.load_model(args.model)
    small = hf_embcomp.compress(src.model, args.method, args.ratio, tokenizer=src.tokenizer,
                                source_folder=str(src.folder) if src.folder else None, **hp)
    out = hf_embcomp.save_compressed(small, Path(args.output_dir), overwrite=True)
    rep = small.compression_report
    print(f"{rep['source_model']} -> {out}")
    print(f"  {args.method} {json.dumps(rep['hyperparameters'])}")
    print(f"  stored bytes {rep['stored_bytes']:,} (fp32 {rep['fp32_bytes']:,}): {rep['compression_ratio']:.2f}x")
    print(f"  row cosine mean {rep['fidelity']['row_cosine_mean']:.4f}, "
          f"rel. Frobenius error {rep['fidelity']['relative_frobenius_error']:.4f}")

    # reload as a Hub user would (the runtime code shipped in the folder)
    reloaded = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    result = {"method": args.method, "compression_ratio": rep["compression_ratio"], "fidelity": rep["fidelity"]}

    sst2 = glue_task("sst2")
    train = sst2["train"].shuffle(seed=0).select(range(args.n_train))
    test = sst2["validation"].select(range(min(args.n_test, len(sst2["validation"]))))
    base = AutoModel.from_pretrained(src.folder).eval() if src.folder else src.model.eval()
    emb = {}
    for name, model in (("uncompressed", base), ("compressed", reloaded)):
        emb[name] = (encode(model, src.tokenizer, list(train["sentence"])), encode(model, src.tokenizer, list(test["sentence"])))
    u, c = emb["uncompressed"][1], emb["compressed"][1]
    agreement = float((u * c).sum(1).mean())
    other = float((u * np.roll(u, 1, axis=0)).sum(1).mean())  # control: two different sentences, same model
    print(f"  sentence-embedding cosine with the uncompressed model (SST-2 dev, n={len(test)}): {agreement:.4f} "
          f"(different sentences, uncompressed: {other:.4f})")
    result["sentence_cosine"], result["different_sentence_cosine"] = agreement, other
    for name, (tr, te) in emb.items():
        clf = LogisticRegression(max_iter=2000, random_state=0).fit(tr, train["label"])
        acc = float((clf.predict(te) == np.asarray(test["label"])).mean())
        result[f"probe_accuracy_{name}"] = acc
        print(f"  SST-2 linear probe ({len(train)} train / {len(test)} dev), {name:>12}: {acc:.4f}")
    return result


if __name__ == "__main__":
    main()
