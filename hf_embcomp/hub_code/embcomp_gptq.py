"""Rotated group-wise scalar and vector quantisation with mixed bits per row (fitted by GPTQ / GPTVQ; see
``hf_embcomp/methods/gptq.py``).

Every row v is stored in the rotated basis x' = x R (R = diag(signs) . blockdiag(H_B), H_B the normalised
B x B Sylvester-Hadamard matrix, signs a fixed random +-1 vector), in one of two kinds of tier:

- scalar tier of b bits (``row_bits`` = b, 1..8): codes q in [0, 2^b - 1] with one (scale, min) pair per group of
  ``group_size`` coordinates: x'_j = q_j * scale_{g(j)} + min_{g(j)};
- vector tier t (``row_bits`` = 128 + t) of b = ``vq_bits[t]``-bit indices and k = ``vq_dims[t]``: the row cut
  into d / k sub-vectors of k coordinates, each a b-bit index into the tier's codebook C [2^b, k], times one
  scale per row: x'_{[jk, (j+1)k)} = scale_v * C[c_vj].

Rows of one tier are stored in vocabulary order; ``row_bits`` says which tier a row is in. With ``center`` (the
default of fits since the mean row was added), the tiers hold x' - mu and ``row_mean`` mu [d] (rotated basis) is
added to every decoded row.

Runtime code: ships in every compressed model repository; imports only torch and sibling files.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .embcomp_base import CompressedEmbedding, _unpack_table, byte_index, is_exporting, tensor_cache, unpack_bits


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


_CODE_TABLES: dict[tuple[int, torch.dtype, Any], torch.Tensor] = {}


def _code_table(bits: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """[256, 8 // bits]: the ``bits``-bit codes held in each byte value (first code in the high bits), in ``dtype``
    (exact: codes are small integers). Built from Python ints (a graph constant when traced), cached in eager mode."""
    key = (bits, dtype, str(device))
    table = _CODE_TABLES.get(key)
    if table is None:
        per, mask = 8 // bits, (1 << bits) - 1
        rows = [[(byte >> (8 - bits * (j + 1))) & mask for j in range(per)] for byte in range(256)]
        table = torch.tensor(rows, dtype=dtype, device=device)
        if not is_exporting():
            _CODE_TABLES[key] = table
    return table


def unpack_codes(packed: torch.Tensor, bits: int, count: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """uint8 [..., ceil(count*bits/8)] (a big-endian bit stream of ``bits``-bit codes) -> ``dtype`` [..., count].

    8 bits: the bytes themselves; whole codes in a byte (1, 2, 4 bits): one ``index_select`` of a 256-entry table
    (byte -> its codes, already in ``dtype``); other widths: the bit stream weighted by place values.
    """
    if bits == 8:  # one code a byte: the bytes are the codes
        vals = packed.to(dtype)
        return vals if vals.shape[-1] == count else vals[..., :count]
    if 8 % bits == 0:
        per = 8 // bits
        vals = _code_table(bits, dtype, packed.device).index_select(0, packed.reshape(-1).to(torch.int32))
        vals = vals.reshape(*packed.shape[:-1], packed.shape[-1] * per)
        return vals if vals.shape[-1] == count else vals[..., :count]
    if dtype.is_floating_point and not is_exporting():  # every ``bits`` bytes hold 8 codes: one fused table sum
        nb = packed.shape[-1]
        words = F.pad(packed, (0, -nb % bits)).reshape(-1, bits).to(torch.int32)
        words = words + torch.arange(0, 256 * bits, 256, dtype=torch.int32, device=packed.device)
        vals = F.embedding_bag(words, _word_table(bits, packed.device), mode="sum").to(dtype)  # [n * nb / bits, 8]
        return vals.reshape(*packed.shape[:-1], -1)[..., :count]
    stream = unpack_bits(packed, count * bits, torch.int32).unflatten(-1, (count, bits))
    weights = 1 << torch.arange(bits - 1, -1, -1, device=packed.device, dtype=torch.int32)
    return (stream * weights).sum(-1).to(dtype)


_ROW_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}


def codebook_rows(codebook: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``F.embedding(idx, codebook)``: int64 [...] indices into float [K, k] -> float [..., k], the same bits.

    Rows of 2 to 16 bytes (k = 2 or 4 in float32) are gathered as single elements of a same-sized dtype viewing the
    codebook (a copy of the bits, exact): on CPU an ``index_select`` of one element per row is much faster than an
    ``embedding`` of a short row (2048 x 288 indices at k = 2, 1 thread: 0.6 ms against 6.5 ms, measured once
    while writing this). Exported and compiled graphs and trainable codebooks take ``F.embedding``.
    """
    K, k = codebook.shape
    view = _ROW_VIEWS.get(k * codebook.element_size())
    if view is None or is_exporting() or codebook.requires_grad or not codebook.is_contiguous():
        return F.embedding(idx, codebook)
    rows = codebook.view(view).reshape(K).index_select(0, idx.reshape(-1))
    return rows.view(codebook.dtype).reshape(*idx.shape, k)


def _word_table(bits: int, device: Any) -> torch.Tensor:
    """float32 [bits * 256, 8]: row k * 256 + c holds what byte value c at byte k of a ``bits``-byte word adds to
    each of the word's 8 codes (its bits times their place values); summing the rows of a word's bytes gives its
    codes exactly. Cached in eager mode."""
    key = (-bits, torch.float32, str(device))
    table = _CODE_TABLES.get(key)
    if table is None:
        rows = []
        for k in range(bits):
            for c in range(256):
                row = [0] * 8
                for j in range(8):  # stream bit 8k + j (MSB first) is bit (bits - 1 - p % bits) of code p // bits
                    if (c >> (7 - j)) & 1:
                        p = 8 * k + j
                        row[p // bits] += 1 << (bits - 1 - p % bits)
                rows.append(row)
        table = torch.tensor(rows, dtype=torch.float32, device=device)
        _CODE_TABLES[key] = table
    return table


VQ_TAG = 128
"""``row_bits`` of a row in vector tier t: VQ_TAG + t (scalar tiers: their bit width)."""


class GroupQuantEmbedding(CompressedEmbedding):
    """Rows decoded on the fly from their tier's codes; no V x d matrix is built for a lookup or tied logits.

    Tensors: ``row_bits`` uint8 [V] (the tier of each row: b, or VQ_TAG + t); ``rotation_signs`` uint8
    [ceil(d/8)] (bit j set: sign_j = -1; present when ``rotation_block`` > 0); per bit width b of ``bits`` with
    n_b = ``tier_rows[i]`` > 0 rows: ``codes_b{b}`` uint8 [n_b, ceil(d*b/8)], ``scales_b{b}`` and ``mins_b{b}``
    float [n_b, ceil(d/group_size)]; per vector tier t (b = ``vq_bits[t]``, k = ``vq_dims[t]``) with n_t =
    ``vq_rows[t]`` > 0 rows: ``codes_v{t}`` uint8 [n_t, ceil(d/k*b/8)] (d / k indices a row, a big-endian bit
    stream), ``codebook_v{t}`` float [2^b, k] and ``scales_v{t}`` float [n_t, 1].
    ``row_mean`` float [d] (rotated basis; present when ``center`` is true) is added to every decoded row.
    Hyper-parameters: ``bits`` (list), ``tier_rows`` (list, same length), ``vq_bits``, ``vq_dims`` (each dividing
    d) and ``vq_rows`` (lists, optional), all rows summing to V; ``group_size``, ``rotation_block`` (B, a power
    of 2 dividing d; 0: no rotation).

    Tied output heads: ``hidden . e_v = (hidden R) . e'_v``, so the hidden states are rotated once and each tier
    is decoded in chunks of :attr:`logits_chunk` rows and multiplied (the tier-ordered logits are then gathered into
    vocabulary order). Runtime caches (not saved): the position of every row in its tier and in the tier-ordered
    concatenation, int64 [V] each (16 V bytes).
    """

    method = "gptq"
    logits_chunk = 2048
    logits_table_rows = 32
    """Hidden rows per byte-table pass: the tables of one pass hold reads * 256 (scalar tiers) or reads * 2^b (vector
    tiers) floats per hidden row (0: never read tables)."""
    logits_few_rows = 4
    """Up to this many hidden rows (generation), every tier that allows byte tables reads them."""
    logits_table_reads = 0.25
    """Above :attr:`logits_few_rows` hidden rows, a tier reads byte tables only where its table reads per row are at
    most this fraction of d (scalar tiers of at most 2 bits, vector tiers of k >= 4); the others are decoded and
    multiplied (a table read costs more than a multiply-add in a matrix product)."""
    logits_table_bits = 8
    """Widest tier read through byte tables (their index cache is bits / 8 of the tier's dense fp32 bytes)."""
    logits_table_use = 2.0
    """Above one hidden row, a tier reads byte tables only where its rows make at least this many table reads per
    table entry built (a tier of a few rows is decoded: building its tables would cost more than the rows)."""

    @property
    def tiers(self) -> list[tuple[int, int]]:
        """(bits, rows) of every stored scalar tier, in the order of ``bits``."""
        return [(int(b), int(n)) for b, n in zip(self.hparams["bits"], self.hparams["tier_rows"]) if int(n) > 0]

    @property
    def vq_tiers(self) -> list[tuple[int, int, int, int]]:
        """(tier t, index bits, k, rows) of every stored vector tier, in the order of ``vq_bits``."""
        bits = self.hparams.get("vq_bits", [])
        dims = self.hparams.get("vq_dims") or [8] * len(bits)
        return [(t, int(b), int(k), int(n)) for t, (b, k, n) in enumerate(zip(bits, dims, self.hparams.get("vq_rows", [])))
                if int(n) > 0]

    @property
    def all_tiers(self) -> list[tuple[str, int, int]]:
        """(name, ``row_bits`` tag, rows) of every stored tier: scalar tiers ("b4"), then vector tiers ("v0"); the
        tier-ordered concatenation of rows (tied logits, reconstruct) follows this order."""
        return [(f"b{b}", b, n) for b, n in self.tiers] + [(f"v{t}", VQ_TAG + t, n) for t, _, _, n in self.vq_tiers]

    @property
    def centered(self) -> bool:
        """Whether the rows are stored minus ``row_mean`` (False for checkpoints without the hyper-parameter)."""
        return bool(self.hparams.get("center", False))

    def _add_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Rotated decoded rows x [n, d] -> x + mu where the rows are stored centred."""
        return x + self.row_mean.to(x.dtype) if self.centered else x

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
        if sum(n for _, _, n in self.all_tiers) != V:
            raise ValueError(f"tier_rows {self.hparams['tier_rows']} and vq_rows {self.hparams.get('vq_rows', [])} "
                             f"do not sum to V = {V}")
        for t, _, k, _ in self.vq_tiers:
            if k < 1 or d % k:
                raise ValueError(f"vq_dims[{t}] = {k} must divide d = {d}")
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
        if self.centered:
            self.row_mean = nn.Parameter(torch.empty(d))
        for t, b, k, n in self.vq_tiers:
            self.register_buffer(f"codes_v{t}", torch.empty(n, (d // k * b + 7) // 8, dtype=torch.uint8), persistent=True)
            setattr(self, f"codebook_v{t}", nn.Parameter(torch.empty(1 << b, k)))
            setattr(self, f"scales_v{t}", nn.Parameter(torch.empty(n, 1)))
        self._index_key: Any = None
        self._bag_cache: dict[int, Any] = {}

    def reset_parameters(self, init: Any = None) -> None:
        init = init or nn.init
        for p in self.parameters(recurse=False):
            init.normal_(p, mean=0.0, std=0.02)
        if not getattr(self.row_bits, "_is_hf_initialized", False):
            with torch.no_grad():  # any assignment with the configured tier sizes keeps lookups well defined
                self.row_bits.copy_(torch.cat([torch.full((n,), t, dtype=torch.uint8) for _, t, n in self.all_tiers]))
        for name, _, _ in self.all_tiers:
            init.zeros_(getattr(self, f"codes_{name}"))

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
        for name, tag, n in self.all_tiers:
            hit = rb == tag
            if check and int(hit.sum()) != n:
                raise ValueError(f"row_bits has {int(hit.sum())} rows in tier {name}, the config says {n}: the "
                                 "checkpoint does not match its config.json.")
            pos = torch.where(hit, torch.cumsum(hit.to(torch.int64), 0) - 1, pos)  # int: ONNX CumSum takes no bool
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

    def _decode(self, name: str, rows: torch.Tensor | slice, padded: bool = False) -> torch.Tensor:
        """Rotated rows ``rows`` of tier ``name`` ("b4", "v0") -> float [n, d] (``padded``, scalar tiers:
        [n, G * group_size], the padding coordinates of the last group hold its min; a tied head multiplies them
        by zeros)."""
        if name[0] == "v":
            return self._decode_vq(int(name[1:]), rows)
        bits = int(name[1:])
        d, g, G = self.embedding_dim, self.group_size, self.num_groups
        scales, mins = getattr(self, f"scales_b{bits}")[rows], getattr(self, f"mins_b{bits}")[rows]
        codes = getattr(self, f"codes_b{bits}")[rows]
        pad = G * g - d
        if pad and (pad * bits) % 8 == 0 and (d * bits) % 8 == 0:  # zero code bytes for the padding: no float pad
            q = unpack_codes(F.pad(codes, (0, pad * bits // 8)), bits, G * g, scales.dtype)
        else:
            q = unpack_codes(codes, bits, d, scales.dtype)
            q = F.pad(q, (0, pad)) if pad else q
        out = torch.addcmul(mins.unsqueeze(-1), q.unflatten(-1, (G, g)), scales.unsqueeze(-1)).flatten(-2)
        return out if padded else out[..., :d]

    def _vq_indices(self, t: int, rows: torch.Tensor | slice) -> torch.Tensor:
        """int64 [n, d / k]: the codebook indices of rows ``rows`` of vector tier t (unpacked through the float
        table path of :func:`unpack_codes`, exact for indices < 2^24)."""
        codebook = getattr(self, f"codebook_v{t}")
        bits, k = codebook.shape[0].bit_length() - 1, codebook.shape[1]
        dtype = torch.int64 if 8 % bits == 0 else torch.float32  # whole codes in a byte: straight to int64
        return unpack_codes(getattr(self, f"codes_v{t}")[rows], bits, self.embedding_dim // k, dtype).long()

    def _decode_vq(self, t: int, rows: torch.Tensor | slice, scaled: bool = True) -> torch.Tensor:
        """Rotated rows of vector tier t -> float [n, d]: scale_v * C[c_vj] for every sub-vector j (``scaled``
        False: C[c_vj] alone, the caller applies scale_v)."""
        raw = codebook_rows(getattr(self, f"codebook_v{t}"), self._vq_indices(t, rows)).flatten(-2)
        return raw * getattr(self, f"scales_v{t}")[rows] if scaled else raw

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos, _ = self._index()
        flat = input_ids.reshape(-1)
        bits_of = self.row_bits[flat]
        p = pos[flat]
        tiers = self.all_tiers
        if len(tiers) == 1:
            out = self._decode(tiers[0][0], p)
        elif is_exporting():
            out = self._embed_traced(bits_of, p)
        else:
            out = torch.empty(flat.numel(), self.embedding_dim, dtype=self.dtype, device=flat.device)  # every id
            for name, tag, _ in tiers:  # is in exactly one tier: each row is written once, in place
                hit = torch.nonzero(bits_of == tag).flatten()
                if hit.numel():
                    out.index_copy_(0, hit, self._decode(name, p[hit]).to(out.dtype))
        return self._unrotate_rows(out).reshape(*input_ids.shape, self.embedding_dim)

    def _embed_traced(self, bits_of: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Rotated rows [N, d] of N ids (tier tags ``bits_of``, positions in their tiers ``p``) without data-dependent
        shapes: each tier reads every id (clamped into range) and selects keep the right one. Vector tiers of one
        sub-vector length k select at the index level ([N, d / k] codebook indices into their codebooks laid end to
        end, and the scales) and gather their rows once; scalar tiers decode every id. Under ``torch.compile`` the
        tiers with at most N rows are instead decoded whole, once, and gathered; ``torch.onnx`` / ``torch.export``
        keep the forms that do not depend on N. The rows are the same every way (decoding is row by row)."""
        N = p.shape[0]
        compiler = getattr(torch, "compiler", None)
        static = torch.onnx.is_in_onnx_export() or (compiler is not None and compiler.is_exporting())
        small = [] if static else [t for t in self.all_tiers if t[2] <= N]
        rest = [t for t in self.all_tiers if t not in small]
        out = torch.zeros(N, self.embedding_dim, dtype=self.dtype, device=p.device)
        if small:  # one table of the small tiers' rows, one gather
            table = torch.cat([self._decode(name, slice(None)).to(out.dtype) for name, _, _ in small])
            at = torch.zeros_like(p)
            offset = 0
            for _, tag, n in small:
                at = torch.where(bits_of == tag, p + offset, at)
                offset += n
            out = table.index_select(0, at)
        by_k: dict[int, list[tuple[str, int, int]]] = {}
        for name, tag, n in rest:
            if name[0] == "v":
                by_k.setdefault(getattr(self, f"codebook_{name}").shape[1], []).append((name, tag, n))
            else:
                out = torch.where((bits_of == tag).unsqueeze(-1), self._decode(name, p.clamp_max(n - 1)).to(out.dtype), out)
        for k, group in by_k.items():
            idx = torch.zeros(N, self.embedding_dim // k, dtype=torch.int64, device=p.device)
            scale = torch.zeros(N, 1, dtype=getattr(self, f"scales_{group[0][0]}").dtype, device=p.device)
            hit = torch.zeros(N, dtype=torch.bool, device=p.device)
            offset = 0
            for name, tag, n in group:
                t, at, here = int(name[1:]), p.clamp_max(n - 1), bits_of == tag
                idx = torch.where(here.unsqueeze(-1), self._vq_indices(t, at) + offset, idx)
                scale = torch.where(here.unsqueeze(-1), getattr(self, f"scales_v{t}")[at], scale)
                hit = hit | here
                offset += getattr(self, f"codebook_v{t}").shape[0]
            books = torch.cat([getattr(self, f"codebook_{name}") for name, _, _ in group])
            rows = codebook_rows(books, idx).flatten(-2) * scale
            out = torch.where(hit.unsqueeze(-1), rows.to(out.dtype), out)
        return out

    def _unrotate_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Decoded rotated rows x [n, d] (centred where stored so) -> rows of E_hat: (x + mu) R^T, computed as
        H(x) * signs + mu R^T (linear: the mean is unrotated once, and the product's output is scaled and shifted in
        place - a fresh [n, d] buffer costs page faults on first touch)."""
        if not self.rotation_block:
            return self._add_mean(x)
        y = self._hadamard(x).mul_(self._signs(x.dtype))
        return y.add_(self.unrotate(self.row_mean.to(x.dtype))) if self.centered else y

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        _, order = self._index()
        d, g, G = self.embedding_dim, self.group_size, self.num_groups
        hr = self.rotate(hidden.to(self.dtype)).reshape(-1, d)  # [N, d]
        hp = F.pad(hr, (0, G * g - d))  # [N, G*g]: zeros against the padding coordinates of _decode(padded=True)
        N = hr.shape[0]
        # h . (x' + mu) = h . x' + h . mu: every tier adds h . mu [N] where it scales its rows (no pass over [V, N])
        hmu = hr @ self.row_mean.to(hr.dtype) if self.centered else torch.zeros(N, dtype=hr.dtype, device=hr.device)
        training = torch.is_grad_enabled() and (hr.requires_grad or any(p.requires_grad for p in self.parameters(recurse=False)))
        tables = self.logits_table_rows > 0 and not is_exporting() and not training
        parts = []  # [n, N] per tier, in tier order
        for name, _, n in self.all_tiers:
            if tables and self._use_tables(name, n, N):
                c = self.logits_table_rows
                chunks = [self._tier_tables(name, hr[i : i + c], hp[i : i + c], hmu[i : i + c]) for i in range(0, N, c)]
                parts.append((chunks[0] if len(chunks) == 1 else torch.cat(chunks, 1)).to(hr.dtype))
            else:
                parts += [self._tier_decoded(name, slice(i, i + self.logits_chunk), hr, hp, hmu)
                          for i in range(0, n, self.logits_chunk)]
        logits = torch.cat(parts).index_select(0, order)  # [V, N]: tier order -> vocabulary order
        return logits.T.contiguous().reshape(*hidden.shape[:-1], self.num_embeddings)

    def _use_tables(self, name: str, n: int, N: int) -> bool:
        """Whether tier ``name`` (n rows) computes its logits of N hidden rows from byte tables: the tier takes tables
        (:meth:`_table_reads`); N is at most :attr:`logits_few_rows` or its reads a row at most
        :attr:`logits_table_reads` of d; and for N > 1, its rows read at least :attr:`logits_table_use` times the
        entries of its tables (at N = 1 a table is one cheap product)."""
        reads = self._table_reads(name)
        if reads is None or (N > self.logits_few_rows and reads > self.logits_table_reads * self.embedding_dim):
            return False
        return N == 1 or n * reads >= self.logits_table_use * self._table_entries(name)

    def _tier_decoded(self, name: str, rows: slice, hr: torch.Tensor, hp: torch.Tensor, hmu: torch.Tensor) -> torch.Tensor:
        """Logits [n, N] of rows ``rows`` of tier ``name`` against hr (float [N, d], rotated; hp: zero-padded to
        [N, G*g]) plus hmu [N] (h . mu): the rows decoded and multiplied (vector tiers: scaled after the product, the
        cheaper side)."""
        if name[0] == "v":
            t = int(name[1:])
            return torch.addcmul(hmu, self._decode_vq(t, rows, scaled=False) @ hr.T, getattr(self, f"scales_v{t}")[rows])
        return torch.addmm(hmu, self._decode(name, rows, padded=True), hp.T)

    # --- byte tables (tied logits without decoding the rows) ----------------------------------------------
    def _table_entries(self, name: str) -> int:
        """Entries of tier ``name``'s byte tables per hidden row: d / k * 2^b (vector), code bytes * 256 (scalar)."""
        if name[0] == "v":
            K, k = getattr(self, f"codebook_v{name[1:]}").shape
            return self.embedding_dim // k * K
        return getattr(self, f"codes_b{name[1:]}").shape[1] * 256

    def _table_reads(self, name: str) -> int | None:
        """Table reads per row of tier ``name`` (scalar: d * bits / 8 code bytes; vector: d / k indices), None where
        the tier takes no byte tables."""
        if name[0] == "v":
            return self.embedding_dim // getattr(self, f"codebook_v{name[1:]}").shape[1]
        bits = int(name[1:])
        return self.embedding_dim * bits // 8 if self._table_ok(bits) else None

    def _tier_tables(self, name: str, hr: torch.Tensor, hp: torch.Tensor, hmu: torch.Tensor) -> torch.Tensor:
        """float32 logits [n, N] of tier ``name`` against hr (float [N, d], rotated; hp zero-padded) plus hmu [N],
        from tables."""
        if name[0] == "v":
            return self._logits_vq_tables(int(name[1:]), hr, hmu)
        return self._logits_tables(int(name[1:]), hp, hmu)

    def _table_ok(self, bits: int) -> bool:
        """Whether tier ``bits`` takes byte tables: at most :attr:`logits_table_bits` bits, and no byte holds bits
        of two groups."""
        return bits <= self.logits_table_bits and (self.group_size * bits) % 8 == 0 and (self.embedding_dim * bits) % 8 == 0

    def _logits_tables(self, bits: int, hp: torch.Tensor, hmu: torch.Tensor) -> torch.Tensor:
        """Tier ``bits`` logits of hp (float [N, G*g], rotated, zero-padded) plus hmu [N] -> float32 [n_b, N] from
        byte tables.

        q_vg . h_g (q the codes of row v in group g) is the sum over the code bytes of group g of
        table_j[byte], table_j[c] = sum over the bits set in byte value c of (place value) * h[coordinate of the
        bit]; one ``embedding_bag`` per tier sums them per (row, group). Then logits_v = sum_g s_vg (q_vg . h_g) +
        m_vg sum(h_g): exact, d * bits / 8 table reads a row instead of d multiply-adds. The tables are built
        as [nbytes * 256, N] (the ``embedding_bag`` weight: one contiguous row of N per byte value).
        """
        d, g, G = self.embedding_dim, self.group_size, self.num_groups
        idx, offsets = self._bag_index(bits)
        h = hp.float()
        N, nbytes = h.shape[0], getattr(self, f"codes_b{bits}").shape[1]
        place = 2.0 ** torch.arange(bits - 1, -1, -1, dtype=torch.float32, device=h.device)
        w = (h[:, :d].unsqueeze(-1) * place).reshape(N, nbytes, 8)  # the weight of every bit of the code stream
        unpack = _unpack_table(torch.float32, h.device)  # [256, 8]
        tables = w.reshape(nbytes, 8) @ unpack.T if N == 1 else unpack @ w.permute(1, 2, 0)  # [nbytes, 256, N]
        dots = F.embedding_bag(idx, tables.reshape(-1, N), offsets, mode="sum")  # [n_b * G, N]
        scales = getattr(self, f"scales_b{bits}").float()
        mins = getattr(self, f"mins_b{bits}").float()
        out = (dots.unflatten(0, (-1, G)) * scales.unsqueeze(-1)).sum(1).add_(hmu.float())  # [n_b, N]
        return torch.addmm(out, mins, h.unflatten(-1, (G, g)).sum(-1).T)

    def _logits_vq_tables(self, t: int, hr: torch.Tensor, hmu: torch.Tensor) -> torch.Tensor:
        """Vector tier t logits of hr (float [N, d], rotated) plus hmu [N] -> float32 [n_t, N] from codebook tables:
        T_j[c] = h_j . C[c] (h_j the j-th k-coordinate slice of h), logits_v = scale_v sum_j T_j[c_vj]; one
        ``embedding_bag`` sums the d / k table entries of each row: exact, d / k table reads a row. The tables are
        built as [d / k * 2^b, N] (one contiguous row of N per (slice, codeword))."""
        codebook = getattr(self, f"codebook_v{t}").float()
        N, k = hr.shape[0], codebook.shape[1]
        h = hr.float().reshape(N, -1, k)
        tables = h[0] @ codebook.T if N == 1 else codebook @ h.permute(1, 2, 0)  # [d / k, K, N] (one product at N = 1)
        idx, offsets = self._vq_bag_index(t)
        dots = F.embedding_bag(idx, tables.reshape(-1, N), offsets, mode="sum")  # [n_t, N]
        return torch.addcmul(hmu.float(), dots, getattr(self, f"scales_v{t}").float())

    def _vq_bag_index(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``embedding_bag`` input of vector tier t: int32 [n_t * d / k] (index + K * its position in the row)
        and the int32 [n_t] bag offsets. Cached on the codes tensor: 4 bytes per index, 4 d / k bytes a row
        (SmolLM2 at k = 8: 288 bytes a row, 1/8 of its dense fp32 row)."""
        codes = getattr(self, f"codes_v{t}")
        K = getattr(self, f"codebook_v{t}").shape[0]

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            idx = self._vq_indices(t, slice(None)).to(torch.int32)
            n, m = idx.shape
            idx = idx + torch.arange(m, dtype=torch.int32, device=idx.device) * K
            return idx.reshape(-1), torch.arange(n, dtype=torch.int32, device=idx.device) * m

        return tensor_cache(self._bag_cache, f"v{t}", codes, build)

    def _bag_index(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``embedding_bag`` input of tier ``bits``: int32 [n_b * nbytes] (code byte + 256 * its position in the
        row) and the int32 [n_b * G] bag offsets (one bag a row and group). Built on first use and cached on the codes
        tensor: 4 bytes per code byte plus 4 per row and group, i.e. bits / 8 of the tier's dense fp32 bytes (SmolLM2
        49152 x 576: 16 MB at 25x (1-2 bits), 1/7 of the 113 MB dense fp32 matrix; 57 MB at 8x (3-4 bits))."""
        codes = getattr(self, f"codes_b{bits}")

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            n, nbytes = codes.shape
            starts = torch.arange(self.num_groups, dtype=torch.int32, device=codes.device) * (self.group_size * bits // 8)
            rows = torch.arange(n, dtype=torch.int32, device=codes.device) * nbytes
            return byte_index(codes).reshape(-1), (rows.unsqueeze(-1) + starts).reshape(-1)

        return tensor_cache(self._bag_cache, f"b{bits}", codes, build)

    def reconstruct(self) -> torch.Tensor:
        _, order = self._index()
        out = torch.cat([self._decode(name, slice(None)).to(self.dtype) for name, _, _ in self.all_tiers]).index_select(0, order)
        return self._unrotate_rows(out)
