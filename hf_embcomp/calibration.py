"""Calibration: what the model itself says about which rows and coordinates of E matter.

One place for every statistic a fit can weigh its error by, collected by running the *source* model on a
calibration text (never an evaluation text):

- ``token_counts`` int64 [V]: how often each token occurs (rows the model reads, and mostly predicts).
- ``head_second_moment`` float64 [d, d]: Sigma = E[h h^T] over the hidden states the tied output head sees
  (the input of ``get_output_embeddings()``). For a tied head the logit error of row v is h^T (e_v - e_hat_v),
  so its expected square is (e_v - e_hat_v)^T Sigma (e_v - e_hat_v): the second-order objective of GPTQ /
  AQLM, and its diagonal is llama.cpp's importance matrix ("imatrix": per column, the mean of h^2).
- ``input_column_gain`` float64 [d]: per column j, E[y_j^2] / E[x_j^2] over the first normalisation layer
  after the embedding (x its input, y its output): the factor by which an input-side error of coordinate j is
  seen by the first block (g_j^2 / rms(x)^2 for an RMSNorm / LayerNorm with gain g).
- ``head_inputs`` float32 [N, d] and ``head_input_ids`` int64 [N]: the hidden states the tied head saw at N
  calibration positions (at most :data:`HEAD_SAMPLES`; only when the refit will run) and the token fed at each: what the head-side refit of
  :mod:`hf_embcomp.training.refit` fits the compressed embedding's real-valued tensors to, after the fit.
- ``input_sensitivity`` float64 [d, d] (models without an output head: encoders): S = E_t[J_t^T J_t] with J_t the
  Jacobian of the model's sentence embedding (mean-pooled, L2-normalised last hidden state of a window) with
  respect to the token embedding at position t. An input-row error delta at position t moves the sentence
  embedding by J_t delta to first order, so delta^T S delta is its expected squared effect - the input-side
  counterpart of Sigma (the "Hessian" of the output error, estimated with random probes: for r with
  E[r r^T] = I, E[(r^T J delta)^2] = delta^T J^T J delta). all-MiniLM-L6-v2, gptq 25x, STS-B dev Spearman x100
  (stock 86.72): 86.23 under the diagonal column gain, 86.57 under S (bench/results/quality_minilm_vs_llamacpp.json).

The default text is the gensim Wikipedia text from character 1,000,000 on (:data:`hf_embcomp.frequency.
DEFAULT_OFFSET`, where the token counts already start; the evaluation reads the first 20,000 tokens only).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import progress
from .frequency import DEFAULT_OFFSET, _chunks, token_counts

logger = logging.getLogger(__name__)

DEFAULT_TOKENS = 16384
"""Tokens the model is run on (the token counts use the whole text)."""
WINDOW = 512
HEAD_SAMPLES = 16384
"""Most head inputs kept (float32 [N, d]: 38 MB for d = 576) for the head-side refit."""
SENSITIVITY_WINDOW = 128
"""Tokens per window of :func:`input_sensitivity` (sentence-length inputs, special tokens included)."""
SENSITIVITY_PROBES = 4
"""Random probe directions per window of :func:`input_sensitivity`."""


class CalibrationError(ValueError):
    """The calibration text cannot be used (the message says why and what to do)."""


@dataclasses.dataclass
class Calibration:
    """Calibration statistics of one source model (module docstring).

    Attributes:
        token_counts: int64 [V], or None.
        head_second_moment: float64 [d, d] Sigma = E[h h^T] of the tied head's inputs, or None (no head).
        input_column_gain: float64 [d], or None (no normalisation layer found).
        tokens: tokens the model was run on (0: counts only).
        source: one line saying what text was used.
        text_file: the calibration file (None: the default text).
        input_sensitivity: float64 [d, d] S = E[J^T J] of the pooled output (models without an output head), or
            None.
        head_inputs: float32 [N, d], the tied head's inputs at N calibration positions (N <= HEAD_SAMPLES), or None.
        head_input_ids: int64 [N], the token id fed at each of those positions, or None.
    """

    token_counts: torch.Tensor | None
    head_second_moment: torch.Tensor | None = None
    input_column_gain: torch.Tensor | None = None
    tokens: int = 0
    source: str = ""
    text_file: str | None = None
    input_sensitivity: torch.Tensor | None = None
    head_inputs: torch.Tensor | None = None
    head_input_ids: torch.Tensor | None = None

    def importance_matrix(self) -> torch.Tensor | None:
        """llama.cpp's importance matrix of the tied head: float64 [d], diag(Sigma) (None without a head)."""
        return None if self.head_second_moment is None else torch.diagonal(self.head_second_moment).clone()

    def column_weights(self) -> torch.Tensor | None:
        """Per-coordinate weight float64 [d] (mean 1) of a squared row error: the head's importance matrix and
        the first norm's gain, each normalised to mean 1, summed. None when neither is known."""
        parts = [w / w.mean().clamp_min(1e-30) for w in (self.importance_matrix(), self.input_column_gain)
                 if w is not None]
        if not parts:
            return None
        w = sum(parts)
        return w / w.mean()

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for compression_report.json / config.json."""
        return {
            "source": self.source,
            "model_tokens": self.tokens,
            "counted_tokens": None if self.token_counts is None else int(self.token_counts.sum()),
            "head_second_moment": self.head_second_moment is not None,
            "input_column_gain": self.input_column_gain is not None,
            "input_sensitivity": self.input_sensitivity is not None,
            "head_inputs": 0 if self.head_inputs is None else int(self.head_inputs.shape[0]),
        }


def calibration_text(path: str | Path | None = None) -> tuple[str, str]:
    """The calibration text and a one-line description of it.

    Args:
        path: a UTF-8 text file, or None for the default (module docstring).

    Raises:
        CalibrationError: the file is missing, not UTF-8 text, or (nearly) empty; or no file is given and the
            default text (gensim, from ``hf-embcomp[eval]``) is not installed.
    """
    if path is None:
        try:
            from . import data

            text = data.wiki_text()[DEFAULT_OFFSET:]
        except (ImportError, FileNotFoundError) as e:
            raise CalibrationError(f"no default calibration text ({e}); install hf-embcomp[eval], pass "
                                   "--calibration FILE, or --calibration none.") from None
        return text, f"gensim Wikipedia text from character {DEFAULT_OFFSET:,} ({len(text):,} characters)"
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"calibration file {p} not found; pass a UTF-8 text file or --calibration none.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CalibrationError(f"calibration file {p} is not UTF-8 text; pass a UTF-8 text file.") from None
    if len(text.strip()) < 200:
        raise CalibrationError(f"calibration file {p} has {len(text.strip())} characters; give it at least a few "
                               "paragraphs of text like the model will see.")
    return text, f"{p.name} ({len(text):,} characters)"


def _first_norm(model: torch.nn.Module, d: int) -> torch.nn.Module | None:
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if "norm" in type(m).__name__.lower() and isinstance(w, torch.Tensor) and tuple(w.shape) == (d,):
            return m
    return None


@torch.no_grad()
def max_positions(model: torch.nn.Module, default: int) -> int:
    """Tokens one forward of ``model`` may take: ``max_position_embeddings`` (or ``n_positions``) less the offset of
    models whose position ids start after the padding index (RoBERTa-style position embeddings with a
    ``padding_idx``); ``default`` where the config says nothing."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not n:
        return default
    offset = 0
    for name, m in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(m, torch.nn.Embedding) and m.padding_idx is not None:
            offset = int(m.padding_idx) + 1
            break
    return max(1, int(n) - offset)


