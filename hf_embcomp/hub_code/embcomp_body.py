"""A body kept in its GGUF blocks: ``nn.Linear`` layers whose weights are stored as llama.cpp's own quantised blocks.

Runtime code: ships in every compressed model repository; imports only torch and the standard library.

A GGUF file's weight matrices are already quantised (SmolLM2-135M-Instruct's: Q4_1, 5 bits per weight);
transformers dequantises them to float32 when it loads the file. hf-embcomp stores such a matrix as the very blocks
the GGUF file holds (``weight_blocks``, uint8, rows in the order of the transformers weight) and dequantises them
when the model loads, with the formula of gguf-py's ``dequantize`` (what transformers runs on a GGUF file): the
loaded weight equals, bit for bit, the one transformers gets from the GGUF file, and the body is stored in the
source's bits rather than 16 or 32. Listed in ``config.body_quantization`` = ``{"format": "ggml", "modules":
{module name: ggml type}}``.

Block formats (ggml's ``block_q4_0`` / ``block_q4_1`` / ``block_q8_0``; 32 weights of one row each, ``d`` and ``m``
float16, ``q`` the codes):

- ``Q4_0`` (18 bytes, 4.5 bits per weight): ``d``, 16 bytes of nibbles; w = d * (q - 8)
- ``Q4_1`` (20 bytes, 5 bits per weight): ``d``, ``m``, 16 bytes of nibbles; w = d * q + m
- ``Q8_0`` (34 bytes, 8.5 bits per weight): ``d``, 32 int8 codes; w = d * q

Nibble ``j`` of a block (low half of byte ``j`` for j < 16, high half of byte ``j - 16`` otherwise) is weight ``j``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

BLOCK_WEIGHTS = 32
"""Weights per block of every supported type."""

GGML_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
"""Bytes of one block of 32 weights, per supported ggml type."""


def dequantize_ggml(blocks: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """Weights of ggml blocks, as gguf-py's ``dequantize`` computes them (float32, the same operations in the same
    order, so bit-identical).

    Args:
        blocks: uint8 [rows, n_blocks * block bytes] (:data:`GGML_BLOCK_BYTES`), one row of the weight per row.
        ggml_type: ``"Q4_0"``, ``"Q4_1"`` or ``"Q8_0"``.

    Returns:
        float32 [rows, n_blocks * 32] on ``blocks``' device.

    Raises:
        ValueError: an unsupported type, a non-uint8 tensor, or a row length that is not whole blocks.
    """
    size = GGML_BLOCK_BYTES.get(ggml_type)
    if size is None:
        raise ValueError(f"ggml type {ggml_type!r} is not supported here (supported: {', '.join(GGML_BLOCK_BYTES)}).")
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % size:
        raise ValueError(f"{ggml_type} blocks must be uint8 [rows, k * {size}] (got {blocks.dtype} {tuple(blocks.shape)}).")
    rows = blocks.shape[0]
    b = blocks.reshape(rows, -1, size)
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # [rows, n_blocks, 1]
    if ggml_type == "Q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).float()
        return (q * d).reshape(rows, -1)
    start = 4 if ggml_type == "Q4_1" else 2
    qs = b[..., start:]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1)  # weights 0-15 are the low nibbles, 16-31 the high ones
    if ggml_type == "Q4_0":
        return (d * (q.to(torch.int8) - 8).float()).reshape(rows, -1)
    m = b[..., 2:4].contiguous().view(torch.float16).float()
    return ((d * q.float()) + m).reshape(rows, -1)


class GGMLLinear(nn.Linear):
    """An ``nn.Linear`` stored as ggml blocks (``weight_blocks``, uint8 [out_features, in_features / 32 * block
    bytes]); its ``weight`` is an ordinary parameter, filled from the blocks by :meth:`unpack_` when the model loads,
    and left out of the state dict. Saving checks that the weight is still what the blocks hold (in the weight's
    dtype): a fine-tuned or merged weight is refused rather than saved stale (call the model's
    ``dequantize_body()`` first).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, ggml_type: str,
                 device: Any = None, dtype: Any = None) -> None:
        if ggml_type not in GGML_BLOCK_BYTES:
            raise ValueError(f"ggml type {ggml_type!r} is not supported here (supported: {', '.join(GGML_BLOCK_BYTES)}).")
        if in_features % BLOCK_WEIGHTS:
            raise ValueError(f"a {ggml_type} Linear needs in_features divisible by {BLOCK_WEIGHTS} (got {in_features}).")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.ggml_type = ggml_type
        nbytes = in_features // BLOCK_WEIGHTS * GGML_BLOCK_BYTES[ggml_type]
        self.register_buffer("weight_blocks", torch.zeros(out_features, nbytes, dtype=torch.uint8, device=device))
        self._register_state_dict_hook(_blocks_instead_of_weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ggml_type={self.ggml_type}"

    def dequantized(self) -> torch.Tensor:
        """float32 [out_features, in_features]: the weight the blocks hold."""
        return dequantize_ggml(self.weight_blocks, self.ggml_type)

    @torch.no_grad()
    def unpack_(self, dtype: torch.dtype | None = None) -> None:
        """Fill ``weight`` from the blocks, in ``dtype`` (default: the weight's own), on the blocks' device."""
        dtype = dtype or self.weight.dtype
        grad = self.weight.requires_grad
        self.weight = nn.Parameter(self.dequantized().to(dtype), requires_grad=grad)

    def matches_blocks(self) -> bool:
        """Whether ``weight`` (in its dtype) is what the blocks hold; True for a weight not materialised (meta)."""
        w = self.weight
        if w.is_meta or self.weight_blocks.is_meta:
            return True
        return torch.equal(self.dequantized().to(device=w.device, dtype=w.dtype), w.detach())


def _blocks_instead_of_weight(module: GGMLLinear, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    state_dict.pop(prefix + "weight", None)
    if not module.matches_blocks():
        raise RuntimeError(
            f"{prefix}weight changed since it was loaded from its {module.ggml_type} blocks (fine-tuned or merged?), "
            "so the blocks no longer hold it; call model.dequantize_body() to store the body dense, then save."
        )


def install_ggml_body(model: nn.Module, modules: dict[str, str]) -> list[str]:
    """Replace the named ``nn.Linear`` layers of ``model`` by :class:`GGMLLinear` of the given ggml types (same
    shapes, device and dtype; weights not carried over: they come from the blocks).

    Raises:
        ValueError: a name is not an ``nn.Linear`` of ``model``, or a type/shape is unsupported.
    """
    for name, ggml_type in modules.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            old = None
        if type(old) is not nn.Linear:
            raise ValueError(f"config.json body_quantization names {name!r}, which is not an nn.Linear of this "
                             "backbone: config.json is inconsistent; re-save the model with hf-embcomp.")
        new = GGMLLinear(old.in_features, old.out_features, old.bias is not None, ggml_type,
                         device=old.weight.device, dtype=old.weight.dtype)
        if old.bias is not None:
            new.bias = old.bias
        model.set_submodule(name, new)
    return list(modules)


def ggml_modules(model: nn.Module) -> dict[str, GGMLLinear]:
    """Every :class:`GGMLLinear` of ``model``, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, GGMLLinear)}
