"""Model classes of an hf-embcomp checkpoint: any transformers backbone with a compressed token embedding.

Runtime code: ships in every compressed model repository; imports only torch, transformers, the
standard library and its sibling files.

How it works (one code path for every architecture whose input embedding is an ``nn.Embedding``):

- ``auto_map`` points every Auto class at a thin *entry* class here (``EmbCompModel``,
  ``EmbCompForCausalLM``, ...). An entry never builds itself: it builds a cached dynamic subclass of the
  stock head, e.g. ``(EmbCompForMaskedLM, BertForMaskedLM)``, found through the Auto class's own mapping.
- The stock ``__init__`` runs unchanged. At its final ``post_init()`` the token embedding (and every
  output projection tied to it) is swapped for the compressed module, before ties, init and loading.
- Tied output projections compute ``hidden @ E_hat.T`` from the compressed module; no V x d copy is stored.

Known gap: a stock class loaded directly (``BertModel.from_pretrained(dir)``) ignores ``auto_map`` and
gets a random token embedding (transformers only warns). Load with the Auto classes and
``trust_remote_code=True``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import torch
import transformers
from torch import nn
from transformers import CONFIG_MAPPING, PretrainedConfig, PreTrainedModel
from transformers.generation import GenerationMixin

from .configuration_embcomp import EmbCompConfig
from .embcomp_layers import CompressedEmbedding, EmbCompTiedLogits, build_compressed_embedding

# Every runtime file is imported here directly, not only through embcomp_layers: transformers before 5.x (e.g.
# 4.57, which optimum-onnx pins) copies only the relative imports of the entry file itself into its module
# cache, so a file imported only by a sibling would be missing there (FileNotFoundError ... embcomp_base.py).
from .embcomp_base import is_exporting  # noqa: E402,F401
from .embcomp_body import ggml_modules, install_ggml_body  # noqa: E402
from .embcomp_dccl import CompositionalCodeEmbedding  # noqa: E402,F401
from .embcomp_direction import DirectionEmbedding  # noqa: E402,F401
from .embcomp_distilled import DistilledEmbedding  # noqa: E402,F401
from .embcomp_gptq import GroupQuantEmbedding  # noqa: E402,F401
from .embcomp_lighttoken import LightTokenEmbedding  # noqa: E402,F401
from .embcomp_svd import LowRankEmbedding  # noqa: E402,F401

MIN_TRANSFORMERS_VERSION = "4.57"
"""The oldest transformers this runtime supports; the model card states it. The v5 tie and init API is used where
it exists, the 4.57 one (``_tied_weights_keys`` lists, ``get_output_embeddings`` ties, per-tensor
``_is_hf_initialized`` flags) otherwise: see :func:`declared_ties` and :func:`guarded_init`."""

_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def declared_ties(model: PreTrainedModel) -> dict[str, str]:
    """The weight ties ``model`` itself declares (not those of its sub-models), ``{target: source}`` parameter names
    relative to ``model``, e.g. ``{"lm_head.weight": "model.embed_tokens.weight"}``.

    transformers >= 5: ``get_expanded_tied_weights_keys``. transformers 4.x (no such method): the output embedding
    tied to the input embedding when the text config's ``tie_word_embeddings`` is true (what 4.x ``tie_weights``
    does); its ``_tied_weights_keys`` is only a list of targets.
    """
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if expand is not None:
        return expand(all_submodels=False)
    if not getattr(model.config.get_text_config(decoder=True), "tie_word_embeddings", True):
        return {}
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out is inp:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    if id(out) not in names or id(inp) not in names:
        return {}
    return {f"{names[id(out)]}.weight": f"{names[id(inp)]}.weight"}


class _GuardedTorchInit:
    """``torch.nn.init`` functions that skip a tensor flagged ``_is_hf_initialized`` (loaded from the checkpoint):
    the role of ``transformers.initialization`` for transformers 4.x, which sets the same flags before init."""

    @staticmethod
    def normal_(t: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
        return t if getattr(t, "_is_hf_initialized", False) else nn.init.normal_(t, mean=mean, std=std)

    @staticmethod
    def zeros_(t: torch.Tensor) -> torch.Tensor:
        return t if getattr(t, "_is_hf_initialized", False) else nn.init.zeros_(t)


def guarded_init() -> Any:
    """The init functions (``normal_``, ``zeros_``) that leave loaded tensors alone: ``transformers.initialization``
    (transformers >= 5), else :class:`_GuardedTorchInit`."""
    try:
        from transformers import initialization
    except ImportError:  # transformers 4.x
        return _GuardedTorchInit
    return initialization


@contextlib.contextmanager
def stock_config_view(config: PretrainedConfig, backbone_model_type: str):
    """Make ``config`` look like the stock config while the stock ``__init__`` runs.

    Generic heads build their backbone with ``AutoModel.from_config(config)``; with our ``auto_map`` that
    would re-enter the remote-code machinery. Restores the class and ``auto_map`` on exit.
    """
    cls = config.__class__
    auto_map = config.__dict__.pop("auto_map", None)
    config.__class__ = CONFIG_MAPPING[backbone_model_type]
    try:
        yield config
    finally:
        config.__class__ = cls
        if auto_map is not None:
            config.__dict__["auto_map"] = auto_map


class EmbCompPreTrainedModel(PreTrainedModel):
    """Mixin placed before the stock class in the MRO. Defines no stock class attribute on purpose."""

    config_class = EmbCompConfig
    _embcomp_auto_class: str | None = None
    _embcomp_stock_class: type | None = None

    def __new__(cls, *args: Any, **kwargs: Any):
        config = args[0] if args else kwargs.get("config")
        if cls._embcomp_stock_class is None and cls._embcomp_auto_class and isinstance(config, PretrainedConfig):
            cls = embcomp_model_class(cls, config.backbone_model_type)
        return super().__new__(cls)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args: Any, **kwargs: Any):
        if cls._embcomp_stock_class is None:
            config = kwargs.get("config")
            if isinstance(config, PretrainedConfig):
                bmt = config.backbone_model_type
            else:
                hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
                config_dict, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub)
                bmt = config_dict.get("backbone_model_type")
                if not bmt:
                    raise ValueError(f"{pretrained_model_name_or_path} is not an hf-embcomp checkpoint (no backbone_model_type).")
            return embcomp_model_class(cls, bmt).from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
        if getattr(model, "hf_quantizer", None) is not None and ggml_modules(model):
            raise ValueError(
                f"{pretrained_model_name_or_path} stores its body as GGUF blocks (config.json body_quantization), "
                "already quantised: load it without a quantization config, or call model.dequantize_body(), save, "
                "and quantise that folder (or compress with --body-dtype bfloat16)."
            )
        # Strict: a compressed embedding (or a body kept as GGUF blocks) with a missing, unexpected or mismatched
        # tensor is never used.
        prefixes = tuple(f"{n}." for n in model._embcomp_embedding_names + list(ggml_modules(model)))
        bad = {
            kind: sorted(k if isinstance(k, str) else k[0] for k in info.get(kind, ()) if (k if isinstance(k, str) else k[0]).startswith(prefixes))
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
        }
        if any(bad.values()):
            raise ValueError(
                f"{pretrained_model_name_or_path}: the compressed token embedding does not match the checkpoint "
                f"({', '.join(f'{k}: {v}' for k, v in bad.items() if v)}); the model would be silently wrong. "
                "Re-save it with hf-embcomp, or load it with the head it was saved with."
            )
        model.get_compressed_embedding().check_layout()
        if ggml_modules(model) and "disk" in set((getattr(model, "hf_device_map", None) or {}).values()):
            raise ValueError(
                f"{pretrained_model_name_or_path} stores its body as GGUF blocks, whose weights are made at load: "
                "they cannot be offloaded to disk; load without disk offload (more max_memory), or call "
                "model.dequantize_body() on a full load, save, and offload that folder."
            )
        for m in ggml_modules(model).values():
            m.unpack_()
        return (model, info) if want_info else model

    # --- the swap ------------------------------------------------------------------------------
    def post_init(self):
        if type(self)._embcomp_stock_class is not None and not getattr(self, "_embcomp_installed", False):
            self._embcomp_install()
        super().post_init()
        removed = getattr(self, "_embcomp_removed_keys", None)
        if removed and isinstance(getattr(self, "all_tied_weights_keys", None), dict):
            self.all_tied_weights_keys = {
                t: s for t, s in self.all_tied_weights_keys.items() if t not in removed and s not in removed
            }

    def _embcomp_install(self) -> None:
        block = dict(self.config.embedding_compression)
        old = self.get_input_embeddings()
        if type(old) is nn.Embedding:
            scale = None
        elif isinstance(old, nn.Embedding) and hasattr(old, "scalar_embed_scale"):
            scale = float(old.scalar_embed_scale)
        else:
            raise NotImplementedError(
                f"unsupported input-embedding class {type(old).__name__}: hf-embcomp compresses nn.Embedding "
                "(optionally with a scalar embed scale) only."
            )
        if (old.num_embeddings, old.embedding_dim) != (block["num_embeddings"], block["embedding_dim"]):
            raise ValueError(
                f"the backbone's token embedding is {old.num_embeddings} x {old.embedding_dim} but the "
                f"embedding_compression block describes {block['num_embeddings']} x {block['embedding_dim']}: "
                "config.json is inconsistent; re-save the model with hf-embcomp."
            )
        for key, stock_value in (("padding_idx", old.padding_idx), ("embed_scale", scale)):
            if block.get(key) != stock_value:
                raise ValueError(
                    f"embedding_compression.{key} is {block.get(key)!r} but the backbone's token embedding has "
                    f"{stock_value!r}: config.json is inconsistent; re-save the model with hf-embcomp."
                )
        emb_names = [n for n, m in self.named_modules(remove_duplicate=False) if m is old]

        # Tie declarations of every sub-model, expanded BEFORE the swap (expansion may search real names).
        ties: dict[str, dict[str, str]] = {}
        for prefix, sub in self.named_modules(remove_duplicate=False):
            if isinstance(sub, PreTrainedModel) and prefix not in ties:
                ties[prefix] = declared_ties(sub)
        emb_keys = {f"{n}.weight" for n in emb_names}
        out_names: list[str] = []
        for prefix, mapping in ties.items():
            pre = f"{prefix}." if prefix else ""
            for t, s in mapping.items():
                t, s = pre + t, pre + s
                for a, b in ((s, t), (t, s)):
                    if a in emb_keys and b.endswith(".weight") and b[: -len(".weight")] not in out_names:
                        out_names.append(b[: -len(".weight")])

        new = build_compressed_embedding(block)
        for n in emb_names:
            self.set_submodule(n, new)
        for n in out_names:
            out_old = self.get_submodule(n)
            self.set_submodule(n, EmbCompTiedLogits(new, bias=getattr(out_old, "bias", None)))

        removed = emb_keys | {f"{n}.weight" for n in out_names}
        for prefix, mapping in ties.items():
            pre = f"{prefix}." if prefix else ""
            if any(pre + t in removed or pre + s in removed for t, s in mapping.items()):
                sub = self.get_submodule(prefix) if prefix else self
                declared = getattr(sub, "_tied_weights_keys", None)
                if isinstance(declared, (list, tuple)):  # transformers 4.x: a list of tied target names
                    sub._tied_weights_keys = [k for k in declared if pre + k not in removed]
                else:
                    sub._tied_weights_keys = {
                        t: s for t, s in mapping.items() if pre + t not in removed and pre + s not in removed
                    }
        self._embcomp_embedding_names = emb_names
        self._embcomp_output_names = out_names
        if _body_blocks(self.config):
            install_ggml_body(self, self.config.body_quantization["modules"])
        self._embcomp_removed_keys = removed
        self._embcomp_installed = True

    @torch.no_grad()
    def initialize_weights(self):
        super().initialize_weights()
        init = guarded_init()
        for m in self.modules():
            if isinstance(m, CompressedEmbedding):
                m.reset_parameters(init)

    def _tie_or_clone_weights(self, output_embeddings: nn.Module, input_embeddings: nn.Module) -> None:
        # transformers 4.x ties by assigning ``output.weight = input.weight``; a compressed embedding has no dense
        # weight, and its tied projection (EmbCompTiedLogits) already reads it. v5 never calls this method.
        if isinstance(output_embeddings, EmbCompTiedLogits) or isinstance(input_embeddings, CompressedEmbedding):
            return
        super()._tie_or_clone_weights(output_embeddings, input_embeddings)

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any):
        """``PreTrainedModel.save_pretrained``, then the side files hf-embcomp attached at compress time
        (tokenizer, sentence-transformers files, model card, ``compression_report.json``)."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            for rel, data in (getattr(self, "_embcomp_extra_files", None) or {}).items():
                path = os.path.join(save_directory, *rel.split("/"))
                if os.path.isabs(rel) or ".." in rel.split("/"):
                    raise ValueError(f"refusing to write side file outside the model folder: {rel}")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
        return out

    # --- helpers ---------------------------------------------------------------------------------
    def dequantize_body(self) -> EmbCompPreTrainedModel:
        """Turn a body kept as GGUF blocks (``config.body_quantization``) into ordinary ``nn.Linear`` layers holding
        the same weights, so that it can be fine-tuned, merged or quantised and then saved (dense, in the model's
        dtype). In place; returns the model. A no-op for a dense body."""
        for name, m in ggml_modules(self).items():
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            new.weight = m.weight
            new.bias = m.bias
            self.set_submodule(name, new)
        self.config.body_quantization = None
        return self

    def get_compressed_embedding(self) -> CompressedEmbedding:
        """The compressed token-embedding module."""
        return self.get_submodule(self._embcomp_embedding_names[0])

    def set_embedding_trainable(self, enabled: bool = True) -> None:
        """Train (True) or freeze (False, the default after loading) the real-valued tensors of the
        compressed embedding (factors, decoders, codebooks); integer codes stay fixed. The stored format
        and byte size do not change either way. The load-time default is ``embedding_compression.trainable``."""
        self.get_compressed_embedding().set_trainable(enabled)

    def resize_token_embeddings(self, *args: Any, **kwargs: Any):
        raise NotImplementedError(
            "resize_token_embeddings is not supported on a compressed token embedding: call "
            "hf_embcomp.decompress(model) (or model.decompress()), resize, then compress again."
        )

    def decompress(self) -> PreTrainedModel:
        """Return the stock model (its own class and config) with a dense ``nn.Embedding`` holding E_hat.

        Raises:
            RuntimeError: a weight could not be carried over (never returns a partly random model).
        """
        emb = self.get_compressed_embedding()
        stock_cfg = self.config.to_backbone_config()
        new = self._embcomp_stock_class(stock_cfg)
        prefixes = tuple(f"{n}." for n in self._embcomp_embedding_names + self._embcomp_output_names)
        sd = {k: v for k, v in self.state_dict().items() if not k.startswith(prefixes) and not k.endswith(".weight_blocks")}
        for n, m in ggml_modules(self).items():  # a body kept as GGUF blocks: its loaded weights
            sd[f"{n}.weight"] = m.weight
        for n in self._embcomp_output_names:  # the tied projection's bias keeps its stock key
            out = self.get_submodule(n)
            if out.bias is not None:
                sd[f"{n}.bias"] = out.bias
        weight = emb.reconstruct().detach()
        for n in self._embcomp_embedding_names:
            sd[f"{n}.weight"] = weight
        missing, unexpected = new.load_state_dict(sd, strict=False)
        new.tie_weights()
        tied = set(getattr(new, "all_tied_weights_keys", {}) or {})
        bad_missing = [k for k in missing if k not in tied]
        if bad_missing or unexpected:
            raise RuntimeError(f"decompress could not carry over weights: missing {bad_missing}, unexpected {unexpected}")
        new.to(device=emb.device, dtype=self.dtype)
        new.train(self.training)
        return new


