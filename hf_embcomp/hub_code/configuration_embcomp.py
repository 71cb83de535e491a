"""Configuration of an hf-embcomp model: a stock backbone config plus an ``embedding_compression`` block.

This file ships inside every compressed model repository (runtime code). It imports only torch,
transformers and the standard library.

``config.json`` holds every field of the backbone config at top level (as the stock config writes it),
``"model_type": "embcomp"``, ``"backbone_model_type"`` (``"bert"``, ``"llama"``, ...) and the
``"embedding_compression"`` block (method, its hyper-parameters, ratio, source model). Loading it
gives an instance of a per-backbone subclass ``EmbCompConfig(EmbCompConfig, <StockConfig>)``, so every
stock attribute, property and default keeps working (``isinstance(config, BertConfig)`` is true).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

from transformers import CONFIG_MAPPING, PretrainedConfig

FORMAT_VERSION = 1
"""Version of the ``embedding_compression`` block written by this code. Newer blocks are refused."""

_EMBCOMP_KEYS = ("backbone_model_type", "embedding_compression", "body_quantization")
_STOCK_DROP_KEYS = ("model_type", "architectures", "auto_map", "transformers_version")
# A compressed model is saved dequantized: the source's quantization_config (e.g. GGUF) does not apply.
_BUILD_DROP_KEYS = _STOCK_DROP_KEYS + ("quantization_config",)


class EmbCompConfig(PretrainedConfig):
    """Config of a model whose token embedding is compressed by hf-embcomp.

    The class named in ``auto_map`` dispatches, in :meth:`from_dict`, to a cached subclass of the stock
    config of ``backbone_model_type``; do not instantiate it directly, use
    ``AutoConfig.from_pretrained(path, trust_remote_code=True)``.
    """

    model_type = "embcomp"
    _embcomp_backbone: str | None = None

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        if cls._embcomp_backbone is None:
            bmt = config_dict.get("backbone_model_type")
            if not bmt:
                raise ValueError(
                    "config.json has model_type 'embcomp' but no 'backbone_model_type': the checkpoint is "
                    "incomplete; re-save it with hf-embcomp."
                )
            validate_compression_block(config_dict.get("embedding_compression"))
            return embcomp_config_class(bmt).from_dict(config_dict, **kwargs)
        return super().from_dict(legacy_rope_fields(config_dict, CONFIG_MAPPING[cls._embcomp_backbone]), **kwargs)

    @classmethod
    def from_backbone_config(cls, stock_config: PretrainedConfig, compression: dict[str, Any]) -> "EmbCompConfig":
        """Build the compressed model's config from a stock config and an ``embedding_compression`` block."""
        bmt = stock_config.model_type
        d = stock_config.to_dict()
        for k in _BUILD_DROP_KEYS:
            d.pop(k, None)
        d["backbone_model_type"] = bmt
        d["embedding_compression"] = dict(compression)
        validate_compression_block(d["embedding_compression"])
        return embcomp_config_class(bmt).from_dict(d)

    @property
    def export_model_type(self) -> str:
        """The stock ``model_type`` an exporter should use for this model: the backbone's (``"bert"``, ...).

        optimum's ONNX exporter reads ``config.export_model_type`` before ``model_type``, so ``optimum-cli export
        onnx --trust-remote-code`` picks the backbone's stock ONNX config; the model's forward takes the stock
        inputs and returns the stock outputs. Not serialised (a property).
        """
        return self.backbone_model_type

    def to_backbone_config(self) -> PretrainedConfig:
        """Return the stock config of the backbone (no compression fields, stock ``model_type``)."""
        d = self.to_dict()
        for k in _STOCK_DROP_KEYS + _EMBCOMP_KEYS:
            d.pop(k, None)
        return CONFIG_MAPPING[self.backbone_model_type].from_dict(d)


def _init_accepts(config_class: type, name: str) -> bool:
    return name in inspect.signature(config_class.__init__).parameters


