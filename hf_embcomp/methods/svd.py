"""Truncated SVD: the universal low-rank baseline (Eckart-Young-Mirsky).

E ~ A B with A = U_k S_k (V x k) and B = V_k^T (k x d), from an exact ``torch.linalg.svd`` of the
float32 matrix (no centring). Runtime module: ``hub_code/embcomp_svd.py`` (``LowRankEmbedding``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .base import CompressionMethod, MethodConfig, RatioError, register_method, round_to_dtype, solve_rank


@dataclasses.dataclass(frozen=True)
class SVDConfig(MethodConfig):
    """Attributes:
        rank: k, the number of singular triplets kept (1 <= k <= min(V, d)).
    """

    rank: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.rank) < 1:
            raise ValueError(f"rank must be >= 1 (got {self.rank}).")

    def stored_bytes(self, num_embeddings: int, embedding_dim: int) -> int:
        return self.rank * (num_embeddings + embedding_dim) * self.dtype_bytes

    @classmethod
    def from_ratio(cls, num_embeddings: int, embedding_dim: int, ratio: float, **overrides: Any) -> "SVDConfig":
        return solve_rank(cls, num_embeddings, embedding_dim, ratio, "svd", min(num_embeddings, embedding_dim),
                          **overrides)


@register_method
class SVDMethod(CompressionMethod):
    """Truncated SVD of E; the best rank-k approximation in Frobenius norm."""

    name = "svd"
    config_class = SVDConfig
    paper = "Eckart & Young (1936), The approximation of one matrix by another of lower rank"

    def fit(self, weight: torch.Tensor, config: SVDConfig) -> dict[str, torch.Tensor]:
        if config.rank > min(weight.shape):
            raise RatioError(f"rank {config.rank} exceeds min(V, d) = {min(weight.shape)}.")
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        k = config.rank
        return {
            "lowrank_a": round_to_dtype(u[:, :k] * s[:k], config.dtype).contiguous(),
            "lowrank_b": round_to_dtype(vh[:k], config.dtype).contiguous(),
        }