def _body_blocks(config: Any) -> bool:
    """Whether ``config`` keeps body layers as GGUF blocks (a ``body_quantization`` block of format ``ggml``)."""
    block = getattr(config, "body_quantization", None)
    if not block:
        return False
    if not isinstance(block, dict) or block.get("format") != "ggml" or not isinstance(block.get("modules"), dict):
        raise ValueError(f"config.json body_quantization {block!r} is not understood by this runtime code (expected "
                         "format 'ggml' with a 'modules' object); re-save the model with hf-embcomp.")
    return True


ENTRY_AUTO_CLASSES = {
    "EmbCompModel": "AutoModel",
    "EmbCompForPreTraining": "AutoModelForPreTraining",
    "EmbCompForMaskedLM": "AutoModelForMaskedLM",
    "EmbCompForCausalLM": "AutoModelForCausalLM",
    "EmbCompForSequenceClassification": "AutoModelForSequenceClassification",
    "EmbCompForTokenClassification": "AutoModelForTokenClassification",
    "EmbCompForQuestionAnswering": "AutoModelForQuestionAnswering",
    "EmbCompForMultipleChoice": "AutoModelForMultipleChoice",
    "EmbCompForNextSentencePrediction": "AutoModelForNextSentencePrediction",
}


class EmbCompModel(EmbCompPreTrainedModel):
    _embcomp_auto_class = "AutoModel"


