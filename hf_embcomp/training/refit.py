"""Head-side refit: the last step of a fit for a causal LM whose output head is tied to the compressed embedding.

A fit weighs its error by second-order statistics (the head's Sigma = E[h h^T], token counts); what the model
feels is the change of its next-token distribution. With the codes fixed, the compressed embedding's real-valued
tensors (group scales and minimums, codebooks, the mean row, a LightToken decoder ...) are fitted by AdamW to

    KL(softmax(h E^T) || softmax(h E_hat^T))  +  input_weight * ||E_hat[x] - E[x]||^2 / ||E[x]||^2

over the hidden states h the uncompressed model's head saw on the calibration text and the tokens x fed at the
same positions (:attr:`hf_embcomp.calibration.Calibration.head_inputs` / ``head_input_ids``): the first term is
the tied head's logit error as the softmax sees it, the second keeps the rows the first layer reads (a tied row
is both; without it the head improves and the model gets worse: SmolLM2 gptq 25x, first 4,096 Wikipedia tokens
32.82 -> 38.68 at weight 0, 31.20 at weight 10). The teacher's logits come from E and the cached h alone: no
forward of the body.

The refit is kept only if it makes the model better, otherwise the fitted tensors are restored bit for bit. "Better"
is what the caller's ``judge`` says where there is one (:func:`hf_embcomp.compress` passes the perplexity on probe text
of the calibration file past the calibrated tokens, as ``auto`` scores its candidates), else the objective on the last
eighth of the positions, held out (with the tensors rounded to the storage dtype first, as they are saved). The
objective is a proxy: SmolLM2 gptq 16x, 16,384 positions, held-out objective 0.1692 -> 0.1695 (undone) where 32,768
positions and the same 300 steps had lowered the perplexity 26.65 -> 26.21.

Measured (SmolLM2-135M, gptq, 300 steps of 256 positions, the refit run on a float32 model outside ``compress``,
perplexity on the first 20,000 Wikipedia tokens, 32,768 positions): 16x 26.65 -> 26.21, 25x 36.56 -> 34.56, 8x
23.166 -> 23.149; with 16,384 positions, 25x on 4,096 tokens: 32.82 -> 31.88. Inside ``compress`` it was undone at 16x
and 25x (:data:`DEFAULT_COMPRESS_STEPS`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported inside the functions: the CLI reads the defaults for its --help
    import torch
    from torch import nn

REFIT_STEPS = 300
"""Optimiser steps of :func:`head_refit` (``hf-embcomp compress --refit-steps 300`` turns the refit on)."""
DEFAULT_COMPRESS_STEPS = 0
"""``compress``'s default: off. In the package (bf16 body of a GGUF source, 16,384 positions, judged by the probe
perplexity) the refit was undone at both ratios it was run at (SmolLM2 gptq 16x probe 13.75 -> 13.99, 25x 14.84 ->
14.95; bench/results/quality_smollm2_vs_llamacpp.json, ``head_refit``). The texts disagree, not the pipelines: one
and the same refitted 25x model (float32 body, kept by the held-out objective) scores 32.81 -> 31.87 on the first
4,096 Wikipedia test tokens and 14.80 -> 14.93 on the probe text (the body dtype is not it: with a float32 body the
probe judge undoes it too, 14.80 -> 14.93). A refit that helps one text and hurts another is not a default."""
BATCH = 256
"""Positions per step."""
LR = 3e-3
"""Step size relative to each tensor's RMS (as recovery's ``lr``)."""
INPUT_WEIGHT = 10.0
"""Weight of the input rows' relative squared error."""
HELDOUT_SHARE = 8
"""One position in this many (the last ones) is held out."""
MIN_KL = 0.01
"""Held-out KL (nats per position) below which the refit does not run: SmolLM2 gptq 8x has 0.004 and gained
0.07 % perplexity (23.166 -> 23.149) for 4 minutes; 16x has ~0.06, 25x ~0.17."""


