"""A body kept in its GGUF blocks: ``nn.Linear`` layers whose weights are stored as llama.cpp's own quantised blocks.

Runtime code: ships in every compressed model repository; imports only torch and the standard library.

A GGUF file's weight matrices are already quantised (SmolLM2-135M-Instruct's: Q4_1, 5 bits per weight);
transformers dequantises them to float32 when it loads the file. hf-embcomp stores such a matrix as the very blocks
the GGUF file holds (``weight_blocks``, uint8, rows in the order of the transformers weight) and dequantises them
when the model loads, with the formula of gguf-py's ``dequantize`` (what transformers runs on a GGUF file): the
loaded weight equals, bit for bit, the one transformers gets from the GGUF file, and the body is stored in the
source's bits rather than 16 or 32. Listed in ``config.body_quantization`` = ``{"format": "ggml", "modules":
{module name: ggml type}}``.

Block formats (ggml's ``block_<type>``, one row of the weight cut into blocks; ``d``, ``m``, ``dmin`` float16, ``q``
the codes, as gguf-py's ``dequantize`` reads them):

- ``Q4_0`` (32 weights, 18 bytes): w = d * (q - 8), 4-bit q
- ``Q4_1`` (32, 20): w = d * q + m
- ``Q5_0`` (32, 22): w = d * (q - 16), 5-bit q (low nibbles + a 32-bit word of high bits)
- ``Q5_1`` (32, 24): w = d * q + m, 5-bit q
- ``Q8_0`` (32, 34): w = d * q, int8 q
- ``Q4_K`` (256, 144): 8 sub-blocks of 32 with 6-bit scales sc and mins mn: w = (d * sc) * q - dmin * mn
- ``Q6_K`` (256, 210): 16 sub-blocks of 16 with int8 scales sc: w = (d * sc) * (q - 32), 6-bit q
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

GGML_BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
               "Q4_K": (256, 144), "Q6_K": (256, 210)}
"""(weights, bytes) of one block, per supported ggml type."""

_NIBBLE = (0, 4)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] (little-endian float16) -> float32 [..., 1]."""
    return b.contiguous().view(torch.float16).float()


def _shifted(b: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """uint8 [N, k, n] -> uint8 [N, k, len(shifts), n]: (b >> s) & mask for each shift."""
    sh = torch.tensor(shifts, dtype=torch.uint8, device=b.device).view(1, 1, -1, 1)
    return (b.unsqueeze(-2) >> sh) & mask


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 4] (a little-endian 32-bit word) -> uint8 [N, 32]: bit j of the word."""
    return _shifted(qh.unsqueeze(1), tuple(range(8)), 1).transpose(-1, -2).reshape(qh.shape[0], 32)


def _dequantize_blocks(b: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """uint8 [N, block bytes] -> float32 [N, block weights], gguf-py's ``dequantize_blocks`` of the type."""
    n = b.shape[0]
    if ggml_type == "Q8_0":
        return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, 0:2])
    if ggml_type in ("Q4_0", "Q4_1"):
        start = 4 if ggml_type == "Q4_1" else 2
        q = _shifted(b[:, start:].unsqueeze(1), _NIBBLE, 0x0F).reshape(n, 32)  # low nibbles first
        if ggml_type == "Q4_0":
            return _f16(b[:, 0:2]) * (q.to(torch.int8) - 8).float()
        return (_f16(b[:, 0:2]) * q.float()) + _f16(b[:, 2:4])
    if ggml_type in ("Q5_0", "Q5_1"):
        start = 4 if ggml_type == "Q5_1" else 2
        qh = _high_bits(b[:, start:start + 4])
        ql = _shifted(b[:, start + 4:].unsqueeze(1), _NIBBLE, 0x0F).reshape(n, 32)
        q = ql | (qh << 4)
        if ggml_type == "Q5_0":
            return _f16(b[:, 0:2]) * (q.to(torch.int8) - 16).float()
        return (_f16(b[:, 0:2]) * q.float()) + _f16(b[:, 2:4])
    if ggml_type == "Q4_K":
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc12 = b[:, 4:16].reshape(n, 3, 4)
        lo, mi, md = sc12[:, 0], sc12[:, 1], sc12[:, 2]
        sc = torch.cat([lo & 0x3F, (md & 0x0F) | ((lo >> 2) & 0x30)], dim=-1)
        mn = torch.cat([mi & 0x3F, (md >> 4) | ((mi >> 2) & 0x30)], dim=-1)
        scale = (d * sc.float()).reshape(n, 8, 1)
        shift = (dmin * mn.float()).reshape(n, 8, 1)
        q = _shifted(b[:, 16:].reshape(n, 4, 32), _NIBBLE, 0x0F).reshape(n, 8, 32).float()
        return (scale * q - shift).reshape(n, 256)
    if ggml_type == "Q6_K":
        ql = _shifted(b[:, 0:128].reshape(n, 2, 64), _NIBBLE, 0x0F).reshape(n, 8, 32)
        qh = _shifted(b[:, 128:192].reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 8, 32)
        q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
        scale = (_f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()).reshape(n, 16, 1)
        return (scale * q).reshape(n, 256)
    raise ValueError(f"ggml type {ggml_type!r} is not supported here (supported: {', '.join(GGML_BLOCKS)}).")


