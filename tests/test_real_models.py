"""Issue 2 acceptance on the real models: the embedded all-MiniLM-L6-v2 and SmolLM2-135M (GGUF).

The CLI and the Python API must write the same repository; it must reload, without hf_embcomp, through
every Auto head, pipelines and sentence-transformers, with outputs equal to the in-memory model's.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import hf_embcomp
from hf_embcomp import cli
from hf_embcomp.io import load_model
from tests.support.isolated import run_isolated

pytestmark = pytest.mark.slow


def wiki_sentences(n: int) -> list[str]:
    """The first ``n`` sentences of 6-40 words of the gensim Wikipedia text (real, offline)."""
    from hf_embcomp.data import wiki_text

    out = []
    for s in re.split(r"(?<=[.!?])\s+", wiki_text()):
        s = " ".join(s.split())
        if 6 <= len(s.split()) <= 40:
            out.append(s)
        if len(out) == n:
            break
    assert len(out) == n
    return out


def safetensors_embedding_bytes(path: Path, prefix: str) -> int:
    """Bytes of the tensors under ``prefix`` read from the safetensors header (not from our report)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k.startswith(prefix))


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def test_minilm_cli_equals_api_and_reloads_everywhere(tmp_path, capsys):
    d_cli, d_api = tmp_path / "cli", tmp_path / "api"
    assert cli.main(["compress", "--method", "svd", "--ratio", "8", "--output", str(d_cli), "--quiet"]) == 0
    summary = capsys.readouterr().out
    assert "compression ratio" in summary

    src = load_model(None)
    comp = hf_embcomp.compress(src.model, "svd", 8, source=src.name, tokenizer=src.tokenizer,
                               source_folder=str(src.folder))
    comp.save_pretrained(d_api)  # the plain transformers call gives the same repository as the CLI

    files = sorted(p.relative_to(d_cli).as_posix() for p in d_cli.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(d_api).as_posix() for p in d_api.rglob("*") if p.is_file())
    for f in ("model.safetensors", "config.json", "README.md", "compression_report.json", "tokenizer.json",
              "modules.json", "1_Pooling/config.json", "modeling_embcomp.py", "configuration_embcomp.py"):
        assert f in files, f
    assert json.loads((d_cli / "config.json").read_text()) == json.loads((d_api / "config.json").read_text())
    with safe_open(str(d_cli / "model.safetensors"), "pt") as a, safe_open(str(d_api / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k

    report = json.loads((d_cli / "compression_report.json").read_text())
    for key in ("method", "hyperparameters", "num_embeddings", "embedding_dim", "source_dtype", "stored_bytes",
                "compression_ratio", "compression_ratio_vs_source", "fit_seconds", "fidelity"):
        assert key in report, key
    stored = safetensors_embedding_bytes(d_cli / "model.safetensors", "embeddings.word_embeddings.")
    assert stored == report["stored_bytes"]
    assert 30522 * 384 * 4 / stored == pytest.approx(report["compression_ratio"], rel=1e-12)
    assert report["compression_ratio"] >= 8.0
    assert set(report["fidelity"]) == {"row_cosine_mean", "row_cosine_p01", "relative_frobenius_error"}

    sentences = wiki_sentences(200)
    tok = src.tokenizer
    with torch.no_grad():
        enc = tok(sentences[:16], padding=True, truncation=True, max_length=128, return_tensors="pt")
        ref_hidden = comp(**enc).last_hidden_state
        cos = []
        for i in range(0, 200, 50):
            e = tok(sentences[i : i + 50], padding=True, truncation=True, max_length=128, return_tensors="pt")
            a = mean_pool(comp(**e).last_hidden_state, e["attention_mask"])
            b = mean_pool(src.model(**e).last_hidden_state, e["attention_mask"])
            cos.append(torch.nn.functional.cosine_similarity(a, b, dim=-1))
        sent_cos = float(torch.cat(cos).mean())
        st_ref = torch.nn.functional.normalize(mean_pool(ref_hidden, enc["attention_mask"]), dim=-1)
    print(f"\nMiniLM svd 8x: ratio {report['compression_ratio']:.3f}, row cos {report['fidelity']['row_cosine_mean']:.4f}, "
          f"sentence cos (mean pooling, 200 wiki sentences) {sent_cos:.4f}")
    assert 0.0 < sent_cos < 0.9999  # compression changed the model, and not into noise
    torch.save({"hidden": ref_hidden, "st": st_ref}, tmp_path / "ref.pt")

    res = run_isolated(
        f"""
import torch, transformers
from transformers import AutoTokenizer, pipeline
d = {str(d_cli)!r}
sentences = {sentences[:16]!r}
ref = torch.load({str(tmp_path / 'ref.pt')!r})
tok = AutoTokenizer.from_pretrained(d)
enc = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
out = {{}}
m = transformers.AutoModel.from_pretrained(d, trust_remote_code=True)
with torch.no_grad():
    out["AutoModel"] = float((m(**enc).last_hidden_state - ref["hidden"]).abs().max())
for name in ["AutoModelForMaskedLM", "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
             "AutoModelForQuestionAnswering"]:
    h = getattr(transformers, name).from_pretrained(d, trust_remote_code=True)
    assert type(h).__name__.startswith("EmbComp"), type(h)
    with torch.no_grad():
        out[name] = float((h.base_model(**enc).last_hidden_state - ref["hidden"]).abs().max())
fe = pipeline("feature-extraction", model=d, trust_remote_code=True)
first = torch.tensor(fe(sentences[0])[0])
n = int(enc["attention_mask"][0].sum())
out["pipeline"] = float((first - ref["hidden"][0, :n]).abs().max())
from sentence_transformers import SentenceTransformer
st = SentenceTransformer(d, trust_remote_code=True, device="cpu")
emb = st.encode(sentences, convert_to_tensor=True)
out["SentenceTransformer"] = float((emb - ref["st"]).abs().max())
emit(out)
""",
        tmp_path,
    )
    assert set(res) == {"AutoModel", "AutoModelForMaskedLM", "AutoModelForSequenceClassification",
                        "AutoModelForTokenClassification", "AutoModelForQuestionAnswering", "pipeline",
                        "SentenceTransformer"}
    for name, diff in res.items():
        assert diff < 1e-5, (name, diff)


def test_smollm2_gguf_tied_head_reload_and_generate(tmp_path, smollm_gguf):
    src = load_model(smollm_gguf)
    assert src.embedding_dtype == "Q8_0" and src.embedding_bytes < 49152 * 576 * 2
    assert src.label == str(smollm_gguf)  # the file named once (was PATH::FILE)
    comp = hf_embcomp.compress(src.model, "svd", 8, source=str(smollm_gguf), source_dtype=src.embedding_dtype,
                               source_embedding_bytes=src.embedding_bytes, tokenizer=src.tokenizer)
    assert comp._embcomp_output_names == ["lm_head"]
    d = tmp_path / "smol"
    hf_embcomp.save_compressed(comp, d)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        big = [k for k in f.keys() if tuple(f.get_slice(k).get_shape()) == (49152, 576)]
    assert big == []  # the tied head is computed from the compressed module, no dense copy
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg  # saved dequantized: the GGUF quantization does not carry over
    assert not list(d.glob("__init__.py"))
    report = json.loads((d / "compression_report.json").read_text())
    assert report["compression_ratio"] >= 8 and report["compression_ratio_vs_source"] < report["compression_ratio"]
    # the default body keeps the file's Q4_1 blocks: bit for bit the source's weights, smaller than the GGUF file
    assert report["body_format"] == "GGUF Q4_1 blocks for 210 linear layers, float32 elsewhere"
    assert torch.equal(comp.model.layers[7].self_attn.k_proj.weight, src.model.model.layers[7].self_attn.k_proj.weight)
    assert (d / "model.safetensors").stat().st_size < smollm_gguf.stat().st_size

    prompt = "The capital of France is"
    enc = src.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ref_logits = comp(**enc).logits
        ref_gen = comp.generate(**enc, max_new_tokens=10, do_sample=False)
    torch.save({"logits": ref_logits, "gen": ref_gen}, tmp_path / "ref.pt")
    res = run_isolated(
        f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
d = {str(d)!r}
ref = torch.load({str(tmp_path / 'ref.pt')!r})
tok = AutoTokenizer.from_pretrained(d)
m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
enc = tok({prompt!r}, return_tensors="pt")
with torch.no_grad():
    diff = float((m(**enc).logits - ref["logits"]).abs().max())
    gen = m.generate(**enc, max_new_tokens=10, do_sample=False)
pipe = pipeline("text-generation", model=d, trust_remote_code=True)
text = pipe({prompt!r}, max_new_tokens=5, do_sample=False)[0]["generated_text"]
emit({{"diff": diff, "same_generation": bool(torch.equal(gen, ref["gen"])), "new_tokens": gen.shape[1] - enc["input_ids"].shape[1],
      "pipeline_text": text}})
""",
        tmp_path,
    )
    assert res["diff"] < 1e-5, res
    assert res["same_generation"] and res["new_tokens"] == 10
    assert res["pipeline_text"].startswith(prompt)
