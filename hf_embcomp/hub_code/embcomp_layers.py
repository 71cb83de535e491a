"""Registry of the compressed token-embedding modules, by method name.

Runtime code: ships in every compressed model repository. A new method adds one sibling file with its
``CompressedEmbedding`` subclass and one line here.
"""

from __future__ import annotations

from typing import Any

from .embcomp_base import CompressedEmbedding, EmbCompTiedLogits
from .embcomp_svd import LowRankEmbedding

LAYER_CLASSES: dict[str, type[CompressedEmbedding]] = {
    "svd": LowRankEmbedding,
}

__all__ = ["CompressedEmbedding", "EmbCompTiedLogits", "LAYER_CLASSES", "build_compressed_embedding"]


def build_compressed_embedding(block: dict[str, Any]) -> CompressedEmbedding:
    """Allocate (no computation; meta-safe) the module that the ``embedding_compression`` block describes.

    Raises:
        ValueError: the method is unknown to this runtime code.
    """
    method = block.get("method")
    if method not in LAYER_CLASSES:
        raise ValueError(
            f"embedding_compression method {method!r} is unknown to this runtime code (known: "
            f"{sorted(LAYER_CLASSES)}); load the repository's own code or upgrade hf-embcomp."
        )
    return LAYER_CLASSES[method](block)
