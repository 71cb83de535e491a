"""LightToken token embedding: low-rank part + residual binary codes with a linear decoder.

E_hat[w] = P[w] Q^T + W_d b_w + c, with P: V x k, Q: d x k, b_w in {0,1}^M the concatenated hash codes
of all residual stages (stored bit-packed, 8 codes a byte, most significant bit first), W_d: d x M the
concatenated stage decoders and c: d the summed decoder biases (Wang et al., KDD 2023; this project's
reading, see ``hf_embcomp/methods/lighttoken.py``).

Runtime code: ships in every compressed model repository; imports only torch and sibling files.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .embcomp_base import CompressedEmbedding, _unpack_table, bag_weight, byte_index, is_exporting, tensor_cache, unpack_bits


class LightTokenEmbedding(CompressedEmbedding):
    """Rows decoded on the fly from the packed codes; no V x d matrix is built for a lookup.

    Tensors: ``lowrank_p`` float [V, k] (= U_k S_k) and ``lowrank_q`` float [d, k] (= V_k), absent when
    k = 0; ``codes`` uint8 [V, ceil(M/8)] (persistent buffer); ``decoder`` float [d, M];
    ``decoder_bias`` float [d].
    Hyper-parameters: ``rank`` (k), ``bits`` (bits of each stage; M = their sum), ``exact_rows`` (n).

    Exact rows (n > 0): ``exact_ids`` int32 [n] (sorted, unique token ids; persistent buffer) and
    ``exact_rows`` float [n, d] hold n rows verbatim (the special tokens and the most frequent tokens of a
    corpus, chosen at fit time). A lookup of such an id returns its stored row, and tied logits of those
    ids are ``h . exact_row``; every other row is decoded as above.

    Tied output heads: :meth:`compute_logits` evaluates ``(h Q) P^T + (h W_d) B^T + h.c`` over chunks of
    the vocabulary, never building E_hat. ``(h W_d) B^T`` is read from byte tables when few hidden rows
    come at once (generation: at most :attr:`logits_table_rows`): for each code byte j, the 256 partial
    sums of ``h W_d`` over its 8 bits, so a row's term is ``sum_j table_j[code byte j]`` (the asymmetric
    distance computation of product quantisation, Jegou et al. 2011), summed by one ``embedding_bag`` over an
    int32 index of the codes built on first use and cached (4 bytes per code byte, M / 2 bytes a row: SmolLM2
    49152 x 576 at 25x, 15 MB, 1/8 of the 113 MB dense fp32 matrix); with more rows the codes of a chunk
    are unpacked once and multiplied. Call
    :meth:`materialize` to cache the dense E_hat instead (faster per token when k + M >= d, at the memory
    of a V x d float matrix; :meth:`logits_cost` gives both costs). The cache is not saved and is dropped
    by ``materialize(False)``; re-materialise after changing the parameters.
    """

    method = "lighttoken"
    logits_chunk = 8192
    logits_table_rows = 4
    """Tied logits of at most this many hidden rows use byte tables (0: always unpack the codes)."""
    logits_byte_tables = True
    """False: always unpack the codes (the path before the byte tables; bench/speed.py times both)."""

    @property
    def rank(self) -> int:
        return int(self.hparams.get("rank", 0))

    @property
    def stage_bits(self) -> list[int]:
        bits = self.hparams["bits"]
        if isinstance(bits, int):
            return [bits] * int(self.hparams.get("stages", 1))
        return [int(b) for b in bits]

    @property
    def num_bits(self) -> int:
        return sum(self.stage_bits)

    @property
    def num_exact(self) -> int:
        return int(self.hparams.get("exact_rows", 0))

    def allocate(self) -> None:
        V, d, k, m = self.num_embeddings, self.embedding_dim, self.rank, self.num_bits
        if k > 0:
            self.lowrank_p = nn.Parameter(torch.empty(V, k))
            self.lowrank_q = nn.Parameter(torch.empty(d, k))
        self.register_buffer("codes", torch.empty(V, (m + 7) // 8, dtype=torch.uint8), persistent=True)
        self.decoder = nn.Parameter(torch.empty(d, m))
        self.decoder_bias = nn.Parameter(torch.empty(d))
        if self.num_exact > 0:
            self.register_buffer("exact_ids", torch.empty(self.num_exact, dtype=torch.int32), persistent=True)
            self.exact_rows = nn.Parameter(torch.empty(self.num_exact, d))
        self._dense: torch.Tensor | None = None
        self._cache: dict[str, Any] = {}

    def reset_parameters(self, init: Any = None) -> None:
        init = init or nn.init
        for p in self.parameters(recurse=False):
            init.normal_(p, mean=0.0, std=0.02)
        init.zeros_(self.codes)
        if self.num_exact > 0 and not getattr(self.exact_ids, "_is_hf_initialized", False):
            with torch.no_grad():  # any sorted unique ids keep lookups well defined
                self.exact_ids.copy_(torch.arange(self.num_exact, dtype=torch.int32))

    # --- decoding ------------------------------------------------------------------------------
    def _bits(self, packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return unpack_bits(packed, self.num_bits, dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._dense is not None:
            return F.embedding(input_ids, self._dense)
        w = self.decoder
        out = F.linear(self._bits(self.codes[input_ids], w.dtype), w, self.decoder_bias)
        if self.rank > 0:
            out = out + F.embedding(input_ids, self.lowrank_p, self.padding_idx) @ self.lowrank_q.T
        if self.num_exact > 0:
            pos = self._exact_slots(input_ids.device)[input_ids]  # -1: not an exact row
            hit = pos >= 0
            out = torch.where(hit.unsqueeze(-1), F.embedding(pos.clamp_min(0), self.exact_rows).to(out.dtype), out)
        return out

    def _exact_slots(self, device: torch.device) -> torch.Tensor:
        """int64 [V]: the index in ``exact_ids`` of every token id, -1 for ids that are not exact rows.

        A scatter of the n ids, rebuilt at each call (V int64 writes): unlike a binary search it exports to
        ONNX, and it does not need the ids sorted."""
        slots = torch.full((self.num_embeddings,), -1, dtype=torch.int64, device=device)
        ids = self.exact_ids.to(device=device, dtype=torch.int64)
        return slots.scatter(0, ids, torch.arange(self.num_exact, dtype=torch.int64, device=device))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.decoder
        hidden = hidden.to(w.dtype)
        if self._dense is not None:
            return hidden @ self._dense.T
        hw = hidden @ w  # [..., M]
        hq = hidden @ self.lowrank_q if self.rank > 0 else None  # [..., k]
        hc = hidden @ self.decoder_bias  # [...]
        few = self.logits_byte_tables and hw[..., 0].numel() <= self.logits_table_rows and not is_exporting()
        if few:  # one embedding_bag over the cached byte index: [N, nbytes, 256] tables -> [V, N]
            n = hw[..., 0].numel()
            tables = self._byte_tables(hw.reshape(n, -1).float()).unflatten(-1, (-1, 256))
            idx = tensor_cache(self._cache, "bag_index", self.codes, lambda: byte_index(self.codes))
            part = F.embedding_bag(idx, bag_weight(tables), mode="sum").T.reshape(*hw.shape[:-1], -1).to(w.dtype)
            if hq is not None:
                part = part + hq @ self.lowrank_p.T
            parts = [part]
        else:
            parts = []
            for i in range(0, self.num_embeddings, self.logits_chunk):
                part = hw @ self._bits(self.codes[i : i + self.logits_chunk], w.dtype).T  # [..., c]
                if hq is not None:
                    part = part + hq @ self.lowrank_p[i : i + self.logits_chunk].T
                parts.append(part)
        logits = torch.cat(parts, dim=-1) + hc.unsqueeze(-1)
        if self.num_exact > 0:
            logits = logits.index_copy(-1, self.exact_ids.long(), hidden @ self.exact_rows.T)
        return logits

    def _byte_tables(self, hw: torch.Tensor) -> torch.Tensor:
        """[..., M] -> [..., nbytes * 256]: entry (j, b) = sum of hw over the bits set in byte value b at byte j."""
        nbytes = self.codes.shape[1]
        hw = F.pad(hw, (0, 8 * nbytes - hw.shape[-1]))  # padding bits are 0 in the codes and weigh 0 here
        table = _unpack_table(hw.dtype, hw.device)  # [256, 8], the bit order of unpack_bits
        return (hw.unflatten(-1, (nbytes, 8)) @ table.T).flatten(-2)

    def reconstruct(self) -> torch.Tensor:
        w = self.decoder
        out = F.linear(self._bits(self.codes, w.dtype), w, self.decoder_bias)
        if self.rank > 0:
            out = out + self.lowrank_p @ self.lowrank_q.T
        if self.num_exact > 0:
            out = out.index_copy(0, self.exact_ids.long(), self.exact_rows.to(out.dtype))
        return out

    # --- dense cache ---------------------------------------------------------------------------
    def materialize(self, enabled: bool = True) -> None:
        """Cache (``enabled``) or drop the dense E_hat used by lookups and tied logits."""
        if enabled:
            with torch.no_grad():
                self._dense = self.reconstruct().detach()
        else:
            self._dense = None

    def _apply(self, fn, *args, **kwargs):  # keep the cache on the module's device/dtype
        out = super()._apply(fn, *args, **kwargs)
        if self._dense is not None:
            self._dense = fn(self._dense)
        return out

    def logits_cost(self) -> dict[str, Any]:
        """Multiply-adds per output token of tied logits, factored vs dense, and the extra memory of dense."""
        V, d, k, m = self.num_embeddings, self.embedding_dim, self.rank, self.num_bits
        factored = d * (k + m + 1 + self.num_exact) + V * (k + m)
        dense = d * V
        return {
            "factored_macs_per_token": factored,
            "dense_macs_per_token": dense,
            "dense_extra_bytes": V * d * 4,
            "cheaper": "dense (materialize)" if dense < factored else "factored",
        }