def collect(model: torch.nn.Module, ids: torch.Tensor, window: int = WINDOW, bos_id: int | None = None,
            quiet: bool = False, keep_head_inputs: int = 0) -> dict[str, Any]:
    """Run ``model`` over ``ids`` in windows and accumulate Sigma and the first norm's column gain.

    Args:
        model: a stock transformers model (eval mode is set for the run and restored).
        ids: int64 [N] token ids.
        window: tokens per forward (``bos_id`` first when given).
        keep_head_inputs: head inputs kept (the first ones run; 0: none, the default: only the head-side refit
            reads them).

    Returns:
        ``{"sigma": float64 [d, d] or None, "gain": float64 [d] or None, "tokens": tokens run, "head_inputs":
        float32 [n, d] or None, "head_input_ids": int64 [n] or None}`` (None: no tied-shape head / no norm).
    """
    d = model.get_input_embeddings().embedding_dim
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    acc: dict[str, Any] = {"sigma": None, "n": 0, "xin": torch.zeros(d, dtype=torch.float64),
                           "yout": torch.zeros(d, dtype=torch.float64), "h": [], "ids": [], "kept": 0, "x": None}

    def head_hook(_m, args):
        h = args[0].detach().reshape(-1, d)
        hd = h.double().cpu()
        acc["sigma"] = hd.T @ hd if acc["sigma"] is None else acc["sigma"] + hd.T @ hd
        acc["n"] += h.shape[0]
        take = min(keep_head_inputs - acc["kept"], h.shape[0])
        if take > 0 and acc["x"] is not None and acc["x"].numel() == h.shape[0]:
            acc["h"].append(h[:take].float().cpu())
            acc["ids"].append(acc["x"][:take].cpu())
            acc["kept"] += take

    def norm_hook(_m, args, out):
        x = args[0].detach().reshape(-1, d).double().cpu()
        y = (out[0] if isinstance(out, tuple) else out).detach().reshape(-1, d).double().cpu()
        acc["xin"] += (x * x).sum(0)
        acc["yout"] += (y * y).sum(0)

    hooks = []
    if head is not None and getattr(head, "weight", None) is not None and head.weight.shape[-1] == d:
        hooks.append(head.register_forward_pre_hook(head_hook))
    norm = _first_norm(model, d)
    if norm is not None:
        hooks.append(norm.register_forward_hook(norm_hook))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = max(1, min(window, max_positions(model, window)) - (bos_id is not None))
    run = 0
    try:
        for i in tqdm(range(0, int(ids.numel()), width), desc="calibration", unit="window",
                      disable=quiet or progress.disabled()):
            x = ids[i : i + width]
            if bos_id is not None:
                x = torch.cat([torch.tensor([bos_id]), x])
            acc["x"] = x
            model(input_ids=x[None].to(device))
            run += int(x.numel())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    sigma = None if acc["sigma"] is None else acc["sigma"] / max(acc["n"], 1)
    gain = None if norm is None else acc["yout"] / acc["xin"].clamp_min(1e-30)
    kept = bool(acc["h"])
    return {"sigma": sigma, "gain": gain, "tokens": run, "head_inputs": torch.cat(acc["h"]) if kept else None,
            "head_input_ids": torch.cat(acc["ids"]) if kept else None}


