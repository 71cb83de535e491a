"""What every suite needs: the compressed model, its uncompressed source, the tokenizer and the settings."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from .. import progress
from ..hub_code.modeling_embcomp import stock_class_for
from ..io import DEFAULT_MODEL, default_model_path

logger = logging.getLogger(__name__)


_BASELINE_MEMO: dict[tuple[Any, ...], Any] = {}
"""Process-wide values computed from an uncompressed baseline (its embedding matrix, its perplexity):
the baseline never changes inside one process, so a sweep computes them once, not once per cell. Keys
start with the baseline's :class:`ModelRef`; models that are fine-tuned are never kept here."""


def clear_baseline_memo() -> None:
    """Forget every memoised baseline value (frees the baseline embedding matrices)."""
    _BASELINE_MEMO.clear()


class SuiteSkipped(Exception):
    """A suite does not apply to this model (the message says why); the run goes on without it."""


@dataclass(frozen=True)
class ModelRef:
    """Where a model is read from: ``from_pretrained(target, **kwargs)``."""

    name: str
    target: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def gguf_file(self) -> str | None:
        """The GGUF file name inside ``target``, if it is a GGUF checkpoint."""
        return dict(self.kwargs).get("gguf_file")


def resolve_source(spec: str) -> ModelRef:
    """A source model spec as written in ``embedding_compression.source_model`` (or ``--baseline``).

    Accepts ``sentence-transformers/all-MiniLM-L6-v2`` (the embedded default, read from its PyPI package),
    a local folder, a ``.gguf`` path, ``<folder or .gguf path>::<gguf file name>``, or a Hub id.

    Raises:
        ValueError: a local path that does not exist.
    """
    if spec == DEFAULT_MODEL and not Path(spec).exists():
        return ModelRef(spec, str(default_model_path()))
    left, _, gguf = spec.partition("::")
    p = Path(left).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelRef(spec, str(p.parent), (("gguf_file", gguf or p.name),))
    if gguf:
        if not p.is_dir():
            raise ValueError(f"source model folder {left} does not exist; pass --baseline MODEL")
        return ModelRef(spec, str(p), (("gguf_file", gguf),))
    if p.is_dir():
        return ModelRef(spec, str(p))
    if p.exists() or left.startswith((".", "/", "~")):
        raise ValueError(f"source model {spec} is not a folder or a .gguf file; pass --baseline MODEL")
    return ModelRef(spec, spec)  # a Hub id


