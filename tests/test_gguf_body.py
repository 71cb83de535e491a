"""Issue 17, a body kept as its GGUF blocks: the runtime's dequantisation is gguf-py's bit for bit, the blocks are found
by content (rows permuted as transformers permutes Llama's q / k), a compressed model stores them and reloads to the
same weights, and a changed weight is never saved stale."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors import safe_open

import hf_embcomp
from hf_embcomp.body import gguf_body_blocks, resolve_body, resolve_body_dtype
from hf_embcomp.hub_code.embcomp_body import GGML_BLOCKS, GGMLLinear, dequantize_ggml
from hf_embcomp.io import SOURCE_ATTRIBUTE, save_compressed
from tests.support.tiny import tiny_model

FLOAT16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2),
                  "Q6_K": (208,)}
"""Byte offsets of each block's float16 fields (d, m, dmin)."""


@pytest.mark.parametrize("kind", sorted(GGML_BLOCKS))
def test_dequantize_matches_gguf_py_bit_for_bit(kind):
    """Random blocks (every bit pattern of the codes and scales, finite float16 fields) read as gguf-py reads them."""
    weights, size = GGML_BLOCKS[kind]
    g = np.random.default_rng(0)
    blocks = g.integers(0, 256, (24, 3 * size), dtype=np.uint8)
    halves = g.standard_normal((24, 3, 2)).astype(np.float16).view(np.uint8).reshape(24, 3, 2, 2)
    for i, off in enumerate(FLOAT16_FIELDS[kind]):
        blocks.reshape(24, 3, size)[:, :, off:off + 2] = halves[:, :, i]
    qtype = GGMLQuantizationType[kind]
    ours = dequantize_ggml(torch.from_numpy(blocks), kind)
    assert ours.shape == (24, 3 * weights) and ours.dtype == torch.float32
    assert torch.equal(ours, torch.from_numpy(dequantize(blocks, qtype)))
    with pytest.raises(ValueError, match="not supported"):
        dequantize_ggml(torch.from_numpy(blocks), "IQ2_XS")
    with pytest.raises(ValueError, match="uint8"):
        dequantize_ggml(torch.from_numpy(blocks)[:, :-1], kind)


def test_quantised_weights_round_trip():
    """gguf-py's own quantiser (Q4_0 / Q4_1 / Q8_0) and our dequantisation agree with its dequantisation."""
    x = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    for kind in ("Q4_0", "Q4_1", "Q8_0"):
        blocks = quantize(x, GGMLQuantizationType[kind])
        assert torch.equal(dequantize_ggml(torch.from_numpy(blocks), kind),
                           torch.from_numpy(dequantize(blocks, GGMLQuantizationType[kind])))