def error_metric(d: int, calibration: Any = None) -> tuple[torch.Tensor, str]:
    """The matrix H float64 [d, d] under which a fit measures a row's error, (e - e_hat)^T H (e - e_hat),
    normalised to mean diagonal 1, and a few words saying where it came from.

    In order of preference: the tied head's second moment Sigma (causal LMs: the expected squared logit error),
    the pooled-output input sensitivity S (encoders), diag(first-norm column gain), else the identity (no
    calibration, or ``calibration`` None). Used by gptq's GPTQ / GPTVQ rounding and allocation (LightToken uses S
    alone: :func:`hf_embcomp.methods.lighttoken.metric_factors`).
    """
    if calibration is not None and calibration.head_second_moment is not None:
        H, src = calibration.head_second_moment.double().clone(), "tied-head second moment"
    elif calibration is not None and getattr(calibration, "input_sensitivity", None) is not None:
        H, src = calibration.input_sensitivity.double().clone(), "pooled-output input sensitivity"
    elif calibration is not None and calibration.input_column_gain is not None:
        H, src = torch.diag(calibration.input_column_gain.double()), "first-norm column gain (diagonal)"
    else:
        H, src = torch.eye(d, dtype=torch.float64), "identity (no calibration)"
    return H / torch.diagonal(H).mean().clamp_min(1e-30), src


