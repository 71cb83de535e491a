"""GPTQ for the token embedding: rotated group-wise scalar and vector quantisation with mixed bits per row,
fitted under the calibration Hessian of the tied head.

Papers: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (Algorithm 1: column-by-column rounding with the error fed back through
the Cholesky factor of H^-1); Chee, Cai, Kuleshov, De Sa, "QuIP: 2-Bit Quantization of Large Language Models
With Guarantees", NeurIPS 2023, and Tseng et al., "QuIP#", ICML 2024 (incoherence processing by a randomised
Hadamard transform); van Baalen, Kuzmin, Nagel et al., "GPTVQ: The Blessing of Dimensionality for LLM
Quantization", 2024 (section 3.1: GPTQ's error feedback with vector rounding). Runtime module: ``hub_code/embcomp_gptq.py`` (``GroupQuantEmbedding``).

Equations followed
------------------
1. Objective. A tied head computes logits E h, so E is the weight of a Linear layer whose input is the hidden
   state h the head sees. The expected squared logit error of row v is (e_v - e_hat_v)^T H (e_v - e_hat_v) with
   H = E[h h^T] (``Calibration.head_second_moment``; GPTQ's layer Hessian up to a factor 2). Without a head
   (encoders), H = E[J^T J], the sensitivity of the pooled sentence embedding to the token embedding
   (``Calibration.input_sensitivity``; all-MiniLM-L6-v2 25x, STS-B dev x100, stock 86.72: 86.57 against 86.23
   under the first normalisation layer's diagonal column gain, which is the fallback); without calibration, H = I.
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
7. Vector tiers (GPTVQ, ours for the per-row scale and the shared codebook): a row of the tier of b-bit indices
   is x'_v ~ s_v [C[c_v1], ..., C[c_v,d/k]] with one codebook C [2^b, k] for all sub-vectors of all its rows (the
   rotation makes the coordinates alike) and one scale s_v a row. C is Lloyd's k-means on the RMS-normalised
   rotated rows' sub-vectors; each row (divided by its RMS) is rounded sub-vector by sub-vector with GPTQ's
   error feedback, sub-vector j taking argmin_c ||U_BB^-T (w_B - C[c])|| (U the upper Cholesky factor of H'^-1,
   B its k coordinates), the error fed on as w_F -= e_B U_BB^-1 U_BF; then s_v = Q^T H' x / Q^T H' Q. At
   k = 8, 9-bit indices cost 1.125 bits a coordinate (+ 16 a row) and beat 1-bit scalar codes with groups of 256
   (1.17 bits a coordinate) at equal bytes: SmolLM2, every row in one tier, 4,096-token perplexity 921 -> 225
   (H'-error -33 %). The allocation (5) weighs vector and scalar tiers alike.

Measured while choosing (SmolLM2-135M, 4,096-token Wikipedia perplexity, stock 21.32; uniform bits):
round-to-nearest 4-bit g32 asymmetric 22.76, imatrix-weighted scales 22.12, GPTQ 3-bit g32 23.75 (RTN 26.11),
GPTQ + rotation 23.46; 2-bit g32: RTN 87.3, imatrix 53.9, GPTQ 38.8, GPTQ + rotation 31.7; 4-bit g128 + rotation
21.97 (4.25 bits per weight; llama.cpp Q4_K at 4.5: 22.53 on a 21.22 baseline). GPTQ's act-order hurt here
(2-bit 65.4), a second Hadamard layer across blocks did not help (2-bit 34.0), adding the input side to H hurt
perplexity (2-bit 34.8). At 25x (calibrated allocation, baseline 32.81), tried and not kept: GPTVQ's codebook
update (section 3.3; conjugate gradients on the row-weighted H'-error in the codebook with the indices fixed, then
the row scales refit) lowers a vector tier's error by only 0.2-0.7 % (32.77, +33 % fit time); row weights from the
model's predicted probabilities summed over the calibration tokens ("soft counts") instead of token counts: 35.87
(floor 0), 34.97 (floor 0.3), their mean with the counts 33.15 (floor 0.1); a per-token bias of the tied logits
that cancels the head's mean error, b_v = mu_h . (e_v - e_hat_v) with mu_h the mean of the hidden states the head
sees (8,192 calibration tokens; V more values to store): 32.93 - the H-weighted fit leaves little error along mu_h.

8. Mean row (``center``): the tiers quantise x'_v - mu with mu = mean_v(e_v) R (d values at ``dtype``) and
   the runtime adds mu back. Every quantiser here spends its bits on the whole row, and the mean row is what all
   rows share: SmolLM2's rows are 45 % mean by energy (87 % under H). On 4,096 random SmolLM2 rows (relative
   H'-error, codebooks retrained on the centred rows) 9-bit k = 8 indices 0.0199 -> 0.0118, 8-bit k = 4
   0.0071 -> 0.0039, 1-bit scalar codes g256 0.0334 -> 0.0165, 2-bit g128 0.0095 -> 0.0051. (The count-weighted
   mean is worse: 0.0140 at 9-bit k = 8; adding H-weighted principal directions with fp16 coefficients a row
   costs more than it gains: 4 of them, 8 bytes a row, 0.0111, against 0.0099 for one more index bit, 9 bytes.)

What the ratio counts: codes, scales and mins of every tier, the codebooks and row scales of the vector tiers,
the mean row, ``row_bits`` (1 byte a row) and the packed rotation signs; ratio = V d 4 / stored bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from typing import Any

import torch

from ..calibration import error_metric
from ..hub_code.embcomp_base import pack_bits
from ..hub_code.embcomp_gptq import VQ_TAG, hadamard_matrix
from .base import DTYPE_BYTES, CompressionMethod, MethodConfig, RatioError, check_ratio, register_method, rows_of

logger = logging.getLogger(__name__)

BIT_GRID = (1, 2, 3, 4, 5, 6, 8)
ROW_CHUNK = 16384
"""Rows GPTQ, the rotation and the packing handle at a time (memory: Er, float32 [V, d], plus a few chunks)."""
GROUP_GRID = (128, 256, 512, 1 << 30)
"""Group sizes :meth:`GPTQConfig.from_ratio` tries in turn (the default first; the last: one group a row)."""
VQ_GRID = ((8, 8), (9, 8), (10, 8), (6, 4), (7, 4), (8, 4), (6, 2), (7, 2), (8, 2))
"""(index bits, k) of the vector tiers :meth:`GPTQConfig.from_ratio` may offer: k = 8 at 1 to 1.25 bits a
coordinate, k = 4 at 1.5 to 2, k = 2 at 3 to 4 (no 2^11-entry codebook: its k-means costs twice the 2^10 one's) (SmolLM2, H'-error of 4,096 random rows at equal bytes: k = 4 at 8 bits,
146 bytes a row, 0.0071 of the row's H'-norm against 0.0090 for 2-bit scalar codes in groups of 128, 164 bytes;
k = 2 at 7 bits, 254 bytes, 0.0012 against ~0.0018 interpolated between 3 and 4-bit scalar codes)."""
VQ_SPAN = (0.5, 2.0)
"""A vector tier is offered where its bits a coordinate are within this factor of the budget's bits per weight."""
VQ_BOOK_SHARE = 0.02
"""A vector tier is offered only where its codebook takes at most this share of the byte budget (small matrices)."""
VQ_MAX_BITS = 14


