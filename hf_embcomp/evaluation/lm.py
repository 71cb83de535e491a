"""Language-model quality with no retraining (the papers' "initial perplexity").

- causal LMs: perplexity = exp(total NLL / tokens scored) over strided windows (each token scored at most
  once, with at least ``window - stride`` tokens of context after the first window; the default is
  non-overlapping 512-token windows, affordable on a CPU), ``<bos>`` first in every window where the
  tokenizer has one and the model needs it (Gemma, Llama-style tokenizers that add it). Without
  ``<bos>``, a window's first token has no context and is not scored; the count reported is exact.
- masked LMs: pseudo-perplexity (Salazar et al., 2020): every token masked in turn, exp(-mean log p).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

from .. import data, progress
from .context import EvalContext, SuiteSkipped
from .results import result

logger = logging.getLogger(__name__)

LM_TOKENS = 20_000
"""Tokens per corpus: the first 20,000 tokens of the text (``--quick``: :data:`QUICK_LM_TOKENS`); the number
actually scored (``dataset.n``) is exact and slightly lower without ``<bos>`` (see :func:`perplexity`)."""
QUICK_LM_TOKENS = 1_000
MLM_TOKENS = 2_000
"""Tokens scored by pseudo-perplexity (each costs one forward; ``--quick``: :data:`QUICK_MLM_TOKENS`)."""
QUICK_MLM_TOKENS = 200

WINDOW = 512
"""Tokens per causal-LM forward; windows do not overlap (stride = window)."""
MLM_WINDOW = 128

CORPORA = {
    "wikipedia": ("gensim/enwiki-shortened", "Wikipedia (gensim test articles)", data.wiki_text),
    "ptb": ("ptb_text_only", "Penn Treebank", data.ptb_test_text),
}
"""corpus key -> (dataset id, name, loader)."""


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    window: int = 512,
    stride: int = 256,
    bos_id: int | None = None,
    desc: str = "perplexity",
) -> tuple[float, float, int]:
    """Causal-LM perplexity of one token sequence with strided windows.

    Args:
        model: a causal LM returning ``.logits`` [1, L, V].
        ids: int64 [N] token ids (no special tokens).
        window: tokens fed per forward, ``<bos>`` included.
        stride: step between window starts, <= window (minus 1 with ``bos_id``). With stride < window (minus
            1) and no ``bos_id`` every token but the first is scored; with stride = window the first token of
            each window is not.
        bos_id: put this token first in every window; then the first token of each window is scored too.

    Returns:
        (perplexity (inf when the mean NLL overflows exp), total NLL in nats, number of tokens scored).

    Raises:
        ValueError: fewer than 2 tokens, or a stride that would skip tokens.
    """
    off = 1 if bos_id is not None else 0
    width = window - off
    n_tok = int(ids.numel())
    if n_tok < 2 - off or not 0 < stride <= width:
        raise ValueError(f"need >= 2 tokens and 0 < stride <= {width} (got {n_tok} tokens, stride {stride})")
    device = next(model.parameters()).device
    nll, scored, prev_end = 0.0, 0, 1 - off
    starts = range(0, max(n_tok - width, 0) + stride, stride)
    for begin in tqdm(starts, desc=desc, unit="window", disable=progress.disabled()):
        end = min(begin + width, n_tok)
        x = ids[begin:end]
        if bos_id is not None:
            x = torch.cat([torch.tensor([bos_id]), x])
        logits = model(input_ids=x[None].to(device)).logits[0].float()
        first = max(prev_end, begin + 1 - off)  # first token of this window not scored before
        pred = logits[first - begin + off - 1 : end - begin + off - 1]
        target = ids[first:end].to(device)
        nll += float(torch.nn.functional.cross_entropy(pred, target, reduction="sum"))
        scored += end - first
        prev_end = end
        if end == n_tok:
            break
    mean = nll / scored
    return (math.exp(mean) if mean < 709 else math.inf), nll, scored  # inf, not OverflowError, for a broken model


@torch.no_grad()
def pseudo_perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask_id: int,
    window: int = 128,
    prefix: tuple[int, ...] = (),
    suffix: tuple[int, ...] = (),
    batch_size: int = 32,
) -> tuple[float, float, int]:
    """Masked-LM pseudo-perplexity: each token of ``ids`` masked in turn within its window.

    Args:
        model: a masked LM returning ``.logits`` [B, L, V].
        ids: int64 [N] token ids (no special tokens); cut into windows of ``window`` tokens.
        mask_id: the tokenizer's mask token id.
        prefix, suffix: special tokens around every window (e.g. ``[CLS]`` / ``[SEP]``).

    Returns:
        (pseudo-perplexity, total negative log-likelihood in nats, N).
    """
    device = next(model.parameters()).device
    nll = 0.0
    pre, suf = torch.tensor(prefix, dtype=torch.int64), torch.tensor(suffix, dtype=torch.int64)
    for begin in tqdm(range(0, ids.numel(), window), desc="pseudo-perplexity", unit="window"):
        chunk = ids[begin : begin + window]
        seq = torch.cat([pre, chunk, suf])
        for b in range(0, chunk.numel(), batch_size):
            pos = torch.arange(b, min(b + batch_size, chunk.numel())) + len(prefix)
            batch = seq.repeat(len(pos), 1)
            batch[torch.arange(len(pos)), pos] = mask_id
            logits = model(input_ids=batch.to(device)).logits.float()
            logp = torch.log_softmax(logits[torch.arange(len(pos)), pos], dim=-1)
            nll -= float(logp.gather(1, seq[pos][:, None].to(device)).sum())
    return math.exp(nll / ids.numel()), nll, int(ids.numel())


def needs_bos(tokenizer: Any) -> int | None:
    """The ``<bos>`` id to put first in every window: when the tokenizer has one and adds it to its own
    encodings (the model was trained with it, e.g. Gemma); else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    return bos if tokenizer("a")["input_ids"][:1] == [bos] else None