@dataclasses.dataclass
class RefitResult:
    """What :func:`head_refit` did (``as_dict()`` goes to ``compression_report.json`` as ``head_refit``).

    Attributes:
        kept: True if the refitted tensors are in the module; False if the fitted ones were restored (or, with
            ``steps`` 0, the refit did not run: the fitted model's held-out KL was already below ``min_kl``).
        steps, batch_size, lr, input_weight: the schedule run.
        positions: calibration positions trained on / held out.
        heldout_before, heldout_after: the objective (nats per position, KL + weighted input error) on the held-out
            positions before and after.
        kl_before, kl_after: its KL part alone.
        seconds: wall time.
        judge_before, judge_after: the judge's score before and after (None without a judge); it decided ``kept``.
    """

    kept: bool
    steps: int
    batch_size: int
    lr: float
    input_weight: float
    positions: int
    heldout_positions: int
    heldout_before: float
    heldout_after: float
    kl_before: float
    kl_after: float
    seconds: float
    judge_before: float | None = None
    judge_after: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


def relative_lr_groups(params: list[torch.nn.Parameter], lr: float) -> list[dict[str, Any]]:
    """AdamW groups, one per tensor, with learning rate ``lr * RMS(tensor)`` (a relative step size: a group scale of
    0.01 and one of 1 both move ~lr of their size per step; a zero tensor gets ``lr``). Shared with recovery."""
    groups = []
    for p in params:
        rms = float(p.detach().float().pow(2).mean().sqrt())
        groups.append({"params": [p], "lr": lr * (rms if rms > 0 else 1.0)})
    return groups


def _trainable(embedding: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in embedding.parameters() if p.is_floating_point()]


def _objective(embedding: nn.Module, weight: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor,
               input_weight: float, chunk: int = 1024) -> tuple[float, float]:
    """(objective, KL part) averaged over the positions, computed in chunks."""
    import torch

    with torch.no_grad():
        return _objective_sums(embedding, weight, hidden, ids, input_weight, chunk)


def _objective_sums(embedding: nn.Module, weight: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor,
                    input_weight: float, chunk: int) -> tuple[float, float]:
    kl = err = norm = 0.0
    for i in range(0, hidden.shape[0], chunk):
        h, x = hidden[i : i + chunk], ids[i : i + chunk]
        kl += float(_kl(embedding, weight, h, reduction="sum"))
        e = weight[x]
        err += float((embedding.embed(x).float() - e).pow(2).sum())
        norm += float(e.pow(2).sum())
    kl /= hidden.shape[0]
    return kl + input_weight * err / max(norm, 1e-30), kl


