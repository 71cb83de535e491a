"""Base class of the compressed token-embedding modules, the tied-logits module and bit packing.

Runtime code: ships in every compressed model repository; imports only torch and the standard library.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # MSB first, as numpy.packbits(bitorder="big")


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a {0,1} tensor [..., m] into uint8 [..., ceil(m/8)], 8 codes a byte, most significant bit first."""
    m = bits.shape[-1]
    pad = (-m) % 8
    b = bits.to(torch.uint8)
    if pad:
        b = torch.cat([b, b.new_zeros(*b.shape[:-1], pad)], dim=-1)
    b = b.reshape(*b.shape[:-1], -1, 8)
    return (b << _BIT_SHIFTS.to(b.device)).sum(-1, dtype=torch.uint8)


def is_exporting() -> bool:
    """Whether the module is being traced by ``torch.onnx.export``, ``torch.export`` or ``torch.compile``.

    The runtime then skips what a graph cannot hold: the data-dependent token-id range check (an exported graph
    has no IndexError; out-of-range ids are the caller's responsibility, as for a stock ``Gather``), the caches
    keyed on tensor identity, and the size-dependent choice of a tied-logits algorithm (the graph always takes the
    shape-independent one). Results are the same either way.
    """
    compiler = getattr(torch, "compiler", None)
    return bool(
        torch.onnx.is_in_onnx_export()
        or (compiler is not None and getattr(compiler, "is_compiling", lambda: False)())
        or (compiler is not None and getattr(compiler, "is_exporting", lambda: False)())
    )


_UNPACK_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _unpack_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 256 x 8 table byte -> its bits (MSB first) in ``dtype`` on ``device``, built once (not cached while
    exporting: a traced tensor must not outlive its trace)."""
    table = _UNPACK_TABLES.get((dtype, device))
    if table is None:
        rows = [[(byte >> (7 - j)) & 1 for j in range(8)] for byte in range(256)]  # Python ints: a graph constant
        table = torch.tensor(rows, dtype=dtype, device=device)
        if not is_exporting():
            _UNPACK_TABLES[(dtype, device)] = table
    return table


def unpack_bits(packed: torch.Tensor, num_bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack uint8 [..., nbytes] into a {0,1} tensor [..., num_bits] of ``dtype``.

    One ``index_select`` of a 256 x 8 table (byte -> its 8 bits, already in ``dtype``): 2-3x faster on CPU
    than shifting and casting (bench/speed.py, "bit unpacking"), and the same result.
    """
    table = _unpack_table(dtype, packed.device)
    bits = table.index_select(0, packed.reshape(-1).to(torch.int32)).reshape(*packed.shape[:-1], -1)
    return bits if bits.shape[-1] == num_bits else bits[..., :num_bits].contiguous()


def bag_weight(tables: torch.Tensor) -> torch.Tensor:
    """Byte tables float [N, nbytes, 256] -> the ``embedding_bag`` weight [nbytes * 256, N], row-major with unit
    column stride (``.T.contiguous()`` keeps stride N for N = 1, which sends ``embedding_bag`` to its slow path)."""
    n = tables.shape[0]
    return tables.reshape(n, -1).T.reshape(-1).view(-1, n)