def _special(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(ids before, ids after) a window: the tokenizer's CLS / BOS and SEP / EOS where it has them."""
    pre = next((t for t in (getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "bos_token_id", None))
                if t is not None), None)
    post = next((t for t in (getattr(tokenizer, "sep_token_id", None), getattr(tokenizer, "eos_token_id", None))
                 if t is not None), None)
    return ([] if pre is None else [int(pre)]), ([] if post is None else [int(post)])


def input_sensitivity(model: torch.nn.Module, ids: torch.Tensor, window: int = SENSITIVITY_WINDOW,
                      probes: int = SENSITIVITY_PROBES, special: tuple[list[int], list[int]] = ([], []),
                      batch: int = 16, seed: int = 0, quiet: bool = False) -> tuple[torch.Tensor, int]:
    """S = E_t[J_t^T J_t] float64 [d, d] of the pooled output (module docstring), over windows of ``ids``.

    Each window is ``special[0] + ids[i : i + w] + special[1]`` (w = ``window`` less the special tokens); its
    sentence embedding is the L2-normalised mean of the last hidden state. Per window, ``probes``
    directions r_1..r_p (the first columns of a seeded random orthogonal matrix: (d / p) sum_i r_i r_i^T has
    expectation I, and is I at p = d) give g_i = d(r_i . pooled)/d e_t for every position t
    (``torch.autograd.grad`` with respect to the token embeddings only: no parameter gradients are computed or
    stored); S = (d / p) sum_t sum_i g_i g_i^T / tokens.

    Args:
        model: a stock transformers model without an output head (eval mode is set for the run and restored).
        ids: int64 [N] token ids (the special tokens are added per window).
        probes: 1..d.

    Returns:
        (S float64 [d, d], window positions run).
    """
    emb = model.get_input_embeddings()
    d = emb.embedding_dim
    probes = max(1, min(int(probes), d))
    pre, post = (torch.tensor(x, dtype=torch.long) for x in special)
    width = max(1, min(window, max_positions(model, window)) - pre.numel() - post.numel())
    wins = [torch.cat([pre, ids[i : i + width], post]) for i in range(0, int(ids.numel()), width)]
    g = torch.Generator().manual_seed(int(seed) + 31337)
    S = torch.zeros(d, d, dtype=torch.float64)
    held: dict[str, torch.Tensor] = {}

    def hook(_m, _args, out):  # the token embeddings become the leaf the gradients are taken for
        held["e"] = out.detach().requires_grad_(True)
        return held["e"]

    handle = emb.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    run = 0
    try:
        for b in tqdm(range(0, len(wins), batch), desc="calibration: input sensitivity", unit="batch",
                      disable=quiet or progress.disabled()):
            group = wins[b : b + batch]
            n = max(w.numel() for w in group)
            x = torch.zeros(len(group), n, dtype=torch.long)
            mask = torch.zeros(len(group), n, dtype=torch.long)
            for j, w in enumerate(group):
                x[j, : w.numel()], mask[j, : w.numel()] = w, 1
            with torch.enable_grad():
                out = model(input_ids=x.to(device), attention_mask=mask.to(device), output_hidden_states=True)
                h = out.hidden_states[-1]
                m = mask.to(device).unsqueeze(-1).to(h.dtype)
                pooled = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)
                r = torch.linalg.qr(torch.randn(len(group), d, d, generator=g, dtype=torch.float64))[0]
                r = r[:, :, :probes].to(pooled)  # [windows, d, probes]: each window its own orthonormal probes
                for i in range(probes):
                    (grad,) = torch.autograd.grad(pooled, held["e"], grad_outputs=r[:, :, i], retain_graph=i < probes - 1)
                    gt = grad[mask.bool().to(device)].double().cpu()  # [tokens, d]
                    S += gt.T @ gt * (d / probes)
            run += int(mask.sum())
    finally:
        handle.remove()
        model.train(was_training)
    return S / max(run, 1), run


