"""Direction-aware autoencoder (Bałazy, Banaei, Lebret, Tabor, Aberer: "Direction is what you need:
Improving Word Embedding Compression in Large Language Models", RepL4NLP 2021), as in the authors' code
(MohammadrezaBanaei/orientation_based_embedding_compression, commit 07705703).

An autoencoder on the rows of E: z_w = W_e e_w + b_e (d -> r; optionally followed by an ELU), e_hat_w =
W_d z_w + b_d (r -> d, linear), trained with :func:`hf_embcomp.losses.direction_loss`
(0.1995 * mean(1 - cos) + 0.0025 * mean((|err| + 1e-10)^alpha)), alpha annealed linearly from 1.0 to 0.1
over the first ``anneal_fraction`` of the epochs (the authors: 20 of 20 + 10), Adam, StepLR(gamma 0.5).
Stored: the latent codes Z = encoder(E) (V x r) and the decoder; the encoder is discarded.

Checkpoint selection: the authors keep the epoch of lowest zero-shot MLM perplexity on WikiText-103
*test*. Here a fixed, seeded ``holdout`` fraction of the rows is kept out of training and the epoch with
the highest mean row cosine on those rows (through encoder and decoder) is kept: a held-out criterion,
cheap, and independent of the alpha schedule. Runtime module: ``hub_code/embcomp_direction.py``.

Departures from the authors (to fit the 2-core budget; override with ``--hp``): 12 epochs instead of 30,
batch 256 instead of 32, StepLR every 2 epochs instead of 4 (about the same number of halvings), and the
autoencoder starts from the truncated SVD (``init="svd"``; the authors' helper for it exists but is off and
broken, their runs used PyTorch's default init). On MiniLM at 25x (r = 15), 12 epochs at batch 64 from random
init reach row cosine 0.431 / rel. Frobenius 1.89, from SVD init 0.439 / 1.03 (SVD itself: 0.433 / 0.913).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import direction_loss
from .base import CompressionMethod, MethodConfig, RatioError, register_method, round_to_dtype, solve_rank
from ..training.rows import train_rows

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DirectionConfig(MethodConfig):
    """Attributes:
        rank: r, the latent size (the authors' default 75 gives ~10x on BERT-base in fp32 parameters).
        nonlinear_encoder: an ELU after the encoder's Linear (the authors' non-linear variant; the
            decoder stays linear, so the runtime module is the same).
        init: ``"svd"`` (encoder V_r^T, decoder V_r: training starts from the truncated SVD; default) or
            ``"random"`` (PyTorch default init, as the authors' published runs).
        epochs, batch_size, lr, lr_decay_every: the Adam / StepLR(gamma 0.5) schedule.
        anneal_fraction: fraction of the epochs over which alpha goes from 1.0 to 0.1 (authors 20/30).
        holdout: fraction of rows kept out of training for checkpoint selection (0: keep the last epoch).
    """

    rank: int = 8
    nonlinear_encoder: bool = False
    init: str = "svd"
    epochs: int = 12
    batch_size: int = 256
    lr: float = 1e-3
    lr_decay_every: int = 2
    anneal_fraction: float = 2 / 3
    holdout: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.rank) < 1:
            raise ValueError(f"rank must be >= 1 (got {self.rank}).")
        if self.init not in ("random", "svd"):
            raise ValueError(f"init must be 'random' or 'svd' (got {self.init!r}).")
        if not 0.0 <= self.holdout < 0.5:
            raise ValueError(f"holdout must be in [0, 0.5) (got {self.holdout}).")

    def stored_bytes(self, num_embeddings: int, embedding_dim: int) -> int:
        # latents V x r, decoder weight d x r, decoder bias d
        return (num_embeddings * self.rank + embedding_dim * self.rank + embedding_dim) * self.dtype_bytes

    @classmethod
    def from_ratio(cls, num_embeddings: int, embedding_dim: int, ratio: float, **overrides: Any) -> DirectionConfig:
        return solve_rank(cls, num_embeddings, embedding_dim, ratio, "direction", embedding_dim, **overrides)


class _Autoencoder(nn.Module):
    def __init__(self, d: int, r: int, nonlinear: bool) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d, r), nn.ELU()) if nonlinear else nn.Sequential(nn.Linear(d, r))
        self.decoder = nn.Linear(r, d)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(e))


def _alpha(progress: float, anneal_fraction: float) -> float:
    """The authors' alpha schedule: 1.0 -> 0.1 linearly over the annealing part, then 0.1."""
    return max(0.1, 1.0 - 0.9 * progress / max(anneal_fraction, 1e-9))


@register_method
class DirectionMethod(CompressionMethod):
    """Autoencoder on the rows of E with a direction-stressing loss; stores latents + linear decoder."""

    name = "direction"
    config_class = DirectionConfig
    paper = ("Bałazy et al. (2021), Direction is what you need: Improving Word Embedding Compression in "
             "Large Language Models, RepL4NLP")

    def fit(self, weight: torch.Tensor, config: DirectionConfig) -> dict[str, torch.Tensor]:
        V, d = weight.shape
        r = config.rank
        if r > d:
            raise RatioError(f"rank {r} exceeds the embedding width d = {d}.")
        gen = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)
        ae = _Autoencoder(d, r, config.nonlinear_encoder).to(weight.device)
        if config.init == "svd":
            _, _, vh = torch.linalg.svd(weight.float(), full_matrices=False)
            with torch.no_grad():
                ae.encoder[0].weight.copy_(vh[:r])
                ae.encoder[0].bias.zero_()
                ae.decoder.weight.copy_(vh[:r].T)
                ae.decoder.bias.zero_()

        perm = torch.randperm(V, generator=gen).to(weight.device)
        n_hold = round(config.holdout * V)
        held, train = weight[perm[:n_hold]], weight[perm[n_hold:]]
        best: dict[str, Any] = {"score": -float("inf"), "state": None, "epoch": -1}

        def select(epoch: int, module: nn.Module) -> None:
            if n_hold == 0:
                return
            score = float(F.cosine_similarity(module(held), held, dim=-1, eps=1e-6).mean())
            logger.info("direction epoch %d: held-out row cosine %.5f", epoch + 1, score)
            if score > best["score"]:
                best.update(score=score, state=copy.deepcopy(module.state_dict()), epoch=epoch)

        def step(module: nn.Module, rows: torch.Tensor, progress: float) -> torch.Tensor:
            return direction_loss(rows, module(rows), _alpha(progress, config.anneal_fraction))

        train_rows(ae, train, step, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                   seed=config.seed, lr_decay_every=config.lr_decay_every, desc="direction",
                   on_epoch_end=select)
        if best["state"] is not None:
            ae.load_state_dict(best["state"])
            logger.info("direction: kept epoch %d (held-out row cosine %.5f)", best["epoch"] + 1, best["score"])
        with torch.no_grad():
            latents = torch.cat([ae.encoder(weight[i : i + 65536]) for i in range(0, V, 65536)])
        return {
            "latents": round_to_dtype(latents, config.dtype).contiguous(),
            "decoder_weight": round_to_dtype(ae.decoder.weight.detach(), config.dtype).contiguous(),
            "decoder_bias": round_to_dtype(ae.decoder.bias.detach(), config.dtype).contiguous(),
        }
