"""LightToken: low-rank approximation + residual binary autoencoder + a direction-aware loss.

Paper: Wang, Li, Jiang, Wang, Tang, Bi, Cheng, Yin, Wang, Zhao, Gao, "LightToken: A Task and
Model-agnostic Lightweight Token Embedding Framework for Pre-trained Language Models", KDD 2023. No code
is public and the full text was not available; this is the project's reconstruction from the abstract,
the authors' blog post and ../shared/docs/methods.md §1. Runtime module:
``hub_code/embcomp_lighttoken.py`` (``LightTokenEmbedding``).

Equations followed
------------------
1. Low-rank part (paper: "rank-k SVD"): E_k = P Q^T with P = U_k S_k (V x k), Q = V_k (d x k), computed
   from the eigendecomposition of E^T E in float64 (the same factors as a truncated SVD, cheaper for
   V >> d). Residual R_1 = E - E_k.
2. Residual binary autoencoder, stages s = 1..S (paper: "residual hashing", "tempered sigmoid", "trained
   to a point short of saturation, then trained on the residual between the old residual and the new
   hash code", "the final hash code is a concatenation"):
   z = W_e r + b_e (m_s outputs), soft code h = sigmoid(beta z), decoder r_hat = W_d h + b_d (linear).
   beta grows geometrically from ``beta_start`` to ``beta_end`` over the stage's epochs and stops there,
   short of saturation (the share of soft codes within 0.05 of 0/1 is logged). Hash code b = 1[z > 0].
   Stage s+1 trains on R_{s+1} = R_s - (W_d b + b_d), the residual left by the HARD codes.
3. Reconstruction: e_hat = P_w Q^T + W_d b_w + c with W_d = [W_d^1 ... W_d^S] (d x M, M = sum m_s), the
   codes of all stages concatenated and bit-packed (uint8, MSB first) and c = sum_s b_d^s.
4. Loss (paper: "a fresh reconstruction loss, which serves as an upper limit for Euclidean distance" and
   stresses "alignment ... by recalibrating cosine similarity"; formula not public):
   L = (|e| - |e_hat|)^2 + lam |e| |e_hat| (1 - cos(e, e_hat)), lam >= 2 (lam = 2: squared error),
   :func:`hf_embcomp.losses.lighttoken_loss`.

This project's open choices
---------------------------
- Loss target: the FULL row e vs e_hat (low-rank part + earlier stages' hard decodes + this stage's soft
  decode), not the residual alone: the cosine the paper stresses is the one of the embedding.
- lam: default 2, from a sweep lam in {2, 4, 8} at 25x on MiniLM (bench/lighttoken_vs_svd.py --sweep);
  see the report of issue 3.
- beta schedule: geometric ``beta_start`` -> ``beta_end`` (1 -> 8) over the first 80 % of a stage's
  epochs, then held. At 8 about 60 % of the soft codes lie within 0.05 of 0/1 ("short of saturation");
  beta_end = 30 (90 % saturated) gave row cos 0.843 vs 0.845 at 25x on MiniLM.
- Stages S and bits per stage m_s: picked by the budget solver (the bits split as evenly as possible).
  Measured at 25x on MiniLM (lam 4, 12 epochs): S = 1 (408 bits) row cos 0.827, S = 2 (208 + 200) 0.845,
  S = 3 0.844; k = 0 0.845, k = 4 0.828, k = 8 0.808 - this matrix is not low-rank (peers.md), so
  the fp16 bytes of P buy less than codes do, and the solver's rule takes the smallest rank of its grid.
  At small budgets 3 stages win (metric fit, code refinement, 72-128 exact rows): all-MiniLM-L6-v2 102x STS-B
  dev x100, seeds 0/1/2, [48, 40] 84.20 / 83.66 / 84.16 against [32, 32, 24] 84.82 / 84.43 / 84.50 ([24, 24,
  24, 16] 84.34, six stages 83.72, one stage 83.97); 52x [88, 88] 85.67 against [64, 56, 56] 85.87; SmolLM2
  4,096-token perplexity 100x [72, 64] 3,443 against [48, 48, 40] 3,374, but 50x [144, 144] 1,296 against
  [96, 96, 96] 1,339. So the rule takes 3 stages where 2 would get at most :data:`THREE_STAGE_BITS` (96) bits
  each, else 2.
- Training init (ours): encoder rows are random directions scaled to unit-variance projections and
  centred on their median (balanced bits); the decoder starts as the least-squares fit to the initial
  soft codes. Random-projection codes + least squares alone give row cos 0.791 at 25x; training adds
  ~0.055.
- Refit (not in the paper's description; a least-squares solve is exact for a linear decoder with fixed
  codes): after each stage the stage decoder is refit to its hard codes, and at the end the whole
  decoder [W_d, c] and then P (given Q) are refit jointly, twice. Squared error can only go down; the
  fit logs the gain.
- Code refinement (ours; the alternating step of binary matrix factorisation / iterated conditional modes, as
  LSQ++ does for additive codes): the encoders' hard codes are not the best codes for the refit decoder. With the
  decoder fixed, every bit of every row is flipped where that lowers the row's squared error (in the fit's
  metric), pass after pass until none flips (at most :data:`FLIP_PASSES`), then the decoder is refit; ``code_sweeps``
  rounds (default 5). The error of every row can only go down in each half-step. SmolLM2 (Euclidean fit),
  4,096-token perplexity, stock 21.32: 50x 2,378 (none) -> 1,370 (2 rounds) -> 1,299 (5 rounds, +10 % fit time);
  100x 4,829 -> 3,621 (2 rounds). all-MiniLM-L6-v2 102x (metric fit, 2 rounds): sentence cosine 0.634 -> 0.651
  (STS-B dev 84.21 -> 84.08, within its seed noise of ~0.3). One-off runs while choosing; the lighttoken rows of
  bench/results are rerun with the default.
- Exact rows (ours, not in the paper): n rows are stored verbatim at ``dtype`` with their int32 ids - the
  tokenizer's special tokens, then the most frequent tokens of a corpus (``hf_embcomp.frequency``; default
  the gensim Wikipedia text past the evaluation slices) - and left out of the fit (zero codes). Row
  cosine weighs every row alike, but text does not: on MiniLM the 64 most frequent tokens alone make most
  of the difference in sentence embeddings. Measured at 25x on MiniLM (sentence cosine vs uncompressed, 200
  SST-2 dev sentences, budget kept equal by fewer code bits): n = 0 0.813, 16 0.907, 32 0.920, 64 0.927,
  128 0.925, 256 0.920, 1024 0.892; at 100x: n = 0 0.394, 16 0.571, 32 0.621, 64 0.665, 128 0.663,
  256 0.604. The solver's rule: n = min(128, 12 % of the byte budget), a multiple of 8
  (:func:`default_exact_rows`); ``exact_rows=0`` turns them off.
  Verbatim rows beat more bits for many frequent rows: at 102x on all-MiniLM-L6-v2 (metric fit, code
  refinement; STS-B dev x100, 72 exact rows 84.20), 8 exact rows plus an extra m-bit residual code stage for the
  K most frequent rows, at equal bytes, gave 82.70 (K = 1200, m = 48), 80.91 (3000, 32), 81.75 (6000, 16) in a
  simulation (reconstruction swapped into the stock model); 96 exact rows 83.90, 128 84.24. Nor does a short
  recovery help STS-B there: with 3 stages (84.82), 5 minutes of ``hf-embcomp recover`` (decoder only) raise the
  held-out sentence cosine it trains for (0.600 -> 0.684) but lower STS-B to 84.21 (the ``lighttoken+recover``
  row of ``bench/results/quality_minilm_vs_llamacpp.json``).
- Frequency-weighted fit (ours, optional ``freq_power`` alpha): rows weigh (count + 1)^alpha in the loss and
  in the refits. At 25x on MiniLM with 128 exact rows: alpha 0 sentence cosine 0.925 / row cosine 0.837 /
  1st percentile 0.760; alpha 0.25: 0.932 / 0.834 / 0.749; alpha 0.5: 0.931 / 0.826 / 0.734. The gain is
  within the noise of 200 sentences and costs rare rows, so the default stays 0.
- Metric fit (ours; the weighted low-rank idea of direction-aware compression): what an encoder feels of a row
  error delta is delta^T S delta (S = E[J^T J], the mean-pooled sentence embedding's sensitivity to the token
  embedding, ``Calibration.input_sensitivity``), not |delta|^2. With A = (S + damp I)^(1/2) (S normalised to
  mean diagonal 1) the whole fit (low rank, stages, refits) runs on E A, where squared error is the S-weighted
  error, and A^-1 is folded into the linear parts after it: Q <- A^-1 Q, W_d <- A^-1 W_d, c <- A^-1 c (rounded
  to ``dtype``); the codes and the runtime do not change. Exact rows are stored as they are.
  all-MiniLM-L6-v2, STS-B dev x100 (stock 86.72): 25x 86.11 -> 86.75, 102x 83.59 -> 84.21 (damp 0.001 84.09,
  0.1 83.90); 8x 86.78 -> 86.74. Causal LMs stay Euclidean: the tied head's second moment Sigma as the metric
  made SmolLM2 8x worse (4,096-token perplexity 30.11 -> 34.27): a tied row is also the first layer's input.
  ``metric="euclidean"`` (or ``--calibration none``) turns it off.
- What the ratio counts (design.md §4): every stored tensor, P, Q, W_d, c (and the exact rows and their ids)
  at ``dtype`` and the packed codes; ratio = V d 4 bytes / stored bytes. The encoders are training-only and
  are not stored.
- Budget solver: every (dtype, k, S) of a small grid with the largest M (a multiple of 8) that fits the
  budget; when the weight is at hand the candidates are scored by a short probe fit on a row sample
  (held-out row cosine) and the best kept; without it, a rule measured on MiniLM and SmolLM2 is used.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..hub_code.embcomp_base import pack_bits
from ..losses import lighttoken_loss
from .base import (DTYPE_BYTES, MIN_ROWS, CompressionMethod, MethodConfig, RatioError, Rows, check_ratio, register_method,
                   round_to_dtype, rows_of)
from ..training.rows import train_rows

logger = logging.getLogger(__name__)

RANK_GRID = (0, 4, 8, 16, 32)
STAGE_GRID = (1, 2, 3)
DTYPE_GRID = ("float16", "float32")
PROBE_ROWS = 4096


@dataclasses.dataclass(frozen=True)
class LightTokenConfig(MethodConfig):
    """Attributes:
        rank: k of the low-rank part (0: codes only).
        bits: code bits of each stage: an int (the same for every stage) or a tuple (one per stage).
        stages: S, the number of residual stages (ignored when ``bits`` is a tuple).
        lam: lambda of the loss (>= 2; 2 is squared error).
        beta_start, beta_end: the tempered-sigmoid temperature schedule of each stage (geometric).
        epochs: epochs per stage over the V rows; batch_size, lr: Adam minibatch schedule.
        refit: least-squares refit of the decoders (and of P) to the hard codes.
        exact_rows: n rows stored verbatim at ``dtype`` (+ an int32 id each): the tokenizer's special
            tokens, then the most frequent tokens of a corpus (``token_counts`` at fit time). None: the
            budget solver picks n (0 when the config is built directly).
        freq_power: alpha of the row weights (count + 1)^alpha (normalised to mean 1) of the loss and the
            least-squares refits, counts from ``token_counts`` at fit time; 0 (default): every row alike.
        metric: ``"calibration"`` (default): fit in the metric of the calibration's input sensitivity S (module
            docstring, "Metric fit") where the calibration has one (encoders); ``"euclidean"``: every coordinate
            alike (always so for causal LMs).
        metric_damp: damping of S, a fraction of its mean diagonal added to the diagonal before its square root
            (S is singular: LayerNorm ignores the all-ones direction). The metric fit holds E A, one more float32
            [V, d] copy, during the fit.
        code_sweeps: rounds of code refinement after the refit (module docstring, "Code refinement"): each round
            flips single bits of the hard codes while that lowers a row's squared error (at most
            :data:`FLIP_PASSES` passes over the bits), then refits the decoder (and P); 0 keeps the encoders' codes
            (checkpoints before it).
        dtype: storage dtype of P, Q, the decoder and its bias (default float16).
    """

    dtype: str = "float16"
    rank: int = 0
    bits: Any = 192
    stages: int = 2
    lam: float = 2.0
    beta_start: float = 1.0
    beta_end: float = 8.0
    epochs: int = 12
    batch_size: int = 256
    lr: float = 3e-3
    refit: bool = True
    exact_rows: Any = None
    freq_power: float = 0.0
    metric: str = "calibration"
    metric_damp: float = 0.01
    code_sweeps: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.metric not in ("calibration", "euclidean"):
            raise ValueError(f"metric must be 'calibration' or 'euclidean' (got {self.metric!r}).")
        if not self.metric_damp > 0:
            raise ValueError(f"metric_damp must be > 0 (got {self.metric_damp}).")
        object.__setattr__(self, "exact_rows", int(self.exact_rows or 0))
        if self.exact_rows < 0:
            raise ValueError(f"exact_rows must be >= 0 (got {self.exact_rows}).")
        if not 0.0 <= self.freq_power <= 1.0:
            raise ValueError(f"freq_power must be in [0, 1] (got {self.freq_power}).")
        bits = self.bits
        if isinstance(bits, (list, tuple)):
            bits = tuple(int(b) for b in bits)
            object.__setattr__(self, "stages", len(bits))
        else:
            bits = int(bits)
        object.__setattr__(self, "bits", bits)
        if int(self.rank) < 0:
            raise ValueError(f"rank must be >= 0 (got {self.rank}).")
        if int(self.stages) < 1 or min(self.stage_bits) < 1:
            raise ValueError(f"need >= 1 stage of >= 1 bit (got stages={self.stages}, bits={self.bits}).")
        if self.lam < 2.0:
            raise ValueError(f"lam must be >= 2 (the loss then upper-bounds the squared error); got {self.lam}.")
        if not 0 < self.beta_start <= self.beta_end:
            raise ValueError(f"need 0 < beta_start <= beta_end (got {self.beta_start}, {self.beta_end}).")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs must be >= 0, batch_size >= 1 and lr > 0.")
        if int(self.code_sweeps) < 0:
            raise ValueError(f"code_sweeps must be >= 0 (got {self.code_sweeps}).")

    @property
    def stage_bits(self) -> tuple[int, ...]:
        if isinstance(self.bits, tuple):
            return self.bits
        return (self.bits,) * int(self.stages)

    @property
    def num_bits(self) -> int:
        return sum(self.stage_bits)

    def stored_bytes(self, num_embeddings: int, embedding_dim: int) -> int:
        V, d, k, m = num_embeddings, embedding_dim, self.rank, self.num_bits
        return self.dtype_bytes * (k * (V + d) + d * m + d) + V * ((m + 7) // 8) + self.exact_bytes(d)

    def exact_bytes(self, embedding_dim: int) -> int:
        """Bytes of the exact rows: n x d values at ``dtype`` and n int32 ids."""
        return self.exact_rows * (embedding_dim * self.dtype_bytes + 4)

    def hyperparameters(self) -> dict[str, Any]:
        hp = dataclasses.asdict(self)
        hp["bits"] = list(self.stage_bits)
        return hp

    # --- budget solver -----------------------------------------------------------------------
    @staticmethod
    def max_bits(num_embeddings: int, embedding_dim: int, budget: float, rank: int, dtype: str, exact_rows: int = 0) -> int:
        """The largest total code bits M (a multiple of 8) with stored bytes <= budget (0 if none)."""
        V, d, b = num_embeddings, embedding_dim, DTYPE_BYTES[dtype]
        budget = budget - exact_rows * (d * b + 4)
        left = budget - b * (rank * (V + d) + d)
        if left <= 0:
            return 0
        m = 8 * int(left // (V + 8 * b * d))  # 8 bits cost V bytes of codes + 8 d decoder entries
        while m > 0 and b * (rank * (V + d) + d * m + d) + V * ((m + 7) // 8) > budget:
            m -= 8
        return max(m, 0)

    @classmethod
    def candidates(cls, num_embeddings: int, embedding_dim: int, ratio: float, **overrides: Any) -> list["LightTokenConfig"]:
        """Every config of the solver's grid that meets ``ratio`` (respecting the given overrides)."""
        V, d = num_embeddings, embedding_dim
        budget = V * d * 4 / ratio
        dtypes = [overrides["dtype"]] if overrides.get("dtype") else list(DTYPE_GRID)
        bits = overrides.get("bits")
        if isinstance(bits, (list, tuple)):
            stage_grid = [len(bits)]
        else:
            stage_grid = [int(overrides["stages"])] if overrides.get("stages") else list(STAGE_GRID)
        out = []
        for dtype in dtypes:
            n_exact = overrides.get("exact_rows")
            if n_exact is None:
                n_exact = default_exact_rows(V, d, budget, dtype)
            for stages in stage_grid:
                if bits is not None:
                    probe = cls(**{**overrides, "dtype": dtype, "stages": stages, "rank": 0, "exact_rows": n_exact})
                    if overrides.get("rank") is not None:
                        ranks = [int(overrides["rank"])]
                    else:  # the largest rank the bits leave room for
                        left = budget - probe.stored_bytes(V, d)
                        ranks = [max(0, min(int(left // (DTYPE_BYTES[dtype] * (V + d))), min(V, d)))]
                    for k in ranks:
                        c = dataclasses.replace(probe, rank=k)
                        if c.stored_bytes(V, d) <= budget:
                            out.append(c)
                    continue
                ranks = [int(overrides["rank"])] if overrides.get("rank") is not None else [r for r in RANK_GRID if r < d]
                for k in ranks:
                    m = cls.max_bits(V, d, budget, k, dtype, n_exact)
                    if m < 8 * stages:
                        continue
                    per = [m // (8 * stages) * 8] * stages  # whole bytes per stage where possible
                    for i in range((m - sum(per)) // 8):
                        per[i] += 8
                    rest = {k2: v for k2, v in overrides.items() if k2 not in ("bits", "stages", "rank", "dtype", "exact_rows")}
                    out.append(cls(**rest, dtype=dtype, rank=k, bits=tuple(per), stages=stages, exact_rows=n_exact))
        return out

    @classmethod
    def from_ratio(cls, num_embeddings: int, embedding_dim: int, ratio: float, *, weight: torch.Tensor | None = None,
                   **overrides: Any) -> "LightTokenConfig":
        """Solve k, the stages, the bits per stage and the dtype so that the stored bytes meet ``ratio``.

        With ``weight`` (E, float [V, d]) the grid's candidates are scored by a short probe fit on a row
        sample and the best is returned; without it a measured rule picks (see the module docstring).

        Raises:
            RatioError: no configuration reaches the ratio (the message gives the reachable range).
        """
        ratio = check_ratio(ratio)
        V, d = num_embeddings, embedding_dim
        overrides = {k: v for k, v in overrides.items() if v is not None}
        cands = cls.candidates(V, d, ratio, **overrides)
        if not cands:
            smallest = cls(**{**overrides, "rank": overrides.get("rank", 0), "bits": overrides.get("bits", 8),
                              "stages": overrides.get("stages", 1), "dtype": overrides.get("dtype", "float16")})
            max_ratio = V * d * 4 / smallest.stored_bytes(V, d)
            raise RatioError(
                f"lighttoken cannot reach ratio {ratio:g} for a {V} x {d} embedding with {overrides or 'defaults'}: "
                f"the reachable range is 1 < ratio <= {max_ratio:.1f}."
            )
        if len(cands) == 1:
            return cands[0]
        if weight is None:
            return _rule_pick(cands)
        return _probe_pick(weight, cands)


EXACT_SHARE = 0.12
"""Largest share of the byte budget the solver gives to exact rows (measured, see the module docstring)."""
EXACT_MAX = 128


def default_exact_rows(num_embeddings: int, embedding_dim: int, budget: float, dtype: str) -> int:
    """The solver's number of exact rows: :data:`EXACT_SHARE` of the byte budget, at most :data:`EXACT_MAX`
    and at most V / 8 (a multiple of 8)."""
    per_row = embedding_dim * DTYPE_BYTES[dtype] + 4
    n = int(EXACT_SHARE * budget // per_row)
    return max(0, min(n, EXACT_MAX, num_embeddings // 8) // 8 * 8)


THREE_STAGE_BITS = 96
"""The rule's stage count: 3 stages where 2 would get at most this many bits each, else 2 (module docstring)."""


def _rule_pick(cands: list[LightTokenConfig]) -> LightTokenConfig:
    """Measured rule (MiniLM, SmolLM2 at 25x, 50x and 100x): float16, the smallest rank, 2 stages, or 3 where 2
    stages would get at most :data:`THREE_STAGE_BITS` bits each (the small budgets of ~50x and more)."""
    fp16 = [c for c in cands if c.dtype == "float16"] or cands
    low = min(c.rank for c in fp16)
    two = [c for c in fp16 if c.rank == low and c.stages == 2]
    stages = 3 if two and max(two[0].stage_bits) <= THREE_STAGE_BITS else 2

    def key(c: LightTokenConfig):
        return (c.dtype != "float16", c.rank, abs(c.stages - stages))

    return min(cands, key=key)


def _probe_pick(weight: torch.Tensor, cands: list[LightTokenConfig]) -> LightTokenConfig:
    gen = torch.Generator().manual_seed(cands[0].seed)
    V = weight.shape[0]
    idx = torch.randperm(V, generator=gen).to(weight.device)
    n = min(PROBE_ROWS, V // 2)
    train, test = weight[idx[:n]].float(), weight[idx[n : 2 * n]].float()
    scores = []
    for c in cands:
        t0 = time.perf_counter()
        probe = dataclasses.replace(c, epochs=max(4, c.epochs), refit=True)
        fitted = _fit(train, probe, holdout=test, log=False)
        scores.append(fitted["holdout_cos"])
        logger.info("lighttoken probe %s k=%d bits=%s: held-out row cos %.4f (%.1fs)", c.dtype, c.rank,
                    c.stage_bits, scores[-1], time.perf_counter() - t0)
    return cands[max(range(len(cands)), key=lambda i: scores[i])]


# --- fitting --------------------------------------------------------------------------------------
ROW_CHUNK = 32768
"""Rows per pass of the fit's [n, d] and [n, M] products: every V-sized product is computed a chunk of rows
at a time, so that the fit holds only one float32 residual [n, d] and the uint8 codes [n, M] beside the
resident model (issue 16: the peak stays within 3x the fp32 matrix). The results do not depend on it (a row
of a matrix product does not depend on the other rows; tests/test_fit_memory.py)."""


def _rows(x: Rows, i: int, j: int) -> torch.Tensor:
    return rows_of(x, i, j, min(MIN_ROWS, ROW_CHUNK))


def _ranges(n: int) -> list[tuple[int, int]]:
    """The row chunks [i, j) of 0..n, :data:`ROW_CHUNK` rows each (the last one shorter)."""
    return [(i, min(i + ROW_CHUNK, n)) for i in range(0, n, ROW_CHUNK)]


def _fill(out: torch.Tensor, fn: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """``out[i:j] = fn(i, j)`` for the row chunks of ``out`` [n, *]; returns ``out``."""
    for i, j in _ranges(out.shape[0]):
        out[i:j] = _rows(fn, i, j)
    return out


class _Stage(nn.Module):
    def __init__(self, d: int, m: int) -> None:
        super().__init__()
        self.enc = nn.Linear(d, m)
        self.dec = nn.Linear(m, d)


def _lstsq(codes: Rows, target: Rows, chunk: int = 32768, weight: torch.Tensor | None = None,
           num_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """W [d, m], c [d] minimising sum_i w_i ||target_i - W codes_i - c||^2 (w = 1 without ``weight``;
    normal equations solved in float64).

    ``codes`` ([n, m], {0,1} of any dtype, or soft codes) and ``target`` (float [n, d]) are row sources
    (:data:`Rows`; ``num_rows`` = n when both are functions). The products are float32 per chunk of ``chunk``
    rows (exact for {0,1} codes), accumulated in float64; tiny ridge.
    """
    n = num_rows if num_rows is not None else next(x.shape[0] for x in (codes, target) if isinstance(x, torch.Tensor))
    G = C = None
    for i in range(0, n, chunk):
        j = min(i + chunk, n)
        a = _rows(codes, i, j).float()
        dev = a.device
        a = torch.cat([a, torch.ones(j - i, 1, device=dev)], 1)
        aw = a if weight is None else a * weight[i:j, None].float()
        t = _rows(target, i, j).float()
        if G is None:
            G = torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64, device=dev)
            C = torch.zeros(a.shape[1], t.shape[1], dtype=torch.float64, device=dev)
        G += (aw.T @ a).double()
        C += (aw.T @ t).double()
    m = G.shape[0] - 1
    G += torch.eye(m + 1, dtype=torch.float64, device=G.device) * (1e-8 * G.diagonal().mean() + 1e-12)
    sol = torch.linalg.solve(G, C)
    return sol[:m].T.float().contiguous(), sol[m].float().contiguous()


def _lowrank_q(E: Rows, n: int, d: int, k: int) -> torch.Tensor:
    """Q = the top-k right singular vectors of E [n, d] (a row source), float32 [d, k] (eigh of E^T E in
    float64; E is cast to float64 once, 2x the fp32 matrix)."""
    first = _rows(E, 0, min(n, ROW_CHUNK))
    if k == 0:
        return first.new_zeros(d, 0)
    Ed = torch.empty(n, d, dtype=torch.float64, device=first.device)
    for i, j in _ranges(n):
        Ed[i:j] = _rows(E, i, j).double()
    gram = Ed.T @ Ed
    del Ed
    _, vecs = torch.linalg.eigh(gram)
    return vecs[:, -k:].flip(1).float().contiguous()


def _row_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)


def _sq(x: torch.Tensor) -> float:
    """Sum of squares of a chunk (the fit's Frobenius statistics add the chunks in float64)."""
    return float(torch.linalg.vector_norm(x)) ** 2


def _init_stage(stage: _Stage, resid: torch.Tensor, gen: torch.Generator, beta: float,
                row_weight: torch.Tensor | None) -> None:
    """Initialise a stage on the residual R (float32 [n, d]): encoder rows are random directions scaled to
    unit-variance projections and centred on their median (balanced bits); the decoder is the least-squares
    fit to the soft codes sigmoid(beta z). Holds the projections [n, m] once (column medians 64 at a time)."""
    m, d = stage.enc.out_features, resid.shape[1]
    w = torch.randn(m, d, generator=gen).to(resid.device)
    proj = _fill(resid.new_empty(resid.shape[0], m), lambda a, b: resid[a:b] @ w.T)
    scale = proj.std(0).clamp_min(1e-8)
    proj.div_(scale)
    med = torch.cat([proj[:, j : j + 64].median(0).values for j in range(0, m, 64)])
    del proj
    stage.enc.weight.copy_(w / scale[:, None])
    stage.enc.bias.copy_(-med)
    enc_w, enc_b = stage.enc.weight, stage.enc.bias
    W, c = _lstsq(lambda a, b: torch.sigmoid(beta * (resid[a:b] @ enc_w.T + enc_b)), resid, weight=row_weight)
    stage.dec.weight.copy_(W)
    stage.dec.bias.copy_(c)


def _harden_stage(stage: _Stage, E: Rows, resid: torch.Tensor, hard: torch.Tensor, cfg: LightTokenConfig,
                  row_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The trained stage's hard codes 1[z > 0] into ``hard`` (uint8 [n, m], a view of B), its decoder refit to
    them (``cfg.refit``), and the residual updated in place, R <- R - (W_d b + b_d).

    Returns (W_d float32 [d, m], b_d [d], statistics with the squared Frobenius norms of the residual left by
    the trained and by the refit decoder, ``sq_hard`` / ``sq_refit``)."""
    n, m = hard.shape
    enc_w, enc_b = stage.enc.weight.detach(), stage.enc.bias.detach()
    dec_w, dec_b = stage.dec.weight.detach().clone(), stage.dec.bias.detach().clone()
    sat = ones = 0
    sq_hard = sq_refit = 0.0
    for i, j in _ranges(n):
        z = _rows(lambda a, b: resid[a:b] @ enc_w.T + enc_b, i, j)
        soft = torch.sigmoid(cfg.beta_end * z)
        sat += int(((soft < 0.05) | (soft > 0.95)).sum())
        hard[i:j] = z > 0
        ones += int(hard[i:j].sum())
        sq_hard += _sq(resid[i:j] - (_rows(lambda a, b: hard[a:b].float() @ dec_w.T, i, j) + dec_b))
    if cfg.refit:
        dec_w, dec_b = _lstsq(hard, resid, weight=row_weight)
    row_cos = torch.empty(n)
    for i, j in _ranges(n):
        resid[i:j] = resid[i:j] - (_rows(lambda a, b: hard[a:b].float() @ dec_w.T, i, j) + dec_b)
        sq_refit += _sq(resid[i:j])
        e = _rows(E, i, j)
        row_cos[i:j] = _row_cos(e, e - resid[i:j]).cpu()
    st = {"bits": m, "saturation": sat / max(1, n * m), "bit_balance": ones / max(1, n * m), "sq_hard": sq_hard,
          "sq_refit": sq_refit, "row_cos": float(row_cos.mean())}
    return dec_w, dec_b, st


def _lowrank_target(E: Rows, P: torch.Tensor, Q: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """Rows of E - P Q^T (what the codes and decoder fit)."""
    return lambda i, j: _rows(E, i, j) - P[i:j] @ Q.T


def _lowrank_of_rest(E: Rows, B: torch.Tensor, W: torch.Tensor, c: torch.Tensor,
                     Q: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """Rows of P = (E - B W^T - c) Q, the low-rank part refit given the codes."""
    return lambda i, j: (_rows(E, i, j) - B[i:j].float() @ W.T - c) @ Q


def _recon(P: torch.Tensor, Q: torch.Tensor, B: torch.Tensor, W: torch.Tensor,
           c: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """Rows of E_hat = P Q^T + B W^T + c (B uint8 codes)."""
    return lambda i, j: P[i:j] @ Q.T + B[i:j].float() @ W.T + c


FLIP_PASSES = 4
"""The most passes over the bits in one round of :func:`_refine_codes` (it stops earlier when no bit flips)."""


def _refine_codes(target: Rows, B: torch.Tensor, W: torch.Tensor, c: torch.Tensor, n: int) -> int:
    """Flip single bits of the hard codes B (uint8 {0,1} [n, M], changed in place) while that lowers the row's
    squared error |t - W b - c|^2 for the fixed decoder W (float32 [d, M]) and bias c [d]; ``target`` gives the
    rows t (float [n, d]). Iterated conditional modes over the bits, one row chunk at a time: flipping bit m
    changes the reconstruction by s W_m (s = 1 - 2 b_m), so it pays when 2 s g_m > |W_m|^2 with g = W^T (t - W b - c);
    g is kept up to date through the Gram matrix W^T W ([M, M]), never recomputing the residual. Memory: g for
    ROW_CHUNK * d / M rows at a time (no more than a chunk of the fit's residual).

    Returns the number of bits flipped. The error of every row can only go down.
    """
    M, d = B.shape[1], W.shape[0]
    gram = W.T @ W
    wn = torch.diagonal(gram).clone()
    flipped = 0
    step = max(1, min(ROW_CHUNK, ROW_CHUNK * d // max(M, 1)))  # g [rows, M] no bigger than a chunk of the residual
    for i in range(0, n, step):
        j = min(i + step, n)
        b = B[i:j]
        g = (_rows(target, i, j).float() - b.float() @ W.T - c) @ W  # [r, M]
        for _ in range(FLIP_PASSES):
            changed = 0
            for m in range(M):
                s = 1.0 - 2.0 * b[:, m].float()
                flip = torch.nonzero(2.0 * s * g[:, m] > wn[m]).flatten()
                if flip.numel():
                    g[flip] -= s[flip, None] * gram[m]
                    b[flip, m] ^= 1
                    changed += flip.numel()
            flipped += changed
            if not changed:
                break
    return flipped


def _fit(weight: torch.Tensor, cfg: LightTokenConfig, holdout: torch.Tensor | None = None, log: bool = True,
         row_weight: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> dict:
    """Fit all parts to E = ``weight[rows]`` (float [n, d]; all rows when ``rows`` (int64 [n] ids) is None).

    Returns the float32 tensors P [n, k], Q [d, k], W [d, M], c [d] (rounded to cfg.dtype), the hard codes
    B (uint8 {0,1} [n, M]) and statistics. ``row_weight`` (float [n], mean 1): per-row weights of the loss and
    of the least-squares refits. Memory beside ``weight``: the residual (float32 [n, d]), B and, while a stage
    is initialised, its projections [n, m_s]; everything else is computed :data:`ROW_CHUNK` rows at a time
    (the rows selected by ``rows`` are gathered a chunk at a time, never copied whole).
    """
    W_in = weight.float()
    dev = W_in.device
    ids = None if rows is None else rows.to(dev)
    n = W_in.shape[0] if ids is None else ids.numel()
    d = W_in.shape[1]

    def E(i: int, j: int) -> torch.Tensor:  # rows [i, j) of the fitted matrix
        return W_in[i:j] if ids is None else W_in[ids[i:j]]

    w_rows = None if row_weight is None else row_weight.float().to(dev)
    k = cfg.rank
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    Q = round_to_dtype(_lowrank_q(E, n, d, k), cfg.dtype)
    P = _fill(W_in.new_empty(n, k), lambda a, b: E(a, b) @ Q)
    e_norm = max(sum(_sq(E(i, j)) for i, j in _ranges(n)) ** 0.5, 1e-300)
    resid = _fill(W_in.new_empty(n, d), _lowrank_target(E, P, Q))
    # the row id rides along with the residual in the training rows: a batch gathers its rows of E
    row_ids = (torch.arange(n, device=dev) if ids is None else ids).float()[:, None]
    B = torch.zeros(n, cfg.num_bits, dtype=torch.uint8, device=dev)
    beta_ratio = cfg.beta_end / cfg.beta_start

    def step(module: nn.Module, batch: torch.Tensor, progress: float) -> torch.Tensor:
        r, e = batch[:, :d], W_in[batch[:, d].long().to(dev)].to(batch.device)
        b0 = e - r
        w = batch[:, d + 1] if batch.shape[1] > d + 1 else None
        beta = cfg.beta_start * beta_ratio ** min(1.0, progress / 0.8)
        h = torch.sigmoid(beta * module.enc(e - b0))
        return lighttoken_loss(e, b0 + module.dec(h), cfg.lam, weight=w)

    decs, biases, encs = [], [], []
    off = 0
    for s, m in enumerate(cfg.stage_bits):
        stage = _Stage(d, m)
        with torch.no_grad():
            _init_stage(stage, resid, torch.Generator().manual_seed(cfg.seed * 1009 + s), cfg.beta_start, w_rows)
        if cfg.epochs > 0:
            parts = [resid, row_ids] + ([] if w_rows is None else [w_rows[:, None]])
            train_rows(stage, parts, step, epochs=cfg.epochs, batch_size=cfg.batch_size,
                       lr=cfg.lr, seed=cfg.seed * 1009 + s, desc=f"lighttoken stage {s + 1}/{cfg.stages}")
        stage.to(dev)  # train_rows may have moved it to the accelerator's device
        with torch.no_grad():
            dec_w, dec_b, st = _harden_stage(stage, E, resid, B[:, off : off + m], cfg, w_rows)
        st["rel_frob_hard"] = st.pop("sq_hard") ** 0.5 / e_norm
        st["rel_frob_refit"] = st.pop("sq_refit") ** 0.5 / e_norm
        stats[f"stage{s + 1}"] = st
        if log:
            logger.info("lighttoken stage %d: %s", s + 1, st)
        decs.append(dec_w)
        biases.append(dec_b)
        encs.append((stage.enc.weight.detach().clone(), stage.enc.bias.detach().clone()))
        off += m
    del resid
    W = torch.cat(decs, 1)
    c = torch.stack(biases).sum(0)
    with torch.no_grad():
        stats["before_refit"] = _summary(E, _recon(P, Q, B, W, c), n)
        if cfg.refit:
            for _ in range(2):
                W, c = _lstsq(B, _lowrank_target(E, P, Q), weight=w_rows)
                if k:
                    P = _fill(P.new_empty(n, k), _lowrank_of_rest(E, B, W, c, Q))
            for r in range(cfg.code_sweeps):
                flips = _refine_codes(_lowrank_target(E, P, Q), B, W, c, n)
                W, c = _lstsq(B, _lowrank_target(E, P, Q), weight=w_rows)
                if k:
                    P = _fill(P.new_empty(n, k), _lowrank_of_rest(E, B, W, c, Q))
                stats[f"code_round{r + 1}"] = {"flipped": flips, **_summary(E, _recon(P, Q, B, W, c), n)}
                if log:
                    logger.info("lighttoken code refinement %d: %s", r + 1, stats[f"code_round{r + 1}"])
            W, c = _lstsq(B, _lowrank_target(E, round_to_dtype(P, cfg.dtype), Q), weight=w_rows)
        P, W, c = round_to_dtype(P, cfg.dtype), round_to_dtype(W, cfg.dtype), round_to_dtype(c, cfg.dtype)
        stats["after_refit"] = _summary(E, _recon(P, Q, B, W, c), n)
        out = {"P": P, "Q": Q, "W": W, "c": c, "B": B, "stats": stats}
        if holdout is not None:
            Eh = holdout.float()
            Ph = Eh @ Q
            r = Eh - Ph @ Q.T
            codes_h = []
            for (we, be), dw, db in zip(encs, decs, biases):
                h = ((r @ we.T + be) > 0).float()
                codes_h.append(h)
                r = r - (h @ dw.T + db)
            Bh = torch.cat(codes_h, 1)
            if k:
                Ph = (Eh - Bh @ W.T - c) @ Q
            out["holdout_cos"] = float(_row_cos(Eh, Ph @ Q.T + Bh @ W.T + c).mean())
    stats["seconds"] = time.perf_counter() - t0
    return out


def _summary(E: Rows, E_hat: Rows, n: int) -> dict[str, float]:
    """Row cosine (mean, 1st percentile) and relative Frobenius error of E_hat against E, row sources [n, d]
    compared :data:`ROW_CHUNK` rows at a time."""
    cos = torch.empty(n)
    err = ref = 0.0
    for i, j in _ranges(n):
        e, e_hat = _rows(E, i, j), _rows(E_hat, i, j)
        cos[i:j] = _row_cos(e, e_hat).cpu()
        err += _sq(e - e_hat)
        ref += _sq(e)
    return {
        "row_cos": float(cos.mean()),
        "row_cos_p01": float(torch.quantile(cos, 0.01)),
        "rel_frob": (err / max(ref, 1e-300)) ** 0.5,
    }


@register_method
class LightTokenMethod(CompressionMethod):
    """Low-rank SVD + residual binary autoencoder stages (tempered sigmoid) + the LightToken loss."""

    name = "lighttoken"
    config_class = LightTokenConfig
    paper = ("Wang et al. (2023), LightToken: A Task and Model-agnostic Lightweight Token Embedding Framework "
             "for Pre-trained Language Models, KDD 2023")

    last_stats: dict[str, Any] | None = None

    uses_token_counts = True
    uses_calibration = True

    def fit(self, weight: torch.Tensor, config: LightTokenConfig, *, token_counts: torch.Tensor | None = None,
            special_ids: list[int] | None = None, calibration: Any = None, **context: Any) -> dict[str, torch.Tensor]:
        """Fit LightToken to E (float32 [V, d]); see the module docstring for the equations.

        ``token_counts`` (int [V]) and ``special_ids`` choose the ``config.exact_rows`` rows stored verbatim
        (:func:`select_exact_ids`); those rows are left out of the fit and get zero codes. With a
        ``calibration`` (:class:`hf_embcomp.calibration.Calibration`) that has an input sensitivity (encoders) and
        ``config.metric == "calibration"`` the fit runs on E A and A^-1 is folded into Q, the decoder and its bias
        (module docstring, "Metric fit").

        Raises:
            RatioError: the rank exceeds min(V, d), or more exact rows than V.
        """
        V, d = weight.shape
        if config.rank > min(weight.shape):
            raise RatioError(f"rank {config.rank} exceeds min(V, d) = {min(weight.shape)}.")
        n = config.exact_rows
        if n >= V:
            raise RatioError(f"exact_rows {n} must be < V = {V}; lower exact_rows or the ratio.")
        mask = None
        if n:
            ids = select_exact_ids(V, n, token_counts, special_ids).to(weight.device)
            mask = torch.ones(V, dtype=torch.bool, device=weight.device)
            mask[ids] = False
        row_weight = None
        if config.freq_power > 0 and token_counts is not None:
            c = token_counts.double().to(weight.device)
            row_weight = ((c if mask is None else c[mask]) + 1.0) ** config.freq_power
            row_weight = (row_weight / row_weight.mean()).float()
        elif config.freq_power > 0:
            logger.warning("lighttoken: freq_power=%g but no token counts; every row weighs the same.", config.freq_power)
        keep = None if mask is None else torch.nonzero(mask).flatten()
        A, A_inv, source = metric_factors(d, calibration, config)
        fit_weight = weight if A is None else _fill(weight.new_empty(V, d, dtype=torch.float32),
                                                    lambda i, j: (weight[i:j].double() @ A.to(weight.device)).float())
        fitted = _fit(fit_weight, config, row_weight=row_weight, rows=keep)
        st = fitted["stats"]
        st["metric"] = source
        B, P = fitted["B"], fitted["P"]
        if mask is not None:
            B = B.new_zeros(V, B.shape[1]).index_put_((mask,), B)
            P = P.new_zeros(V, P.shape[1]).index_put_((mask,), P)
            exact = round_to_dtype(fit_weight[ids], config.dtype)  # the statistics are in the fit's metric
            slot = torch.full((V,), -1, dtype=torch.int64, device=weight.device)
            slot[ids] = torch.arange(n, device=weight.device)
            Q, W, c = fitted["Q"], fitted["W"], fitted["c"]

            def e_hat(i: int, j: int) -> torch.Tensor:
                out = P[i:j] @ Q.T + B[i:j].float() @ W.T + c
                at = slot[i:j]
                out[at >= 0] = exact[at[at >= 0]]
                return out

            st["with_exact_rows"] = _summary(lambda i, j: fit_weight[i:j].float(), e_hat, V)
            st["exact_rows"] = n
        del fit_weight
        if A_inv is not None:  # e_hat A^-1 = P (A^-1 Q)^T + B (A^-1 W)^T + A^-1 c (A symmetric)
            for key in ("Q", "W", "c"):
                x = fitted[key]
                fitted[key] = round_to_dtype((A_inv.to(x.device) @ x.double()).float(), config.dtype)
        logger.info("lighttoken refit: row cos %.4f -> %.4f, rel. Frobenius %.4f -> %.4f",
                    st["before_refit"]["row_cos"], st["after_refit"]["row_cos"],
                    st["before_refit"]["rel_frob"], st["after_refit"]["rel_frob"])
        LightTokenMethod.last_stats = st
        state = {
            "codes": torch.cat([pack_bits(B[i:j]) for i, j in _ranges(V)]).contiguous(),
            "decoder": fitted["W"].contiguous(),
            "decoder_bias": fitted["c"].contiguous(),
        }
        if config.rank > 0:
            state["lowrank_p"] = P.contiguous()
            state["lowrank_q"] = fitted["Q"].contiguous()
        if n:
            state["exact_ids"] = ids.to(torch.int32).contiguous()
            state["exact_rows"] = round_to_dtype(weight[ids], config.dtype).contiguous()
        return state


def metric_factors(d: int, calibration: Any, config: LightTokenConfig
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
    """(A, A^-1, source): A = (S + damp I)^(1/2) float64 [d, d] (symmetric) with S the calibration's pooled-output
    input sensitivity normalised to mean diagonal 1 (encoders), or (None, None, why not) where the fit stays
    Euclidean: ``config.metric == "euclidean"``, no calibration, or a calibration without S (causal LMs: the tied
    head's second moment made SmolLM2 worse, 8x perplexity 30.11 -> 34.27 on 4,096 tokens, because a tied row is
    also an input and the head's metric ignores what the first layer reads)."""
    S = None if calibration is None else getattr(calibration, "input_sensitivity", None)
    if config.metric != "calibration" or S is None:
        why = "metric='euclidean'" if config.metric == "euclidean" else \
            "no calibration" if calibration is None else "no input sensitivity in the calibration"
        return None, None, f"euclidean ({why})"
    S = S.double() / torch.diagonal(S.double()).mean().clamp_min(1e-30)
    w, U = torch.linalg.eigh(S + config.metric_damp * torch.eye(d, dtype=torch.float64))
    w = w.clamp_min(config.metric_damp * 1e-3)
    return (U * w.sqrt()) @ U.T, (U / w.sqrt()) @ U.T, "pooled-output input sensitivity"


def select_exact_ids(num_embeddings: int, n: int, token_counts: torch.Tensor | None = None,
                     special_ids: list[int] | None = None) -> torch.Tensor:
    """The n token ids whose rows are stored verbatim: the special tokens (ids < V) first, then the most
    frequent tokens by ``token_counts`` (int [V]; ties and a missing count go to the lower id).

    Returns:
        int64 [n], sorted ascending, unique.
    """
    V = num_embeddings
    special = [int(i) for i in dict.fromkeys(special_ids or []) if 0 <= int(i) < V][:n]
    if token_counts is None:
        logger.warning("lighttoken: no token counts given; the %d exact rows go to the special tokens and then the "
                       "lowest ids (pass token_counts= / --corpus for the most frequent tokens of a corpus).", n)
        score = -torch.arange(V, dtype=torch.float64)
    else:
        if token_counts.shape != (V,):
            raise ValueError(f"token_counts must have shape ({V},), got {tuple(token_counts.shape)}.")
        score = token_counts.double().cpu() - torch.arange(V, dtype=torch.float64) / (2 * V)  # ties: lower id
    score[special] = float("inf")
    return torch.topk(score, n).indices.sort().values
