"""Compression methods, one module each, registered by name (see :mod:`hf_embcomp.methods.base`)."""

from .base import METHODS, CompressionMethod, MethodConfig, RatioError, get_method, register_method
from . import svd  # noqa: F401  (registers "svd")
from . import lighttoken  # noqa: F401  (registers "lighttoken")
from . import direction  # noqa: F401  (registers "direction")
from . import distilled  # noqa: F401  (registers "distilled")
from . import dccl  # noqa: F401  (registers "dccl")
from . import gptq  # noqa: F401  (registers "gptq")

__all__ = ["METHODS", "CompressionMethod", "MethodConfig", "RatioError", "get_method", "register_method"]
