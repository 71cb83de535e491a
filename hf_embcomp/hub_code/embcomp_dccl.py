"""Compositional-code token embedding (Shu & Nakayama, ICLR 2018): E_hat[w] = sum_i codebooks[i, c_w^i].

Runtime code: ships in every compressed model repository; imports only torch and sibling files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embcomp_base import CompressedEmbedding, is_exporting, unpack_bits


def code_weights(bits: int) -> torch.Tensor:
    """Place values (MSB first) that turn ``bits`` unpacked bits into one code: int64 [bits]."""
    return 2 ** torch.arange(bits - 1, -1, -1, dtype=torch.int64)


def _code_shifts(bits: int) -> torch.Tensor:
    return torch.arange(bits - 1, -1, -1, dtype=torch.uint8)


class CompositionalCodeEmbedding(CompressedEmbedding):
    """M codebooks of K = 2**bits codewords; token w is the sum of one codeword of each codebook.

    Tensors: ``codes`` uint8 [V, ceil(M * bits / 8)] (persistent buffer; token w's M codes of ``bits``
    bits each, concatenated and bit-packed MSB first), ``codebooks`` float [M, K, d].
    Hyper-parameters: ``num_codebooks`` (M), ``bits`` (log2 K).
    """

    method = "dccl"
    logits_table_rows = 64
    """Tied logits of at most this many hidden rows gather from per-codebook tables (``h . codeword``);
    with more rows (a forward over a sequence) a chunk of rows of E_hat is rebuilt at a time and multiplied.
    SmolLM2 shape at 25x (M = 73, K = 16), one thread, one run: byte tables 1 row 7.9 ms (dense ``h @ E.T``
    9.1 ms, unpacked codes 62 ms), 64 rows 127 ms vs rebuild 281 ms, 128 rows 339 ms vs 302 ms."""
    logits_chunk = 4096
    logits_byte_tables = True
    """Few-row logits gather from byte tables of the packed codes when ``bits`` divides 8 (False: unpack
    every code and gather per codebook, the path before them; bench/speed.py times both)."""

    def allocate(self) -> None:
        m, bits = int(self.hparams["num_codebooks"]), int(self.hparams["bits"])
        self.register_buffer("codes", torch.zeros(self.num_embeddings, (m * bits + 7) // 8, dtype=torch.uint8))
        self.codebooks = nn.Parameter(torch.empty(m, 2**bits, self.embedding_dim))

    def reset_parameters(self, init=None) -> None:
        init = init or nn.init
        init.normal_(self.codebooks, mean=0.0, std=0.02)
        init.zeros_(self.codes)

    def unpack_codes(self, packed: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """uint8 [..., nbytes] -> codes [..., M] in [0, K) of ``dtype`` (uint8 arithmetic: K <= 256)."""
        m, bits = self.codebooks.shape[0], int(self.hparams["bits"])
        if is_exporting():  # ONNX has no uint8 shifts: weigh the bits by their place values in int32 (same codes)
            b = unpack_bits(packed, m * bits, torch.int32).reshape(*packed.shape[:-1], m, bits)
            return (b * code_weights(bits).to(device=b.device, dtype=torch.int32)).sum(-1).to(dtype)
        b = unpack_bits(packed, m * bits, torch.uint8).reshape(*packed.shape[:-1], m, bits)
        return (b << _code_shifts(bits).to(b.device)).sum(-1, dtype=torch.uint8).to(dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        m, k, d = self.codebooks.shape
        codes = self.unpack_codes(self.codes[input_ids])  # [..., M]
        flat = codes + torch.arange(m, device=codes.device) * k  # index into the M*K codewords
        # embedding_bag sums the M codewords without building the [..., M, d] intermediate
        out = F.embedding_bag(flat.reshape(-1, m), self.codebooks.reshape(m * k, d), mode="sum")
        return out.reshape(*input_ids.shape, d)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Few rows: project on every codeword once (P = hidden @ codebooks^T, [..., M, K]), then each token's
        # logit is the sum of its M entries of P: O(rows * V * M) gathers, or O(rows * V * M * bits / 8)
        # from byte tables when bits divides 8. Many rows: that is slower than
        # rebuilding E_hat chunk by chunk (O(V * M * d) once) and a matmul; the V x d matrix is never built.
        hidden = hidden.to(self.codebooks.dtype)
        if hidden[..., 0].numel() > self.logits_table_rows or is_exporting():
            V = self.num_embeddings
            ids = torch.arange(V, device=self.codes.device)
            return torch.cat([hidden @ self.embed(ids[i : i + self.logits_chunk]).T
                              for i in range(0, V, self.logits_chunk)], dim=-1)
        proj = torch.einsum("...d,mkd->...mk", hidden, self.codebooks)  # [..., M, K]
        bits = int(self.hparams["bits"])
        if self.logits_byte_tables and 8 % bits == 0:
            return self._logits_from_byte_tables(proj, bits)
        codes = self.unpack_codes(self.codes, torch.uint8)  # [V, M], 1 byte a code
        logits = proj[..., 0, :].index_select(-1, codes[:, 0].long())
        for i in range(1, codes.shape[1]):
            logits = logits + proj[..., i, :].index_select(-1, codes[:, i].long())
        return logits

    def _logits_from_byte_tables(self, proj: torch.Tensor, bits: int) -> torch.Tensor:
        """Logits read straight from the packed code bytes (``bits`` divides 8, so no code straddles a byte).

        Byte j holds the codes of codebooks j*p .. j*p+p-1 (p = 8 / bits). Its table (256 entries) is the sum
        of those codebooks' projections ``proj[..., m, code]`` for the p codes byte value b encodes, so a
        token's logit is ``sum_j table_j[codes[w, j]]``: ceil(M / p) gathers a token instead of M gathers plus
        unpacking every code (SmolLM2 25x, M = 73, K = 16: 37 gathers).
        proj: [..., M, K] -> logits [..., V].
        """
        per, nbytes = 8 // bits, self.codes.shape[1]
        m, k = proj.shape[-2:]
        proj = F.pad(proj, (0, 0, 0, nbytes * per - m)).unflatten(-2, (nbytes, per))  # padding codes weigh 0
        byte = torch.arange(256, device=proj.device)
        shifts = 8 - bits * torch.arange(1, per + 1, device=proj.device)
        digits = (byte.unsqueeze(0) >> shifts.unsqueeze(1)) & (k - 1)  # [p, 256]: the p codes of each byte value
        lut = proj[..., 0, :].index_select(-1, digits[0])  # [..., nbytes, 256]
        for j in range(1, per):
            lut = lut + proj[..., j, :].index_select(-1, digits[j])
        logits = lut[..., 0, :].index_select(-1, self.codes[:, 0].to(torch.int32))
        for j in range(1, nbytes):
            logits = logits + lut[..., j, :].index_select(-1, self.codes[:, j].to(torch.int32))
        return logits

    def reconstruct(self) -> torch.Tensor:
        return self.embed(torch.arange(self.num_embeddings, device=self.codes.device))
