"""Low-rank (truncated SVD) token embedding: E_hat = A B, A: V x k, B: k x d.

Runtime code: ships in every compressed model repository; imports only torch and sibling files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embcomp_base import CompressedEmbedding


class LowRankEmbedding(CompressedEmbedding):
    """E_hat = lowrank_a @ lowrank_b (Eckart-Young: the best rank-k approximation when fitted by SVD).

    Tensors: ``lowrank_a`` float [V, k] (= U_k S_k), ``lowrank_b`` float [k, d] (= V_k^T).
    Hyper-parameters: ``rank`` (k).
    """

    method = "svd"

    def allocate(self) -> None:
        k = int(self.hparams["rank"])
        self.lowrank_a = nn.Parameter(torch.empty(self.num_embeddings, k))
        self.lowrank_b = nn.Parameter(torch.empty(k, self.embedding_dim))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.lowrank_a, self.padding_idx) @ self.lowrank_b

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.lowrank_b.dtype)
        return (hidden @ self.lowrank_b.T) @ self.lowrank_a.T

    def reconstruct(self) -> torch.Tensor:
        return self.lowrank_a @ self.lowrank_b
