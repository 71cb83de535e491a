"""The seed methods of issue 4 - direction, distilled, dccl - on tiny random models.

For each method: the accounted bytes are the bytes in model.safetensors, the ratio is met, codes are
bit-packed uint8, the tied head computes hidden @ E_hat^T, and a fresh interpreter without hf_embcomp
reloads the saved repository with equal outputs. Plus one quick ``hf-embcomp distill`` run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import hf_embcomp
from hf_embcomp.cli import main as cli_main
from hf_embcomp.hub_code.embcomp_dccl import CompositionalCodeEmbedding
from hf_embcomp.methods import RatioError, get_method
from hf_embcomp.methods.dccl import DCCLConfig, pack_codes, refit_codebooks
from tests.support.isolated import run_isolated
from tests.support.tiny import V, tiny_model

RATIO = 8.0
# Short schedules: these tests check mechanics and format; bench/seed_methods.py measures quality.
FAST = {
    "direction": {"epochs": 2, "batch_size": 128},
    "distilled": {"epochs": 3, "batch_size": 256},
    "dccl": {"epochs": 2, "batch_size": 128},
}
TENSORS = {
    "direction": {"latents", "decoder_weight", "decoder_bias"},
    "distilled": {"lowrank_a", "lowrank_b", "mlp_in_weight", "mlp_in_bias", "mlp_out_weight", "mlp_out_bias"},
    "dccl": {"codes", "codebooks"},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small-batch training on a shared 2-core machine is several times faster on one thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """method -> (dir, compressed model, reference ids / logits file)."""
    root = tmp_path_factory.mktemp("seed")
    ids = torch.randint(4, V, (2, 7), generator=torch.Generator().manual_seed(1))
    out = {}
    for method, schedule in FAST.items():
        comp = hf_embcomp.compress(tiny_model("llama"), method, RATIO, **schedule)
        d = root / method
        hf_embcomp.save_compressed(comp, d)
        with torch.no_grad():
            torch.save({"ids": ids, "logits": comp(input_ids=ids).logits}, root / f"{method}.pt")
        out[method] = (d, comp, root / f"{method}.pt")
    return out


def _embedding_bytes(d: Path, prefix: str) -> tuple[int, dict]:
    total, dtypes = 0, {}
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.startswith(prefix):
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
                dtypes[k[len(prefix):]] = (t.dtype, tuple(t.shape))
    return total, dtypes


@pytest.mark.parametrize("method", list(FAST))
def test_stored_bytes_and_ratio(saved, method):
    d, comp, _ = saved[method]
    rep = json.loads((d / "compression_report.json").read_text())
    prefix = comp._embcomp_embedding_names[0] + "."
    nbytes, dtypes = _embedding_bytes(d, prefix)
    assert set(dtypes) == TENSORS[method]
    cfg = get_method(method).config_class(**rep["hyperparameters"])
    dim = comp.config.hidden_size
    assert nbytes == rep["stored_bytes"] == cfg.stored_bytes(V, dim)
    assert V * dim * 4 / nbytes >= RATIO
    assert rep["compression_ratio"] == pytest.approx(V * dim * 4 / nbytes)
    for name, (dtype, _) in dtypes.items():
        assert dtype == (torch.uint8 if name == "codes" else torch.float32), name


def test_dccl_codes_are_bit_packed(saved):
    d, comp, _ = saved["dccl"]
    hp = json.loads((d / "config.json").read_text())["embedding_compression"]["hyperparameters"]
    m, bits = hp["num_codebooks"], hp["bits"]
    _, dtypes = _embedding_bytes(d, comp._embcomp_embedding_names[0] + ".")
    assert dtypes["codes"] == (torch.uint8, (V, math.ceil(m * bits / 8)))
    assert dtypes["codebooks"][1] == (m, 2**bits, comp.config.hidden_size)
    # pack / unpack at an unaligned width (5 codes of 3 bits = 15 bits -> 2 bytes a row)
    codes = torch.randint(0, 8, (37, 5), generator=torch.Generator().manual_seed(0))
    packed = pack_codes(codes, 3)
    assert packed.dtype == torch.uint8 and packed.shape == (37, 2)
    emb = CompositionalCodeEmbedding({"num_embeddings": 37, "embedding_dim": 4,
                                      "hyperparameters": {"num_codebooks": 5, "bits": 3}})
    assert torch.equal(emb.unpack_codes(packed), codes)


def test_dccl_codebook_refit_is_least_squares():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 4, (300, 3), generator=gen)
    true = torch.randn(3, 4, 5, generator=gen)
    e = true[torch.arange(3), codes].sum(1)  # exactly representable
    fit = refit_codebooks(e, codes, 4)
    assert torch.allclose(fit[torch.arange(3), codes].sum(1), e, atol=1e-4)


@pytest.mark.parametrize("method", list(FAST))
def test_tied_head_and_lookup_match_reconstruction(saved, method):
    _, comp, ref = saved[method]
    ids = torch.load(ref)["ids"]
    emb = comp.get_compressed_embedding()
    with torch.no_grad():
        e_hat = emb.reconstruct()
        hidden = comp.model(input_ids=ids).last_hidden_state
        logits = comp(input_ids=ids).logits
        assert torch.allclose(emb(ids), e_hat[ids], atol=1e-6)
        assert torch.allclose(logits, hidden @ e_hat.T, atol=1e-5, rtol=1e-4)


def test_ratio_errors_give_the_reachable_range():
    for method in FAST:
        with pytest.raises(RatioError, match="reachable range is 1 < ratio <= "):
            get_method(method).config_class.from_ratio(V, 32, 1e6)
    cfg = DCCLConfig.from_ratio(30522, 384, 25)
    assert cfg.num_codebooks == 46 and 30522 * 384 * 4 / cfg.stored_bytes(30522, 384) >= 25
    assert 30522 * 384 * 4 / DCCLConfig(num_codebooks=47).stored_bytes(30522, 384) < 25


@pytest.fixture(scope="module")
def distilled_run(saved, tmp_path_factory):
    """A tiny causal LM with a real tokenizer, compressed with ``distilled`` and run through ``hf-embcomp distill``."""
    root = tmp_path_factory.mktemp("distill")
    tok = transformers.AutoTokenizer.from_pretrained(hf_embcomp.io.default_model_path())
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(cfg).eval()
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    comp = hf_embcomp.compress(teacher, "distilled", 8, tokenizer=tok, epochs=2, batch_size=4096)
    hf_embcomp.save_compressed(comp, root / "student")
    from hf_embcomp import data

    (root / "text.txt").write_text(data.wiki_text()[100_000:106_000])
    rc = cli_main(["distill", str(root / "student"), "--teacher", str(root / "teacher"), "--data",
                   str(root / "text.txt"), "--output", str(root / "out"), "--max-steps", "8", "--seq-len", "32",
                   "--batch-size", "2", "--heldout-tokens", "256", "--eval-window", "32", "--lr", "5e-2", "--quiet"])
    assert rc == 0
    return root


def test_distill_reports_heldout_gain(distilled_run):
    rep = json.loads((distilled_run / "out" / "compression_report.json").read_text())
    kd = rep["recovery"]
    assert rep["method"] == "distilled" and kd["metric"] == "held-out perplexity"
    assert kd["trained_parameters"] > 0 and kd["heldout_tokens"] == 256 and kd["steps"] == 8
    before, after = kd["before"], kd["after"]
    assert math.isfinite(before) and math.isfinite(after) and after != before
    assert (after < before) == (kd["kept"] == "recovered")  # the better of the two is what was saved
    # stored bytes are unchanged by the fine-tune
    student = distilled_run / "student"
    pre = "model.embed_tokens."
    assert _embedding_bytes(distilled_run / "out", pre)[0] == _embedding_bytes(student, pre)[0]


def test_reload_without_package(saved, distilled_run, tmp_path):
    dirs = {m: (str(d), str(ref)) for m, (d, _, ref) in saved.items()}
    out = distilled_run / "out"
    ids = torch.randint(0, 30000, (1, 9), generator=torch.Generator().manual_seed(2))
    from hf_embcomp.training.distill import load_compressed

    with torch.no_grad():
        torch.save({"ids": ids, "logits": load_compressed(out)(input_ids=ids).logits}, tmp_path / "kd.pt")
    dirs["distill"] = (str(out), str(tmp_path / "kd.pt"))
    res = run_isolated(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        res = {{}}
        for name, (d, ref) in {dirs!r}.items():
            r = torch.load(ref)
            m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
            with torch.no_grad():
                logits = m(input_ids=r["ids"]).logits
            res[name] = [type(m.get_input_embeddings()).__name__, float((logits - r["logits"]).abs().max())]
        print(json.dumps(res))
        """,
        tmp_path,
    )
    expected = {"direction": "DirectionEmbedding", "distilled": "DistilledEmbedding",
                "dccl": "CompositionalCodeEmbedding", "distill": "DistilledEmbedding"}
    for name, (cls, diff) in res.items():
        assert cls == expected[name] and diff < 1e-5, (name, cls, diff)
