"""Issue 17, ONNX export: every method exports with torch.onnx, the graph keeps the embedding compressed (codes as
integer initializers, no dense V x d tensor) and onnxruntime matches torch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import hf_embcomp
from hf_embcomp.export import (
    FOLD_LIMIT,
    WITH_PAST,
    ExportError,
    compare_with_past,
    export_model_onnx,
    export_onnx,
    initializer_summary,
    ort_outputs,
    past_names,
    sample_inputs,
)
from hf_embcomp.hub_code.embcomp_base import is_exporting
from tests.support.tiny import ARCHS, V, tiny_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

METHODS = ["svd", "lighttoken", "direction", "distilled", "dccl", "gptq"]
_EXTRA = {"lighttoken": {"token_counts": torch.arange(V).flip(0)}, "gptq": {"calibration": None},
          "dccl": {"calibration": None}}


def _compress(model, method):
    return hf_embcomp.compress(model, method, 8, **_EXTRA.get(method, {})).eval()


def _initializers(path):
    return {i.name: i for i in onnx.load(str(path)).graph.initializer}


def _check_compressed_graph(path, comp):
    """No initializer as big as the dense matrix; every integer tensor of the embedding is an integer initializer."""
    d = comp.get_compressed_embedding().embedding_dim
    inits = _initializers(path)
    biggest = max(int(np.prod(i.dims)) for i in inits.values())
    assert biggest < V * d / 2, biggest
    emb = comp.get_compressed_embedding()
    for name, buf in emb.named_buffers(recurse=False):
        if not buf.is_floating_point() and buf.numel() > FOLD_LIMIT:  # small ones may be folded into constants
            hits = [i for n, i in inits.items() if n.endswith(f"embed_tokens.{name}")]
            assert hits, f"{name} is not an initializer of the graph"
            assert onnx.helper.tensor_dtype_to_np_dtype(hits[0].data_type) == buf.numpy().dtype


@pytest.mark.parametrize("method", METHODS)
def test_causal_lm_exports_compressed_and_matches_torch(tmp_path, method):
    comp = _compress(tiny_model("llama"), method)
    path = tmp_path / "model.onnx"
    names = export_model_onnx(comp, path, "text-generation")
    assert names == ["input_ids", "attention_mask"]
    _check_compressed_graph(path, comp)
    # another batch / length than the traced example: the axes are dynamic
    inputs = sample_inputs(names, V, batch=3, seq=13, seed=1)
    with torch.no_grad():
        ref = comp(**inputs, use_cache=False).logits.numpy()
    got = ort_outputs(path, {k: v.numpy() for k, v in inputs.items()})
    assert got.shape == ref.shape
    assert float(np.abs(got - ref).max()) < 1e-4
    assert not is_exporting()  # nothing leaks out of the trace


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_causal_lm_with_past_default_export(tmp_path):
    """A causal LM exports with the key/value cache by default, in optimum's names and axes; onnxruntime greedy
    decoding from an empty cache gives torch's logits at every position and torch's tokens."""
    comp = _compress(tiny_model("llama"), "gptq")
    hf_embcomp.save_compressed(comp, tmp_path / "m")
    rep = export_onnx(tmp_path / "m", tmp_path / "onnx")
    n = comp.config.num_hidden_layers
    assert rep["task"] == WITH_PAST and rep["inputs"] == ["input_ids", "attention_mask", "position_ids", *past_names(n)]
    assert rep["ort_max_abs_diff"] < 1e-4 and rep["ort_greedy_equal"] is True
    path = tmp_path / "onnx" / "model.onnx"
    _check_compressed_graph(path, comp)
    graph = onnx.load(str(path)).graph
    ins, outs = {i.name: _dims(i) for i in graph.input}, {o.name: _dims(o) for o in graph.output}
    total = "past_sequence_length + sequence_length"
    assert ins["attention_mask"] == ["batch_size", total] and ins["position_ids"] == ["batch_size", "sequence_length"]
    assert ins["past_key_values.0.key"][::2] == ["batch_size", "past_sequence_length"]
    assert list(outs) == ["logits", *past_names(n, "present")] and outs["present.1.value"][::2] == ["batch_size", total]
    assert json.loads((tmp_path / "onnx" / "config.json").read_text())["model_type"] == "llama"
    # another batch and prompt length than the traced ones, 12 steps from the cache
    ids = torch.randint(4, V, (3, 5), generator=torch.Generator().manual_seed(2))
    diff, same = compare_with_past(comp, path, ids, max_new_tokens=12)
    assert diff < 1e-4 and same


def test_sliding_window_with_past(tmp_path):
    """Gemma3 with a sliding window shorter than the sequence: the graph keeps the full cache and the mask applies
    the window, so decoding past the window still matches torch (whose own cache drops old tokens)."""
    kw = ARCHS["gemma3_text"][1]
    torch.manual_seed(0)
    stock = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(vocab_size=V, **{**kw, "sliding_window": 3}))
    comp = _compress(stock.eval(), "svd")
    export_model_onnx(comp, tmp_path / "model.onnx", WITH_PAST)
    ids = torch.randint(4, V, (2, 6), generator=torch.Generator().manual_seed(1))
    diff, same = compare_with_past(comp, tmp_path / "model.onnx", ids, max_new_tokens=8)
    assert diff < 1e-4 and same


def test_non_float32_model_is_refused_before_export(tmp_path):
    comp = _compress(tiny_model("llama"), "svd").to(torch.bfloat16)
    with pytest.raises(ExportError, match="bfloat16 weights.*hf-embcomp export onnx"):
        export_model_onnx(comp, tmp_path / "m.onnx", "text-generation")
    assert not (tmp_path / "m.onnx").exists()


def test_stock_export_is_bigger(tmp_path):
    stock = tiny_model("llama")
    comp = _compress(stock, "svd")
    export_model_onnx(stock, tmp_path / "stock.onnx", "text-generation")
    export_model_onnx(comp, tmp_path / "comp.onnx", "text-generation")
    size = {k: sum(v["bytes"] for v in initializer_summary(tmp_path / f"{k}.onnx").values()) for k in ("stock", "comp")}
    assert size["comp"] < 0.6 * size["stock"], size


@pytest.mark.parametrize("method", ["lighttoken", "gptq"])
def test_encoder_cli_export_folder(tmp_path, method, capsys):
    from hf_embcomp.cli import main

    torch.manual_seed(0)
    stock = transformers.BertForSequenceClassification(tiny_model("bert").config).eval()
    comp = _compress(stock, method)
    hf_embcomp.save_compressed(comp, tmp_path / "m")
    assert main(["export", "onnx", str(tmp_path / "m"), str(tmp_path / "onnx")]) == 0
    assert "max abs diff to torch" in capsys.readouterr().out
    out = tmp_path / "onnx"
    rep = json.loads((out / "export_report.json").read_text())
    assert rep["task"] == "text-classification" and rep["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert rep["ort_max_abs_diff"] < 1e-4
    assert "uint8" in rep["initializers"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["embedding_compression"]["method"] == method
    assert (out / "compression_report.json").is_file()
    # the feature-extraction graph of the same folder
    assert main(["export", "onnx", str(tmp_path / "m"), str(tmp_path / "fe"), "--task", "feature-extraction"]) == 0
    fe = transformers.AutoModel.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    inputs = sample_inputs(["input_ids", "attention_mask", "token_type_ids"], V, batch=2, seq=9, seed=3)
    with torch.no_grad():
        ref = fe(**inputs).last_hidden_state.numpy()
    got = ort_outputs(tmp_path / "fe" / "model.onnx", {k: v.numpy() for k, v in inputs.items()})
    assert float(np.abs(got - ref).max()) < 1e-4


def test_export_errors(tmp_path):
    from hf_embcomp.cli import main

    stock = tiny_model("bert")
    stock.save_pretrained(tmp_path / "stock")
    assert main(["export", "onnx", str(tmp_path / "stock"), str(tmp_path / "o")]) == 2
    comp = _compress(tiny_model("bert"), "svd")
    hf_embcomp.save_compressed(comp, tmp_path / "m")
    with pytest.raises(ExportError, match="unknown task 'translation'; choose one of"):
        export_onnx(tmp_path / "m", tmp_path / "o", task="translation")
    assert not (tmp_path / "o").exists()


def test_eager_range_check_and_exact_rows_lookup():
    comp = _compress(tiny_model("llama"), "lighttoken")
    emb = comp.get_compressed_embedding()
    assert emb.num_exact > 0
    with pytest.raises(IndexError, match="out of range"):
        emb(torch.tensor([[0, V]]))
    ids = torch.arange(V)
    exact = emb.exact_ids.long()
    full = emb(ids)
    assert torch.equal(full[exact], emb.exact_rows.to(full.dtype))  # the exact rows come back verbatim
    assert torch.allclose(emb.reconstruct(), full)


SENTENCES = [
    "A man is playing a guitar.",
    "The new movie is awesome, and the soundtrack is even better than the trailer suggested.",
    "Stocks fell.",
    "A woman is slicing an onion in the kitchen while the radio plays an old song about the sea.",
    "How do I reset my password?",
    "Compressed embeddings keep the model small enough for a phone.",
    "Two dogs run across the snowy field, chasing a red ball that keeps bouncing away from them.",
    "Yes.",
]


@pytest.mark.slow
def test_minilm_lighttoken_25x_onnx(tmp_path, minilm_path):
    """Issue 17 acceptance: MiniLM lighttoken 25x, ONNX file <= 1.05x model.safetensors, onnxruntime within 1e-4 of
    torch on 8 real sentences of mixed lengths (one padded batch), tokenizer files in the export folder.

    The 1e-4 holds on the attended tokens (measured 2.7e-6), and so on the masked mean pooling sentence-transformers
    computes from them. Padded positions are only bounded at 1e-3: no consumer reads them, and their float
    differences run larger (1.5e-4 measured with code refinement on; the stock MiniLM export's own: 1.6e-5)."""
    from hf_embcomp.body import state_dict_bytes
    from hf_embcomp.io import load_model

    src = load_model(minilm_path)
    comp = hf_embcomp.compress(src.model, "lighttoken", 25, tokenizer=src.tokenizer, source_folder=str(minilm_path),
                               calibration=None)  # the export, not the fit, is under test
    hf_embcomp.save_compressed(comp, tmp_path / "m")
    rep = export_onnx(tmp_path / "m", tmp_path / "onnx")
    size = (tmp_path / "onnx" / "model.onnx").stat().st_size
    assert size <= 1.05 * rep["safetensors_bytes"], (size, rep["safetensors_bytes"])
    assert size < 0.6 * state_dict_bytes(src.model)  # the stock fp32 model: 90.9 MB
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "onnx")
    enc = tok(SENTENCES, padding=True, return_tensors="np")
    got = ort_outputs(tmp_path / "onnx" / "model.onnx", dict(enc))
    model = transformers.AutoModel.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    with torch.no_grad():
        ref = model(**tok(SENTENCES, padding=True, return_tensors="pt")).last_hidden_state.numpy()
    mask = enc["attention_mask"].astype(bool)
    diff = np.abs(got - ref)
    assert float(diff[mask].max()) < 1e-4  # bounds the masked mean pooling's difference too
    assert float(diff.max()) < 1e-3
    assert (tmp_path / "onnx" / "modules.json").is_file()  # sentence-transformers files came along
