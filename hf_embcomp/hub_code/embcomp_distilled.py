"""Distilled Embedding (Lioutas et al., 2020): a low-rank factorisation with an added non-linearity,
E_hat = A B + phi(A W_in^T + b_in) W_out^T + b_out.

Runtime code: ships in every compressed model repository; imports only torch and sibling files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embcomp_base import CompressedEmbedding

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh, "silu": F.silu}


class DistilledEmbedding(CompressedEmbedding):
    """E_hat[w] = a_w B + W_out phi(W_in a_w + b_in) + b_out: a rank-r code a_w decoded by a linear path
    plus a one-hidden-layer non-linear path.

    Tensors: ``lowrank_a`` float [V, r], ``lowrank_b`` float [r, d], ``mlp_in_weight`` float [h, r],
    ``mlp_in_bias`` float [h], ``mlp_out_weight`` float [d, h], ``mlp_out_bias`` float [d].
    Hyper-parameters: ``rank`` (r), ``hidden`` (h), ``activation`` (phi: gelu, relu, tanh or silu).
    """

    method = "distilled"

    def allocate(self) -> None:
        r, h, d = int(self.hparams["rank"]), int(self.hparams["hidden"]), self.embedding_dim
        self.lowrank_a = nn.Parameter(torch.empty(self.num_embeddings, r))
        self.lowrank_b = nn.Parameter(torch.empty(r, d))
        self.mlp_in_weight = nn.Parameter(torch.empty(h, r))
        self.mlp_in_bias = nn.Parameter(torch.empty(h))
        self.mlp_out_weight = nn.Parameter(torch.empty(d, h))
        self.mlp_out_bias = nn.Parameter(torch.empty(d))

    def _hidden(self, a: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.hparams.get("activation", "gelu")]
        return act(F.linear(a, self.mlp_in_weight, self.mlp_in_bias))

    def decode(self, a: torch.Tensor) -> torch.Tensor:
        """Rows of E_hat from codes ``a`` (float [..., r]) -> float [..., d]."""
        return a @ self.lowrank_b + F.linear(self._hidden(a), self.mlp_out_weight, self.mlp_out_bias)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decode(F.embedding(input_ids, self.lowrank_a, self.padding_idx))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden @ E_hat^T = (hidden B^T) A^T + (hidden W_out) H^T + hidden . b_out, H = phi(A W_in^T + b_in)
        # is V x h (h << d): the V x d matrix is never built.
        hidden = hidden.to(self.lowrank_a.dtype)
        h_all = self._hidden(self.lowrank_a)
        return ((hidden @ self.lowrank_b.T) @ self.lowrank_a.T + (hidden @ self.mlp_out_weight) @ h_all.T
                + (hidden @ self.mlp_out_bias).unsqueeze(-1))

    def reconstruct(self) -> torch.Tensor:
        return self.decode(self.lowrank_a)
