"""``method="auto"``: fit the candidate methods for the requested ratio and keep the one the model itself
scores best on a short calibration probe.

Candidates (measured on SmolLM2 and MiniLM, bench/results/quality.json): ``gptq`` at every ratio it reaches, and
``lighttoken`` from :data:`LIGHTTOKEN_FROM` on (below it GPTQ's scalar codes win by a wide margin; above it
LightToken's binary codes with a learned decoder may). The probe is text the fit never saw and the evaluation
never reads: the calibration text after the tokens calibration ran the model on.

- causal LM (an output head): perplexity of each candidate on :data:`PROBE_TOKENS` probe tokens (lower wins);
- encoder: mean cosine between the mean-pooled last hidden states of the candidate and of the source model on
  probe passages of :data:`PASSAGE_TOKENS` tokens (higher wins).

The report (``compression_report.json``, key ``auto``) lists every candidate with its probe score and fit time,
the one chosen, and why.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

LIGHTTOKEN_FROM = 10.0
"""Ratio from which LightToken is a candidate too."""
PROBE_TOKENS = 2048
PASSAGE_TOKENS = 64


def _method_fields() -> set[str]:
    """Hyper-parameter names that belong to one method: every registered config's fields beyond the shared ones
    (``dtype`` and ``seed`` apply to every candidate)."""
    import dataclasses

    from .methods import METHODS, MethodConfig

    shared = {f.name for f in dataclasses.fields(MethodConfig)}
    return {f.name for m in METHODS.values() for f in dataclasses.fields(m.config_class)} - shared


def candidates(ratio: float) -> list[tuple[str, dict[str, Any]]]:
    """(method, hyper-parameter overrides) tried for ``ratio``."""
    out: list[tuple[str, dict[str, Any]]] = [("gptq", {})]
    if ratio >= LIGHTTOKEN_FROM:
        out.append(("lighttoken", {}))
    return out


def probe_ids(tokenizer: Any, calibration: Any, vocab_size: int, tokens: int = PROBE_TOKENS) -> torch.Tensor:
    """int64 [<= tokens] probe token ids: the calibration text after the tokens calibration ran the model on."""
    from .calibration import DEFAULT_TOKENS, calibration_text

    text, _ = calibration_text(getattr(calibration, "text_file", None))
    skip = max(int(getattr(calibration, "tokens", 0) or 0), DEFAULT_TOKENS)
    ids = tokenizer(text[: (skip + tokens) * 12], add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.tensor(ids[skip : skip + tokens] if len(ids) > skip + 64 else ids[-tokens:])
    return ids[(ids >= 0) & (ids < vocab_size)]


class Probe:
    """The score of a model on a probe text (see the module docstring); ``better(a, b)``: a beats b.

    Also the held-out score of recovery (:mod:`hf_embcomp.training.recover`), given its own ``ids``.

    Args:
        source: the uncompressed model (an encoder's score is the cosine to its pooled states).
        tokenizer, calibration: the probe is the calibration text after the calibrated tokens; or
        ids: int64 [N] token ids to score on instead (then ``bos_id`` says what each window starts with).
        label: the metric's first word (``"probe"``, ``"held-out"``).
        window: tokens per perplexity window (causal LMs).
    """

    def __init__(self, source: PreTrainedModel, tokenizer: Any = None, calibration: Any = None, *,
                 ids: torch.Tensor | None = None, bos_id: int | None = None, label: str = "probe",
                 window: int = 512) -> None:
        from .evaluation.lm import needs_bos

        V = source.get_input_embeddings().num_embeddings
        self.ids = probe_ids(tokenizer, calibration, V) if ids is None else ids
        self.window = window
        self.causal = source.get_output_embeddings() is not None
        self.bos = (needs_bos(tokenizer) if ids is None else bos_id) if self.causal else None
        self.metric = f"{label} perplexity" if self.causal else f"{label} sentence cosine"
        if not self.causal:
            n = max(1, self.ids.numel() // PASSAGE_TOKENS)
            self.passages = self.ids[: n * PASSAGE_TOKENS].reshape(n, -1)
            self.reference = self._pooled(source)

    @torch.no_grad()
    def _pooled(self, model: PreTrainedModel) -> torch.Tensor:
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        out = []
        for i in range(0, self.passages.shape[0], 16):
            x = self.passages[i : i + 16].to(dev)
            h = model(input_ids=x, output_hidden_states=True).hidden_states[-1].float()
            out.append(torch.nn.functional.normalize(h.mean(1), dim=-1).cpu())
        model.train(was)
        return torch.cat(out)

    @torch.no_grad()
    def score(self, model: PreTrainedModel) -> float:
        if self.causal:
            from .evaluation.lm import perplexity

            was = model.training
            model.eval()
            try:
                w = min(self.window, self.ids.numel())
                return perplexity(model, self.ids, window=w, stride=w - (self.bos is not None), bos_id=self.bos,
                                  desc=self.metric)[0]
            finally:
                model.train(was)
        return float((self._pooled(model) * self.reference).sum(-1).mean())

    def better(self, a: float, b: float) -> bool:
        if math.isnan(b):
            return not math.isnan(a)
        return a < b if self.causal else a > b


def compress_auto(model: PreTrainedModel, ratio: float | None, *, compress_one: Callable[..., PreTrainedModel],
                  tokenizer: Any = None, calibration: Any = "default", token_counts: torch.Tensor | None = None,
                  refit_steps: int = 0, refit_one: Callable[..., bool] | None = None, **kwargs: Any) -> PreTrainedModel:
    """:func:`hf_embcomp.compress` with the best candidate method (module docstring).

    Args:
        model, ratio, tokenizer, calibration, token_counts, **kwargs: as for :func:`hf_embcomp.compress`
            (hyper-parameter overrides in ``kwargs`` are not accepted: they belong to one method).
        compress_one: compresses with one method, ``compress_one(model, method, ratio, **kwargs)``
            (:func:`hf_embcomp.compress`, which hands ``method="auto"`` here: passed in, not imported).
        refit_steps, refit_one: the candidates are fitted without the head-side refit; the one kept is then refitted
            with ``refit_one(model, E, calibration, refit_steps, judge=...)`` (:func:`hf_embcomp.core.refit_finished`),
            judged by the probe: the refit stays only if it lowers the probe perplexity.

    Raises:
        ValueError: no ratio, hyper-parameter overrides, or no tokenizer (the probe needs text).
        RatioError: no candidate reaches the ratio.
    """
    from .calibration import HEAD_SAMPLES, resolve_calibration
    from .io import refresh_report
    from .methods.base import RatioError, check_ratio

    given = sorted(k for k in kwargs if k in _method_fields() and kwargs[k] is not None)
    if given:
        raise ValueError(f"hyper-parameters {given} belong to one method; pass --method NAME with them, not auto.")
    if ratio is None:
        raise ValueError("method auto needs a ratio, e.g. --ratio 8.")
    if tokenizer is None:
        raise ValueError("method auto scores candidates on text: pass tokenizer= (or choose a --method).")
    ratio = check_ratio(ratio)
    t0 = time.perf_counter()
    cal = resolve_calibration(model, tokenizer, calibration, token_counts,
                              head_inputs=HEAD_SAMPLES if refit_steps > 0 and refit_one is not None else 0)
    if cal is None:
        raise ValueError("method auto needs a calibration text to probe on; install hf-embcomp[eval] or pass "
                         "--calibration FILE (or choose a --method).")
    probe = Probe(model, tokenizer, cal)
    rows, best, best_score = [], None, float("nan")
    for method, hp in candidates(ratio):
        t = time.perf_counter()
        try:
            cand = compress_one(model, method, ratio, tokenizer=tokenizer, calibration=cal,
                                token_counts=cal.token_counts, refit_steps=0, **kwargs, **hp)
        except RatioError as e:
            rows.append({"method": method, "hyperparameters": hp, "status": "skipped", "reason": str(e)})
            continue
        s = probe.score(cand)
        rows.append({"method": method, "overrides": hp, "status": "ok", "compression_ratio":
                     cand.compression_report["compression_ratio"], probe.metric.replace(" ", "_"): s,
                     "seconds": round(time.perf_counter() - t, 1)})
        logger.info("auto: %s at %.2fx: %s %.4g", method, cand.compression_report["compression_ratio"], probe.metric, s)
        if best is None or probe.better(s, best_score):
            best, best_score, best_row = cand, s, rows[-1]
        else:
            del cand
    if best is None:
        raise RatioError(f"no candidate method reaches ratio {ratio:g}: " + "; ".join(r["reason"] for r in rows))
    chosen = best.compression_report["method"]
    best_row["chosen"] = True
    others = [r for r in rows if r["status"] == "ok" and r is not best_row]
    why = (f"best {probe.metric} ({best_score:.4g}) of {len(others) + 1} candidates on {probe.ids.numel()} probe "
           "tokens of the calibration text" if others else f"the only candidate for ratio {ratio:g}")
    refit = _refit_kept(best, model, cal, probe, refit_steps, refit_one)
    best.compression_report["auto"] = {"chosen": chosen, "why": why, "metric": probe.metric, "candidates": rows,
                                       "refit": refit, "seconds": round(time.perf_counter() - t0, 1)}
    refresh_report(best)
    return best


def _refit_kept(best: PreTrainedModel, model: PreTrainedModel, cal: Any, probe: Probe, steps: int,
                refit_one: Callable[..., bool] | None) -> dict[str, Any] | None:
    """Refit the kept candidate (``refit_one``), judged by the probe (kept only if it lowers the probe score); returns
    the probe scores before / after and whether the refit was kept (None: the refit did not run; the report's
    ``head_refit`` says why where it applies)."""
    if refit_one is None or steps <= 0 or not probe.causal:  # the refit is for tied heads: perplexity, lower wins
        return None
    refit_one(best, model.get_input_embeddings().weight.detach(), cal, steps, judge=lambda: probe.score(best))
    entry = best.compression_report.get("head_refit")
    if not entry or not entry["steps"]:
        return None
    return {"before": entry["judge_before"], "after": entry["judge_after"], "kept": entry["kept"]}