def dequantize_ggml(blocks: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """Weights of ggml blocks, as gguf-py's ``dequantize`` computes them (float32, the same operations in the same
    order, so bit-identical).

    Args:
        blocks: uint8 [rows, n_blocks * block bytes] (:data:`GGML_BLOCKS`), one row of the weight per row.
        ggml_type: one of :data:`GGML_BLOCKS` (``"Q4_1"``, ``"Q6_K"``, ...).

    Returns:
        float32 [rows, n_blocks * block weights] on ``blocks``' device.

    Raises:
        ValueError: an unsupported type, a non-uint8 tensor, or a row length that is not whole blocks.
    """
    if ggml_type not in GGML_BLOCKS:
        raise ValueError(f"ggml type {ggml_type!r} is not supported here (supported: {', '.join(GGML_BLOCKS)}).")
    size = GGML_BLOCKS[ggml_type][1]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % size:
        raise ValueError(f"{ggml_type} blocks must be uint8 [rows, k * {size}] (got {blocks.dtype} {tuple(blocks.shape)}).")
    rows = blocks.shape[0]
    return _dequantize_blocks(blocks.reshape(-1, size), ggml_type).reshape(rows, -1)


class GGMLLinear(nn.Linear):
    """An ``nn.Linear`` stored as ggml blocks (``weight_blocks``, uint8 [out_features, in_features / block weights *
    block bytes], :data:`GGML_BLOCKS`); its ``weight`` is an ordinary parameter, filled from the blocks by :meth:`unpack_` when the model loads,
    and left out of the state dict. Saving checks that the weight is still what the blocks hold (in the weight's
    dtype): a fine-tuned or merged weight is refused rather than saved stale (call the model's
    ``dequantize_body()`` first).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, ggml_type: str,
                 device: Any = None, dtype: Any = None) -> None:
        if ggml_type not in GGML_BLOCKS:
            raise ValueError(f"ggml type {ggml_type!r} is not supported here (supported: {', '.join(GGML_BLOCKS)}).")
        weights, size = GGML_BLOCKS[ggml_type]
        if in_features % weights:
            raise ValueError(f"a {ggml_type} Linear needs in_features divisible by {weights} (got {in_features}).")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.ggml_type = ggml_type
        nbytes = in_features // weights * size
        self.register_buffer("weight_blocks", torch.zeros(out_features, nbytes, dtype=torch.uint8, device=device))
        self._register_state_dict_hook(_blocks_instead_of_weight)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # a state dict of this module (the blocks, no weight: what ``state_dict()`` gives) restores the weight from
        # its blocks; one with a weight (a stock Linear's) loads it as it is
        super()._load_from_state_dict(state_dict, prefix, *args)
        missing = args[2] if len(args) > 2 else []
        if prefix + "weight" not in state_dict and prefix + "weight_blocks" in state_dict:
            if prefix + "weight" in missing:
                missing.remove(prefix + "weight")
            self.unpack_()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ggml_type={self.ggml_type}"

    def dequantized(self) -> torch.Tensor:
        """float32 [out_features, in_features]: the weight the blocks hold."""
        return dequantize_ggml(self.weight_blocks, self.ggml_type)

    @torch.no_grad()
    def unpack_(self, dtype: torch.dtype | None = None) -> None:
        """Fill ``weight`` from the blocks, in ``dtype`` (default: the weight's own), on the blocks' device.

        Raises:
            ValueError: the blocks are not materialised (meta: Accelerate offloaded them to disk).
        """
        if self.weight_blocks.is_meta:
            raise ValueError("a body kept as GGUF blocks cannot be offloaded to disk (its weights are made from the "
                             "blocks at load): load without disk offload, or re-compress with --body-dtype bfloat16.")
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
