"""The form of the uncompressed body (every weight but the token embedding) and whole-model byte counts.

By default the body keeps the *precision class* of the source checkpoint, so that the body is never stored wider
than its source's: a float32 safetensors checkpoint stays float32, a bfloat16 one bfloat16. A GGUF file - which
transformers dequantises to float32 on load - keeps its own quantised blocks when every weight matrix of its body
is of a type the runtime reads (:data:`KEPT_GGML_TYPES`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K): ``"gguf"``, the
matrices are stored as the file's blocks, the model computes in float32 and equals the float32 model transformers
loads from the file bit for bit (runtime ``embcomp_body.py``). Other GGUF files (I-quants, Q2_K, Q3_K, Q5_K) become
bfloat16 (float16 when their matrices are float16, float32 only when float32). ``--body-dtype`` (the
``body_dtype=`` argument of :func:`hf_embcomp.compress`) overrides the choice.

SmolLM2-135M-Instruct Q4_1 (98 MB file): its body kept as Q4_1 blocks stores 66 MB, bfloat16 212 MB, float32 424 MB.
:func:`model_size_report` logs a warning when the whole model grows.

The compressed embedding's own tensors are always written in its storage dtype (``embedding_compression
.storage_dtype``), whatever the body dtype.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .hub_code.embcomp_body import GGML_BLOCKS

if TYPE_CHECKING:
    from gguf import GGUFReader

logger = logging.getLogger(__name__)

BODY_DTYPES = ("auto", "gguf", "float32", "bfloat16", "float16")
"""Accepted ``body_dtype`` values (``--body-dtype``); ``"gguf"``: weight matrices kept as the GGUF file's blocks."""

KEPT_GGML_TYPES = tuple(GGML_BLOCKS)
"""GGUF block types a body keeps as they are (:mod:`hf_embcomp.hub_code.embcomp_body`)."""