def byte_index(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [n, nbytes] -> int32 [n, nbytes]: code byte + 256 * its position in the row, the
    ``embedding_bag`` input that reads row j * 256 + byte of a [nbytes * 256, N] byte table (4 bytes per code byte)."""
    pos = torch.arange(codes.shape[-1], dtype=torch.int32, device=codes.device) * 256
    return codes.to(torch.int32) + pos


def tensor_cache(store: dict, name: str, source: torch.Tensor, build: Any) -> Any:
    """``build()``, cached in ``store[name]`` until ``source`` changes (its storage, version or device)."""
    key = (source.data_ptr(), source._version, source.device)
    hit = store.get(name)
    if hit is None or hit[0] != key:
        hit = (key, build())
        store[name] = hit
    return hit[1]


def _cast_to_storage(module: "CompressedEmbedding", state_dict: dict, prefix: str, local_metadata: Any) -> None:
    # Floating tensors are written in the storage dtype of the compression block, whatever the in-memory
    # dtype, so that a re-saved (or fine-tuned) model keeps the stored bytes it was compressed to.
    # Meta tensors are left alone: from_pretrained reads the meta model's state dict to choose the load
    # dtype of every tensor, and the embedding must load in the model's dtype (as the rest of the model).
    for name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        key = prefix + name
        t = state_dict.get(key)
        if t is not None and t.is_floating_point() and t.dtype != module.storage_dtype and not t.is_meta:
            state_dict[key] = t.detach().to(module.storage_dtype)


class CompressedEmbedding(nn.Module):
    """A token embedding E_hat (V x d) stored in compressed form.

    Deliberately not an ``nn.Embedding`` subclass: stock init and resize code test ``isinstance(m,
    nn.Embedding)`` and would touch a ``.weight`` that does not exist.

    Frozen by default: every parameter registered on the module (at construction and when
    ``from_pretrained`` loads it) gets ``requires_grad=False`` unless the block says ``"trainable": true``
    or :meth:`set_trainable` was called, so fine-tuning the rest of a model leaves the stored embedding as
    it was. Integer codes are buffers and never train.

    Subclasses (one per method) implement :meth:`allocate` (shapes only: it runs on the meta device),
    :meth:`embed`, :meth:`compute_logits`, :meth:`reconstruct` and :meth:`reset_parameters`.

    Args:
        block: the ``embedding_compression`` block of the config: ``num_embeddings`` (V),
            ``embedding_dim`` (d), ``padding_idx``, ``embed_scale``, ``storage_dtype`` and the method's
            ``hyperparameters``.
    """

    method: str = ""

    def __init__(self, block: dict[str, Any]) -> None:
        super().__init__()
        self.num_embeddings = int(block["num_embeddings"])
        self.embedding_dim = int(block["embedding_dim"])
        self.padding_idx = block.get("padding_idx")
        scale = block.get("embed_scale")
        self.embed_scale = None if scale is None else float(scale)
        self.storage_dtype = getattr(torch, block.get("storage_dtype", "float32"))
        self.hparams = dict(block.get("hyperparameters", {}))
        self.trainable = bool(block.get("trainable", False))
        self._register_state_dict_hook(_cast_to_storage)
        self.allocate()
        self._layout = {
            name: (tuple(t.shape), t.is_floating_point() or t.dtype)
            for name, t in list(self.named_parameters(recurse=False)) + list(self.named_buffers(recurse=False))
        }

    def check_layout(self) -> None:
        """Check that every tensor still has the shape (and integer dtype) the config implies.

        Raises:
            ValueError: a tensor was loaded with another shape or dtype (the checkpoint does not match).
        """
        for name, t in list(self.named_parameters(recurse=False)) + list(self.named_buffers(recurse=False)):
            shape, kind = self._layout[name]
            if tuple(t.shape) != shape or (kind is not True and t.dtype != kind) or (kind is True and not t.is_floating_point()):
                raise ValueError(
                    f"compressed embedding tensor {name!r} has shape {tuple(t.shape)} / {t.dtype}, the config implies "
                    f"{shape} / {'a float dtype' if kind is True else kind}: the checkpoint does not match its config.json."
                )

    # --- to implement per method -------------------------------------------------------------
    def allocate(self) -> None:
        """Register parameters and persistent buffers of the right shapes, with no computation."""
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Rows of E_hat for ``input_ids`` (int64 [...]) -> float [..., d], unscaled."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ E_hat.T`` (float [..., d] -> [..., V]) without building the V x d matrix."""
        raise NotImplementedError

    def reconstruct(self) -> torch.Tensor:
        """The dense unscaled E_hat, float [V, d] (for decompress and evaluation only)."""
        raise NotImplementedError

    def reset_parameters(self, init: Any = None) -> None:
        """Give every tensor finite values (used when a model is built without weights).

        ``init`` is ``transformers.initialization`` (whose functions skip tensors already loaded) or None
        for ``torch.nn.init``.
        """
        init = init or nn.init
        for p in self.parameters(recurse=False):
            init.normal_(p, mean=0.0, std=0.02)

    # --- shared ------------------------------------------------------------------------------
    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        # Loading replaces parameters with new ones (requires_grad=True): apply the trainable flag here.
        if param is not None and not getattr(self, "trainable", False):
            param.requires_grad_(False)
        super().register_parameter(name, param)

    def set_trainable(self, enabled: bool = True) -> None:
        """Train (True) or freeze (False) every floating-point parameter of this module; buffers (codes)
        are never trained."""
        self.trainable = bool(enabled)
        for p in self.parameters():
            p.requires_grad_(self.trainable and p.is_floating_point())

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for t in self.parameters():
            return t.dtype
        return torch.float32

    @property
    def weight(self):  # noqa: D401 - a clear error instead of an AttributeError deep in user code
        raise AttributeError(
            f"{type(self).__name__} stores the token embedding compressed and has no dense .weight; "
            "use .reconstruct() for the V x d matrix or hf_embcomp.decompress(model) for a stock model."
        )

    def forward(self, input_ids: torch.Tensor | None = None, *, logits_from: torch.Tensor | None = None):
        """Look up token embeddings, or (``logits_from=hidden``) compute tied output logits.

        Args:
            input_ids: int64 [...] token ids in [0, V).
            logits_from: float [..., d] hidden states; returns float [..., V] logits ``hidden @ E_hat.T``.

        Raises:
            IndexError: a token id is negative or >= V (eager mode; not checked in an exported or compiled graph,
                see :func:`is_exporting`).
        """
        if logits_from is not None:
            return self.compute_logits(logits_from.to(self.device))
        if input_ids.numel() and not is_exporting():
            lo, hi = (int(v) for v in torch.aminmax(input_ids))
            if lo < 0 or hi >= self.num_embeddings:
                raise IndexError(
                    f"token id {hi if hi >= self.num_embeddings else lo} is out of range for a vocabulary of "
                    f"{self.num_embeddings}: check that the tokenizer matches this model."
                )
        out = self.embed(input_ids)
        if self.embed_scale is not None:
            out = out * torch.tensor(self.embed_scale, dtype=torch.float32).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, method={self.method}, hparams={self.hparams}"


class EmbCompTiedLogits(nn.Module):
    """Output projection tied to a :class:`CompressedEmbedding`: ``logits = hidden @ E_hat.T + bias``.

    Holds the embedding by plain reference (not a registered submodule), so the state dict has no second
    copy. Goes through the embedding's ``forward`` so accelerate's offload hooks load its weights.
    """

    def __init__(self, source: CompressedEmbedding, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_embcomp_source", source)
        self.in_features = source.embedding_dim
        self.out_features = source.num_embeddings
        self.bias = bias

    @property
    def weight(self):
        return self._embcomp_source.weight  # raises the explanatory AttributeError

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._embcomp_source(logits_from=hidden).to(hidden.device)
        if self.bias is not None:
            logits = logits + self.bias.to(logits.device, logits.dtype)
        return logits

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied=compressed"