def special(token_id: int | None) -> tuple[int, ...]:
    """``(token_id,)``, or ``()`` when the tokenizer has no such token."""
    return () if token_id is None else (token_id,)


def run(ctx: EvalContext) -> list[dict[str, Any]]:
    """Perplexity (causal LM) or pseudo-perplexity (masked LM) of both models on Wikipedia and PTB.

    Raises:
        SuiteSkipped: the source has no pretrained LM head.
    """
    heads = ctx.pretrained_heads()
    if not heads:
        raise SuiteSkipped(f"{ctx.baseline.name} has no pretrained LM head ({ctx.source_config.architectures})")
    tok = ctx.tokenizer()
    causal = "causal-lm" in heads
    n_tokens = (QUICK_LM_TOKENS if ctx.quick else LM_TOKENS) if causal else (QUICK_MLM_TOKENS if ctx.quick else MLM_TOKENS)
    ids = {}
    for key, (_, _, loader) in CORPORA.items():
        if ctx.tasks and key not in ctx.tasks:
            continue
        ids[key] = torch.tensor(tok(loader()[: n_tokens * 20], add_special_tokens=False, verbose=False)["input_ids"][:n_tokens])
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForMaskedLM
    bos = needs_bos(tok) if causal else None
    window, stride = (WINDOW, WINDOW) if causal else (MLM_WINDOW, MLM_WINDOW)
    if not ids:
        raise SuiteSkipped(f"--tasks names no lm corpus ({', '.join(CORPORA)})")
    values: dict[str, dict[str, tuple[float, int]]] = {}
    memo = {key: ("lm", key, causal, tuple(x.tolist()), window, stride, bos) for key, x in ids.items()}
    for key in ids:  # the baseline's values are computed once per process (a sweep reuses them)
        if (known := ctx.baseline_memo(memo[key])) is not None:
            values.setdefault(key, {})["baseline"] = known
    for which in ("baseline", "compressed"):
        todo = [key for key in ids if which not in values.get(key, {})]
        if not todo:
            logger.info("lm: baseline values computed before in this process, not recomputed")
            continue
        model = ctx.load(which, auto)
        for key in todo:
            x = ids[key]
            if causal:
                ppl, _, n = perplexity(model, x, window, stride, bos, desc=f"lm: {which} {key}")
            else:
                ppl, _, n = pseudo_perplexity(model, x, tok.mask_token_id, window, special(tok.cls_token_id),
                                              special(tok.sep_token_id))
            values.setdefault(key, {})[which] = (ppl, n)
            if which == "baseline":
                ctx.remember(memo[key], (ppl, n))
        del model
    out = []
    metric = "perplexity" if causal else "pseudo_perplexity"
    for key, v in values.items():
        ds_id, name, _ = CORPORA[key]
        n_slice, n_scored = int(ids[key].numel()), v["compressed"][1]
        settings = ctx.settings | {"window": window, "stride": stride, "bos": bos is not None, "tokens": n_slice}
        dataset = {"id": ds_id, "name": f"{name}, first {n_slice} tokens", "split": "test" if key == "ptb" else None,
                   "n": n_scored}
        out.append(result("lm", key, "text-generation" if causal else "fill-mask", dataset, metric, v["baseline"][0],
                          v["compressed"][0], False, settings))
    return out
