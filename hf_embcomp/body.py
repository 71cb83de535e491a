"""The dtype of the uncompressed body (every weight but the token embedding) and whole-model byte counts.

By default the body keeps the *precision class* of the source checkpoint, so that the body is never stored wider
than its source's: a float32 safetensors checkpoint stays float32, a bfloat16 one bfloat16, and a GGUF
file - which transformers dequantises to float32 on load - becomes bfloat16 when its weight matrices are quantised
or bfloat16 (float16 when they are float16, float32 only when they are float32). ``--body-dtype`` (the
``body_dtype=`` argument of :func:`hf_embcomp.compress`) overrides the choice.

A 16-bit body is still bigger than a 4-bit GGUF body (SmolLM2-135M Q4_1: 98 MB file, 217 MB compressed with a
bfloat16 body, 433 MB with the float32 one): only a quantised body (torchao, README "torchao bodies") makes such
a model smaller than its source. :func:`model_size_report` logs a warning when the whole model grows.

The compressed embedding's own tensors are always written in its storage dtype (``embedding_compression
.storage_dtype``), whatever the body dtype.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gguf import GGUFReader

logger = logging.getLogger(__name__)

BODY_DTYPES = ("auto", "float32", "bfloat16", "float16")
"""Accepted ``body_dtype`` values (``--body-dtype``)."""

_GGUF_FLOAT = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def gguf_body_info(path: str | Path | GGUFReader) -> tuple[str, int]:
    """The precision class of a GGUF file's weight matrices and the bytes of all its tensors.

    The class is that of the matrices other than ``token_embd.weight`` (1-D tensors such as norms are float32
    in every GGUF file and are ignored): ``"float32"`` if they are all F32, ``"float16"`` if the widest is F16,
    else ``"bfloat16"`` (quantised types such as Q4_1 and Q8_0, and BF16).

    Args:
        path: the GGUF file, or the file already opened as a ``gguf.GGUFReader`` (opening one parses all the
            metadata: ~10 s for SmolLM2's vocabulary).

    Returns:
        (dtype name, bytes): bytes is the sum of every tensor's stored bytes (body + embedding), the
        whole model as the file stores it (the file is this plus its metadata).
    """
    from gguf import GGUFReader

    reader = path if isinstance(path, GGUFReader) else GGUFReader(str(path))
    kinds = {t.tensor_type.name for t in reader.tensors if t.name != "token_embd.weight" and len(t.shape) > 1}
    total = sum(int(t.n_bytes) for t in reader.tensors)
    if kinds and kinds <= {"F32"}:
        return "float32", total
    if kinds and kinds <= {"F32", "F16"}:
        return "float16", total
    return "bfloat16", total


def state_dict_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct tensor of ``model.state_dict()`` (tied / shared tensors counted once), in the
    dtypes the state dict holds (for a compressed model: the embedding in its storage dtype). That is what
    ``save_pretrained`` writes to ``model.safetensors``, less the file's JSON header."""
    seen: set[tuple[int, int, torch.dtype, tuple[int, ...]]] = set()
    total = 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t), t.storage_offset(), t.dtype,
               tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def resolve_body_dtype(model: torch.nn.Module, body_dtype: str | torch.dtype | None = "auto") -> torch.dtype:
    """The dtype a compressed model's body is saved in.

    Args:
        model: the stock source model. A model from :func:`hf_embcomp.load_model` carries the source
            checkpoint's precision class (``_embcomp_source["body_dtype"]``, e.g. ``"bfloat16"`` for a Q4_1 GGUF
            file); any other model keeps its in-memory dtype under ``"auto"``.
        body_dtype: ``"auto"`` / None (as above), or ``"float32"``, ``"bfloat16"``, ``"float16"`` (or the torch dtype).

    Returns:
        A floating torch dtype.

    Raises:
        ValueError: ``body_dtype`` is not one of :data:`BODY_DTYPES`.
    """
    if isinstance(body_dtype, torch.dtype):
        body_dtype = str(body_dtype).replace("torch.", "")
    if body_dtype is None or body_dtype == "auto":
        carried = (getattr(model, "_embcomp_source", None) or {}).get("body_dtype")
        if carried:
            return getattr(torch, carried)
        return model.dtype if getattr(model, "dtype", None) is not None else torch.float32
    if body_dtype not in BODY_DTYPES:
        raise ValueError(f"body_dtype must be one of {', '.join(BODY_DTYPES)} (got {body_dtype!r}); e.g. --body-dtype bfloat16.")
    return getattr(torch, body_dtype)


def model_size_report(source: torch.nn.Module, compressed: torch.nn.Module) -> dict[str, Any]:
    """The whole-model fields of ``compression_report.json``.

    Returns:
        ``body_dtype`` (of the compressed model's body), ``source_model_bytes`` (every tensor of the source
        checkpoint: a GGUF file's tensor bytes, else the source model's state dict as loaded),
        ``model_bytes`` (every tensor ``model.safetensors`` stores: body + compressed embedding) and
        ``model_compression_ratio`` = source_model_bytes / model_bytes.
    """
    carried = getattr(source, "_embcomp_source", None) or {}
    before = carried.get("model_bytes") or state_dict_bytes(source)
    after = state_dict_bytes(compressed)
    if after > before:
        logger.warning("the compressed model stores %.1f MB, more than its source's %.1f MB: the source's body is "
                       "quantised below 16 bits (e.g. a 4-bit GGUF file); quantise the body too (README, 'torchao "
                       "bodies') to be smaller than the source.", after / 1e6, before / 1e6)
    return {
        "body_dtype": str(compressed.dtype).replace("torch.", ""),
        "source_model_bytes": int(before),
        "model_bytes": int(after),
        "model_compression_ratio": before / after,
    }
