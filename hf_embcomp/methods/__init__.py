"""Compression methods, one module each, registered by name (see :mod:`hf_embcomp.methods.base`)."""

from .base import METHODS, CompressionMethod, MethodConfig, RatioError, get_method, register_method
from . import svd  # noqa: F401  (registers "svd")

__all__ = ["METHODS", "CompressionMethod", "MethodConfig", "RatioError", "get_method", "register_method"]
