"""Issue 17: the runtime also loads under transformers 4.57 (the version optimum-onnx pins). CI has one venv (v5), so
these tests run the 4.x branches of the feature detection here, against what v5 gives; the end-to-end 4.57 run
(load, optimum-cli export, onnxruntime) is manual and recorded in the README, "Deploy"."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import PreTrainedModel

import hf_embcomp
from hf_embcomp.hub_code.configuration_embcomp import legacy_rope_fields
from hf_embcomp.hub_code.modeling_embcomp import _GuardedTorchInit, declared_ties
from hf_embcomp.io import _portable_tokenizer_config
from tests.support.tiny import tiny_model


class _LlamaConfig4:
    """The 4.x constructor signature of LlamaConfig (rope_theta / rope_scaling, no rope_parameters)."""

    def __init__(self, vocab_size=32000, rope_theta=10000.0, rope_scaling=None, partial_rotary_factor=None, **kw):
        pass


class _Gemma3TextConfig4:
    def __init__(self, rope_theta=1_000_000.0, rope_scaling=None, rope_local_base_freq=10_000.0, **kw):
        pass


def test_v5_rope_parameters_become_4x_fields():
    smol = {"vocab_size": 49152, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    assert legacy_rope_fields(smol, _LlamaConfig4) == {**smol, "rope_theta": 100000.0}
    scaled = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}}
    assert legacy_rope_fields(scaled, _LlamaConfig4)["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}
    gemma = {"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                                 "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}}
    out = legacy_rope_fields(gemma, _Gemma3TextConfig4)
    assert (out["rope_theta"], out["rope_local_base_freq"]) == (1e6, 1e4) and "rope_scaling" not in out
    with pytest.raises(ValueError, match="upgrade transformers to 5.x"):
        legacy_rope_fields({"rope_parameters": {"chunked_attention": {}}}, _LlamaConfig4)
    # v5 config classes, configs without RoPE and 4.x configs without RoPE fields are left alone (the same object)
    for d, cls in ((smol, transformers.LlamaConfig), ({"vocab_size": 3}, _LlamaConfig4), (smol, transformers.BertConfig)):
        assert legacy_rope_fields(d, cls) is d


def test_v5_config_of_a_compressed_llama_reads_back_under_4x_fields(tmp_path):
    """The rope_theta a 4.x LlamaConfig would get from a config.json this package writes (v5) is the model's."""
    stock = tiny_model("llama")
    stock.config.rope_parameters = {"rope_theta": 12345.0, "rope_type": "default"}
    hf_embcomp.save_compressed(hf_embcomp.compress(stock, "svd", 4), tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "rope_theta" not in raw  # v5 writes rope_parameters only: without the translation 4.x would use 10000
    assert legacy_rope_fields(raw, _LlamaConfig4)["rope_theta"] == 12345.0


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_4x_tie_discovery_equals_v5(arch, monkeypatch):
    """Without ``get_expanded_tied_weights_keys`` (4.x), ties come from get_output_embeddings, as 4.x ties them."""
    model = tiny_model(arch)
    subs = [m for m in model.modules() if isinstance(m, PreTrainedModel)]

    def to_embedding(sub, ties):  # the ties that matter to the swap (v5 also lists e.g. BERT's decoder bias)
        emb = {f"{n}.weight" for n, m in sub.named_modules() if m is sub.get_input_embeddings()}
        return {t: s for t, s in ties.items() if emb & {t, s}}

    v5 = [to_embedding(m, declared_ties(m)) for m in subs]
    assert any(v5)
    monkeypatch.delattr(PreTrainedModel, "get_expanded_tied_weights_keys")
    assert [declared_ties(m) for m in subs] == v5
    model.config.tie_word_embeddings = False
    assert declared_ties(model) == {}


def test_guarded_init_skips_loaded_tensors():
    loaded, missing = torch.full((3,), 7.0), torch.full((3,), 7.0)
    loaded._is_hf_initialized = True
    _GuardedTorchInit.zeros_(loaded)
    _GuardedTorchInit.zeros_(missing)
    _GuardedTorchInit.normal_(loaded, std=0.02)
    assert torch.equal(loaded, torch.full((3,), 7.0)) and torch.equal(missing, torch.zeros(3))


def test_export_model_type_is_the_backbone():
    """optimum's exporter reads config.export_model_type before model_type: the stock OnnxConfig applies."""
    comp = hf_embcomp.compress(tiny_model("bert"), "svd", 4)
    assert comp.config.model_type == "embcomp" and comp.config.export_model_type == "bert"
    assert "export_model_type" not in comp.config.to_dict()


def test_tokenizer_class_is_portable():
    v5 = json.dumps({"tokenizer_class": "TokenizersBackend", "eos_token": "<|im_end|>"}).encode()
    assert json.loads(_portable_tokenizer_config(v5)) == {"tokenizer_class": "PreTrainedTokenizerFast",
                                                          "eos_token": "<|im_end|>"}
    bert = json.dumps({"tokenizer_class": "BertTokenizer"}).encode()
    assert _portable_tokenizer_config(bert) is bert
    assert transformers.PreTrainedTokenizerFast is transformers.TokenizersBackend  # the same class in v5