def _gguf_source(tmp_path):
    """A tiny Llama whose Linear weights lie on GGUF grids (Q4_1, with one Q4_0 and one Q8_0 layer), and a GGUF file
    holding their blocks, q_proj rows reversed in the file (as a permuting loader would see them)."""
    model = tiny_model("llama").eval()
    kinds = {"model.layers.0.mlp.up_proj": "Q4_0", "model.layers.1.self_attn.o_proj": "Q8_0"}
    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(str(path), "llama")
    with torch.no_grad():
        for name, lin in model.named_modules():
            if type(lin) is not torch.nn.Linear or lin.weight is model.get_input_embeddings().weight:
                continue
            kind = kinds.get(name, "Q4_1")
            qtype = GGMLQuantizationType[kind]
            blocks = quantize(lin.weight.numpy(), qtype)
            lin.weight.copy_(torch.from_numpy(dequantize(blocks, qtype)))
            if name.endswith("q_proj"):
                blocks = blocks[::-1].copy()
            writer.add_tensor(name, blocks, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    setattr(model, SOURCE_ATTRIBUTE, {"body_dtype": "gguf", "gguf_path": str(path)})
    return model, path, kinds


def test_blocks_found_by_content_in_row_order(tmp_path):
    model, path, kinds = _gguf_source(tmp_path)
    found, left = gguf_body_blocks(model, path)
    linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
    assert left == [] and sorted(found) == sorted(linears)
    for name, (kind, blocks) in found.items():
        assert kind == kinds.get(name, "Q4_1")
        assert torch.equal(dequantize_ggml(blocks, kind), model.get_submodule(name).weight)
    dtype, blocks = resolve_body(model)
    assert dtype == torch.float32 and sorted(blocks) == sorted(linears)
    assert resolve_body(model)[1] is blocks  # auto's candidates: the file is read and matched once
    with torch.no_grad():  # a weight off its grid has no blocks
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    found, left = gguf_body_blocks(model, path)
    assert left == ["model.layers.0.mlp.down_proj"] and len(found) == len(linears) - 1
    assert resolve_body(model) == (torch.bfloat16, None)  # the changed weight is seen: no stale blocks
    with pytest.raises(ValueError, match="have no blocks"):
        resolve_body(model, "gguf")
    assert resolve_body_dtype(model) == "gguf" and resolve_body_dtype(model, "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="load the model from a .gguf file"):
        resolve_body_dtype(tiny_model("llama"), "gguf")


def test_compressed_model_stores_blocks_and_reloads_the_same(tmp_path):
    model, _, _ = _gguf_source(tmp_path)
    comp = hf_embcomp.compress(model, "svd", 4)
    body = {n: m for n, m in comp.named_modules() if isinstance(m, GGMLLinear)}
    assert len(body) == 14 and comp.dtype == torch.float32
    for n, m in body.items():  # bit for bit the source's weights
        assert torch.equal(m.weight, model.get_submodule(n).weight)
    d = tmp_path / "m"
    save_compressed(comp, d)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert not any(k.endswith("proj.weight") for k in keys)
        assert all(f.get_tensor(f"{n}.weight_blocks").dtype == torch.uint8 for n in body)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["body_quantization"]["format"] == "ggml" and len(cfg["body_quantization"]["modules"]) == 14
    rep = json.loads((d / "compression_report.json").read_text())
    assert rep["body_format"].startswith("GGUF ") and "14 linear layers" in rep["body_format"]
    assert "model.dequantize_body()" in (d / "README.md").read_text()  # the card says how to fine-tune and save

    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 13, 2]])
    again = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, comp(ids).logits)
    half = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.bfloat16)
    assert half.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    half.save_pretrained(tmp_path / "half")  # still what the blocks hold, rounded: saved as blocks
    with safe_open(str(tmp_path / "half" / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.down_proj.weight_blocks" in set(f.keys())

    with torch.no_grad():
        again.model.layers[0].mlp.down_proj.weight[0, 0] += 1
    with pytest.raises(RuntimeError, match="dequantize_body"):
        again.save_pretrained(tmp_path / "stale")
    again.dequantize_body()
    assert again.config.body_quantization is None and not any(isinstance(m, GGMLLinear) for m in again.modules())
    again.save_pretrained(tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", trust_remote_code=True)
    assert torch.equal(dense.model.layers[0].mlp.down_proj.weight, again.model.layers[0].mlp.down_proj.weight)
    stock = dense.decompress()
    assert torch.equal(stock.model.layers[1].self_attn.q_proj.weight, model.model.layers[1].self_attn.q_proj.weight)


def test_state_dict_restores_from_blocks_and_recover_with_lora_saves(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_embcomp.training.recover import recover

    model, _, _ = _gguf_source(tmp_path)
    comp = hf_embcomp.compress(model, "svd", 4).float()
    snapshot = comp.state_dict()
    lin = comp.model.layers[0].mlp.down_proj
    with torch.no_grad():
        lin.weight.add_(1.0)
    comp.load_state_dict(snapshot)  # no weight in the snapshot: restored from the blocks
    assert torch.equal(lin.weight, model.model.layers[0].mlp.down_proj.weight)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (16 * 16 + 64,), generator=g)
    held, blocks = ids[:64], ids[64:].reshape(16, 16)
    res = recover(comp, model, blocks, held, lora_rank=2, max_steps=4, batch_size=2, lr=3e-3, lora_lr=1e-2, quiet=True)
    left = [m for m in comp.modules() if isinstance(m, GGMLLinear)]
    if res.kept == "recovered":  # the merged adapters changed the body: dense now, saved in the model's dtype
        assert not left and comp.config.body_quantization is None
    else:  # the original weights, still what the blocks hold
        assert len(left) == 14 and all(m.matches_blocks() for m in left)
    save_compressed(comp, tmp_path / "r")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "r", trust_remote_code=True)
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(again(x).logits, comp(x).logits)