def calibrate(model: torch.nn.Module, tokenizer: Any, text_file: str | Path | None = None,
              max_tokens: int = DEFAULT_TOKENS, quiet: bool = False, head_inputs: int = 0) -> Calibration:
    """Token counts of the calibration text and the model's statistics on its first ``max_tokens`` tokens.

    Args:
        model: the stock source model (its input embedding V x d).
        tokenizer: its tokenizer.
        text_file: UTF-8 text file, or None for the default text (module docstring).
        max_tokens: tokens the model is run on (0: token counts only).
        quiet: no progress bars (they also follow :mod:`hf_embcomp.progress`).
        head_inputs: head inputs to keep for the head-side refit (0: none; :data:`HEAD_SAMPLES` when it runs).

    Raises:
        CalibrationError: see :func:`calibration_text`.
    """
    from .evaluation.lm import needs_bos

    V = model.get_input_embeddings().num_embeddings
    text, desc = calibration_text(text_file)
    with progress.quiet(quiet):
        counts = token_counts(tokenizer, _chunks(text), V, desc="calibration: counting tokens")
    if int(counts.sum()) == 0:
        raise CalibrationError(f"the calibration text ({desc}) has no tokens of this vocabulary.")
    stats: dict[str, Any] = {"sigma": None, "gain": None, "tokens": 0, "head_inputs": None, "head_input_ids": None}
    sens = None
    if max_tokens > 0:
        ids = torch.tensor(tokenizer(text[: max_tokens * 12], add_special_tokens=False, verbose=False)["input_ids"][:max_tokens])
        ids = ids[(ids >= 0) & (ids < V)]
        causal = model.get_output_embeddings() is not None if hasattr(model, "get_output_embeddings") else False
        stats = collect(model, ids, bos_id=needs_bos(tokenizer) if causal else None, quiet=quiet,
                        keep_head_inputs=head_inputs)
        if not causal:
            sens = input_sensitivity(model, ids, probes=SENSITIVITY_PROBES, special=_special(tokenizer), quiet=quiet)[0]
    return Calibration(counts, stats["sigma"], stats["gain"], stats["tokens"],
                       desc + f", {int(counts.sum()):,} tokens counted", None if text_file is None else str(text_file),
                       sens, stats["head_inputs"], stats["head_input_ids"])


def resolve_calibration(model: torch.nn.Module, tokenizer: Any, calibration: Any,
                        token_counts: torch.Tensor | None = None, head_inputs: int = 0) -> Calibration | None:
    """The :class:`Calibration` that ``calibration=`` of :func:`hf_embcomp.compress` asks for.

    Returns None for ``calibration=None`` and for ``"default"`` without a tokenizer or without the default
    text installed (the fit then weighs every row and coordinate alike). Caller ``token_counts`` replace the
    counted ones.

    Raises:
        hf_embcomp.calibration.CalibrationError: a file that cannot be used.
        ValueError: ``calibration`` is none of the accepted kinds.
    """
    if calibration is None or isinstance(calibration, Calibration):
        cal = calibration
    elif isinstance(calibration, (str, Path)):
        default = str(calibration) == "default"
        if tokenizer is None:
            if not default:
                raise ValueError("calibration needs the tokenizer: pass tokenizer= (or calibration=None).")
            cal = None
        else:
            try:
                cal = calibrate(model, tokenizer, None if default else calibration, head_inputs=head_inputs)
            except CalibrationError:
                if not default:
                    raise
                logger.warning("no default calibration text (install hf-embcomp[eval]); fitting without calibration")
                cal = None
    else:
        raise ValueError(f"calibration must be a Calibration, a text file, 'default' or None (got {type(calibration).__name__}).")
    if cal is not None and token_counts is not None:
        cal = dataclasses.replace(cal, token_counts=token_counts)
    return cal