class EmbCompForPreTraining(EmbCompPreTrainedModel):
    _embcomp_auto_class = "AutoModelForPreTraining"


class EmbCompForMaskedLM(EmbCompPreTrainedModel):
    _embcomp_auto_class = "AutoModelForMaskedLM"


class EmbCompForCausalLM(EmbCompPreTrainedModel):
    _embcomp_auto_class = "AutoModelForCausalLM"


class EmbCompForSequenceClassification(EmbCompPreTrainedModel):
    _embcomp_auto_class = "AutoModelForSequenceClassification"


class EmbCompForTokenClassification(EmbCompPreTrainedModel):
    _embcomp_auto_class = "AutoModelForTokenClassification"


class EmbCompForQuestionAnswering(EmbCompPreTrainedModel):
    _embcomp_auto_class = "AutoModelForQuestionAnswering"


class EmbCompForMultipleChoice(EmbCompPreTrainedModel):
    _embcomp_auto_class = "AutoModelForMultipleChoice"


class EmbCompForNextSentencePrediction(EmbCompPreTrainedModel):
    _embcomp_auto_class = "AutoModelForNextSentencePrediction"


ENTRY_CLASSES = {name: globals()[name] for name in ENTRY_AUTO_CLASSES}


def stock_class_for(auto_class_name: str, backbone_model_type: str) -> type | None:
    """The stock class that ``transformers.<auto_class_name>`` builds for a backbone, or None."""
    auto = getattr(transformers, auto_class_name)
    try:
        stock = auto._model_mapping[CONFIG_MAPPING[backbone_model_type]]
    except KeyError:
        return None
    return stock[0] if isinstance(stock, (tuple, list)) else stock


