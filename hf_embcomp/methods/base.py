"""The surface every compression method implements, and the method registry.

A method is one module under ``hf_embcomp/methods/`` with:

- a frozen dataclass of hyper-parameters (subclass of :class:`MethodConfig`) whose
  :meth:`MethodConfig.from_ratio` solves rank / code bits / codebook size so that the *stored bytes*
  meet a compression ratio, and whose :meth:`MethodConfig.stored_bytes` is the exact byte count;
- a :class:`CompressionMethod` subclass registered with :func:`register_method`, whose :meth:`fit`
  returns the tensors of its runtime module (``hf_embcomp/hub_code/embcomp_<method>.py``) by name.

Adding a method means adding one file here, one runtime file in ``hub_code/``, and one line in each
registry (``methods/__init__.py`` and ``hub_code/embcomp_layers.py``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import torch

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class RatioError(ValueError):
    """The requested compression ratio cannot be met by a method for this V x d."""


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Hyper-parameters common to every method.

    Attributes:
        dtype: storage dtype of the real-valued tensors (factors, decoders, codebooks):
            ``"float32"``, ``"float16"`` or ``"bfloat16"``. Codes are always bit-packed uint8.
        seed: seed of every random choice of the fit (initialisation, batch order).
    """

    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; use one of {sorted(DTYPE_BYTES)}.")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @classmethod
    def from_ratio(cls, num_embeddings: int, embedding_dim: int, ratio: float, **overrides: Any) -> "MethodConfig":
        """Solve the hyper-parameters so that ``V*d*4 / stored_bytes >= ratio``.

        Raises:
            RatioError: the ratio is not reachable for this V x d (the message gives the reachable range).
        """
        raise NotImplementedError

    def stored_bytes(self, num_embeddings: int, embedding_dim: int) -> int:
        """Exact bytes of every tensor the runtime module stores in model.safetensors."""
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        """The JSON-able hyper-parameters written to config.json (``embedding_compression.hyperparameters``)."""
        return dataclasses.asdict(self)


def check_ratio(ratio: float) -> float:
    """Validate a compression ratio. Raises RatioError for NaN, inf or <= 1."""
    r = float(ratio)
    if math.isnan(r) or math.isinf(r) or r <= 1.0:
        raise RatioError(f"--ratio must be a finite number > 1 (got {ratio}); e.g. --ratio 8.")
    return r


def solve_rank(config_cls: type, num_embeddings: int, embedding_dim: int, ratio: float, name: str,
               max_rank: int, **overrides: Any) -> MethodConfig:
    """The config of largest ``rank`` in [1, max_rank] whose stored bytes meet ``ratio`` (a rank search).

    Raises:
        RatioError: even rank 1 stores too much (the message gives the reachable range).
    """
    ratio = check_ratio(ratio)
    if overrides.get("rank") is not None:
        return config_cls(**overrides)
    full = num_embeddings * embedding_dim * 4
    best = None
    for rank in range(1, max_rank + 1):
        cfg = config_cls(**{**overrides, "rank": rank})
        if full / cfg.stored_bytes(num_embeddings, embedding_dim) < ratio:
            break
        best = cfg
    if best is None:
        one = config_cls(**{**overrides, "rank": 1})
        raise RatioError(
            f"{name} cannot reach ratio {ratio:g} for a {num_embeddings} x {embedding_dim} embedding at "
            f"{one.dtype}: the reachable range is 1 < ratio <= "
            f"{full / one.stored_bytes(num_embeddings, embedding_dim):.1f} (rank 1)."
        )
    return best


ProgressFn = Callable[[int], None]


class CompressionMethod:
    """A registered compression method. Subclasses set ``name``, ``config_class`` and implement :meth:`fit`."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    paper: ClassVar[str] = ""
    uses_token_counts: ClassVar[bool] = False
    """True when :meth:`fit` takes ``token_counts`` and ``special_ids`` (token frequencies of a corpus)."""
    uses_calibration: ClassVar[bool] = False
    """True when :meth:`fit` takes ``calibration`` (a :class:`hf_embcomp.calibration.Calibration` or None)."""

    def fit(self, weight: torch.Tensor, config: MethodConfig, **context: Any) -> dict[str, torch.Tensor]:
        """Fit the compressed representation of a token-embedding matrix.

        Args:
            weight: E, float32 [V, d] (on the device where the fit should run).
            config: the method's hyper-parameters.
            **context: for methods with ``uses_token_counts``: ``token_counts`` (int64 [V], how often each
                token occurs in a corpus, or None) and ``special_ids`` (the tokenizer's special token ids).

        Returns:
            The runtime module's tensors by name (float tensors in float32, already rounded to
            ``config.dtype``; codes as bit-packed uint8).
        """
        raise NotImplementedError

    def fit_with_config(self, weight: torch.Tensor, config: MethodConfig,
                        **context: Any) -> tuple[dict[str, torch.Tensor], MethodConfig]:
        """:meth:`fit`, and the config the tensors realise: methods whose tensor shapes are decided by the
        data (e.g. how many rows get how many bits) return the completed config; the default returns ``config``."""
        return self.fit(weight, config, **context), config


METHODS: dict[str, type[CompressionMethod]] = {}


def register_method(cls: type[CompressionMethod]) -> type[CompressionMethod]:
    """Class decorator: add a method to :data:`METHODS` under ``cls.name``."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> CompressionMethod:
    """The registered method ``name``.

    Raises:
        ValueError: unknown method (the message lists the known ones).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}.")
    return METHODS[name]()


MIN_ROWS = 8192
"""The fewest rows :func:`rows_of` computes a product on. BLAS picks its kernel (and on several threads its split
of the sum) by the shape, so a product of a few rows can differ in the last bit from the same rows inside a larger
product; chunked passes over the rows of E give the rows of the whole product bit for bit when no chunk is shorter."""

Rows = torch.Tensor | Callable[[int, int], torch.Tensor]
"""A row source: a tensor [n, ...], or a function (i, j) -> rows [i, j) of one, computed on demand."""


def rows_of(x: Rows, i: int, j: int, min_rows: int = MIN_ROWS) -> torch.Tensor:
    """Rows [i, j) of a row source; a function is called on at least ``min_rows`` rows (a shorter range is
    computed as the tail of ``[j - min_rows, j)``), so a chunk's rows equal those of the whole product."""
    if isinstance(x, torch.Tensor):
        return x[i:j]
    lo = max(0, j - min_rows) if j - i < min_rows else i
    return x(lo, j)[i - lo :]


def round_to_dtype(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round a float tensor to the storage dtype and return it as float32 (the values that will be stored)."""
    return t.to(getattr(torch, dtype)).to(torch.float32)