class Tier(typing.NamedTuple):
    """One tier of a :class:`GPTQConfig`: ``name`` ("b4": scalar, 4 bits; "v0": vector tier 0), ``bits`` (code or
    index width), ``dim`` (k of a vector tier; 0: scalar), ``row_bytes`` and ``rows``."""

    name: str
    bits: int
    dim: int
    row_bytes: int
    rows: int

    @property
    def label(self) -> str:
        """"b4" for a scalar tier, "v9x8" for 9-bit indices of 8-dimensional vectors."""
        return self.name if not self.dim else f"v{self.bits}x{self.dim}"


@dataclasses.dataclass(frozen=True)
class GPTQConfig(MethodConfig):
    """Attributes:
        bits: the bit widths a row of a scalar tier may get (each stored scalar tier has one).
        tier_rows: rows per entry of ``bits``. :meth:`from_ratio` fills in a data-free split (two adjacent tiers
            meeting the budget); with ``allocation="calibrated"`` the fit replaces it.
        vq_bits: the index widths of the vector tiers (module docstring, 7): a row of vector tier j stores
            d / k_j ``vq_bits[j]``-bit indices into the tier's codebook of 2^b vectors of k_j coordinates; () for
            none.
        vq_dims: k_j of every vector tier (each must divide d; None: 8 for all); the (bits, k) pairs are distinct.
        vq_rows: rows per entry of ``vq_bits`` (None: none); all rows of both kinds sum to V.
        vq_iters: k-means iterations of each codebook.
        target_bytes: the byte budget of the allocation (from the ratio; None: the bytes of the given rows).
        allocation: ``"calibrated"`` (the fit assigns tiers to rows under ``target_bytes``, module docstring 5)
            or ``"fixed"`` (the rows as given; the rows of highest weight get the costliest tiers). Default: fixed
            when the config is built directly, calibrated when it is solved from a ratio.
        group_size: coordinates sharing one (scale, min) pair (the last group of a row may be shorter);
            :meth:`from_ratio` takes the first of :data:`GROUP_GRID` that reaches the ratio.
        rotation_block: B of the randomised Hadamard transform (a power of 2 dividing d; 0: none; None: the
            largest power of 2 <= 64 dividing d).
        damp: GPTQ's dampening, a fraction of the mean diagonal of H.
        count_floor: row weights are count + count_floor * mean count (module docstring, 5). SmolLM2 25x,
            4,096-token perplexity (stock 21.32): floor 3.0 35.00, 1.0 33.20, 0.3 32.81, 0.1 32.68; 0.3 keeps
            more weight on the rows a calibration text rarely reads than the slightly better 0.1.
        refine: rounds of (refit the scales and mins to the codes, GPTQ again with them fixed) after the first
            GPTQ pass of each scalar tier, ending with a refit; each row keeps its best round (module docstring, 6).
        center: subtract the mean row before quantising and store it (d values at ``dtype``; module docstring,
            8); False: quantise the rows as they are (checkpoints written before it had no mean row).
        dtype: storage dtype of the scales, mins, codebooks and mean row (default float16).
    """

    dtype: str = "float16"
    bits: tuple = BIT_GRID
    tier_rows: tuple | None = None
    vq_bits: tuple = ()
    vq_dims: tuple | None = None
    vq_rows: tuple | None = None
    vq_iters: int = 15
    target_bytes: int | None = None
    group_size: int = 128
    rotation_block: int | None = None
    damp: float = 0.01
    count_floor: float = 0.3
    refine: int = 1
    allocation: str = "fixed"
    center: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        bits = tuple(int(b) for b in (self.bits if isinstance(self.bits, (list, tuple)) else [self.bits]))
        if not bits or any(not 1 <= b <= 8 for b in bits) or len(set(bits)) != len(bits):
            raise ValueError(f"bits must be distinct widths in 1..8 (got {self.bits}).")
        object.__setattr__(self, "bits", bits)
        vq = tuple(int(b) for b in (self.vq_bits if isinstance(self.vq_bits, (list, tuple)) else [self.vq_bits]))
        dims = (8,) * len(vq) if self.vq_dims is None else tuple(int(k) for k in self.vq_dims)
        if any(not 1 <= b <= VQ_MAX_BITS for b in vq) or len(dims) != len(vq) or min(dims, default=1) < 1 \
                or len(set(zip(vq, dims))) != len(vq):
            raise ValueError(f"vq_bits / vq_dims must be distinct (index width in 1..{VQ_MAX_BITS}, dimension >= 1) "
                             f"pairs (got {self.vq_bits} / {self.vq_dims}).")
        object.__setattr__(self, "vq_bits", vq)
        object.__setattr__(self, "vq_dims", dims)
        for name, widths, given in (("tier_rows", bits, self.tier_rows), ("vq_rows", vq, self.vq_rows)):
            if given is not None:
                rows = tuple(int(n) for n in given)
                if len(rows) != len(widths) or (rows and min(rows) < 0):
                    raise ValueError(f"{name} must give a row count >= 0 for each of {list(widths)} (got {given}).")
                object.__setattr__(self, name, rows)
        if self.vq_rows is None:
            object.__setattr__(self, "vq_rows", (0,) * len(vq))
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
        """Bytes of one row of the scalar tier ``bits``: its packed codes and its groups' (scale, min) pairs."""
        groups = -(-embedding_dim // int(self.group_size))
        return (embedding_dim * bits + 7) // 8 + 2 * groups * self.dtype_bytes

    def vq_row_bytes(self, bits: int, dim: int, embedding_dim: int) -> int:
        """Bytes of one row of a vector tier: d / ``dim`` packed ``bits``-bit indices and its scale."""
        return (embedding_dim // dim * bits + 7) // 8 + self.dtype_bytes

    def codebook_bytes(self, bits: int, dim: int) -> int:
        """Bytes of the codebook of a vector tier: 2^bits vectors of ``dim`` values."""
        return (1 << bits) * dim * self.dtype_bytes

    def tiers(self, embedding_dim: int) -> list[Tier]:
        """Every configured tier: scalar tiers ("b4") in ``bits`` order, then vector tiers ("v0", "v1", ...) in
        ``vq_bits`` order (the runtime's order)."""
        d = embedding_dim
        return ([Tier(f"b{b}", b, 0, self.row_bytes(b, d), n) for b, n in zip(self.bits, self.tier_rows)]
                + [Tier(f"v{j}", b, k, self.vq_row_bytes(b, k, d), n)
                   for j, (b, k, n) in enumerate(zip(self.vq_bits, self.vq_dims, self.vq_rows))])

    def fixed_bytes(self, num_embeddings: int, embedding_dim: int, used_only: bool = False) -> int:
        """Bytes that do not depend on the row allocation: ``row_bits``, the rotation signs, the mean row
        (``center``) and the codebooks (of every vector tier; ``used_only``: of those holding rows)."""
        books = sum(self.codebook_bytes(b, k) for b, k, n in zip(self.vq_bits, self.vq_dims, self.vq_rows)
                    if n or not used_only)
        mean = embedding_dim * self.dtype_bytes if self.center else 0
        return num_embeddings + ((embedding_dim + 7) // 8 if self.block_for(embedding_dim) else 0) + books + mean

    def stored_bytes(self, num_embeddings: int, embedding_dim: int) -> int:
        """Exact bytes of the tiers the row counts describe (a calibrated fit stays within ``target_bytes``)."""
        return self.fixed_bytes(num_embeddings, embedding_dim, used_only=True) + sum(
            t.row_bytes * t.rows for t in self.tiers(embedding_dim))

    def hyperparameters(self) -> dict[str, Any]:
        hp = dataclasses.asdict(self)
        for key in ("bits", "tier_rows", "vq_bits", "vq_dims", "vq_rows"):
            hp[key] = list(getattr(self, key))
        return hp

    @classmethod
    def from_ratio(cls, num_embeddings: int, embedding_dim: int, ratio: float, **overrides: Any) -> "GPTQConfig":
        """The budget V d 4 / ratio and a data-free split of the rows over two tiers adjacent in cost within it.
        Vector tiers (``vq_bits`` / ``vq_dims``, default: the (bits, k) pairs of :data:`VQ_GRID` whose k divides d
        and whose bits a coordinate lie within :data:`VQ_SPAN` of the budget's, and whose codebook is at most
        :data:`VQ_BOOK_SHARE` of the budget) join the scalar ones.

        Raises:
            RatioError: even every row in the cheapest tier stores too much (the message gives the range).
        """
        ratio = check_ratio(ratio)
        V, d = num_embeddings, embedding_dim
        overrides = {k: v for k, v in overrides.items() if k != "target_bytes"}
        if "vq_bits" not in overrides:  # explicit tier_rows: scalar tiers only
            bpw = 32.0 / ratio
            book_cap = VQ_BOOK_SHARE * V * d * 4 / ratio / DTYPE_BYTES.get(overrides.get("dtype", "float16"), 2)
            grid = [] if overrides.get("tier_rows") is not None else [
                (b, k) for b, k in VQ_GRID if d % k == 0 and VQ_SPAN[0] <= b / k / bpw <= VQ_SPAN[1]
                and (1 << b) * k <= book_cap]
            overrides["vq_bits"], overrides["vq_dims"] = tuple(b for b, _ in grid), tuple(k for _, k in grid)
        if "group_size" not in overrides:  # larger groups (fewer scales) where the default cannot reach the ratio
            for g in GROUP_GRID:
                try:
                    return cls.from_ratio(V, d, ratio, **overrides, group_size=g)
                except RatioError:
                    if g >= d:
                        raise
            raise AssertionError("unreachable")
        nb, nv = len(tuple(overrides.get("bits", BIT_GRID))), len(tuple(overrides["vq_bits"]))
        probe = cls(**{"tier_rows": (V,) + (0,) * (nb - 1), "vq_rows": (0,) * nv, **overrides})
        probe = dataclasses.replace(probe, rotation_block=probe.block_for(d))
        if overrides.get("tier_rows") is not None:
            return dataclasses.replace(probe, target_bytes=probe.stored_bytes(V, d), allocation="fixed")
        full = V * d * 4
        target = int(full // ratio)
        tiers = probe.tiers(d)
        order = sorted(range(len(tiers)), key=lambda j: tiers[j].row_bytes)
        cost = {j: tiers[j].row_bytes for j in order}
        budget = target - probe.fixed_bytes(V, d)
        if budget < V * cost[order[0]]:
            lo = probe.fixed_bytes(V, d) + V * cost[order[0]]
            raise RatioError(f"gptq cannot reach ratio {ratio:g} for a {V} x {d} embedding with bits {list(probe.bits)} "
                             f"and group_size {probe.group_size}: the reachable range is 1 < ratio <= {full / lo:.1f}.")
        rows = [0] * len(tiers)
        k = max(i for i, j in enumerate(order) if V * cost[j] <= budget)
        base = order[k]
        if k + 1 < len(order):
            up = order[k + 1]
            n_up = min(V, (budget - V * cost[base]) // (cost[up] - cost[base]))
            rows[up], rows[base] = int(n_up), V - int(n_up)
        else:
            rows[base] = V
        return dataclasses.replace(probe, tier_rows=tuple(rows[:nb]), vq_rows=tuple(rows[nb:]), target_bytes=target,
                                   allocation=overrides.get("allocation", "calibrated"))


# --- the fit, along its lifecycle: Hessian -> rotation -> per-width GPTQ -> allocation -> packing ------------

def rotation_matrix(d: int, block: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R float64 [d, d] = diag(s) blockdiag(H_B), the sign bits uint8 [d] with 1 where s = -1)."""
    if not block:
        return torch.eye(d, dtype=torch.float64), torch.zeros(d, dtype=torch.uint8)
    g = torch.Generator().manual_seed(int(seed) + 7919)
    neg = torch.randint(0, 2, (d,), generator=g, dtype=torch.uint8)
    hb = hadamard_matrix(block, torch.float64)
    R = (1.0 - 2.0 * neg.double())[:, None] * torch.block_diag(*([hb] * (d // block)))
    return R, neg


def row_mean(E: torch.Tensor, R: torch.Tensor, config: GPTQConfig) -> torch.Tensor:
    """float32 [d]: the mean row of E float32 [V, d] in the rotated basis (mean(E) R, computed in float64 a chunk
    of rows at a time), rounded to ``config.dtype`` (module docstring, 8)."""
    V = E.shape[0]
    total = sum(E[i : i + ROW_CHUNK].double().sum(0) for i in range(0, V, ROW_CHUNK))
    return ((total / V) @ R).to(getattr(torch, config.dtype)).float()


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


def row_rms(x: torch.Tensor) -> torch.Tensor:
    """float32 [n, 1]: the root mean square of each row of x [n, d] (the normaliser of the vector tiers)."""
    return x.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)


def nearest(x: torch.Tensor, book: torch.Tensor, chunk: int = 1 << 14) -> torch.Tensor:
    """int64 [n]: the index of the codeword of book float32 [K, k] nearest to each row of x float32 [n, k]
    (argmin of ||c||^2 - 2 x . c: one matrix product per ``chunk`` rows)."""
    norms = book.pow(2).sum(1)
    return torch.cat([torch.addmm(norms, x[i : i + chunk], book.T, alpha=-2).argmin(1)
                      for i in range(0, x.shape[0], chunk)])


def train_codebook(X: torch.Tensor, bits: int, k: int, iters: int, seed: int, dtype: str,
                   row_scale: torch.Tensor | None = None, sample: int = 1 << 19, chunk: int = 1 << 15) -> torch.Tensor:
    """Lloyd's k-means codebook float32 [2^bits, k] of the k-coordinate sub-vectors of rows X float32 [n, d]
    (divided by ``row_scale`` float32 [n, 1] where given; module docstring, 7), rounded to ``dtype``.

    At most ``sample`` sub-vectors (a seeded random subset) take part; the initial centres are a random subset of
    them; an empty cell restarts at a random sub-vector. Memory: the sample, and ``chunk`` x 2^bits distances at
    a time.
    """
    K = 1 << bits
    m = X.shape[1] // k
    g = torch.Generator().manual_seed(int(seed) + 104729 + bits)
    pick = torch.arange(X.shape[0] * m)
    if pick.numel() > max(sample, K):
        pick = torch.randperm(pick.numel(), generator=g)[: max(sample, 4 * K)]
    sub = X.reshape(-1, k)[pick]
    if row_scale is not None:
        sub = sub / row_scale.reshape(-1)[pick // m].unsqueeze(-1)
    if sub.shape[0] < K:  # fewer sub-vectors than centres: repeat them (tiny matrices)
        sub = sub.repeat(-(-K // sub.shape[0]), 1)
    C = sub[torch.randperm(sub.shape[0], generator=g)[:K]].clone()
    for _ in range(int(iters)):
        assign = nearest(sub, C, chunk)
        count = torch.bincount(assign, minlength=K)
        total = torch.zeros_like(C).index_add_(0, assign, sub)
        empty = count == 0
        C = torch.where(empty[:, None], sub[torch.randint(0, sub.shape[0], (K,), generator=g)],
                        total / count.clamp_min(1)[:, None])
    return C.to(getattr(torch, dtype)).float()


def gptvq_rows(W: torch.Tensor, hinv_u: torch.Tensor, codebook: torch.Tensor, k: int,
               chunk: int = 1 << 13) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ with vector rounding (GPTVQ, van Baalen et al. 2024, section 3.1) of rows W float32 [n, d] onto the
    codebook float32 [K, k], sub-vector by sub-vector.

    With U the upper Cholesky factor of H^-1 (float32 [d, d]) and B the coordinates of sub-vector j, the rounding
    error e_B = w_B - C[c] is measured by (U_BB^T U_BB)^-1, i.e. c = argmin ||U_BB^-T (w_B - C[c])||, and is fed back
    into the later coordinates F: w_F -= e_B U_BB^-1 U_BF (Algorithm 1 of GPTQ with k columns at a time, with its
    lazy batch updates: within a block of >= 128 columns at once, beyond it once per block).

    Returns:
        (indices int64 [n, d / k], the rounded rows float32 [n, d]).
    """
    W = W.clone()
    n, d = W.shape
    idx = torch.empty(n, d // k, dtype=torch.int64)
    Q = torch.empty_like(W)
    block = k * max(1, 128 // k)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        W1 = W[:, i1:i2]  # a view: the block's updates land in W
        E1 = torch.empty_like(W1)
        for a in range(0, i2 - i1, k):
            b = a + k
            U = hinv_u[i1 + a : i1 + b, i1 + a : i1 + b].double()
            metric = torch.linalg.inv(U.T).float()  # U_BB^-T: distances in its image are the GPTQ error
            wb = W1[:, a:b]
            c = nearest(wb @ metric.T, codebook @ metric.T, chunk)
            q = codebook[c]
            idx[:, (i1 + a) // k] = c
            Q[:, i1 + a : i1 + b] = q
            E1[:, a:b] = ((wb - q).double() @ torch.linalg.inv(U)).float()  # e_B U_BB^-1
            if b < i2 - i1:
                W1[:, b:] -= E1[:, a:b] @ hinv_u[i1 + a : i1 + b, i1 + b : i2]
        if i2 < d:
            W[:, i2:] -= E1 @ hinv_u[i1:i2, i2:]
    return idx, Q


def vq_scales(x: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, dtype: str) -> torch.Tensor:
    """The H-optimal scale float32 [n, 1] of each row for its rounded direction Q float32 [n, d] (x ~ s Q;
    s = Q^T H x / Q^T H Q), rounded to ``dtype``."""
    QH = Q @ H
    s = (QH * x).sum(1, keepdim=True) / (QH * Q).sum(1, keepdim=True).clamp_min(1e-30)
    return s.to(getattr(torch, dtype)).float()


def vq_tier(x: torch.Tensor, hinv_u: torch.Tensor, H: torch.Tensor, codebook: torch.Tensor, k: int, dtype: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows x float32 [n, d] (rotated) in a vector tier: (indices int64 [n, d / k], scales float32 [n, 1], the
    decoded rows float32 [n, d]); rows are divided by their RMS before :func:`gptvq_rows`, then rescaled."""
    idx, Q = gptvq_rows(x / row_rms(x), hinv_u, codebook, k)
    s = vq_scales(x, Q, H, dtype)
    return idx, s, Q * s


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
        if any(d % k for k in config.vq_dims):
            raise ValueError(f"vq_dims {list(config.vq_dims)} must divide the embedding dimension {d}; pass "
                             "vq_bits=() or dimensions that divide it.")
        E = weight.detach().float().cpu()
        H, h_src = error_metric(d, calibration)
        block = config.block_for(d)
        R, neg = rotation_matrix(d, block, config.seed)
        Hr = R.T @ H @ R
        Hr += config.damp * torch.diagonal(Hr).mean() * torch.eye(d, dtype=torch.float64)
        hinv_u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hr)), upper=True).float()
        colw = torch.diagonal(Hr).float()
        mean = row_mean(E, R, config) if config.center else None
        Er = torch.empty(V, d)  # (E R - mean), float32 [V, d]; rotated in float64 a chunk of rows at a time
        for i in range(0, V, ROW_CHUNK):
            Er[i : i + ROW_CHUNK] = rows_of(lambda a, b: (E[a:b].double() @ R).float(), i, min(i + ROW_CHUNK, V))
            if mean is not None:
                Er[i : i + ROW_CHUNK] -= mean
        fit = _TierFit(Er, Hr, hinv_u, colw, config)
        tiers = config.tiers(d)
        if config.allocation == "calibrated":
            rows_at = self._allocate(fit, config, calibration, V, d)
        else:  # fixed tier sizes: the most important rows get the costliest tiers
            rows_at = self._explicit(config, calibration, V, d)
        tags = torch.tensor([t.bits if t.dim == 0 else VQ_TAG + int(t.name[1:]) for t in tiers], dtype=torch.uint8)
        state: dict[str, torch.Tensor] = {"row_bits": tags[rows_at]}
        if block:
            state["rotation_signs"] = pack_bits(neg)
        if mean is not None:
            state["row_mean"] = mean
        counts = []
        for j, tier in enumerate(tiers):
            ids = torch.nonzero(rows_at == j).flatten()
            counts.append(int(ids.numel()))
            if ids.numel():
                state.update(fit.final(tier, ids))
        nb = len(config.bits)
        final = dataclasses.replace(config, tier_rows=tuple(counts[:nb]), vq_rows=tuple(counts[nb:]),
                                    rotation_block=block)
        per_tier = {t.label: n for t, n in zip(tiers, counts)}
        logger.info("gptq: H from %s, rotation block %d, rows per tier %s", h_src, block, per_tier)
        self.fit_notes = {"hessian": h_src, "rotation_block": block, "rows_per_tier": per_tier}
        return state, final

    @staticmethod
    def _row_weights(config: GPTQConfig, calibration: Any, V: int) -> torch.Tensor:
        counts = None if calibration is None else calibration.token_counts
        if counts is None:
            return torch.ones(V, dtype=torch.float64)
        c = counts.double()
        return c + config.count_floor * c.mean().clamp_min(1e-12)

    def _allocate(self, fit: "_TierFit", config: GPTQConfig, calibration: Any, V: int, d: int) -> torch.Tensor:
        """Index into ``config.tiers(d)`` per row (module docstring, 5): every tier tried on every row."""
        tiers = config.tiers(d)
        if len(tiers) == 1:
            return torch.zeros(V, dtype=torch.int64)
        err = torch.stack([fit.errors(t) for t in tiers], 1)
        row_bytes = torch.tensor([t.row_bytes for t in tiers], dtype=torch.float64)
        target = config.target_bytes if config.target_bytes is not None else config.stored_bytes(V, d)
        budget = target - config.fixed_bytes(V, d)
        return allocate_bits(err, self._row_weights(config, calibration, V), row_bytes, budget)

    def _explicit(self, config: GPTQConfig, calibration: Any, V: int, d: int) -> torch.Tensor:
        if sum(config.tier_rows) + sum(config.vq_rows) != V:
            raise ValueError(f"tier_rows {list(config.tier_rows)} and vq_rows {list(config.vq_rows)} must sum to V = {V}.")
        tiers = config.tiers(d)
        order = torch.argsort(self._row_weights(config, calibration, V), descending=True, stable=True)
        by_cost = sorted(range(len(tiers)), key=lambda j: -tiers[j].row_bytes)
        rows_at = torch.empty(V, dtype=torch.int64)
        start = 0
        for j in by_cost:
            n = tiers[j].rows
            rows_at[order[start : start + n]] = j
            start += n
        return rows_at


class _TierFit:
    """The per-tier fits of one rotated matrix, shared by the allocation and the final tiers: a vector tier's
    codebook is trained once and its GPTVQ pass over all rows reused; scalar tiers are refined only for the rows
    they finally hold."""

    def __init__(self, Er: torch.Tensor, Hr: torch.Tensor, hinv_u: torch.Tensor, colw: torch.Tensor,
                 config: GPTQConfig) -> None:
        self.Er, self.Hf, self.hinv_u, self.colw, self.config = Er, Hr.float(), hinv_u, colw, config
        self._vq: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _vq_all(self, tier: Tier) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codebook float32 [2^bits, k], indices int16 [V, d / k], scales [V, 1], H-error float64 [V]) of every row
        in a vector tier: the codebook trained once (on every row, RMS-normalised), then one GPTVQ pass."""
        if tier.name not in self._vq:
            c, Er = self.config, self.Er
            book = train_codebook(Er, tier.bits, tier.dim, c.vq_iters, c.seed, c.dtype, row_scale=row_rms(Er))
            idx, scales, err = [], [], []
            for i in range(0, Er.shape[0], ROW_CHUNK):  # decoded rows live a chunk at a time
                c_i, s_i, x_hat = vq_tier(Er[i : i + ROW_CHUNK], self.hinv_u, self.Hf, book, tier.dim, c.dtype)
                idx.append(c_i.to(torch.int16))  # indices < 2^14: int16 keeps V d / k small
                scales.append(s_i)
                err.append(h_error(Er[i : i + ROW_CHUNK], x_hat, self.Hf).double())
            self._vq[tier.name] = (book, torch.cat(idx), torch.cat(scales), torch.cat(err))
        return self._vq[tier.name]

    def errors(self, tier: Tier) -> torch.Tensor:
        """H-error float64 [V] of every row in ``tier`` (scalar tiers: one GPTQ pass, no refinement)."""
        if tier.dim:
            return self._vq_all(tier)[3]
        c, out = self.config, []
        for i in range(0, self.Er.shape[0], ROW_CHUNK):
            x = self.Er[i : i + ROW_CHUNK]
            Q, S, M = gptq_rows(x, self.hinv_u, tier.bits, c.group_size, self.colw, c.dtype)
            out.append(h_error(x, dequantise(Q, S, M, c.group_size), self.Hf).double())
        return torch.cat(out)

    def final(self, tier: Tier, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors of ``tier`` holding rows ``ids`` (int64, vocabulary order)."""
        c, name, b = self.config, tier.name, tier.bits
        chunks = [ids[i : i + ROW_CHUNK] for i in range(0, ids.numel(), ROW_CHUNK)]
        if tier.dim:  # codes packed per chunk: the int32 bit stream never exists for all rows
            book, idx, scales, _ = self._vq_all(tier)
            return {f"codes_{name}": torch.cat([pack_codes(idx[r], b) for r in chunks]), f"codebook_{name}": book,
                    f"scales_{name}": scales[ids]}
        codes, scales, mins = [], [], []
        for r in chunks:
            Q, S, M = refine_rows(self.Er[r], self.hinv_u, self.Hf, b, c.group_size, self.colw, c.dtype, int(c.refine))
            codes.append(pack_codes(Q, b))
            scales.append(S)
            mins.append(M)
        return {f"codes_{name}": torch.cat(codes), f"scales_{name}": torch.cat(scales), f"mins_{name}": torch.cat(mins)}
