"""The runtime format on tiny random models of eight architectures (issue 2, item 5).

One saved directory per architecture (its richest head); a fresh interpreter where hf_embcomp cannot be
imported loads every Auto head listed in its auto_map and compares outputs with the in-memory model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import hf_embcomp
from tests.support.isolated import run_isolated
from tests.support.tiny import ARCHS, V, tiny_model

EMB_TENSORS = ("lowrank_a", "lowrank_b")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """arch -> (dir, stock model, compressed model, ids, reference outputs)."""
    root = tmp_path_factory.mktemp("archs")
    out = {}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, V, (2, 9), generator=gen)
    for arch in ARCHS:
        stock = tiny_model(arch)
        comp = hf_embcomp.compress(stock, "svd", ratio=None, rank=4)
        with torch.no_grad():
            logits = comp(input_ids=ids).logits
            hidden = comp.base_model(input_ids=ids).last_hidden_state
        d = root / arch
        hf_embcomp.save_compressed(comp, d)
        stock.save_pretrained(root / f"{arch}_stock")
        torch.save({"ids": ids, "logits": logits, "hidden": hidden}, root / f"{arch}.pt")
        out[arch] = (d, stock, comp, ids, root / f"{arch}.pt")
    return out


def test_config_format(saved):
    for arch, (d, stock, comp, _, _) in saved.items():
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["model_type"] == "embcomp"
        assert cfg["backbone_model_type"] == stock.config.model_type
        block = cfg["embedding_compression"]
        assert block["method"] == "svd" and block["num_embeddings"] == V
        assert cfg["auto_map"]["AutoConfig"] == "configuration_embcomp.EmbCompConfig"
        assert "AutoModel" in cfg["auto_map"]
        # the backbone's usual fields stay readable as usual
        assert comp.config.vocab_size == V and comp.config.hidden_size == stock.config.hidden_size
        assert isinstance(comp.config, type(stock.config))
        # the same three-plus runtime files in every repository
        py = sorted(p.name for p in d.glob("*.py"))
        assert py == sorted(p.name for p in saved["bert"][0].glob("*.py"))
        assert {"configuration_embcomp.py", "modeling_embcomp.py", "embcomp_layers.py"} <= set(py)


def test_safetensors_keys_are_stock_except_embedding(saved, tmp_path):
    for arch, (d, stock, comp, _, _) in saved.items():
        stock_dir = tmp_path / arch
        stock.save_pretrained(stock_dir)
        with safe_open(str(stock_dir / "model.safetensors"), "pt") as f:
            stock_keys = set(f.keys())
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        emb = comp._embcomp_embedding_names[0]
        ours = {f"{emb}.{t}" for t in EMB_TENSORS}
        assert keys - ours == stock_keys - {f"{emb}.weight"}, arch
        assert ours <= keys
        # no full V x d matrix stored, except an untied lm_head (qwen2 default)
        full = [k for k, s in shapes.items() if s == (V, stock.config.hidden_size)]
        untied = [] if getattr(stock.config, "tie_word_embeddings", True) else ["lm_head.weight"]
        assert full == untied, (arch, full)


def test_reload_every_head_without_package(saved, tmp_path):
    dirs = {arch: (str(v[0]), str(v[4])) for arch, v in saved.items()}
    result = run_isolated(
        f"""
import json, torch, transformers
from transformers import CONFIG_MAPPING
dirs = {json.dumps(dirs)}
report = {{}}
for arch, (d, refp) in dirs.items():
    ref = torch.load(refp)
    cfg = json.load(open(d + "/config.json"))
    bmt = cfg["backbone_model_type"]
    saved_head = cfg["architectures"][0]
    rows = []
    for auto_name, target in cfg["auto_map"].items():
        if auto_name == "AutoConfig":
            continue
        auto = getattr(transformers, auto_name)
        try:
            model, info = auto.from_pretrained(d, trust_remote_code=True, output_loading_info=True)
        except ValueError as e:
            assert "does not match the checkpoint" in str(e), str(e)
            # refused only where the stock head also loses the token embedding from the stock checkpoint
            _, stock_info = auto.from_pretrained(d + "_stock", output_loading_info=True)
            assert any("emb" in k or "wte" in k for k in stock_info["missing_keys"]), (arch, auto_name, stock_info)
            rows.append([auto_name, "refused"])
            continue
        stock = auto._model_mapping[CONFIG_MAPPING[bmt]]
        stock = stock[0] if isinstance(stock, tuple) else stock
        assert isinstance(model, stock), (arch, auto_name, type(model).__mro__)
        assert model.__class__.__module__.startswith("transformers_modules"), model.__class__.__module__
        assert isinstance(model.config, CONFIG_MAPPING[bmt])
        with torch.no_grad():
            if target.endswith("." + saved_head):
                diff = float((model(input_ids=ref["ids"]).logits - ref["logits"]).abs().max())
            else:
                out = model.base_model(input_ids=ref["ids"]).last_hidden_state
                diff = float((out - ref["hidden"]).abs().max())
        rows.append([auto_name, diff])
    # no trust -> loud failure, never a stock model with a random embedding
    failures = 0
    for fn in (lambda: transformers.AutoConfig.from_pretrained(d), lambda: transformers.AutoModel.from_pretrained(d),
               lambda: transformers.AutoModel.from_pretrained(d, trust_remote_code=False)):
        try:
            fn()
        except ValueError as e:
            failures += "trust_remote_code=True" in str(e)
    # accelerate placement keeps outputs exact
    head_auto = [k for k, v in cfg["auto_map"].items() if v.endswith("." + saved_head)][0]
    for dm in ({{"": "cpu"}}, "auto"):
        m = getattr(transformers, head_auto).from_pretrained(d, trust_remote_code=True, device_map=dm)
        with torch.no_grad():
            rows.append(["device_map=" + str(dm), float((m(input_ids=ref["ids"]).logits - ref["logits"]).abs().max())])
    report[arch] = {{"rows": rows, "no_trust_failures": failures}}