def _kl(embedding: nn.Module, weight: torch.Tensor, h: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(h E^T) || softmax(h E_hat^T)) of a batch of head inputs h float32 [n, d]."""
    import torch.nn.functional as F

    teacher = F.log_softmax(h @ weight.T, -1)
    student = F.log_softmax(embedding.compute_logits(h).float(), -1)
    return F.kl_div(student, teacher, log_target=True, reduction=reduction)


def head_refit(embedding: nn.Module, weight: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor, *,
               steps: int = REFIT_STEPS, batch_size: int = BATCH, lr: float = LR,
               input_weight: float = INPUT_WEIGHT, min_kl: float = MIN_KL, seed: int = 0,
               judge: Callable[[], float] | None = None) -> RefitResult:
    """Refit the real-valued tensors of a tied compressed embedding, in place (module docstring).

    Args:
        embedding: the compressed embedding (a ``CompressedEmbedding`` of the hf-embcomp runtime) that is also the
            model's output head; its floating tensors train in float32 and are left in its own dtype, rounded
            through ``embedding.storage_dtype``. Its codes (buffers) never change.
        weight: float [V, d] the uncompressed token embedding E (the teacher's head).
        hidden: float [N, d] head inputs of the uncompressed model on calibration text (N >= 2 * HELDOUT_SHARE).
        ids: int64 [N] the token fed at each of those positions.
        steps, batch_size: AdamW steps of ``batch_size`` positions (linear warm-up over 5 %, linear decay).
        lr: step size relative to each tensor's RMS (a zero tensor gets ``lr``).
        input_weight: weight of the input rows' relative squared error.
        min_kl: no refit (``steps`` 0 in the result) where the held-out KL of the fitted model is below this.
        seed: sampling seed.
        judge: scores the model the embedding belongs to, lower is better (called with the embedding in its own
            dtype, before and after); decides whether the refit is kept. None: the held-out objective decides.

    Returns:
        A :class:`RefitResult`.

    Raises:
        ValueError: shapes that do not match, too few positions, or nothing real-valued to train.
    """
    import torch

    V, d = embedding.num_embeddings, embedding.embedding_dim
    if tuple(weight.shape) != (V, d) or hidden.ndim != 2 or hidden.shape[1] != d or ids.shape != hidden.shape[:1]:
        raise ValueError(f"head_refit needs weight [{V}, {d}], hidden [N, {d}] and ids [N]; got "
                         f"{tuple(weight.shape)}, {tuple(hidden.shape)}, {tuple(ids.shape)}.")
    if hidden.shape[0] < 2 * HELDOUT_SHARE:
        raise ValueError(f"head_refit needs at least {2 * HELDOUT_SHARE} calibration positions, got {hidden.shape[0]}.")
    params = _trainable(embedding)
    if not params:
        raise ValueError("this compressed embedding has no real-valued tensor to refit.")
    t0 = time.perf_counter()
    device = embedding.device
    dtype = embedding.dtype
    snapshot = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    W = weight.detach().to(device=device, dtype=torch.float32)
    H, X = hidden.to(device=device, dtype=torch.float32), ids.to(device)
    n_held = max(1, H.shape[0] // HELDOUT_SHARE)
    Ht, Xt, Hh, Xh = H[:-n_held], X[:-n_held], H[-n_held:], X[-n_held:]
    embedding.float()
    judged: list[float] = []
    try:
        before, kl0 = _objective(embedding, W, Hh, Xh, input_weight)
        if kl0 < min_kl:
            return RefitResult(False, 0, batch_size, lr, input_weight, int(Ht.shape[0]), n_held, before, before, kl0,
                               kl0, round(time.perf_counter() - t0, 1))
        if judge is not None:
            embedding.to(dtype)
            judged.append(float(judge()))
            embedding.float()
        _train(embedding, params, W, Ht, Xt, steps=steps, batch_size=batch_size, lr=lr, input_weight=input_weight,
               seed=seed)
        after, kl1 = _objective(embedding, W, Hh, Xh, input_weight)
        embedding.to(dtype)
        if judge is not None:
            judged.append(float(judge()))
        kept = judged[1] < judged[0] if judge is not None else after < before
        if not kept:
            with torch.no_grad():
                for p, saved in zip(params, snapshot):
                    p.copy_(saved)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
        embedding.to(dtype)
    return RefitResult(kept, steps, batch_size, lr, input_weight, int(Ht.shape[0]), n_held, before, after, kl0, kl1,
                       round(time.perf_counter() - t0, 1), *(judged or [None, None]))


def _train(embedding: nn.Module, params: list[torch.nn.Parameter], W: torch.Tensor, H: torch.Tensor, X: torch.Tensor, *,
           steps: int, batch_size: int, lr: float, input_weight: float, seed: int) -> None:
    """The AdamW loop of :func:`head_refit` on float32 ``params``, which end rounded through the storage dtype."""
    import torch

    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(relative_lr_groups(params, lr), weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, 1 - s / steps))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(0, H.shape[0], (batch_size,), generator=gen).to(H.device)
        x = X[pick]
        e = W[x]
        loss = _kl(embedding, W, H[pick])
        loss = loss + input_weight * (embedding.embed(x) - e).pow(2).sum() / e.pow(2).sum().clamp_min(1e-30)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        for p in params:
            p.copy_(p.to(embedding.storage_dtype).float())
