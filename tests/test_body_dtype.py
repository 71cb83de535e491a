"""Issue 17, body dtype: the body keeps the source's precision class (``--body-dtype`` overrides) and the report
gives the whole model's stored bytes before and after."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import hf_embcomp
from hf_embcomp.body import gguf_body_info, resolve_body_dtype, state_dict_bytes
from hf_embcomp.io import SOURCE_ATTRIBUTE, save_compressed

from tests.support.tiny import tiny_model


def _safetensors_bytes(path) -> tuple[int, dict[str, torch.dtype]]:
    total, dtypes = 0, {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            total += t.numel() * t.element_size()
            dtypes[k] = t.dtype
    return total, dtypes


@pytest.mark.parametrize("requested, expected", [("auto", torch.float32), ("bfloat16", torch.bfloat16),
                                                 ("float16", torch.float16)])
def test_body_dtype_saved_and_report_bytes(tmp_path, requested, expected):
    src = tiny_model("llama")
    comp = hf_embcomp.compress(src, "lighttoken", 8, body_dtype=requested)
    save_compressed(comp, tmp_path / "m")
    stored, dtypes = _safetensors_bytes(tmp_path / "m" / "model.safetensors")
    body = {k: t for k, t in dtypes.items() if "embed_tokens" not in k}
    assert body and set(body.values()) == {expected}
    # the compressed embedding keeps its storage dtype (lighttoken: float16) whatever the body dtype
    emb = {k: t for k, t in dtypes.items() if "embed_tokens" in k and t.is_floating_point}
    assert set(emb.values()) == {torch.float16}
    rep = json.loads((tmp_path / "m" / "compression_report.json").read_text())
    assert rep["body_dtype"] == str(expected).replace("torch.", "")
    assert rep["model_bytes"] == stored
    assert rep["source_model_bytes"] == state_dict_bytes(src)
    assert rep["model_compression_ratio"] == pytest.approx(rep["source_model_bytes"] / stored)
    card = (tmp_path / "m" / "README.md").read_text()
    assert f"{stored:,} bytes stored" in card and f"{rep['source_model_bytes']:,} in the source" in card


def test_auto_follows_the_source_precision_class():
    m = tiny_model("bert")
    assert resolve_body_dtype(m) == torch.float32
    assert resolve_body_dtype(m.to(torch.bfloat16)) == torch.bfloat16
    setattr(m, SOURCE_ATTRIBUTE, {"body_dtype": "float16"})  # as load_model sets it for a F16 GGUF file
    assert resolve_body_dtype(m, "auto") == torch.float16
    assert resolve_body_dtype(m, "float32") == torch.float32
    with pytest.raises(ValueError, match="body_dtype must be one of .*--body-dtype"):
        resolve_body_dtype(m, "int8")


def test_gguf_body_info_of_smollm2(smollm_gguf):
    dtype, total = gguf_body_info(smollm_gguf)
    assert dtype == "gguf"  # Q4_1 matrices: kept as their blocks
    assert 0.9 * smollm_gguf.stat().st_size < total <= smollm_gguf.stat().st_size


def test_cli_body_dtype_flag(tmp_path, capsys):
    from hf_embcomp.cli import build_parser

    args = build_parser().parse_args(["compress", "--body-dtype", "float16", "-o", str(tmp_path)])
    assert args.body_dtype == "float16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "--body-dtype", "int8", "-o", str(tmp_path)])