emit(report)
""",
        tmp_path,
    )
    for arch, r in result.items():
        assert r["no_trust_failures"] == 3, arch
        diffs = {name: diff for name, diff in r["rows"]}
        assert len(diffs) >= 4, (arch, diffs)
        for name, diff in diffs.items():
            if diff != "refused":
                assert diff < 1e-5, (arch, name, diff)
        # the saved head and AutoModel are always compared
        assert diffs["AutoModel"] != "refused", arch


def test_tied_logits_are_computed_from_the_compressed_module(saved):
    for arch, (_, stock, comp, ids, _) in saved.items():
        emb = comp.get_compressed_embedding()
        if not comp._embcomp_output_names:
            assert not stock.config.tie_word_embeddings
            continue
        out = comp.get_output_embeddings()
        assert out._embcomp_source is emb
        h = torch.randn(3, emb.embedding_dim)
        expected = h @ emb.reconstruct().T
        if out.bias is not None:
            expected = expected + out.bias
        assert torch.allclose(out(h), expected, atol=1e-5), arch


def test_decompress_gives_the_stock_class(saved, tmp_path):
    for arch, (_, stock, comp, ids, _) in saved.items():
        dense = hf_embcomp.decompress(comp)
        assert type(dense) is type(stock)
        assert type(dense.get_input_embeddings()) is type(stock.get_input_embeddings())
        assert torch.allclose(dense.get_input_embeddings().weight, comp.get_compressed_embedding().reconstruct())
        with torch.no_grad():
            diff = (dense(input_ids=ids).logits - comp(input_ids=ids).logits).abs().max()
        assert diff < 1e-5, (arch, diff)
        dense.save_pretrained(tmp_path / arch)
        assert not list((tmp_path / arch).glob("*.py"))
        cfg = json.loads((tmp_path / arch / "config.json").read_text())
        assert cfg["model_type"] == stock.config.model_type and "auto_map" not in cfg


def test_runtime_errors_are_clear(saved):
    _, _, comp, _, _ = saved["bert"]
    with pytest.raises(IndexError, match="out of range"):
        comp(input_ids=torch.tensor([[V]]))
    with pytest.raises(NotImplementedError, match="decompress"):
        comp.resize_token_embeddings(V + 8)
    with pytest.raises(hf_embcomp.CompressionError, match="already compressed"):
        hf_embcomp.compress(comp, "svd", ratio=4)
    with pytest.raises(ValueError, match="unknown method"):
        hf_embcomp.compress(saved["bert"][1], "nope", ratio=4)
    with pytest.raises(hf_embcomp.RatioError, match="reachable range"):
        hf_embcomp.compress(saved["bert"][1], "svd", ratio=1e6)
    for bad in (1.0, 0.5, float("nan")):
        with pytest.raises(hf_embcomp.RatioError):
            hf_embcomp.compress(saved["bert"][1], "svd", ratio=bad)


def test_compress_is_not_in_place_and_float16_storage(saved, tmp_path):
    stock = tiny_model("llama")
    before = stock.get_input_embeddings().weight.clone()
    comp = hf_embcomp.compress(stock, "svd", ratio=4, dtype="float16")
    assert torch.equal(stock.get_input_embeddings().weight, before)
    hf_embcomp.save_compressed(comp, tmp_path / "f16")
    with safe_open(str(tmp_path / "f16" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys() if "lowrank" in k}
        stored = sum(f.get_tensor(k).numel() * 2 for k in dtypes)
    assert set(dtypes.values()) == {"F16"}
    block = comp.config.embedding_compression
    assert stored == block["stored_bytes"] and V * stock.config.hidden_size * 4 / stored == pytest.approx(block["compression_ratio"])
    assert block["compression_ratio"] >= 4


def test_entry_file_imports_every_runtime_file_directly():
    """transformers 4.x copies only the entry file's own relative imports with remote code (issue 17): the
    modelling file must import every runtime file itself, and the card states the minimum version."""
    from transformers.dynamic_module_utils import get_relative_imports

    from hf_embcomp.cards import render_card
    from hf_embcomp.hub_code.modeling_embcomp import MIN_TRANSFORMERS_VERSION

    folder = Path(hf_embcomp.__file__).parent / "hub_code"
    runtime = {p.stem for p in folder.glob("*.py") if p.stem not in ("__init__", "modeling_embcomp")}
    assert runtime <= set(get_relative_imports(str(folder / "modeling_embcomp.py")))
    comp = hf_embcomp.compress(tiny_model("bert"), "svd", 4)
    assert f"transformers >= {MIN_TRANSFORMERS_VERSION}" in render_card(comp.config, comp.compression_report)
