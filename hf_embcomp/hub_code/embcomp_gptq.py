"""Rotated group-wise scalar quantisation with mixed bits per row (fitted by GPTQ; see
``hf_embcomp/methods/gptq.py``).

Every row v is stored in the rotated basis x' = x R (R = diag(signs) . blockdiag(H_B), H_B the normalised
B x B Sylvester-Hadamard matrix, signs a fixed random +-1 vector) as b_v-bit codes q in [0, 2^b_v - 1] with one
(scale, min) pair per group of ``group_size`` coordinates: x'_j = q_j * scale_{g(j)} + min_{g(j)}. Rows with the
same bit width form a tier (its rows in vocabulary order); ``row_bits`` says which tier a row is in.

Runtime code: ships in every compressed model repository; imports only torch and sibling files.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .embcomp_base import CompressedEmbedding, is_exporting, unpack_bits


_HADAMARD: dict[tuple[int, torch.dtype, Any], torch.Tensor] = {}


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
    """The n x n Sylvester-Hadamard matrix divided by sqrt(n) (orthonormal and symmetric); n a power of 2.
    Built once per (n, dtype, device) and cached (every lookup and tied-logits call uses it)."""
    key = (n, dtype, str(device))
    h = _HADAMARD.get(key)
    if h is None:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        h = (h / math.sqrt(n)).to(dtype=dtype, device=device)
        if not is_exporting():  # a traced tensor must not outlive its trace
            _HADAMARD[key] = h
    return h


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 [..., ceil(count*bits/8)] (a big-endian bit stream of ``bits``-bit codes) -> int32 [..., count]."""
    if 8 % bits == 0:  # whole codes in a byte: shift them out
        per = 8 // bits
        # (byte >> shift) & mask, written as a floor division and a remainder (ONNX has no int32 shifts)
        shifts = torch.arange(8 - bits, -1, -bits, device=packed.device, dtype=torch.int32)
        vals = torch.div(packed.to(torch.int32).unsqueeze(-1), 2**shifts, rounding_mode="floor") % (1 << bits)
        return vals.flatten(-2)[..., :count]
    stream = unpack_bits(packed, count * bits, torch.int32).unflatten(-1, (count, bits))
    weights = 1 << torch.arange(bits - 1, -1, -1, device=packed.device, dtype=torch.int32)
    return (stream * weights).sum(-1)


