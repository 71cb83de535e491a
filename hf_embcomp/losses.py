"""Reconstruction losses between token-embedding rows e (targets) and their reconstructions e_hat.

All take float tensors [B, d] and return a scalar (mean over rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mse_loss(e: torch.Tensor, e_hat: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the squared Euclidean error ||e - e_hat||^2 (summed over d)."""
    return ((e - e_hat) ** 2).sum(-1).mean()


def lighttoken_loss(e: torch.Tensor, e_hat: torch.Tensor, lam: float = 2.0, eps: float = 1e-8,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """This project's reading of LightToken's compression loss (Wang et al., KDD 2023).

    L = (|e| - |e_hat|)^2 + lam * |e| * |e_hat| * (1 - cos(e, e_hat)), mean over rows (weighted by
    ``weight`` [N] when given: sum(w L) / sum(w)).

    From the identity ||e - e_hat||^2 = (|e| - |e_hat|)^2 + 2 |e||e_hat| (1 - cos), L upper-bounds the
    squared Euclidean error for lam >= 2 (lam = 2 is exactly the squared error) and stresses direction
    as lam grows. The paper's exact formula is not public (../shared/docs/methods.md §1).

    Raises:
        ValueError: lam < 2 (the loss would no longer bound the Euclidean error).
    """
    if lam < 2.0:
        raise ValueError(f"lam must be >= 2 for the loss to upper-bound the squared error (got {lam}).")
    n, n_hat = e.norm(dim=-1), e_hat.norm(dim=-1)
    cos = F.cosine_similarity(e, e_hat, dim=-1, eps=eps)
    per_row = (n - n_hat) ** 2 + lam * n * n_hat * (1.0 - cos)
    if weight is None:
        return per_row.mean()
    return (per_row * weight).sum() / weight.sum().clamp_min(eps)


def direction_loss(e: torch.Tensor, e_hat: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Bałazy et al. (2021), "Direction is what you need", as in the authors' code (commit 07705703).

    L = 0.1995 * mean(1 - cos(e_hat, e)) + 0.0025 * mean((|e_hat - e| + 1e-10) ** alpha),
    the second mean over all elements; alpha is annealed from 1.0 to 0.1 by the caller.
    """
    cos = F.cosine_similarity(e_hat, e, dim=-1, eps=1e-6)
    return 0.1995 * (1.0 - cos).mean() + 0.0025 * ((e_hat - e).abs() + 1e-10).pow(alpha).mean()
