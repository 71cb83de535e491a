"""Compress a stock transformers model's token embedding into the hf-embcomp runtime format."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel

from .body import model_size_report, resolve_body_dtype
from .hub_code.configuration_embcomp import FORMAT_VERSION, EmbCompConfig
from .hub_code.embcomp_base import CompressedEmbedding
from .hub_code.modeling_embcomp import ENTRY_AUTO_CLASSES, ENTRY_CLASSES, auto_map_for, stock_class_for
from .methods import get_method
from .methods.base import MethodConfig

logger = logging.getLogger(__name__)

# Most specific heads first; AutoModelForPreTraining last (RobertaForMaskedLM is also its class).
_AUTO_ORDER = [
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForMultipleChoice",
    "AutoModelForNextSentencePrediction",
    "AutoModel",
    "AutoModelForPreTraining",
]


class CompressionError(ValueError):
    """A model cannot be compressed as asked (the message says why and what to do)."""


def auto_class_of(model: PreTrainedModel) -> str:
    """The name of the Auto class whose mapping builds ``type(model)`` for its config.

    Raises:
        CompressionError: no Auto class builds this model class.
    """
    bmt = model.config.model_type
    for auto in _AUTO_ORDER:
        if stock_class_for(auto, bmt) is type(model):
            return auto
    raise CompressionError(
        f"{type(model).__name__} is not built by any transformers Auto class for model_type {bmt!r}; "
        "load the model with an Auto class (e.g. AutoModel) before compressing."
    )


def is_compressed(model: Any) -> bool:
    """Whether ``model`` already has an hf-embcomp compressed token embedding."""
    return getattr(getattr(model, "config", None), "model_type", None) == "embcomp"


def embedding_weight(model: PreTrainedModel) -> torch.Tensor:
    """The input token-embedding matrix E of a stock model, float32 [V, d] (detached, a copy).

    Raises:
        CompressionError: the model is already compressed, or its input embedding is not an nn.Embedding.
    """
    if is_compressed(model):
        raise CompressionError("this model is already compressed; compress its source model, or decompress it first.")
    emb = model.get_input_embeddings()
    if not isinstance(emb, torch.nn.Embedding):
        raise CompressionError(
            f"the input embedding is a {type(emb).__name__}, not an nn.Embedding: hf-embcomp cannot compress it."
        )
    return emb.weight.detach().to(torch.float32).clone()


def fidelity(original: torch.Tensor, reconstructed: torch.Tensor, chunk: int = 65536) -> dict[str, float]:
    """Embedding fidelity of a reconstruction.

    Args:
        original: E, float [V, d].
        reconstructed: E_hat, float [V, d].

    Returns:
        ``row_cosine_mean``, ``row_cosine_p01`` (1st percentile of the per-row cosine) and
        ``relative_frobenius_error`` = ||E - E_hat||_F / ||E||_F.
    """
    cos, err2, ref2 = [], 0.0, 0.0
    for i in range(0, original.shape[0], chunk):
        a = original[i : i + chunk].double()
        b = reconstructed[i : i + chunk].double()
        cos.append(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12))
        err2 += float(((a - b) ** 2).sum())
        ref2 += float((a**2).sum())
    c = torch.cat(cos)
    return {
        "row_cosine_mean": float(c.mean()),
        "row_cosine_p01": float(torch.quantile(c.float(), 0.01)),
        "relative_frobenius_error": math.sqrt(err2 / max(ref2, 1e-30)),
    }


def method_config(method: str, num_embeddings: int, embedding_dim: int, ratio: float | None = None,
                  **hyperparameters: Any) -> MethodConfig:
    """Build a method's hyper-parameters from a ratio (solved) or from explicit values.

    Raises:
        ValueError: unknown method, or neither ``ratio`` nor the method's size parameter given.
        RatioError: the ratio is out of the method's reachable range.
    """
    cfg_cls = get_method(method).config_class
    hp = {k: v for k, v in hyperparameters.items() if v is not None}
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(hp) - known)
    if unknown:
        raise ValueError(f"unknown hyper-parameter(s) {unknown} for {method}; known: {', '.join(sorted(known))}.")
    try:
        if ratio is not None:
            return cfg_cls.from_ratio(num_embeddings, embedding_dim, ratio, **hp)
        return cfg_cls(**hp)
    except TypeError as e:
        raise ValueError(f"bad hyper-parameters for {method}: {e}") from None


def compress(
    model: PreTrainedModel,
    method: str = "svd",
    ratio: float | None = 8.0,
    *,
    config: MethodConfig | None = None,
    source: str | None = None,
    source_revision: str | None = None,
    source_dtype: str | None = None,
    source_embedding_bytes: int | None = None,
    device: str | torch.device | None = None,
    tokenizer: Any = None,
    source_folder: str | None = None,
    token_counts: torch.Tensor | None = None,
    corpus: str | None = None,
    calibration: Any = "default",
    body_dtype: str | torch.dtype | None = "auto",
    **hyperparameters: Any,
) -> PreTrainedModel:
    """Compress the token embedding of a stock transformers model.

    Not in place: returns a NEW model (an hf-embcomp entry class, e.g. ``EmbCompForCausalLM``) that
    shares no tensors with ``model``; ``model`` is left unchanged. ``model.save_pretrained(dir)`` on the
    result writes a repository that loads with ``AutoModel*.from_pretrained(dir, trust_remote_code=True)``
    where hf-embcomp is not installed.

    Args:
        model: a stock model whose input embedding is an ``nn.Embedding`` (V x d).
        method: a registered method name (``hf_embcomp.METHODS``).
        ratio: target compression ratio R = V*d*4 bytes / stored bytes; the method solves its sizes so
            that the stored bytes meet R. Ignored when ``config`` is given; None to use ``hyperparameters``.
        config: explicit method hyper-parameters (a ``MethodConfig`` of the method).
        source, source_revision: recorded in the ``embedding_compression`` block (model id / path).
            Without ``source``, a model from :func:`hf_embcomp.load_model` records the name, revision,
            dtype and embedding bytes it was loaded from (its ``_embcomp_source`` attribute) for the four
            ``source*`` arguments not given; any other model records ``config._name_or_path``.
        source_dtype: dtype of the source checkpoint's embedding (e.g. ``"float16"``, ``"Q8_0"``).
        source_embedding_bytes: bytes of the embedding in the source checkpoint (for the ratio vs source).
        device: where to run the fit (default: CPU, or the model's device).
        tokenizer: saved with the model by ``save_pretrained`` (optional).
        source_folder: local folder of the source checkpoint; its tokenizer and sentence-transformers
            files are saved with the model by ``save_pretrained`` (optional).
        token_counts: int [V] token frequencies of a corpus, for methods that use them (LightToken's
            exact rows). Default: counted with ``tokenizer`` on ``corpus`` (a UTF-8 text file) or on the
            default corpus of :mod:`hf_embcomp.frequency`; without a tokenizer, none.
        corpus: text file to count token frequencies on (see ``token_counts``).
        calibration: for methods that weigh their error by the model's own statistics (``uses_calibration``):
            a :class:`hf_embcomp.calibration.Calibration`, a UTF-8 text file to calibrate on, ``"default"``
            (the built-in calibration text, when a tokenizer is given) or None (no calibration). Recorded in the
            report and config.
        body_dtype: dtype of every weight but the compressed embedding (:func:`hf_embcomp.body.resolve_body_dtype`):
            ``"auto"`` keeps the source checkpoint's precision class (bfloat16 for a quantised GGUF file).
        **hyperparameters: overrides passed to the method config (``rank=``, ``dtype=``, ``seed=`` ...).

    Returns:
        The compressed model, in eval/train mode as ``model``, on ``model``'s device, in the body dtype
        (``body_dtype``). Its
        ``compression_report`` attribute holds the report written to ``compression_report.json``.

    Raises:
        CompressionError: already compressed, or not an nn.Embedding input embedding.
        ValueError / RatioError: unknown method, bad hyper-parameters or unreachable ratio.
        hf_embcomp.calibration.CalibrationError: the calibration file cannot be used.
    """
    if method == "auto":
        from .auto import compress_auto

        return compress_auto(model, ratio, source=source, source_revision=source_revision, source_dtype=source_dtype,
                             source_embedding_bytes=source_embedding_bytes, device=device, tokenizer=tokenizer,
                             source_folder=source_folder, token_counts=token_counts, corpus=corpus,
                             calibration=calibration, body_dtype=body_dtype, **hyperparameters)
    weight = embedding_weight(model)
    V, d = weight.shape
    if source is None:  # where load_model loaded the model from
        from .io import SOURCE_ATTRIBUTE

        carried = getattr(model, SOURCE_ATTRIBUTE, None) or {}
        source = carried.get("name")
        source_revision = source_revision if source_revision is not None else carried.get("revision")
        source_dtype = source_dtype or carried.get("dtype")
        source_embedding_bytes = source_embedding_bytes or carried.get("embedding_bytes")
    meth = get_method(method)
    cfg = config if config is not None else method_config(method, V, d, ratio, **hyperparameters)
    if not isinstance(cfg, meth.config_class):
        raise ValueError(f"config must be a {meth.config_class.__name__} for method {method!r}.")
    auto = auto_class_of(model)
    old = model.get_input_embeddings()
    model_dtype = resolve_body_dtype(model, body_dtype)

    torch.manual_seed(cfg.seed)
    fit_device = torch.device(device) if device is not None else old.weight.device
    t0 = time.perf_counter()
    logger.info("fitting %s on a %d x %d embedding (%s)", method, V, d, cfg)
    context: dict[str, Any] = {}
    counts_source = None
    if corpus is not None and (tokenizer is None or not meth.uses_token_counts):
        raise ValueError("corpus= needs a tokenizer and a method that uses token frequencies (lighttoken); "
                         "pass tokenizer= or leave corpus out.")
    if meth.uses_token_counts:
        special = [int(i) for i in getattr(tokenizer, "all_special_ids", None) or [] if 0 <= int(i) < V]
        if token_counts is None and tokenizer is not None and getattr(cfg, "exact_rows", 0):
            from .frequency import corpus_token_counts

            got = corpus_token_counts(tokenizer, V, corpus)
            if got is not None:
                token_counts, counts_source = got
        elif token_counts is not None:
            counts_source = "token_counts given by the caller"
        if token_counts is not None and tuple(token_counts.shape) != (V,):
            raise ValueError(f"token_counts must have shape ({V},), got {tuple(token_counts.shape)}.")
        context = {"token_counts": token_counts, "special_ids": special}
    cal = None
    if meth.uses_calibration:
        cal = resolve_calibration(model, tokenizer, calibration, token_counts)
        context["calibration"] = cal
    state, cfg = meth.fit_with_config(weight.to(fit_device), cfg, **context)
    stored = cfg.stored_bytes(V, d)
    fit_seconds = time.perf_counter() - t0

    src_dtype = source_dtype or str(old.weight.dtype).replace("torch.", "")
    src_bytes = source_embedding_bytes or V * d * old.weight.element_size()
    block: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "num_embeddings": V,
        "embedding_dim": d,
        "padding_idx": old.padding_idx,
        "embed_scale": float(old.scalar_embed_scale) if hasattr(old, "scalar_embed_scale") else None,
        "storage_dtype": cfg.dtype,
        "hyperparameters": cfg.hyperparameters(),
        "stored_bytes": stored,
        "compression_ratio": V * d * 4 / stored,
        "compression_ratio_vs_source": src_bytes / stored,
        "source_dtype": src_dtype,
        "source_model": source or getattr(model.config, "_name_or_path", None) or None,
        "source_revision": source_revision,
    }
    if meth.uses_calibration:
        block["calibration"] = None if cal is None else cal.describe()
    ecfg = EmbCompConfig.from_backbone_config(model.config, block)
    ecfg.auto_map = auto_map_for(ecfg.backbone_model_type)
    ecfg.architectures = [next(n for n, a in ENTRY_AUTO_CLASSES.items() if a == auto)]
    entry = ENTRY_CLASSES[ecfg.architectures[0]]
    new = entry(ecfg)

    src_state = model.state_dict()
    keep = {k: v for k, v in src_state.items() if k not in new._embcomp_removed_keys}
    missing, unexpected = new.load_state_dict(keep, strict=False)
    emb: CompressedEmbedding = new.get_compressed_embedding()
    emb_prefixes = tuple(f"{n}." for n in new._embcomp_embedding_names)
    bad = [k for k in missing if not k.startswith(emb_prefixes)]
    if bad or unexpected:
        raise CompressionError(f"could not carry the stock weights over: missing {bad}, unexpected {unexpected}")
    with torch.no_grad():
        own = dict(emb.named_parameters(recurse=False)) | dict(emb.named_buffers(recurse=False))
        if set(own) != set(state):
            raise CompressionError(f"method {method} produced tensors {sorted(state)}, the runtime expects {sorted(own)}")
        for k, t in state.items():
            if own[k].shape != t.shape:
                raise CompressionError(f"method {method} produced {k} of shape {tuple(t.shape)}, expected {tuple(own[k].shape)}")
            own[k].copy_(t.to(own[k].dtype) if t.is_floating_point() else t)
    new.to(device=old.weight.device, dtype=model_dtype)
    new.train(model.training)
    new.tie_weights()

    actual = sum(t.numel() * t.element_size() for t in _stored_tensors(emb))
    if actual != stored:
        raise CompressionError(f"method {method} accounted {stored} bytes but stores {actual}: a bug, please report it.")
    with torch.no_grad():
        fid = fidelity(weight, emb.reconstruct().float().cpu())
    new.compression_report = {
        "method": method,
        "paper": meth.paper,
        "hyperparameters": cfg.hyperparameters(),
        "num_embeddings": V,
        "embedding_dim": d,
        "source_model": block["source_model"],
        "source_dtype": src_dtype,
        "fp32_bytes": V * d * 4,
        "source_bytes": src_bytes,
        "stored_bytes": stored,
        "compression_ratio": block["compression_ratio"],
        "compression_ratio_vs_source": block["compression_ratio_vs_source"],
        "fit_seconds": round(fit_seconds, 3),
        "fidelity": fid,
    } | model_size_report(model, new)
    if meth.uses_token_counts:
        new.compression_report["token_counts_source"] = counts_source
    if meth.uses_calibration:
        new.compression_report["calibration"] = block["calibration"]
        notes = getattr(meth, "fit_notes", None)
        if notes:
            new.compression_report["fit_notes"] = notes
    from .cards import has_tokenizer_files, render_card, source_license
    from .io import attach_side_files, prepare_for_save, side_files

    files = side_files(Path(source_folder) if source_folder else None, tokenizer)
    new._embcomp_card_args = {"license": source_license(block["source_model"], source_folder),
                              "has_tokenizer": has_tokenizer_files(files)}
    attach_side_files(new, files)
    refresh_report(new)
    prepare_for_save(new)
    return new


def refresh_report(model: PreTrainedModel) -> None:
    """Write ``model.compression_report`` again into the files ``save_pretrained`` adds
    (``compression_report.json`` and the card), after a change to the report."""
    from .cards import render_card
    from .io import attach_side_files

    card = render_card(model.config, model.compression_report, **getattr(model, "_embcomp_card_args", {}))
    attach_side_files(model, {"compression_report.json": (json.dumps(model.compression_report, indent=2) + "\n").encode(),
                              "README.md": card.encode()})


def resolve_calibration(model: PreTrainedModel, tokenizer: Any, calibration: Any,
                        token_counts: torch.Tensor | None = None) -> Any:
    """The :class:`~hf_embcomp.calibration.Calibration` that ``calibration=`` of :func:`compress` asks for.

    Returns None for ``calibration=None`` and for ``"default"`` without a tokenizer or without the default
    text installed (the fit then weighs every row and coordinate alike). Caller ``token_counts`` replace the
    counted ones.

    Raises:
        hf_embcomp.calibration.CalibrationError: a file that cannot be used.
        ValueError: ``calibration`` is none of the accepted kinds.
    """
    from .calibration import Calibration, CalibrationError, calibrate

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
                cal = calibrate(model, tokenizer, None if default else calibration)
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


def _stored_tensors(emb: CompressedEmbedding):
    for name, t in emb.state_dict().items():
        yield t


def decompress(model: PreTrainedModel) -> PreTrainedModel:
    """The stock model (its own class and config) with a plain ``nn.Embedding`` holding E_hat.

    Works on a model from :func:`compress` and on one loaded with ``trust_remote_code=True``.

    Raises:
        ValueError: ``model`` is not compressed.
    """
    if not is_compressed(model) or not hasattr(model, "decompress"):
        raise ValueError("decompress expects a model compressed by hf-embcomp.")
    return model.decompress()


def load_class_for(config: transformers.PretrainedConfig) -> type:
    """The class to load a source checkpoint with: the stock class named by ``config.architectures``
    (the checkpoint's own head); without one (GGUF files), the LM head the model type has
    (causal, then masked), else the base model."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    for auto in ("AutoModelForCausalLM", "AutoModelForMaskedLM"):
        cls = stock_class_for(auto, config.model_type)
        if cls is not None:
            return cls
    return transformers.AutoModel
