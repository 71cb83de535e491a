"""The seed methods (direction, distilled, dccl; issue 4) vs truncated SVD (and LightToken, if registered)
at the same stored bytes on a real embedding, side by side in one run.

Every row goes through ``hf_embcomp.compress`` (which checks the accounted bytes against the bytes stored).
Prints: ratio (fp32 bytes / stored bytes), row cosine mean and 1st percentile, relative Frobenius error,
fit seconds, and either the sentence-embedding cosine vs the uncompressed model (encoders: mean pooling,
the first 200 sentences of GLUE SST-2 dev from ../shared/data) or the perplexity on the first
``--ppl-tokens`` tokens of the gensim Wikipedia text (causal LMs; 0 skips it). Writes the rows as JSON.

    HF_HUB_OFFLINE=1 python bench/seed_methods.py                               # MiniLM, 10x and 25x
    HF_HUB_OFFLINE=1 python bench/seed_methods.py --model SmolLM2.gguf --ratios 25 --ppl-tokens 4096
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

import hf_embcomp
from hf_embcomp.io import load_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = ("svd", "direction", "distilled", "dccl", "lighttoken")


def sst2_sentences(n: int) -> list[str]:
    path = ROOT.parent / "shared" / "data" / "glue" / "SST-2" / "dev.tsv"
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [ln.split("\t")[0].strip() for ln in lines[:n]]


@torch.no_grad()
def pooled(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="folder or .gguf (default: the embedded all-MiniLM-L6-v2)")
    ap.add_argument("--ratios", default="10,25")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--ppl-tokens", type=int, default=0, help="causal LMs: Wikipedia tokens for perplexity")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "seed_methods.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    src = load_model(args.model)
    model, tok = src.model.float().eval(), src.tokenizer
    E = model.get_input_embeddings().weight
    V, d = E.shape
    causal = type(model).__name__.endswith("ForCausalLM")
    methods = [m for m in args.methods.split(",") if m in hf_embcomp.METHODS]
    skipped = [m for m in args.methods.split(",") if m not in hf_embcomp.METHODS]

    if causal and args.ppl_tokens:
        from hf_embcomp import data
        from hf_embcomp.evaluation.lm import needs_bos, perplexity

        ids = torch.tensor(tok(data.wiki_text(), add_special_tokens=False)["input_ids"][: args.ppl_tokens])
        bos = needs_bos(tok)

        def quality(m: torch.nn.Module) -> float:
            return perplexity(m, ids, window=512, stride=256, bos_id=bos)[0]

        qname = f"ppl@{args.ppl_tokens}"
    elif not causal:
        batch = tok(sst2_sentences(args.sentences), padding=True, truncation=True, max_length=128, return_tensors="pt")
        ref = pooled(model, batch)

        def quality(m: torch.nn.Module) -> float:
            return float(torch.nn.functional.cosine_similarity(pooled(m, batch), ref, dim=1).mean())

        qname = "sent cos"
    else:
        quality, qname = None, "-"

    rows = []
    base_q = quality(model) if quality is not None and causal else None
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for method in methods:
            t0 = time.perf_counter()
            try:
                comp = hf_embcomp.compress(model, method, ratio)
            except ValueError as e:  # RatioError: out of the method's range
                rows.append({"ratio_target": ratio, "method": method, "error": str(e)})
                continue
            rep = comp.compression_report
            row = {
                "ratio_target": ratio,
                "method": method,
                "hyperparameters": {k: v for k, v in rep["hyperparameters"].items() if k in (
                    "rank", "num_codebooks", "bits", "hidden", "init", "epochs", "stages")},
                "ratio": rep["compression_ratio"],
                "stored_bytes": rep["stored_bytes"],
                **rep["fidelity"],
                "fit_seconds": rep["fit_seconds"],
                "quality": quality(comp.eval()) if quality is not None else None,
                "total_seconds": round(time.perf_counter() - t0, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            del comp

    name = src.name if src.gguf_file is None else f"{src.name}::{src.gguf_file}"
    print(f"\n{name}: {V} x {d}, fp32 {V * d * 4 / 1e6:.1f} MB; {torch.get_num_threads()} thread(s)"
          + (f"; uncompressed {qname} {base_q:.3f}" if base_q is not None else ""))
    if skipped:
        print(f"not registered here (skipped): {', '.join(skipped)}")
    print(f"| target | method | size params | ratio | row cos mean | row cos p01 | rel. Frob | {qname} | fit s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['ratio_target']:g} | {r['method']} | {r['error']} |")
            continue
        q = "-" if r["quality"] is None else f"{r['quality']:.4f}"
        hp = " ".join(f"{k}={v}" for k, v in r["hyperparameters"].items())
        print(f"| {r['ratio_target']:g} | {r['method']} | {hp} | {r['ratio']:.2f} | {r['row_cosine_mean']:.4f} | "
              f"{r['row_cosine_p01']:.4f} | {r['relative_frobenius_error']:.4f} | {q} | {r['fit_seconds']:.1f} |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": name, "shape": [V, d], "quality_metric": qname,
                               "uncompressed_quality": base_q, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
