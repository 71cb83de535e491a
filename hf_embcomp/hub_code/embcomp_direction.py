"""Direction-aware autoencoder token embedding (Bałazy et al., 2021): E_hat = Z W^T + b.

Runtime code: ships in every compressed model repository; imports only torch and sibling files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embcomp_base import CompressedEmbedding


class DirectionEmbedding(CompressedEmbedding):
    """E_hat[w] = decoder(z_w) = z_w @ decoder_weight.T + decoder_bias, the linear decoder of the autoencoder.

    Tensors: ``latents`` float [V, r] (the encoder outputs z_w, one row per token), ``decoder_weight``
    float [d, r] and ``decoder_bias`` float [d] (an ``nn.Linear(r, d)``). Hyper-parameters: ``rank`` (r).
    """

    method = "direction"

    def allocate(self) -> None:
        r = int(self.hparams["rank"])
        self.latents = nn.Parameter(torch.empty(self.num_embeddings, r))
        self.decoder_weight = nn.Parameter(torch.empty(self.embedding_dim, r))
        self.decoder_bias = nn.Parameter(torch.empty(self.embedding_dim))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.linear(F.embedding(input_ids, self.latents, self.padding_idx), self.decoder_weight, self.decoder_bias)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden @ (Z W^T + 1 b^T)^T = (hidden @ W) @ Z^T + (hidden . b): never builds V x d.
        hidden = hidden.to(self.latents.dtype)
        return (hidden @ self.decoder_weight) @ self.latents.T + (hidden @ self.decoder_bias).unsqueeze(-1)

    def reconstruct(self) -> torch.Tensor:
        return F.linear(self.latents, self.decoder_weight, self.decoder_bias)
