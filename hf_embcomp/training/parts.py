"""Choose which parts of a compressed model train when it is fine-tuned (e.g. with ``transformers.Trainer``).

A compressed model's token embedding is frozen by default (the runtime sets ``requires_grad=False`` on
its parameters when the model is built or loaded, unless ``embedding_compression.trainable`` is true in
``config.json``). :func:`trainable_parts` changes that choice before the optimiser is built::

    model = AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)
    hf_embcomp.trainable_parts(model, "real")   # also train the embedding's factors / decoders / codebooks
    Trainer(model=model, ...).train()

Whatever is chosen, the saved model keeps its compressed format and stored byte size: integer codes are
buffers (never trained) and float tensors are written back in the block's storage dtype.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..core import is_compressed

logger = logging.getLogger(__name__)

PRESETS = ("none", "real", "all", "embedding_only")
"""Named choices of :func:`trainable_parts`:

- ``"none"``: the compressed embedding is frozen (the default after loading); the rest is left as it is.
- ``"real"``: every floating-point tensor of the compressed embedding trains (low-rank factors, decoders,
  codebooks); the rest is left as it is.
- ``"all"``: every parameter of the model trains, the compressed embedding's real-valued tensors included.
- ``"embedding_only"``: only the compressed embedding's real-valued tensors train; everything else is frozen
  (e.g. to recover accuracy of the embedding alone by distillation).
"""


@dataclass(frozen=True)
class TrainableParts:
    """What :func:`trainable_parts` left trainable.

    Attributes:
        trainable: names (local to the compressed embedding) of its parameters that train.
        frozen: names of its parameters that do not train.
        fixed: names of its buffers (e.g. the packed integer ``codes``), which never train.
        model_trainable: number of trainable scalars in the whole model.
        model_total: number of parameter scalars in the whole model.
    """

    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    fixed: tuple[str, ...]
    model_trainable: int
    model_total: int


def compressed_embedding(model: nn.Module) -> nn.Module:
    """The compressed token-embedding module of a compressed model (loaded with or without hf-embcomp).

    Raises:
        ValueError: ``model`` is not compressed by hf-embcomp.
    """
    if not is_compressed(model) or not hasattr(model, "get_compressed_embedding"):
        raise ValueError("expected a model compressed by hf-embcomp (config model_type 'embcomp').")
    return model.get_compressed_embedding()


def trainable_parts(model: nn.Module, parts: str | Iterable[str] = "none") -> TrainableParts:
    """Set ``requires_grad`` on a compressed model so that the chosen parts train. Call it before building
    the optimiser (before ``Trainer(...)``).

    Args:
        model: a compressed model (from :func:`hf_embcomp.compress`, or loaded with ``trust_remote_code=True``).
        parts: one of :data:`PRESETS`, or an iterable of the compressed embedding's parameter names (e.g.
            ``["decoder", "decoder_bias"]`` for LightToken): those train, its other parameters are frozen and
            the rest of the model is left as it is.

    Returns:
        A :class:`TrainableParts` summary.

    Raises:
        ValueError: ``model`` is not compressed, ``parts`` is an unknown preset, or it names a tensor the
            embedding does not have, or an integer tensor (codes cannot be trained).
    """
    emb = compressed_embedding(model)
    params = dict(emb.named_parameters())
    floats = {n for n, p in params.items() if p.is_floating_point()}
    if isinstance(parts, str):
        if parts not in PRESETS:
            raise ValueError(f"unknown parts {parts!r}; choose one of {PRESETS} or a list of names from {sorted(params)}.")
        if parts == "all":
            model.requires_grad_(True)
        elif parts == "embedding_only":
            model.requires_grad_(False)
        chosen = set() if parts == "none" else floats
    else:
        chosen = set(parts)
        buffers = {n for n, _ in emb.named_buffers()}
        if chosen & buffers:
            raise ValueError(f"{sorted(chosen & buffers)} are buffers (integer codes) and cannot be trained.")
        unknown = chosen - set(params)
        if unknown:
            raise ValueError(f"the compressed embedding has no parameter {sorted(unknown)}; it has {sorted(params)}.")
        if chosen - floats:
            raise ValueError(f"{sorted(chosen - floats)} are not floating-point tensors and cannot be trained.")
    # the module-level flag decides what a parameter re-registered later (e.g. reloaded) gets
    emb.trainable = chosen == floats and bool(floats)
    for n, p in params.items():
        p.requires_grad_(n in chosen)
    result = TrainableParts(
        trainable=tuple(sorted(chosen)),
        frozen=tuple(sorted(set(params) - chosen)),
        fixed=tuple(sorted(n for n, _ in emb.named_buffers())),
        model_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        model_total=sum(p.numel() for p in model.parameters()),
    )
    logger.info("compressed embedding: training %s, frozen %s, fixed buffers %s; %d of %d model parameters train",
                list(result.trainable), list(result.frozen), list(result.fixed), result.model_trainable,
                result.model_total)
    return result


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder} has no model.safetensors (nor a sharded index).")
    return [single]


def stored_embedding(folder: str | os.PathLike, model_or_prefix: nn.Module | str) -> dict[str, tuple[str, list[int], int, str]]:
    """The compressed embedding's tensors as stored in a saved folder, read from the safetensors headers.

    Use it to check that fine-tuning kept the stored embedding: same names, dtypes, shapes and byte lengths
    (always), and the same bytes (when the embedding was frozen). A base-model checkpoint
    (``embeddings.word_embeddings.*``) and a head checkpoint (``bert.embeddings.word_embeddings.*``)
    compare equal: the tensors are keyed by their name inside the embedding module.

    Args:
        folder: a saved compressed model (``model.safetensors`` or a sharded index).
        model_or_prefix: the compressed model (its embedding's module name is used) or that name, e.g.
            ``"bert.embeddings.word_embeddings"``.

    Returns:
        tensor name in the embedding (``"lowrank_a"``, ``"codes"``, ...) -> (safetensors dtype, e.g. ``"F16"``
        / ``"U8"``; shape; byte length; sha256 of the stored bytes).

    Raises:
        FileNotFoundError: no safetensors file in ``folder``.
        ValueError: no tensor of the embedding found.
    """
    if isinstance(model_or_prefix, str):
        prefix = model_or_prefix
    else:
        compressed_embedding(model_or_prefix)
        prefix = model_or_prefix._embcomp_embedding_names[0]

    def matches(module: str) -> bool:  # with or without the base-model prefix (bert., model., ...)
        return module == prefix or prefix.endswith("." + module) or module.endswith("." + prefix)

    out: dict[str, tuple[str, list[int], int, str]] = {}
    for path in _safetensors_files(Path(folder)):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            for key, info in sorted(header.items()):
                module, _, name = key.rpartition(".")
                if key == "__metadata__" or not matches(module):
                    continue
                start, end = info["data_offsets"]
                f.seek(8 + n + start)
                out[name] = (info["dtype"], list(info["shape"]), end - start, hashlib.sha256(f.read(end - start)).hexdigest())
    if not out:
        raise ValueError(f"no tensor under {prefix!r} in {folder}: not the compressed model saved there?")
    return out


__all__ = ["PRESETS", "TrainableParts", "compressed_embedding", "stored_embedding", "trainable_parts"]
