"""GPTQ for the token embedding: rotated group-wise scalar quantisation with mixed bits per row, fitted
under the calibration Hessian of the tied head.

Papers: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (Algorithm 1: column-by-column rounding with the error fed back through
the Cholesky factor of H^-1); Chee, Cai, Kuleshov, De Sa, "QuIP: 2-Bit Quantization of Large Language Models
With Guarantees", NeurIPS 2023, and Tseng et al., "QuIP#", ICML 2024 (incoherence processing by a randomised
Hadamard transform). Runtime module: ``hub_code/embcomp_gptq.py`` (``GroupQuantEmbedding``).

Equations followed
------------------
1. Objective. A tied head computes logits E h, so E is the weight of a Linear layer whose input is the hidden
   state h the head sees. The expected squared logit error of row v is (e_v - e_hat_v)^T H (e_v - e_hat_v) with
   H = E[h h^T] (``Calibration.head_second_moment``; GPTQ's layer Hessian up to a factor 2). Without a head
   (encoders), H = diag(input column gain) of the first normalisation layer; without calibration, H = I.
2. Incoherence: E' = E R, H' = R^T H R with R = diag(s) blockdiag(H_B) (random signs s, normalised
   Sylvester-Hadamard blocks of B = the largest power of 2 <= 64 dividing d). It spreads the few
   coordinates with massive activations (SmolLM2: the largest diagonal entry of H is 180x the mean) over
   their block, so that one scale per group fits them.
3. Quantiser: asymmetric b-bit codes with one (scale, min) pair per group of ``group_size`` coordinates,
   stored at ``dtype``: x' = q s + m, q in [0, 2^b - 1]. The (s, m) of a group is fitted when GPTQ reaches the
   group (on the error-updated values): a grid of 9 range shrinks/expansions, each refined by two rounds of
   H'-diagonal-weighted least squares, rounded to ``dtype``, the best kept.
4. GPTQ (Algorithm 1, lazy batch updates of ``block`` columns, damping ``damp`` * mean diag(H')): rows are
   independent, so the rows are processed in chunks (memory bounded by the chunk, not by V).
5. Mixed precision (ours): every row is quantised at every candidate bit width b; row v's cost is
   w_v * err_v(b) with err_v(b) = delta^T H' delta and w_v = count_v + ``count_floor`` * mean(count) (token
   counts of the calibration text: rows the model reads and predicts often weigh more; the floor keeps every
   row in the softmax normaliser). A Lagrange multiplier search assigns each row the bit width minimising
   w_v err_v(b) + lambda bytes(b) under the byte budget of the ratio (the rate-distortion allocation of
   transform coding). Rows of one bit width form a tier.
6. Refinement (ours; the alternating step of Lloyd-style quantiser design): with the codes q of a row fixed,
   its (scale, min) pairs theta = (s_1..s_G, m_1..m_G) minimise (x - A theta)^T H' (x - A theta) with
   A [d, 2G] (column g: q_j on the coordinates of group g; column G + g: 1 there), so theta = (A^T H' A)^-1
   A^T H' x, rounded to ``dtype``; GPTQ then re-chooses the codes under the refitted pairs. On 4,096 random
   SmolLM2 rows the H'-error falls by 12.7 / 3.5 / 2.4 / 2.1 % at 1 / 2 / 3 / 4 bits after a refit alone, by
   18 / 6 / 3 % at 1 / 2 / 4 bits with ``refine=1`` (the default; 3-4x the time of the tier's GPTQ pass) and by
   19 / 6 / 3 % with ``refine=2``.

Measured while choosing (SmolLM2-135M, 4,096-token Wikipedia perplexity, stock 21.32; uniform bits):
round-to-nearest 4-bit g32 asymmetric 22.76, imatrix-weighted scales 22.12, GPTQ 3-bit g32 23.75 (RTN 26.11),
GPTQ + rotation 23.46; 2-bit g32: RTN 87.3, imatrix 53.9, GPTQ 38.8, GPTQ + rotation 31.7; 4-bit g128 + rotation
21.97 (4.25 bits per weight; llama.cpp Q4_K at 4.5: 22.53 on a 21.22 baseline). GPTQ's act-order hurt here
(2-bit 65.4), a second Hadamard layer across blocks did not help (2-bit 34.0), adding the input side to H hurt
perplexity (2-bit 34.8).

What the ratio counts: codes, scales and mins of every tier, ``row_bits`` (1 byte a row) and the packed
rotation signs; ratio = V d 4 / stored bytes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from ..hub_code.embcomp_base import pack_bits
from ..hub_code.embcomp_gptq import hadamard_matrix
from .base import CompressionMethod, MethodConfig, RatioError, check_ratio, register_method, rows_of

logger = logging.getLogger(__name__)

BIT_GRID = (1, 2, 3, 4, 5, 6, 8)
ROW_CHUNK = 16384
"""Rows GPTQ, the rotation and the packing handle at a time (memory: Er, float32 [V, d], plus a few chunks)."""
GROUP_GRID = (128, 256, 512, 1 << 30)
"""Group sizes :meth:`GPTQConfig.from_ratio` tries in turn (the default first; the last: one group a row)."""


@dataclasses.dataclass(frozen=True)
class GPTQConfig(MethodConfig):
    """Attributes:
        bits: the bit widths a row may get (each stored tier has one).
        tier_rows: rows per entry of ``bits`` (sums to V). :meth:`from_ratio` fills in a data-free split (two
            adjacent widths meeting the budget); with ``allocation="calibrated"`` the fit replaces it.
        target_bytes: the byte budget of the allocation (from the ratio; None: the bytes of ``tier_rows``).
        allocation: ``"calibrated"`` (the fit assigns widths to rows under ``target_bytes``, module docstring 5)
            or ``"fixed"`` (``tier_rows`` as given; the rows of highest weight get the most bits). Default: fixed
            when the config is built directly, calibrated when it is solved from a ratio.
        group_size: coordinates sharing one (scale, min) pair (the last group of a row may be shorter);
            :meth:`from_ratio` takes the first of :data:`GROUP_GRID` that reaches the ratio.
        rotation_block: B of the randomised Hadamard transform (a power of 2 dividing d; 0: none; None: the
            largest power of 2 <= 64 dividing d).
        damp: GPTQ's dampening, a fraction of the mean diagonal of H.
        count_floor: row weights are count + count_floor * mean count (module docstring, 5).
        refine: rounds of (refit the scales and mins to the codes, GPTQ again with them fixed) after the first
            GPTQ pass of each tier, ending with a refit; each row keeps its best round (module docstring, 6).
        dtype: storage dtype of the scales and mins (default float16).
    """

    dtype: str = "float16"
    bits: tuple = BIT_GRID
    tier_rows: tuple | None = None
    target_bytes: int | None = None
    group_size: int = 128
    rotation_block: int | None = None
    damp: float = 0.01
    count_floor: float = 1.0
    refine: int = 1
    allocation: str = "fixed"

    def __post_init__(self) -> None:
        super().__post_init__()
        bits = tuple(int(b) for b in (self.bits if isinstance(self.bits, (list, tuple)) else [self.bits]))
        if not bits or any(not 1 <= b <= 8 for b in bits) or len(set(bits)) != len(bits):
            raise ValueError(f"bits must be distinct widths in 1..8 (got {self.bits}).")
        object.__setattr__(self, "bits", bits)
        if self.tier_rows is not None:
            rows = tuple(int(n) for n in self.tier_rows)
            if len(rows) != len(bits) or min(rows) < 0:
                raise ValueError(f"tier_rows must give a row count >= 0 for each of bits {bits} (got {self.tier_rows}).")
            object.__setattr__(self, "tier_rows", rows)
        if int(self.group_size) < 1:
            raise ValueError(f"group_size must be >= 1 (got {self.group_size}).")
        if self.tier_rows is None:
            raise ValueError("gptq needs a ratio or explicit tier_rows (rows per bit width); pass --ratio.")
        if int(self.refine) < 0:
            raise ValueError(f"refine must be >= 0 rounds (got {self.refine}).")
        if self.allocation not in ("calibrated", "fixed"):
            raise ValueError(f"allocation must be 'calibrated' or 'fixed' (got {self.allocation!r}).")

    def block_for(self, embedding_dim: int) -> int:
        if self.rotation_block is not None:
            return int(self.rotation_block)
        b = 64
        while b > 1 and embedding_dim % b:
            b //= 2
        return b if b > 1 else 0

    def row_bytes(self, bits: int, embedding_dim: int) -> int:
        """Bytes of one row at ``bits``: its packed codes and its groups' (scale, min) pairs."""
        groups = -(-embedding_dim // int(self.group_size))
        return (embedding_dim * bits + 7) // 8 + 2 * groups * self.dtype_bytes

    def fixed_bytes(self, num_embeddings: int, embedding_dim: int) -> int:
        """Bytes that do not depend on the allocation: ``row_bits`` and the rotation signs."""
        return num_embeddings + ((embedding_dim + 7) // 8 if self.block_for(embedding_dim) else 0)

    def stored_bytes(self, num_embeddings: int, embedding_dim: int) -> int:
        """Exact bytes of the tiers ``tier_rows`` describes (a calibrated fit stays within ``target_bytes``)."""
        return self.fixed_bytes(num_embeddings, embedding_dim) + sum(
            n * self.row_bytes(b, embedding_dim) for b, n in zip(self.bits, self.tier_rows))

    def hyperparameters(self) -> dict[str, Any]:
        hp = dataclasses.asdict(self)
        hp["bits"], hp["tier_rows"] = list(self.bits), list(self.tier_rows)
        return hp

    @classmethod
    def from_ratio(cls, num_embeddings: int, embedding_dim: int, ratio: float, **overrides: Any) -> "GPTQConfig":
        """The budget V d 4 / ratio and a data-free split of the rows over two adjacent widths within it.

        Raises:
            RatioError: even every row at the smallest width stores too much (the message gives the range).
        """
        ratio = check_ratio(ratio)
        V, d = num_embeddings, embedding_dim
        overrides = {k: v for k, v in overrides.items() if k != "target_bytes"}
        if "group_size" not in overrides:  # larger groups (fewer scales) where the default cannot reach the ratio
            for g in GROUP_GRID:
                try:
                    return cls.from_ratio(V, d, ratio, **overrides, group_size=g)
                except RatioError:
                    if g >= d:
                        raise
            raise AssertionError("unreachable")
        probe = cls(**{"tier_rows": (V,) + (0,) * (len(tuple(overrides.get("bits", BIT_GRID))) - 1), **overrides})
        probe = dataclasses.replace(probe, rotation_block=probe.block_for(d))
        if overrides.get("tier_rows") is not None:
            return dataclasses.replace(probe, target_bytes=probe.stored_bytes(V, d), allocation="fixed")
        full = V * d * 4
        target = int(full // ratio)
        order = sorted(range(len(probe.bits)), key=lambda j: probe.bits[j])
        cost = {j: probe.row_bytes(probe.bits[j], d) for j in order}
        budget = target - probe.fixed_bytes(V, d)
        if budget < V * cost[order[0]]:
            lo = probe.fixed_bytes(V, d) + V * cost[order[0]]
            raise RatioError(f"gptq cannot reach ratio {ratio:g} for a {V} x {d} embedding with bits {list(probe.bits)} "
                             f"and group_size {probe.group_size}: the reachable range is 1 < ratio <= {full / lo:.1f}.")
        rows = [0] * len(probe.bits)
        k = max(i for i, j in enumerate(order) if V * cost[j] <= budget)
        base = order[k]
        if k + 1 < len(order):
            up = order[k + 1]
            n_up = min(V, (budget - V * cost[base]) // (cost[up] - cost[base]))
            rows[up], rows[base] = int(n_up), V - int(n_up)
        else:
            rows[base] = V
        return dataclasses.replace(probe, tier_rows=tuple(rows), target_bytes=target,
                                   allocation=overrides.get("allocation", "calibrated"))


# --- the fit, along its lifecycle: Hessian -> rotation -> per-width GPTQ -> allocation -> packing ------------

def hessian(d: int, calibration: Any = None) -> tuple[torch.Tensor, str]:
    """H float64 [d, d] (normalised to mean diagonal 1) and a word saying where it came from."""
    if calibration is not None and calibration.head_second_moment is not None:
        H, src = calibration.head_second_moment.double().clone(), "tied-head second moment"
    elif calibration is not None and calibration.input_column_gain is not None:
        H, src = torch.diag(calibration.input_column_gain.double()), "first-norm column gain (diagonal)"
    else:
        H, src = torch.eye(d, dtype=torch.float64), "identity (no calibration)"
    return H / torch.diagonal(H).mean().clamp_min(1e-30), src


def rotation_matrix(d: int, block: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R float64 [d, d] = diag(s) blockdiag(H_B), the sign bits uint8 [d] with 1 where s = -1)."""
    if not block:
        return torch.eye(d, dtype=torch.float64), torch.zeros(d, dtype=torch.uint8)
    g = torch.Generator().manual_seed(int(seed) + 7919)
    neg = torch.randint(0, 2, (d,), generator=g, dtype=torch.uint8)
    hb = hadamard_matrix(block, torch.float64)
    R = (1.0 - 2.0 * neg.double())[:, None] * torch.block_diag(*([hb] * (d // block)))
    return R, neg


def _fit_group(x: torch.Tensor, w: torch.Tensor, levels: int, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, min) float32 [n, 1] of one group x [n, g] (weights w [g]), rounded to ``dtype`` (equation 3)."""
    store = getattr(torch, dtype)
    ww = w.reshape(1, -1).expand_as(x)
    mn, mx = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    sw = ww.sum(-1, keepdim=True)
    sx = (ww * x).sum(-1, keepdim=True)
    best = None
    for f in (-0.1, -0.075, -0.05, -0.025, 0.0, 0.025, 0.05, 0.075, 0.1):
        s = ((mx - mn) * (1 + f) / levels).clamp_min(1e-8)
        m = mn - (mx - mn) * f / 2
        q = torch.clamp(torch.round((x - m) / s), 0, levels)
        for _ in range(2):
            sq, sqq, sqx = (ww * q).sum(-1, keepdim=True), (ww * q * q).sum(-1, keepdim=True), (ww * q * x).sum(-1, keepdim=True)
            det = sw * sqq - sq * sq
            ok = det > 1e-12
            s = torch.where(ok, (sw * sqx - sq * sx) / det.clamp_min(1e-12), s).clamp_min(1e-8)
            m = torch.where(ok, (sqq * sx - sq * sqx) / det.clamp_min(1e-12), m)
            q = torch.clamp(torch.round((x - m) / s), 0, levels)
        s = s.to(store).float().clamp_min(float(torch.finfo(store).tiny) * 4)
        m = m.to(store).float()
        q = torch.clamp(torch.round((x - m) / s), 0, levels)
        err = (ww * (x - (q * s + m)) ** 2).sum(-1, keepdim=True)
        if best is None:
            best = [s, m, err]
        else:
            k = err < best[2]
            best = [torch.where(k, s, best[0]), torch.where(k, m, best[1]), torch.where(k, err, best[2])]
    return best[0], best[1]


def gptq_rows(W: torch.Tensor, hinv_u: torch.Tensor, bits: int, group_size: int, colw: torch.Tensor,
              dtype: str, fixed: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ Algorithm 1 on rows W float32 [n, d] with the upper Cholesky factor of H^-1 (float32 [d, d]).

    Args:
        fixed: (scales, mins) float32 [n, G] to quantise with; None: each group's pair is fitted when GPTQ
            reaches it (equation 3).

    Returns:
        (codes int32 [n, d] in [0, 2^bits - 1], scales float32 [n, G], mins float32 [n, G]), G = ceil(d / g).
    """
    W = W.clone()
    n, d = W.shape
    g, levels = int(group_size), (1 << bits) - 1
    block = g * max(1, 128 // g)
    G = -(-d // g)
    Q = torch.zeros(n, d, dtype=torch.int32)
    S = torch.zeros(n, G) if fixed is None else fixed[0].clone()
    M = torch.zeros(n, G) if fixed is None else fixed[1].clone()
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        Hi = hinv_u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if c % g == 0:
                if fixed is None:
                    s, m = _fit_group(W1[:, i : i + g], colw[c : c + g], levels, dtype)
                    S[:, c // g], M[:, c // g] = s[:, 0], m[:, 0]
                else:
                    s, m = S[:, c // g : c // g + 1], M[:, c // g : c // g + 1]
            col = W1[:, i]
            q = torch.clamp(torch.round((col - m[:, 0]) / s[:, 0]), 0, levels)
            Q[:, c] = q.to(torch.int32)
            err = (col - (q * s[:, 0] + m[:, 0])) / Hi[i, i]
            W1[:, i:] -= err[:, None] * Hi[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ hinv_u[i1:i2, i2:]
    return Q, S, M


def dequantise(Q: torch.Tensor, S: torch.Tensor, M: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes [n, d], scales / mins [n, G] -> float32 [n, d] (rotated basis)."""
    d = Q.shape[1]
    return Q.float() * S.repeat_interleave(group_size, 1)[:, :d] + M.repeat_interleave(group_size, 1)[:, :d]


def h_error(x: torch.Tensor, x_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """(x - x_hat)^T H (x - x_hat) per row: float32 [n] for rows [n, d] and H float32 [d, d]."""
    delta = x - x_hat
    return ((delta @ H) * delta).sum(1)


def refit_scales(x: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, group_size: int, dtype: str,
                 chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """The H-optimal (scales, mins) float32 [n, G] for fixed codes Q int [n, d] of rows x float32 [n, d]
    (module docstring, 6), rounded to ``dtype``; computed in chunks of ``chunk`` rows (memory n_chunk d 2G)."""
    n, d = x.shape
    G = -(-d // group_size)
    onehot = torch.nn.functional.one_hot(torch.arange(d) // group_size, G).float()  # [d, G]
    store = getattr(torch, dtype)
    S, M = torch.empty(n, G), torch.empty(n, G)
    for i in range(0, n, chunk):
        q, xi = Q[i : i + chunk].float(), x[i : i + chunk]
        A = torch.cat([q.unsqueeze(-1) * onehot, onehot.expand(q.shape[0], d, G)], -1)  # [c, d, 2G]
        HA = torch.einsum("jk,ckb->cjb", H, A)
        AtHA = torch.einsum("cja,cjb->cab", A, HA).double()
        AtHx = torch.einsum("cja,cj->ca", HA, xi).double()
        ridge = 1e-9 * AtHA.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
        theta = torch.linalg.solve(AtHA + ridge[:, None, None] * torch.eye(2 * G, dtype=torch.float64), AtHx)
        S[i : i + chunk] = theta[:, :G].to(store).float()
        M[i : i + chunk] = theta[:, G:].to(store).float()
    return S, M


def refine_rows(x: torch.Tensor, hinv_u: torch.Tensor, H: torch.Tensor, bits: int, group_size: int,
                colw: torch.Tensor, dtype: str, rounds: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ, then ``rounds`` x (refit the pairs, GPTQ with them fixed), then a last refit; every row keeps the
    (codes, scales, mins) of its lowest H-error (module docstring, 6). Shapes as :func:`gptq_rows`."""
    Q, S, M = gptq_rows(x, hinv_u, bits, group_size, colw, dtype)
    if rounds <= 0:
        return Q, S, M
    best = [Q, S, M]
    best_err = h_error(x, dequantise(Q, S, M, group_size), H)
    for r in range(rounds + 1):
        S, M = refit_scales(x, Q, H, group_size, dtype)
        S = torch.where(torch.isfinite(S), S, best[1])
        M = torch.where(torch.isfinite(M), M, best[2])
        for cand in ([Q, S, M],) if r == rounds else ([Q, S, M], list(gptq_rows(x, hinv_u, bits, group_size, colw,
                                                                               dtype, fixed=(S, M)))):
            err = h_error(x, dequantise(*cand, group_size), H)
            k = err < best_err
            best = [torch.where(k[:, None], c, b) for c, b in zip(cand, best)]
            best_err = torch.where(k, err, best_err)
        Q = best[0]
        S, M = best[1], best[2]
    return best[0], best[1], best[2]


def pack_codes(Q: torch.Tensor, bits: int) -> torch.Tensor:
    """int [n, d] codes of ``bits`` bits -> uint8 [n, ceil(d*bits/8)], a big-endian bit stream (unpack_codes)."""
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.int32)
    stream = ((Q.to(torch.int32).unsqueeze(-1) >> shifts) & 1).flatten(-2)
    return pack_bits(stream)


def allocate_bits(err: torch.Tensor, weights: torch.Tensor, row_bytes: torch.Tensor, budget: float) -> torch.Tensor:
    """Bit-width index per row minimising sum_v w_v err[v, j_v] subject to sum_v row_bytes[j_v] <= budget.

    Args:
        err: float64 [V, K] error of each row at each candidate width; weights: float64 [V]; row_bytes: [K].

    Returns:
        int64 [V] indices into the candidate widths (a Lagrange multiplier search, 200 bisection steps).
    """
    cost = weights[:, None] * err
    rb = row_bytes.double()

    def pick(lam: float) -> torch.Tensor:
        return (cost + lam * rb[None, :]).argmin(1)

    lo, hi = 0.0, 1.0
    while float(rb[pick(hi)].sum()) > budget and hi < 1e30:
        hi *= 4
    for _ in range(200):
        mid = (lo + hi) / 2
        if float(rb[pick(mid)].sum()) > budget:
            lo = mid
        else:
            hi = mid
    return pick(hi)


@register_method
class GPTQMethod(CompressionMethod):
    """Rotated group-wise scalar quantisation, GPTQ under the calibration Hessian, mixed bits per row."""

    name = "gptq"
    config_class = GPTQConfig
    paper = ("Frantar et al., GPTQ (ICLR 2023); Chee et al., QuIP (NeurIPS 2023) / Tseng et al., QuIP# (ICML 2024) "
             "for the randomised Hadamard rotation")
    uses_calibration = True

    def fit(self, weight: torch.Tensor, config: GPTQConfig, **context: Any) -> dict[str, torch.Tensor]:
        return self.fit_with_config(weight, config, **context)[0]

    def fit_with_config(self, weight: torch.Tensor, config: GPTQConfig, calibration: Any = None,
                        **context: Any) -> tuple[dict[str, torch.Tensor], GPTQConfig]:
        V, d = weight.shape
        E = weight.detach().float().cpu()
        H, h_src = hessian(d, calibration)
        block = config.block_for(d)
        R, neg = rotation_matrix(d, block, config.seed)
        Hr = R.T @ H @ R
        Hr += config.damp * torch.diagonal(Hr).mean() * torch.eye(d, dtype=torch.float64)
        hinv_u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hr)), upper=True).float()
        colw = torch.diagonal(Hr).float()
        Hf = Hr.float()
        Er = torch.empty(V, d)  # E R, float32 [V, d]; rotated in float64 a chunk of rows at a time
        for i in range(0, V, ROW_CHUNK):
            Er[i : i + ROW_CHUNK] = rows_of(lambda a, b: (E[a:b].double() @ R).float(), i, min(i + ROW_CHUNK, V))
        bits = list(config.bits)
        if config.allocation == "calibrated":
            rows_at = self._allocate(Er, Hr, hinv_u, colw, config, calibration, V, d)
        else:  # fixed tier sizes: the most important rows get the most bits
            rows_at = self._explicit(config, calibration, V)
        state: dict[str, torch.Tensor] = {"row_bits": torch.tensor(bits, dtype=torch.uint8)[rows_at]}
        if block:
            state["rotation_signs"] = pack_bits(neg)
        tier_rows = []
        for j, b in enumerate(bits):
            ids = torch.nonzero(rows_at == j).flatten()
            tier_rows.append(int(ids.numel()))
            if not ids.numel():
                continue
            codes, scales, mins = [], [], []
            for i in range(0, ids.numel(), ROW_CHUNK):  # codes packed per chunk: int32 codes never exist for all rows
                Q, S, M = refine_rows(Er[ids[i : i + ROW_CHUNK]], hinv_u, Hf, b, config.group_size, colw, config.dtype,
                                      int(config.refine))
                codes.append(pack_codes(Q, b))
                scales.append(S)
                mins.append(M)
                del Q
            state[f"codes_b{b}"] = torch.cat(codes)
            state[f"scales_b{b}"] = torch.cat(scales)
            state[f"mins_b{b}"] = torch.cat(mins)
        final = dataclasses.replace(config, tier_rows=tuple(tier_rows), rotation_block=block)
        logger.info("gptq: H from %s, rotation block %d, rows per bit width %s", h_src, block,
                    dict(zip(bits, tier_rows)))
        self.fit_notes = {"hessian": h_src, "rotation_block": block, "rows_per_bits": dict(zip(map(str, bits), tier_rows))}
        return state, final

    @staticmethod
    def _row_weights(config: GPTQConfig, calibration: Any, V: int) -> torch.Tensor:
        counts = None if calibration is None else calibration.token_counts
        if counts is None:
            return torch.ones(V, dtype=torch.float64)
        c = counts.double()
        return c + config.count_floor * c.mean().clamp_min(1e-12)

    def _allocate(self, Er, Hr, hinv_u, colw, config, calibration, V, d) -> torch.Tensor:
        """Index into ``config.bits`` per row (module docstring, 5): every width tried on every row."""
        bits = list(config.bits)
        if len(bits) == 1:
            return torch.zeros(V, dtype=torch.int64)
        err = torch.zeros(V, len(bits), dtype=torch.float64)
        Hf = Hr.float()
        for i in range(0, V, ROW_CHUNK):
            x = Er[i : i + ROW_CHUNK]
            for j, b in enumerate(bits):
                Q, S, M = gptq_rows(x, hinv_u, b, config.group_size, colw, config.dtype)
                delta = x - dequantise(Q, S, M, config.group_size)
                err[i : i + ROW_CHUNK, j] = ((delta @ Hf) * delta).sum(1).double()
        row_bytes = torch.tensor([config.row_bytes(b, d) for b in bits], dtype=torch.float64)
        target = config.target_bytes if config.target_bytes is not None else config.stored_bytes(V, d)
        budget = target - config.fixed_bytes(V, d)
        return allocate_bits(err, self._row_weights(config, calibration, V), row_bytes, budget)

    def _explicit(self, config: GPTQConfig, calibration: Any, V: int) -> torch.Tensor:
        if sum(config.tier_rows) != V:
            raise ValueError(f"tier_rows {list(config.tier_rows)} must sum to V = {V}.")
        order = torch.argsort(self._row_weights(config, calibration, V), descending=True, stable=True)
        by_bits = sorted(range(len(config.bits)), key=lambda j: -config.bits[j])
        rows_at = torch.empty(V, dtype=torch.int64)
        start = 0
        for j in by_bits:
            n = config.tier_rows[j]
            rows_at[order[start : start + n]] = j
            start += n
        return rows_at
