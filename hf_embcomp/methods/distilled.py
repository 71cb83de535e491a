"""Distilled Embedding (Lioutas, Rashid, Kumar, Haidar, Rezagholizadeh: "Improving Word Embedding
Factorization for Compression Using Distilled Nonlinear Neural Decomposition", Findings of EMNLP 2020;
arXiv 1910.06720): a low-rank factorisation of E with an added non-linearity, initialised by learning
to reconstruct the pretrained E, then fine-tuned end to end with knowledge distillation (``hf-embcomp
recover``, :mod:`hf_embcomp.training.recover`), shared by the input embedding and the tied output projection.

Neither the paper's text nor code was available (../shared/docs/methods.md §3), so the placement of the
non-linearity is this project's decision: E_hat = A B + phi(A W_in^T + b_in) W_out^T + b_out, a rank-r
code a_w (row of A, V x r) decoded by a linear path (B, r x d) plus a one-hidden-layer non-linear path
(r -> h -> d). W_out starts at zero and (A, B) at the truncated SVD, so the reconstruction fit starts
exactly at SVD and learns what the non-linear path adds; its loss is the squared Euclidean error
(:func:`hf_embcomp.losses.mse_loss`), full-vocabulary minibatches, Adam. "rank" is r, the width of the
per-token code; the reconstruction lies in an (r + h)-dimensional affine space. The "one parameter
controlling compression size" of the paper is r (h = r unless set).

Runtime module: ``hub_code/embcomp_distilled.py`` (``DistilledEmbedding``), which is also the module
trained here (one definition of the decoder).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..hub_code.embcomp_distilled import ACTIVATIONS, DistilledEmbedding
from ..losses import mse_loss
from .base import CompressionMethod, MethodConfig, RatioError, register_method, round_to_dtype, solve_rank
from ..training.rows import train_rows


@dataclasses.dataclass(frozen=True)
class DistilledConfig(MethodConfig):
    """Attributes:
        rank: r, the width of the per-token code (rows of A).
        hidden: h, the hidden width of the non-linear path (None: h = r).
        activation: phi: ``gelu``, ``relu``, ``tanh`` or ``silu``.
        epochs, batch_size, lr, lr_decay_every: the reconstruction fit (Adam, StepLR gamma 0.5).
    """

    rank: int = 8
    hidden: int | None = None
    activation: str = "gelu"
    epochs: int = 40
    batch_size: int = 2048
    lr: float = 2e-3
    lr_decay_every: int | None = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.rank) < 1:
            raise ValueError(f"rank must be >= 1 (got {self.rank}).")
        if self.hidden is None:
            object.__setattr__(self, "hidden", int(self.rank))
        if int(self.hidden) < 1:
            raise ValueError(f"hidden must be >= 1 (got {self.hidden}).")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} (got {self.activation!r}).")

    def stored_bytes(self, num_embeddings: int, embedding_dim: int) -> int:
        r, h, d = self.rank, self.hidden, embedding_dim
        return (num_embeddings * r + r * d + h * r + h + d * h + d) * self.dtype_bytes

    @classmethod
    def from_ratio(cls, num_embeddings: int, embedding_dim: int, ratio: float, **overrides: Any) -> DistilledConfig:
        return solve_rank(cls, num_embeddings, embedding_dim, ratio, "distilled", embedding_dim, **overrides)


def distilled_module(num_embeddings: int, embedding_dim: int, config: DistilledConfig) -> DistilledEmbedding:
    """The runtime module for ``config`` (uninitialised tensors), used as the training module."""
    block = {"num_embeddings": num_embeddings, "embedding_dim": embedding_dim, "storage_dtype": "float32",
             "hyperparameters": config.hyperparameters()}
    mod = DistilledEmbedding(block)
    mod.set_trainable(True)
    return mod


@register_method
class DistilledMethod(CompressionMethod):
    """Low-rank + non-linear decomposition, initialised by reconstructing E (the KD step is ``distill``)."""

    name = "distilled"
    config_class = DistilledConfig
    paper = ("Lioutas et al. (2020), Improving Word Embedding Factorization for Compression Using Distilled "
             "Nonlinear Neural Decomposition, Findings of EMNLP")

    def fit(self, weight: torch.Tensor, config: DistilledConfig) -> dict[str, torch.Tensor]:
        V, d = weight.shape
        r = config.rank
        if r > min(V, d):
            raise RatioError(f"rank {r} exceeds min(V, d) = {min(V, d)}.")
        torch.manual_seed(config.seed)
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        mod = distilled_module(V, d, config).to(weight.device)
        with torch.no_grad():
            mod.lowrank_a.copy_(u[:, :r] * s[:r])
            mod.lowrank_b.copy_(vh[:r])
            lin = nn.Linear(r, config.hidden)  # PyTorch default init of the hidden layer
            mod.mlp_in_weight.copy_(lin.weight)
            mod.mlp_in_bias.copy_(lin.bias)
            mod.mlp_out_weight.zero_()
            mod.mlp_out_bias.zero_()
        del u, s, vh
        # Each training row carries its token id in an extra column, so a batch can look up its codes.
        rows = (weight.float(), torch.arange(V, device=weight.device, dtype=torch.float32)[:, None])

        def step(module: DistilledEmbedding, batch: torch.Tensor, progress: float) -> torch.Tensor:
            return mse_loss(batch[:, :-1], module.embed(batch[:, -1].long()))

        train_rows(mod, rows, step, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                   seed=config.seed, lr_decay_every=config.lr_decay_every, desc="distilled")
        return {k: round_to_dtype(p.detach(), config.dtype).contiguous() for k, p in mod.named_parameters()}