def legacy_rope_fields(config_dict: dict[str, Any], stock_config_class: type) -> dict[str, Any]:
    """``config_dict`` with the RoPE fields a transformers 4.x config reads, when ``stock_config_class`` is one.

    transformers v5 writes the rotary embedding as ``rope_parameters`` (one dict, or one per layer type for Gemma3:
    ``{"full_attention": ..., "sliding_attention": ...}``); 4.x configs take ``rope_theta``, ``rope_scaling`` (a
    non-default ``rope_type``), ``partial_rotary_factor`` and Gemma3's ``rope_local_base_freq``, and would silently
    fall back to their defaults (SmolLM2: rope_theta 10,000 instead of 100,000). Returns the dict unchanged (the
    same object) for a v5 config class, a config without ``rope_parameters``, or one that already has the 4.x
    fields.

    Raises:
        ValueError: a ``rope_parameters`` layout that transformers 4.x cannot express.
    """
    rope = config_dict.get("rope_parameters")
    if (not isinstance(rope, dict) or _init_accepts(stock_config_class, "rope_parameters")
            or not _init_accepts(stock_config_class, "rope_theta")):
        return config_dict
    if "rope_theta" in rope or "rope_type" in rope:
        full, local = rope, None
    elif set(rope) <= {"full_attention", "sliding_attention"}:
        full, local = rope.get("full_attention") or {}, rope.get("sliding_attention")
    else:
        raise ValueError(f"rope_parameters with keys {sorted(rope)} cannot be read by transformers 4.x; "
                         "upgrade transformers to 5.x.")
    d = dict(config_dict)
    if "rope_theta" in full:
        d.setdefault("rope_theta", full["rope_theta"])
    if "partial_rotary_factor" in full:
        d.setdefault("partial_rotary_factor", full["partial_rotary_factor"])
    if full.get("rope_type", "default") != "default":
        d.setdefault("rope_scaling", {k: v for k, v in full.items() if k not in ("rope_theta", "partial_rotary_factor")})
    if local is not None:
        if local.get("rope_type", "default") != "default" or not _init_accepts(stock_config_class, "rope_local_base_freq"):
            raise ValueError("per-layer-type rope_parameters with a scaled local RoPE cannot be read by "
                             "transformers 4.x; upgrade transformers to 5.x.")
        if "rope_theta" in local:
            d.setdefault("rope_local_base_freq", local["rope_theta"])
    return d


_REQUIRED_FIELDS = ("format_version", "method", "num_embeddings", "embedding_dim")


def validate_compression_block(block: Any) -> None:
    """Check an ``embedding_compression`` block.

    Raises:
        ValueError: the block is missing, lacks a required field, or has a newer ``format_version``.
    """
    if not isinstance(block, dict):
        raise ValueError(
            "config.json has no 'embedding_compression' block: this is not a complete hf-embcomp checkpoint."
        )
    missing = [k for k in _REQUIRED_FIELDS if k not in block]
    if missing:
        raise ValueError(f"config.json 'embedding_compression' lacks {missing}; re-save the model with hf-embcomp.")

    def _int(name: str, lo: int) -> int:
        v = block[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"config.json 'embedding_compression.{name}' must be an integer >= {lo} (got {v!r}).")
        return v

    if _int("format_version", 1) > FORMAT_VERSION:
        raise ValueError(
            f"embedding_compression format_version {block['format_version']} is newer than this runtime code "
            f"({FORMAT_VERSION}); load the repository's own code (trust_remote_code=True) or upgrade hf-embcomp."
        )
    num = _int("num_embeddings", 1)
    _int("embedding_dim", 1)
    if not isinstance(block["method"], str):
        raise ValueError(f"config.json 'embedding_compression.method' must be a string (got {block['method']!r}).")
    if not isinstance(block.get("hyperparameters", {}), dict):
        raise ValueError("config.json 'embedding_compression.hyperparameters' must be an object.")
    if block.get("storage_dtype", "float32") not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"config.json 'embedding_compression.storage_dtype' {block.get('storage_dtype')!r} is not "
                         "float32, float16 or bfloat16.")
    pad = block.get("padding_idx")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not -num <= pad < num):
        raise ValueError(f"config.json 'embedding_compression.padding_idx' {pad!r} is not a token id.")
    scale = block.get("embed_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"config.json 'embedding_compression.embed_scale' {scale!r} is not a finite number.")


@functools.lru_cache(maxsize=None)
def embcomp_config_class(backbone_model_type: str) -> type:
    """The cached ``EmbCompConfig`` subclass for one backbone ``model_type``.

    Raises:
        ValueError: ``backbone_model_type`` is not a transformers model type.
    """
    if backbone_model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"backbone_model_type {backbone_model_type!r} is unknown to this transformers version; upgrade transformers."
        )
    stock = CONFIG_MAPPING[backbone_model_type]

    def __init__(self, **kw):  # noqa: N807 - keeps the stock constructor as it is
        stock.__init__(self, **kw)

    ns = {
        "__init__": __init__,
        "__module__": __name__,
        "__qualname__": f"EmbCompConfig__{backbone_model_type}",
        "_embcomp_backbone": backbone_model_type,
        "model_type": "embcomp",
    }
    cls = type("EmbCompConfig", (EmbCompConfig, stock), ns)
    return cls


def __getattr__(name: str):  # PEP 562: lets pickle find the dynamic classes by their qualname
    if name.startswith("EmbCompConfig__"):
        return embcomp_config_class(name[len("EmbCompConfig__"):])
    raise AttributeError(name)
