"""Registry of the compressed token-embedding modules, by method name.

Runtime code: ships in every compressed model repository. A new method adds one sibling file with its
``CompressedEmbedding`` subclass and one line here.
"""

from __future__ import annotations

from typing import Any

from .embcomp_base import CompressedEmbedding, EmbCompTiedLogits
from .embcomp_svd import LowRankEmbedding
from .embcomp_lighttoken import LightTokenEmbedding
from .embcomp_direction import DirectionEmbedding
from .embcomp_distilled import DistilledEmbedding
from .embcomp_dccl import CompositionalCodeEmbedding
from .embcomp_gptq import GroupQuantEmbedding

LAYER_CLASSES: dict[str, type[CompressedEmbedding]] = {
    "svd": LowRankEmbedding,
    "lighttoken": LightTokenEmbedding,
    "direction": DirectionEmbedding,
    "distilled": DistilledEmbedding,
    "dccl": CompositionalCodeEmbedding,
    "gptq": GroupQuantEmbedding,
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
    try:
        return LAYER_CLASSES[method](block)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"embedding_compression.hyperparameters of method {method!r} are invalid ({type(e).__name__}: {e}); "
            "re-save the model with hf-embcomp."
        ) from None
