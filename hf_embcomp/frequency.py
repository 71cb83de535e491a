"""Token frequencies of a corpus, for methods that spend bytes by frequency (LightToken's exact rows).

The default corpus is the gensim Wikipedia text (``hf_embcomp.data.wiki_text``) from character
:data:`DEFAULT_OFFSET` on: disjoint from the slices the evaluation reads (the first 20,000 tokens for
perplexity), so a frequency-aware model is not fitted on its own test text.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import progress

logger = logging.getLogger(__name__)

DEFAULT_OFFSET = 1_000_000
"""Characters of the Wikipedia text skipped by the default corpus (the evaluation slices lie before it)."""
CHUNK_CHARS = 100_000


def token_counts(tokenizer: Any, texts: list[str], vocab_size: int, desc: str = "counting tokens") -> torch.Tensor:
    """How often each token id occurs when ``texts`` are tokenized (no special tokens added).

    Returns:
        int64 [vocab_size]; ids >= vocab_size (added tokens beyond the matrix) are dropped.
    """
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for text in tqdm(texts, desc=desc, unit="chunk", disable=progress.disabled()):
        ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.int64)
        counts += torch.bincount(ids[(ids >= 0) & (ids < vocab_size)], minlength=vocab_size)
    return counts


def _chunks(text: str) -> list[str]:
    return [text[i : i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)]


def corpus_token_counts(tokenizer: Any, vocab_size: int, corpus: str | Path | None = None) -> tuple[torch.Tensor, str] | None:
    """Token counts of ``corpus`` (a UTF-8 text file) or of the default corpus (module docstring).

    Returns:
        (int64 [vocab_size] counts, a one-line description of the corpus), or None when no corpus is given
        and the default one is not installed (gensim, from ``hf-embcomp[eval]``).

    Raises:
        FileNotFoundError: ``corpus`` does not exist.
    """
    if corpus is not None:
        path = Path(corpus)
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} not found; pass a UTF-8 text file to --corpus.")
        text = path.read_text(encoding="utf-8", errors="replace")
        desc = f"{path.name} ({len(text):,} characters)"
    else:
        try:
            from . import data

            text = data.wiki_text()[DEFAULT_OFFSET:]
        except (ImportError, FileNotFoundError) as e:
            logger.warning("no default token-frequency corpus (%s); install hf-embcomp[eval] or pass a corpus.", e)
            return None
        desc = f"gensim Wikipedia text from character {DEFAULT_OFFSET:,} ({len(text):,} characters)"
    counts = token_counts(tokenizer, _chunks(text), vocab_size)
    return counts, desc + f", {int(counts.sum()):,} tokens"