@dataclass
class EvalContext:
    """A compressed model directory, its baseline, and the run settings shared by every suite.

    Attributes:
        compressed: the compressed repository (loaded with ``trust_remote_code=True``).
        baseline: the uncompressed source model.
        block: the ``embedding_compression`` block of the compressed config.
        quick: small fixed subsets everywhere.
        max_steps: fine-tuning step budget (GLUE, SQuAD), the same for both models.
        seed: seed of every fine-tune, split and classifier head.
        data_dir: folder with ``glue/`` and ``squad/`` (None: the default, else the Hub).
        device: torch device string.
        tasks: only these GLUE tasks and lm corpora (None: all).
        models: models already in memory, ``{"baseline": model}``: :meth:`load` hands such a model out instead of
            reading it again when it is what the read would give (the class asked for, float32); it is moved to
            :attr:`device` and put in eval mode.
    """

    compressed: ModelRef
    baseline: ModelRef
    block: dict[str, Any]
    quick: bool = False
    max_steps: int = 200
    seed: int = 0
    data_dir: str | None = None
    device: str = "cpu"
    tasks: tuple[str, ...] | None = None
    models: dict[str, PreTrainedModel] = field(default_factory=dict, repr=False)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dir(cls, model_dir: str, baseline: str | None = None, **settings: Any) -> EvalContext:
        """Read the compressed ``model_dir``'s config and resolve its baseline (``baseline`` overrides).

        Raises:
            ValueError: ``model_dir`` is not a folder with an hf-embcomp ``config.json``, or the source
                cannot be resolved.
        """
        cfg_path = Path(model_dir) / "config.json"
        if not cfg_path.is_file():
            raise ValueError(f"{model_dir} is not a model folder (no config.json); pass a compressed model directory")
        try:
            block = json.loads(cfg_path.read_text())["embedding_compression"]
        except (json.JSONDecodeError, KeyError):
            raise ValueError(f"{model_dir} is not compressed by hf-embcomp (no embedding_compression in config.json)") from None
        spec = baseline or block.get("source_model")
        if not spec:
            raise ValueError(f"{model_dir} does not name its source model; pass --baseline MODEL")
        return cls(ModelRef(str(model_dir), str(model_dir), (("trust_remote_code", True),)), resolve_source(spec), block,
                   **settings)

    @property
    def settings(self) -> dict[str, Any]:
        """The settings recorded with every result."""
        return {"seed": self.seed, "quick": self.quick}

    def tokenizer(self) -> Any:
        """The tokenizer saved with the compressed model (the source's own)."""
        if "tok" not in self._cache:
            tok = AutoTokenizer.from_pretrained(self.compressed.target, trust_remote_code=True)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            self._cache["tok"] = tok
        return self._cache["tok"]

    @functools.cached_property
    def source_config(self) -> transformers.PretrainedConfig:
        """The baseline's config (architectures tell which heads it was trained with)."""
        return AutoConfig.from_pretrained(self.baseline.target, **dict(self.baseline.kwargs))

    def pretrained_heads(self) -> set[str]:
        """``{"causal-lm", "masked-lm"}`` subset: the pretrained LM heads the source has (GGUF files are
        causal LMs)."""
        archs = self.source_config.architectures or []
        heads = set()
        if self.baseline.gguf_file or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            heads.add("causal-lm")
        if any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs):
            heads.add("masked-lm")
        return heads

    def is_sentence_transformer(self) -> bool:
        """Whether the compressed repository carries sentence-transformers files (``modules.json``)."""
        return (Path(self.compressed.target) / "modules.json").is_file()

    def load(self, which: str, auto_class: type = transformers.AutoModel, **kwargs: Any) -> PreTrainedModel:
        """Load the ``"baseline"`` or ``"compressed"`` model with ``auto_class`` in float32, eval mode, on
        :attr:`device`. ``kwargs`` go to ``from_pretrained`` (e.g. ``num_labels``)."""
        ref = {"baseline": self.baseline, "compressed": self.compressed}[which]
        held = self.models.get(which)
        if (held is not None and not kwargs and held.dtype == torch.float32
                and type(held) is stock_class_for(auto_class.__name__, held.config.model_type)):
            logger.info("using the %s model %s in memory as %s", which, ref.name, auto_class.__name__)
            return held.to(self.device).eval()
        logger.info("loading the %s model %s as %s", which, ref.name, auto_class.__name__)
        with progress.gguf_bar():
            model = auto_class.from_pretrained(ref.target, dtype=torch.float32, **dict(ref.kwargs), **kwargs)
        return model.to(self.device).eval()

    def baseline_memo(self, key: tuple[Any, ...]) -> Any | None:
        """A value memoised for this baseline under ``key`` by :meth:`remember`, or None."""
        return _BASELINE_MEMO.get((self.baseline, *key))

    def remember(self, key: tuple[Any, ...], value: Any) -> Any:
        """Memoise ``value`` (computed from the unchanged baseline only) for this process; returns it."""
        _BASELINE_MEMO[(self.baseline, *key)] = value
        return value

    def embedding_matrix(self, which: str) -> torch.Tensor:
        """The token-embedding matrix as float32 [V, d] on CPU: E for ``"baseline"`` (read once per process
        and baseline, see :func:`clear_baseline_memo`; do not modify it), the reconstruction E_hat for
        ``"compressed"``."""
        if which == "baseline" and (E := self.baseline_memo(("embedding_matrix",))) is not None:
            return E
        model = self.load(which)
        emb = model.get_input_embeddings()
        with torch.no_grad():
            w = emb.reconstruct() if which == "compressed" else emb.weight
            w = w.detach().float().cpu().clone()
        return self.remember(("embedding_matrix",), w) if which == "baseline" else w