_GGUF_FLOAT = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def gguf_body_info(path: str | Path | GGUFReader) -> tuple[str, int]:
    """The precision class of a GGUF file's weight matrices and the bytes of all its tensors.

    The class is that of the matrices other than ``token_embd.weight`` (1-D tensors such as norms are float32
    in every GGUF file and are ignored): ``"float32"`` if they are all F32, ``"float16"`` if the widest is F16,
    ``"gguf"`` if they are all of :data:`KEPT_GGML_TYPES` (kept as blocks), else ``"bfloat16"`` (other quantised
    types such as IQ2_XS, and BF16).

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
    if kinds and kinds <= set(KEPT_GGML_TYPES):
        return "gguf", total
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


def resolve_body_dtype(model: torch.nn.Module, body_dtype: str | torch.dtype | None = "auto") -> torch.dtype | str:
    """The dtype a compressed model's body is saved in, or ``"gguf"`` (weight matrices kept as the GGUF blocks).

    Args:
        model: the stock source model. A model from :func:`hf_embcomp.load_model` carries the source
            checkpoint's precision class (``_embcomp_source["body_dtype"]``, e.g. ``"gguf"`` for a Q4_1 GGUF file,
            ``"bfloat16"`` for an IQ4_XS one); any other model keeps its in-memory dtype under ``"auto"``.
        body_dtype: ``"auto"`` / None (as above), ``"gguf"``, or ``"float32"``, ``"bfloat16"``, ``"float16"`` (or the
            torch dtype).

    Returns:
        A floating torch dtype, or ``"gguf"``.

    Raises:
        ValueError: ``body_dtype`` is not one of :data:`BODY_DTYPES`, or ``"gguf"`` for a model not loaded from a
            GGUF file by :func:`hf_embcomp.load_model`.
    """
    if isinstance(body_dtype, torch.dtype):
        body_dtype = str(body_dtype).replace("torch.", "")
    carried = getattr(model, "_embcomp_source", None) or {}
    if body_dtype is None or body_dtype == "auto":
        if carried.get("body_dtype"):
            return "gguf" if carried["body_dtype"] == "gguf" else getattr(torch, carried["body_dtype"])
        return model.dtype if getattr(model, "dtype", None) is not None else torch.float32
    if body_dtype not in BODY_DTYPES:
        raise ValueError(f"body_dtype must be one of {', '.join(BODY_DTYPES)} (got {body_dtype!r}); e.g. --body-dtype bfloat16.")
    if body_dtype == "gguf":
        if not carried.get("gguf_path"):
            raise ValueError("body_dtype 'gguf' keeps a GGUF file's blocks: load the model from a .gguf file with "
                             "hf_embcomp.load_model (or pass another --body-dtype).")
        return "gguf"
    return getattr(torch, body_dtype)


def gguf_body_blocks(model: torch.nn.Module, path: str | Path) -> tuple[dict[str, tuple[str, torch.Tensor]], list[str]]:
    """The GGUF blocks of each ``nn.Linear`` of ``model`` (the stock model transformers loaded from ``path``), found by
    content: a GGUF matrix of a kept type (:data:`KEPT_GGML_TYPES`) belongs to a Linear when its dequantised rows are
    the Linear's weight rows, bit for bit (in the weight's dtype), in some order (transformers permutes the rows of
    Llama's q / k projections); the blocks are returned in the Linear's row order. The token embedding (and a head
    tied to it) is not a body matrix and is left out.

    Args:
        model: the stock source model, loaded from ``path``.
        path: the GGUF file.

    Returns:
        ({module name: (ggml type, uint8 [out_features, in_features / 32 * block bytes])}, [names of the Linears
        with no matching blocks]).
    """
    import numpy as np
    from gguf import GGUFReader

    from .hub_code.embcomp_body import dequantize_ggml

    emb = model.get_input_embeddings()
    linears = {n: m for n, m in model.named_modules()
               if type(m) is torch.nn.Linear and m.weight is not getattr(emb, "weight", None)}
    gen = torch.Generator().manual_seed(0)
    probes: dict[int, torch.Tensor] = {}

    def fingerprint(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = probes.setdefault(w.shape[1], torch.randn(w.shape[1], generator=gen, dtype=torch.float64))
        return torch.sort(w.double() @ r)

    candidates: dict[tuple[int, int], list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for t in GGUFReader(str(path)).tensors:
        kind = t.tensor_type.name
        if kind not in KEPT_GGML_TYPES or t.name == "token_embd.weight" or len(t.shape) != 2:
            continue
        blocks = torch.from_numpy(np.array(t.data, dtype=np.uint8))
        dense = dequantize_ggml(blocks, kind)
        candidates.setdefault(tuple(dense.shape), []).append((kind, blocks, dense, {}))
    found: dict[str, tuple[str, torch.Tensor]] = {}
    for name, lin in linears.items():
        w = lin.weight.detach().cpu()
        pool = candidates.get(tuple(w.shape), [])
        if not pool:
            continue
        keys, order = fingerprint(w.float())
        for i, (kind, blocks, dense, prints) in enumerate(pool):
            if w.dtype not in prints:  # fingerprints of the rows as the model holds them (a bfloat16 load rounds)
                prints[w.dtype] = fingerprint(dense.to(w.dtype).float())
            ckeys, corder = prints[w.dtype]
            if not torch.allclose(keys, ckeys, rtol=1e-9, atol=1e-12):
                continue
            perm = torch.empty_like(order)
            perm[order] = corder  # weight row order[k] is GGUF row corder[k]
            if torch.equal(dense[perm].to(w.dtype), w):
                found[name] = (kind, blocks[perm].contiguous())
                pool.pop(i)
                break
    return found, [n for n in linears if n not in found]


_FOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> (its Linear weights' identity and version, path, :func:`gguf_body_blocks` result): ``method="auto"``
validates every candidate against the same source; the GGUF file is read and matched once."""


def resolve_body(model: torch.nn.Module, body_dtype: str | torch.dtype | None = "auto"
                 ) -> tuple[torch.dtype, dict[str, tuple[str, torch.Tensor]] | None]:
    """The body of the compressed model: its dtype and, for ``"gguf"`` (:func:`resolve_body_dtype`), the Linear
    layers kept as the GGUF file's blocks (:func:`gguf_body_blocks`; the rest of the body is then float32).

    Under ``"auto"``, a body whose Linear layers do not all have blocks falls back to bfloat16 (a warning says so).

    Returns:
        (dtype, {module name: (ggml type, uint8 blocks)} or None).

    Raises:
        ValueError: as :func:`resolve_body_dtype`; or ``"gguf"`` asked explicitly and some Linear layer has no blocks.
    """
    body = resolve_body_dtype(model, body_dtype)
    if body != "gguf":
        return body, None
    path = model._embcomp_source["gguf_path"]
    state = tuple((m.weight.data_ptr(), m.weight._version) for m in model.modules() if type(m) is torch.nn.Linear)
    cached = _FOUND.get(model)
    if cached is None or cached[:2] != (state, path):
        _FOUND[model] = cached = (state, path, gguf_body_blocks(model, path))
    blocks, left = cached[2]
    if left and body_dtype == "gguf":
        raise ValueError(f"--body-dtype gguf: {len(left)} linear layers (e.g. {left[0]}) have no blocks of a type the "
                         "runtime reads (e.g. I-quants) in the GGUF file that hold their weights; pass --body-dtype "
                         "bfloat16.")
    if left:
        logger.warning("%d linear layers (e.g. %s) have no GGUF blocks that hold their weights: the body is stored in "
                       "bfloat16 instead of the GGUF blocks.", len(left), left[0])
        return torch.bfloat16, None
    return torch.float32, blocks


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
    block = getattr(compressed.config, "body_quantization", None)
    kinds = sorted(set(block["modules"].values())) if block else []
    return {
        "body_dtype": str(compressed.dtype).replace("torch.", ""),
        "body_format": (f"GGUF {'/'.join(kinds)} blocks for {len(block['modules'])} linear layers, "
                        f"{str(compressed.dtype).replace('torch.', '')} elsewhere") if block else None,
        "source_model_bytes": int(before),
        "model_bytes": int(after),
        "model_compression_ratio": before / after,
    }
