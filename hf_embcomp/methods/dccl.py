"""Deep Compositional Code Learning (Shu & Nakayama: "Compressing Word Embeddings via Deep Compositional
Code Learning", ICLR 2018; arXiv 1711.01068), as in the author code (zomux/neuralcompressor, ab293a87).

Each token w gets M discrete codes c_w^i in [0, K) and E_hat[w] = sum_i A_i[c_w^i] over M codebooks
A_i (K x d). The codes are learned end to end with an encoder and Gumbel-softmax:
h = tanh(W_1 e + b_1) (width M*K/2), alpha = log(softplus(W_2 h + b_2) + 1e-8) reshaped M x K,
d^i = softmax((alpha^i + g^i) / tau) with Gumbel noise g and tau = 1 fixed (soft samples, as the author
code), e_hat = sum_i A_i^T d^i, loss 0.5 * ||e_hat - e||^2 averaged over the batch, Adam, global-norm
gradient clipping, parameters initialised uniformly in [-0.01, 0.01]. At export the codes are the
noise-free argmax of alpha and are stored bit-packed at log2(K) bits each.

Beyond the author code (pitfall: the soft-sample / hard-code gap, ../shared/docs/methods.md §4(f)): with
``refit_codebooks`` (default on) the codebooks are re-solved by least squares for the final hard codes,
which can only lower the squared error of what is stored. Reductions vs the author code for the 2-core
budget: 10 epochs instead of 200, batch 256 instead of 64, lr 3e-3 instead of 1e-4 (on MiniLM at 25x,
8 epochs of this schedule reach row cosine 0.590 in 110 s, 15 epochs at batch 128 / lr 1e-3 reach 0.602 in
~590 s on the shared 2-core machine).

M and K are solved from the ratio: K = 2**bits (default 16, as the authors) and M the largest number of
codebooks whose stored bytes meet the ratio. Runtime module: ``hub_code/embcomp_dccl.py``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..hub_code.embcomp_base import pack_bits
from ..hub_code.embcomp_dccl import code_weights
from ..losses import mse_loss
from .base import CompressionMethod, MethodConfig, RatioError, check_ratio, register_method, round_to_dtype
from ..training.rows import train_rows

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DCCLConfig(MethodConfig):
    """Attributes:
        num_codebooks: M.
        bits: log2 K, bits per code (1..8); K = 2**bits codewords per codebook (authors: K = 16).
        tau: Gumbel-softmax temperature (fixed, as the authors).
        epochs, batch_size, lr, max_grad_norm: Adam schedule (authors: 200, 64, 1e-4, 0.001).
        refit_codebooks: least-squares codebooks for the final hard codes.
    """

    num_codebooks: int = 32
    bits: int = 4
    tau: float = 1.0
    epochs: int = 10
    batch_size: int = 256
    lr: float = 3e-3
    max_grad_norm: float | None = 0.001
    refit_codebooks: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.num_codebooks) < 1:
            raise ValueError(f"num_codebooks must be >= 1 (got {self.num_codebooks}).")
        if not 1 <= int(self.bits) <= 8:
            raise ValueError(f"bits must be in 1..8 (K = 2**bits codewords; got {self.bits}).")

    @property
    def codewords(self) -> int:
        """K, codewords per codebook."""
        return 2**self.bits

    def stored_bytes(self, num_embeddings: int, embedding_dim: int) -> int:
        code_bytes = num_embeddings * ((self.num_codebooks * self.bits + 7) // 8)
        return code_bytes + self.num_codebooks * self.codewords * embedding_dim * self.dtype_bytes

    @classmethod
    def from_ratio(cls, num_embeddings: int, embedding_dim: int, ratio: float, **overrides: Any) -> DCCLConfig:
        ratio = check_ratio(ratio)
        if overrides.get("num_codebooks") is not None:
            return cls(**overrides)
        full = num_embeddings * embedding_dim * 4

        def meets(m: int) -> bool:
            return full / cls(**{**overrides, "num_codebooks": m}).stored_bytes(num_embeddings, embedding_dim) >= ratio

        if not meets(1):
            one = cls(**{**overrides, "num_codebooks": 1})
            raise RatioError(
                f"dccl cannot reach ratio {ratio:g} for a {num_embeddings} x {embedding_dim} embedding with "
                f"K = {one.codewords} at {one.dtype}: the reachable range is 1 < ratio <= "
                f"{full / one.stored_bytes(num_embeddings, embedding_dim):.1f} (M = 1); lower --bits for more."
            )
        lo, hi = 1, 2
        while meets(hi):  # stored bytes grow with M: double, then bisect
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if meets(mid) else (lo, mid)
        return cls(**{**overrides, "num_codebooks": lo})


class _CodeLearner(nn.Module):
    """The author code's network: encoder to M x K log-probabilities, Gumbel-softmax, codebook sum."""

    def __init__(self, d: int, m: int, k: int) -> None:
        super().__init__()
        self.m, self.k = m, k
        self.enc1 = nn.Linear(d, max(1, m * k // 2))
        self.enc2 = nn.Linear(max(1, m * k // 2), m * k)
        self.codebooks = nn.Parameter(torch.empty(m * k, d))
        for p in self.parameters():
            nn.init.uniform_(p, -0.01, 0.01)

    def log_probs(self, e: torch.Tensor) -> torch.Tensor:
        return torch.log(F.softplus(self.enc2(torch.tanh(self.enc1(e)))) + 1e-8).view(-1, self.m, self.k)

    def forward(self, e: torch.Tensor, tau: float) -> torch.Tensor:
        u = torch.rand(e.shape[0], self.m, self.k, device=e.device)
        g = -torch.log(-torch.log(u + 1e-20) + 1e-20)
        y = F.softmax((self.log_probs(e) + g) / tau, dim=-1)
        return y.reshape(-1, self.m * self.k) @ self.codebooks


def refit_codebooks(weight: torch.Tensor, codes: torch.Tensor, k: int, chunk: int = 8192) -> torch.Tensor:
    """Least-squares codebooks for fixed codes: argmin_A sum_w ||e_w - sum_i A_i[c_w^i]||^2.

    Args:
        weight: E, float32 [V, d]; codes: integer [V, M] in [0, K) (any integer dtype, e.g. uint8).

    Returns:
        float32 [M, K, d]. A tiny ridge term picks the minimum-norm solution (the per-codebook offsets are
        not identifiable) and sets unused codewords to zero.
    """
    v, m = codes.shape
    offsets = torch.arange(m, device=codes.device) * k  # codebook i's codewords are rows [i K, (i + 1) K)
    gram = torch.zeros(m * k, m * k, dtype=torch.float64, device=weight.device)
    rhs = torch.zeros(m * k, weight.shape[1], dtype=torch.float64, device=weight.device)
    for i in range(0, v, chunk):
        onehot = torch.zeros(min(chunk, v - i), m * k, dtype=torch.float64, device=weight.device)
        onehot.scatter_(1, codes[i : i + chunk].long() + offsets, 1.0)
        gram += onehot.T @ onehot
        rhs += onehot.T @ weight[i : i + chunk].double()
    ridge = 1e-6 * float(gram.diagonal().mean()) + 1e-12
    sol = torch.linalg.solve(gram + ridge * torch.eye(m * k, dtype=gram.dtype, device=gram.device), rhs)
    return sol.float().reshape(m, k, -1)


def pack_codes(codes: torch.Tensor, bits: int, chunk: int = 8192) -> torch.Tensor:
    """Integer codes [V, M] in [0, 2**bits) -> uint8 [V, ceil(M * bits / 8)], MSB first, concatenated (``chunk``
    rows at a time: the unpacked bits, int64 [chunk, M, bits], never exist for all rows)."""
    w = code_weights(bits).to(codes.device)
    return torch.cat([pack_bits(((c.long().unsqueeze(-1) // w) % 2).reshape(c.shape[0], -1))
                      for c in codes.split(chunk)])


@register_method
class DCCLMethod(CompressionMethod):
    """Compositional codes learned with Gumbel-softmax; stores bit-packed codes + M codebooks."""

    name = "dccl"
    config_class = DCCLConfig
    paper = "Shu & Nakayama (2018), Compressing Word Embeddings via Deep Compositional Code Learning, ICLR"

    def fit(self, weight: torch.Tensor, config: DCCLConfig) -> dict[str, torch.Tensor]:
        V, d = weight.shape
        m, k = config.num_codebooks, config.codewords
        if m * k > 1 << 16:
            raise RatioError(f"M x K = {m * k} codewords is too many for this fit; use fewer --bits or a higher ratio.")
        torch.manual_seed(config.seed)
        net = _CodeLearner(d, m, k).to(weight.device)

        def step(module: _CodeLearner, rows: torch.Tensor, progress: float) -> torch.Tensor:
            return 0.5 * mse_loss(rows, module(rows, config.tau))

        train_rows(net, weight, step, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                   seed=config.seed, max_grad_norm=config.max_grad_norm, desc="dccl")
        with torch.no_grad():
            # uint8 codes (K <= 256): [V, M] bytes, not int64
            codes = torch.cat([net.log_probs(weight[i : i + 8192]).argmax(-1).to(torch.uint8) for i in range(0, V, 8192)])
            codebooks = net.codebooks.detach().reshape(m, k, d)
            if config.refit_codebooks:
                codebooks = refit_codebooks(weight, codes, k)
        seen = torch.zeros(m * k, dtype=torch.bool, device=codes.device)
        for c in codes.split(8192):
            seen[(c.long() + torch.arange(m, device=codes.device) * k).flatten()] = True
        used = int(seen.sum())
        logger.info("dccl: %d of %d codewords used", used, m * k)
        return {
            "codes": pack_codes(codes, config.bits).contiguous(),
            "codebooks": round_to_dtype(codebooks, config.dtype).contiguous(),
        }
