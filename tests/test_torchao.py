"""Issue 17, torchao bodies: the documented route (TorchAoConfig at load, then save_pretrained) saves and reloads
an int8 weight-only body, and the compressed embedding is not quantised a second time."""

from __future__ import annotations

import pytest
import torch
import transformers

import hf_embcomp
from tests.support.tiny import tiny_model

pytest.importorskip("torchao")


def test_int8_body_saves_and_reloads(tmp_path):
    from torchao.quantization import Int8WeightOnlyConfig

    torch.manual_seed(0)
    comp = hf_embcomp.compress(transformers.BertModel(tiny_model("bert").config).eval(), "lighttoken", 8)
    hf_embcomp.save_compressed(comp, tmp_path / "m")
    q = transformers.AutoModel.from_pretrained(tmp_path / "m", trust_remote_code=True,
                                               quantization_config=transformers.TorchAoConfig(Int8WeightOnlyConfig()))
    assert type(q.encoder.layer[0].attention.self.query.weight) is not torch.nn.Parameter  # quantised body
    emb = q.get_compressed_embedding()
    assert all(type(p) is torch.nn.Parameter for p in emb.parameters())  # the embedding is left as it is
    assert emb.codes.dtype == torch.uint8
    ids = torch.tensor([[5, 17, 300, 999, 2]])
    with torch.no_grad():
        ref = q(input_ids=ids).last_hidden_state
    q.save_pretrained(tmp_path / "q")
    back = transformers.AutoModel.from_pretrained(tmp_path / "q", trust_remote_code=True)
    with torch.no_grad():
        got = back(input_ids=ids).last_hidden_state
    assert torch.allclose(got, ref, atol=1e-5)
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "q") < size(tmp_path / "m")