class GroupQuantEmbedding(CompressedEmbedding):
    """Rows decoded on the fly from their tier's codes; no V x d matrix is built for a lookup or tied logits.

    Tensors: ``row_bits`` uint8 [V] (the bit width of each row); ``rotation_signs`` uint8 [ceil(d/8)] (bit j
    set: sign_j = -1; present when ``rotation_block`` > 0); per bit width b of ``bits`` with n_b =
    ``tier_rows[i]`` > 0 rows: ``codes_b{b}`` uint8 [n_b, ceil(d*b/8)], ``scales_b{b}`` and ``mins_b{b}`` float
    [n_b, ceil(d/group_size)].
    Hyper-parameters: ``bits`` (list), ``tier_rows`` (list, same length, sums to V), ``group_size``,
    ``rotation_block`` (B, a power of 2 dividing d; 0: no rotation).

    Tied output heads: ``hidden . e_v = (hidden R) . e'_v``, so the hidden states are rotated once and each tier
    is decoded in chunks of :attr:`logits_chunk` rows and multiplied (the tier-ordered logits are then gathered into
    vocabulary order). Runtime caches (not saved): the position of every row in its tier and in the tier-ordered
    concatenation, int64 [V] each (16 V bytes).
    """

    method = "gptq"
    logits_chunk = 8192

    @property
    def tiers(self) -> list[tuple[int, int]]:
        """(bits, rows) of every stored tier, in the order of ``bits``."""
        return [(int(b), int(n)) for b, n in zip(self.hparams["bits"], self.hparams["tier_rows"]) if int(n) > 0]

    @property
    def group_size(self) -> int:
        return int(self.hparams["group_size"])

    @property
    def num_groups(self) -> int:
        return -(-self.embedding_dim // self.group_size)

    @property
    def rotation_block(self) -> int:
        return int(self.hparams.get("rotation_block", 0))

    def allocate(self) -> None:
        V, d, G = self.num_embeddings, self.embedding_dim, self.num_groups
        if sum(n for _, n in self.tiers) != V:
            raise ValueError(f"tier_rows {self.hparams['tier_rows']} do not sum to V = {V}")
        B = self.rotation_block
        if B and (B & (B - 1) or d % B):
            raise ValueError(f"rotation_block {B} must be a power of 2 dividing d = {d}")
        self.register_buffer("row_bits", torch.empty(V, dtype=torch.uint8), persistent=True)
        if B:
            self.register_buffer("rotation_signs", torch.empty((d + 7) // 8, dtype=torch.uint8), persistent=True)
        for b, n in self.tiers:
            self.register_buffer(f"codes_b{b}", torch.empty(n, (d * b + 7) // 8, dtype=torch.uint8), persistent=True)
            setattr(self, f"scales_b{b}", nn.Parameter(torch.empty(n, G)))
            setattr(self, f"mins_b{b}", nn.Parameter(torch.empty(n, G)))
        self._index_key: Any = None

    def reset_parameters(self, init: Any = None) -> None:
        init = init or nn.init
        for p in self.parameters(recurse=False):
            init.normal_(p, mean=0.0, std=0.02)
        if not getattr(self.row_bits, "_is_hf_initialized", False):
            with torch.no_grad():  # any assignment with the configured tier sizes keeps lookups well defined
                self.row_bits.copy_(torch.cat([torch.full((n,), b, dtype=torch.uint8) for b, n in self.tiers]))
        for b, _ in self.tiers:
            init.zeros_(getattr(self, f"codes_b{b}"))

    # --- indexing ------------------------------------------------------------------------------
    def _index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(position of each row in its tier, position of each row in the tiers concatenated in ``bits``
        order), both int64 [V]. Cached on ``row_bits`` in eager mode; built in the graph when exporting."""
        rb = self.row_bits
        if is_exporting():
            return self._build_index(rb, check=False)
        key = (rb.data_ptr(), rb._version, rb.device)
        if self._index_key != key:
            self._index_cache = self._build_index(rb, check=True)
            self._index_key = key
        return self._index_cache

    def _build_index(self, rb: torch.Tensor, check: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Cumulative sums over the tier masks (no ``nonzero``: exportable).

        Raises:
            ValueError: (``check``) a tier has another number of rows than the config says.
        """
        pos = torch.zeros(self.num_embeddings, dtype=torch.int64, device=rb.device)
        start = torch.zeros_like(pos)
        offset = 0
        for b, n in self.tiers:
            hit = rb == b
            if check and int(hit.sum()) != n:
                raise ValueError(f"row_bits has {int(hit.sum())} rows of {b} bits, the config says {n}: the "
                                 "checkpoint does not match its config.json.")
            pos = torch.where(hit, torch.cumsum(hit, 0) - 1, pos)
            start = torch.where(hit, torch.full_like(pos, offset), start)
            offset += n
        return pos, start + pos

    # --- decoding ------------------------------------------------------------------------------
    def _signs(self, dtype: torch.dtype) -> torch.Tensor:
        bits = unpack_bits(self.rotation_signs, self.embedding_dim, dtype)
        return 1 - 2 * bits

    def _hadamard(self, x: torch.Tensor) -> torch.Tensor:
        B = self.rotation_block
        hb = hadamard_matrix(B, x.dtype, x.device)
        return (x.unflatten(-1, (-1, B)) @ hb).flatten(-2)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> x R (the basis the codes live in)."""
        return self._hadamard(x * self._signs(x.dtype)) if self.rotation_block else x

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        """x' [..., d] -> x' R^T (back to the embedding's basis)."""
        return self._hadamard(x) * self._signs(x.dtype) if self.rotation_block else x

    def _decode(self, bits: int, rows: torch.Tensor | slice) -> torch.Tensor:
        """Rotated rows ``rows`` of tier ``bits`` -> float [n, d]."""
        d, g = self.embedding_dim, self.group_size
        scales, mins = getattr(self, f"scales_b{bits}")[rows], getattr(self, f"mins_b{bits}")[rows]
        q = unpack_codes(getattr(self, f"codes_b{bits}")[rows], bits, d).to(scales.dtype)
        q = q.unflatten(-1, (-1, g)) if d % g == 0 else torch.nn.functional.pad(q, (0, self.num_groups * g - d)).unflatten(-1, (-1, g))
        out = (q * scales.unsqueeze(-1) + mins.unsqueeze(-1)).flatten(-2)
        return out[..., :d]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos, _ = self._index()
        flat = input_ids.reshape(-1)
        bits_of = self.row_bits[flat]
        p = pos[flat]
        tiers = self.tiers
        if len(tiers) == 1:
            out = self._decode(tiers[0][0], p)
        elif is_exporting():  # every tier decodes every id (clamped into range) and a select keeps the right one
            out = torch.zeros(flat.shape[0], self.embedding_dim, dtype=self.dtype, device=flat.device)
            for b, n in tiers:
                out = torch.where((bits_of == b).unsqueeze(-1), self._decode(b, p.clamp_max(n - 1)).to(out.dtype), out)
        else:
            out = torch.zeros(flat.numel(), self.embedding_dim, dtype=self.dtype, device=flat.device)
            for b, _ in tiers:
                hit = torch.nonzero(bits_of == b).flatten()
                if hit.numel():
                    out = out.index_copy(0, hit, self._decode(b, p[hit]).to(out.dtype))
        return self.unrotate(out).reshape(*input_ids.shape, self.embedding_dim)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        _, order = self._index()
        hr = self.rotate(hidden.to(self.dtype))
        parts = [hr @ self._decode(b, slice(i, i + self.logits_chunk)).T
                 for b, n in self.tiers for i in range(0, n, self.logits_chunk)]
        return torch.cat(parts, dim=-1).index_select(-1, order)  # tier order -> vocabulary order

    def reconstruct(self) -> torch.Tensor:
        _, order = self._index()
        out = torch.cat([self._decode(b, slice(None)).to(self.dtype) for b, _ in self.tiers]).index_select(0, order)
        return self.unrotate(out)
