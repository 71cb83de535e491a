"""Issue 17, 4-bit bodies: the documented route (bitsandbytes' NF4 ``BitsAndBytesConfig`` at load on the CPU, then
``save_pretrained``) saves and reloads a compressed causal LM with a tied head, and neither the compressed embedding
nor the tied head is quantised a second time."""

from __future__ import annotations

import pytest
import torch
import transformers

import hf_embcomp
from tests.support.tiny import ARCHS, V

pytest.importorskip("bitsandbytes")


def test_nf4_body_saves_and_reloads(tmp_path):
    from bitsandbytes.nn import Linear4bit

    # the tiny llama at d = 128: bitsandbytes' CPU kernel wants in_features >= its block of 64
    kw = ARCHS["llama"][1] | {"hidden_size": 128, "intermediate_size": 256}
    torch.manual_seed(0)
    comp = hf_embcomp.compress(transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=V, **kw)).eval(),
                               "lighttoken", 8)
    hf_embcomp.save_compressed(comp, tmp_path / "m")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    q = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True, device_map="cpu",
                                                          quantization_config=cfg)
    assert isinstance(q.model.layers[0].mlp.up_proj, Linear4bit)  # quantised body
    emb = q.get_compressed_embedding()
    assert all(type(p) is torch.nn.Parameter for p in emb.parameters())  # the embedding is left as it is
    assert emb.codes.dtype == torch.uint8
    assert not any(isinstance(m, Linear4bit) for m in q.get_output_embeddings().modules())  # so is the tied head
    ids = torch.tensor([[2, 17, 300, 999, 5]])
    with torch.no_grad():
        dense = comp(input_ids=ids).logits
    q.save_pretrained(tmp_path / "q")  # before any forward: bitsandbytes' CPU path repacks on the first one
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", trust_remote_code=True)
    assert isinstance(back.model.layers[0].mlp.up_proj, Linear4bit)
    with torch.no_grad():
        ref, got = q(input_ids=ids).logits, back(input_ids=ids).logits
    assert torch.equal(got, ref)
    assert 0 < float((got - dense).norm() / dense.norm()) < 0.2  # 4-bit weights, not a broken model
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "q") < size(tmp_path / "m")