@functools.lru_cache(maxsize=None)
def embcomp_model_class(entry: type, backbone_model_type: str) -> type:
    """The cached dynamic class ``(entry, StockHead[, GenerationMixin])`` for one backbone.

    Raises:
        ValueError: the Auto class has no head for this backbone.
    """
    stock = stock_class_for(entry._embcomp_auto_class, backbone_model_type)
    if stock is None:
        raise ValueError(
            f"{entry._embcomp_auto_class} has no class for backbone {backbone_model_type!r}; "
            f"use one of the Auto classes listed in this checkpoint's config.json auto_map."
        )
    bases = (entry, stock) + ((GenerationMixin,) if issubclass(stock, GenerationMixin) else ())
    bmt = backbone_model_type

    def __init__(self, config, *args, **kwargs):  # noqa: N807
        with stock_config_view(config, bmt):
            stock.__init__(self, config, *args, **kwargs)
            if not getattr(self, "_embcomp_installed", False):  # a stock class that never calls post_init
                self.post_init()

    no_split = set(getattr(stock, "_no_split_modules", None) or []) | {
        c.__name__ for c in _layer_classes()
    }
    ns = {
        "__init__": __init__,
        "__module__": __name__,
        "__qualname__": f"{entry.__name__}__{bmt}",
        "_embcomp_stock_class": stock,
        "_no_split_modules": sorted(no_split),
    }
    return type(entry.__name__, bases, ns)


def _layer_classes() -> list[type]:
    from .embcomp_layers import LAYER_CLASSES

    return list(LAYER_CLASSES.values())


def auto_map_for(backbone_model_type: str) -> dict[str, str]:
    """The ``auto_map`` of a checkpoint: AutoConfig plus every Auto class that has a head for the backbone."""
    auto_map = {"AutoConfig": "configuration_embcomp.EmbCompConfig"}
    for name, auto in ENTRY_AUTO_CLASSES.items():
        if stock_class_for(auto, backbone_model_type) is not None:
            auto_map[auto] = f"modeling_embcomp.{name}"
    return auto_map


def __getattr__(name: str):  # PEP 562: lets pickle find the dynamic classes by their qualname
    entry, sep, bmt = name.partition("__")
    if sep and entry in ENTRY_CLASSES:
        return embcomp_model_class(ENTRY_CLASSES[entry], bmt)
    raise AttributeError(name)
