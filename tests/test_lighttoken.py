"""LightToken (issue 3): budget, stored bytes, packed codes, refit, fidelity vs SVD, reload, tied logits, seeds.

Offline; the fits are kept short (few epochs, small models or a row sample) so the file runs in a few
minutes on 2 cores. The full-quality numbers are in bench/lighttoken_vs_svd.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
from safetensors import safe_open

import hf_embcomp
from hf_embcomp.core import fidelity
from hf_embcomp.hub_code.embcomp_base import pack_bits, unpack_bits
from hf_embcomp.methods.base import RatioError
from hf_embcomp.methods.lighttoken import LightTokenConfig, _fit, _refine_codes, select_exact_ids
from hf_embcomp.methods.svd import SVDConfig, SVDMethod
from tests.support.isolated import run_isolated

FAST = {"epochs": 1, "batch_size": 512}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The fits are many small matmuls: one thread is faster than two on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def minilm_E(minilm_path):
    with safe_open(str(minilm_path / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("word_embeddings.weight"))
        return f.get_tensor(key).float()


def _tiny_bert(V=2000, d=64):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=V, hidden_size=d, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64)
    return BertModel(cfg).eval()


def _tiny_llama(V=1000, d=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _embedding_bytes(path, prefix_hint="embed"):
    total, keys = 0, {}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if any(p in k for p in ("lowrank_p", "lowrank_q", "codes", "decoder", "decoder_bias", "exact_ids", "exact_rows")):
                t = f.get_tensor(k)
                keys[k.rsplit(".", 1)[-1]] = t
                total += t.numel() * t.element_size()
    return total, keys


def test_budget_solver_meets_ratio_and_reports_range():
    V, d = 30522, 384
    for ratio in (25, 100):
        cands = LightTokenConfig.candidates(V, d, ratio)
        assert cands and all(V * d * 4 / c.stored_bytes(V, d) >= ratio for c in cands)
        cfg = LightTokenConfig.from_ratio(V, d, ratio)
        assert V * d * 4 / cfg.stored_bytes(V, d) >= ratio
        # the largest M: 8 more bits would break the budget
        bigger = dataclasses.replace(cfg, bits=cfg.stage_bits[:-1] + (cfg.stage_bits[-1] + 8,))
        assert V * d * 4 / bigger.stored_bytes(V, d) < ratio
    cfg = LightTokenConfig.from_ratio(V, d, 25, rank=8, stages=1)
    assert cfg.rank == 8 and cfg.stages == 1
    with pytest.raises(RatioError, match="reachable range"):
        LightTokenConfig.from_ratio(V, d, 5000)
    with pytest.raises(ValueError):
        LightTokenConfig(lam=1.0)


def test_pack_bits_round_trip():
    g = torch.Generator().manual_seed(0)
    for m in (1, 7, 8, 13, 408):
        bits = (torch.rand(33, m, generator=g) > 0.5).to(torch.uint8)
        packed = pack_bits(bits)
        assert packed.dtype == torch.uint8 and packed.shape == (33, (m + 7) // 8)
        assert torch.equal(unpack_bits(packed, m, torch.uint8), bits)
    # MSB first, as numpy.packbits
    assert pack_bits(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 1]])).tolist() == [[129, 128]]


@pytest.mark.parametrize("ratio", [25, 100])
def test_stored_bytes_equal_safetensors_bytes(tmp_path, ratio):
    model = _tiny_bert()
    V, d = 2000, 64
    comp = hf_embcomp.compress(model, "lighttoken", ratio, **FAST)
    rep = comp.compression_report
    comp.save_pretrained(tmp_path)
    total, tensors = _embedding_bytes(tmp_path)
    assert total == rep["stored_bytes"]
    assert V * d * 4 / total >= ratio
    cfg = LightTokenConfig(**{k: v for k, v in rep["hyperparameters"].items()})
    m = cfg.num_bits
    codes = tensors["codes"]
    assert codes.dtype == torch.uint8 and codes.shape == (V, (m + 7) // 8)  # bit-packed, 8 codes a byte
    assert tensors["decoder"].dtype == torch.float16
    # the packed codes read back from disk decode to the in-memory embedding
    emb = comp.get_compressed_embedding()
    assert torch.equal(codes, emb.codes)


def test_refit_never_worsens_reconstruction(minilm_E):
    rows = minilm_E[torch.randperm(minilm_E.shape[0], generator=torch.Generator().manual_seed(1))[:4096]]
    for rank in (0, 8):
        cfg = dataclasses.replace(LightTokenConfig.from_ratio(30522, 384, 25, rank=rank), dtype="float32", **FAST)
        st = _fit(rows, cfg, log=False)["stats"]
        assert st["after_refit"]["rel_frob"] <= st["before_refit"]["rel_frob"] + 1e-6
        for s in range(cfg.stages):
            assert st[f"stage{s + 1}"]["rel_frob_refit"] <= st[f"stage{s + 1}"]["rel_frob_hard"] + 1e-6


def test_code_refinement_finds_the_best_codes_and_never_worsens_a_row():
    g = torch.Generator().manual_seed(0)
    d, M, n = 12, 4, 64
    target = torch.randn(n, d, generator=g)
    c = 0.1 * torch.randn(d, generator=g)

    def err(B, W):
        return ((target - B.float() @ W.T - c) ** 2).sum(1)

    # orthogonal decoder columns: the bits decouple, so single-bit flips reach the exhaustive optimum
    W = torch.linalg.qr(torch.randn(d, M, generator=g))[0] * torch.tensor([3.0, 2.0, 1.5, 0.5])
    B = torch.randint(0, 2, (n, M), generator=g, dtype=torch.uint8)
    before = err(B, W)
    flipped = _refine_codes(target, B, W, c, n)
    every = torch.tensor(list(itertools.product([0, 1], repeat=M)), dtype=torch.float32)  # [2^M, M]
    best = ((target[:, None] - every @ W.T - c) ** 2).sum(-1).min(1).values
    assert flipped > 0 and (err(B, W) < before - 1e-4).any()
    assert torch.allclose(err(B, W), best, atol=1e-4)
    # any decoder: no row gets worse
    W = torch.randn(d, M, generator=g)
    B = torch.randint(0, 2, (n, M), generator=g, dtype=torch.uint8)
    before = err(B, W)
    _refine_codes(target, B, W, c, n)
    assert (err(B, W) <= before + 1e-5).all()


def test_code_rounds_lower_the_fit_error(minilm_E):
    rows = minilm_E[torch.randperm(minilm_E.shape[0], generator=torch.Generator().manual_seed(2))[:4096]]
    cfg = dataclasses.replace(LightTokenConfig.from_ratio(30522, 384, 100), dtype="float32", exact_rows=0, **FAST)
    off = _fit(rows, dataclasses.replace(cfg, code_sweeps=0), log=False)["stats"]["after_refit"]["rel_frob"]
    st = _fit(rows, dataclasses.replace(cfg, code_sweeps=2), log=False)["stats"]
    assert st["code_round1"]["flipped"] > 0
    assert st["code_round2"]["rel_frob"] <= st["code_round1"]["rel_frob"] + 1e-6
    assert st["after_refit"]["rel_frob"] < off


def test_beats_svd_at_same_bytes_on_minilm(minilm_E):
    V, d = minilm_E.shape
    cfg = dataclasses.replace(LightTokenConfig.from_ratio(V, d, 25), **FAST)
    svd_cfg = SVDConfig.from_ratio(V, d, 25, dtype="float16")
    assert cfg.stored_bytes(V, d) <= V * d * 4 / 25 and svd_cfg.stored_bytes(V, d) <= V * d * 4 / 25
    out = _fit(minilm_E, cfg, log=False)
    lt = fidelity(minilm_E, out["P"] @ out["Q"].T + out["B"].float() @ out["W"].T + out["c"])
    st = SVDMethod().fit(minilm_E, svd_cfg)
    sv = fidelity(minilm_E, st["lowrank_a"] @ st["lowrank_b"])
    assert lt["row_cosine_mean"] > sv["row_cosine_mean"] + 0.15
    assert lt["row_cosine_p01"] > sv["row_cosine_p01"]
    assert lt["relative_frobenius_error"] < sv["relative_frobenius_error"]


def test_same_seed_same_codes(minilm_E):
    rows = minilm_E[:3000]
    cfg = dataclasses.replace(LightTokenConfig.from_ratio(30522, 384, 100, rank=4), **FAST)
    a = _fit(rows, cfg, log=False)
    b = _fit(rows, cfg, log=False)
    c = _fit(rows, dataclasses.replace(cfg, seed=1), log=False)
    assert torch.equal(pack_bits(a["B"].to(torch.uint8)), pack_bits(b["B"].to(torch.uint8)))
    assert torch.equal(a["W"], b["W"]) and torch.equal(a["P"], b["P"])
    assert not torch.equal(a["B"], c["B"])


def test_lookup_and_reload_without_package(tmp_path):
    model = _tiny_bert()
    comp = hf_embcomp.compress(model, "lighttoken", 25, **FAST)  # float16 storage, float32 model
    emb = comp.get_compressed_embedding()
    ids = torch.randint(0, 2000, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(emb.embed(ids), emb.reconstruct()[ids], atol=1e-6)
        ref = comp(input_ids=ids).last_hidden_state
    comp.save_pretrained(tmp_path / "m")
    torch.save(ids, tmp_path / "ids.pt")
    code = f"""
        import json, torch
        from transformers import AutoModel
        m = AutoModel.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True).eval()
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        with torch.no_grad():
            out = m(input_ids=ids).last_hidden_state
        emb = m.get_input_embeddings()
        torch.save({{"out": out, "codes": emb.codes}}, {str(tmp_path / 'child.pt')!r})
        print(json.dumps({{"cls": type(emb).__name__, "module": type(emb).__module__}}))
    """
    res = run_isolated(code, tmp_path)
    assert res["cls"] == "LightTokenEmbedding" and "hf_embcomp" not in res["module"]
    child = torch.load(tmp_path / "child.pt")
    assert (child["out"] - ref).abs().max() < 1e-5
    assert torch.equal(child["codes"], emb.codes)


def test_tied_causal_lm_logits_from_factors():
    model = _tiny_llama()
    comp = hf_embcomp.compress(model, "lighttoken", 10, rank=4, **FAST)  # V = 1000 leaves no bits at 25x
    emb = comp.get_compressed_embedding()
    assert emb.rank == 4
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = comp(input_ids=ids, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        dense = emb.reconstruct()
        expect = hidden @ dense.T
        assert (out.logits - expect).abs().max() < 1e-4
        emb.logits_chunk = 300  # exercise the chunked path over the vocabulary
        assert (emb.compute_logits(hidden) - expect).abs().max() < 1e-4
        for rows in (0, 100):  # unpacked codes always / byte tables for these 18 hidden rows
            emb.logits_table_rows = rows
            assert (emb.compute_logits(hidden) - expect).abs().max() < 1e-4
            assert (emb.compute_logits(hidden[0, :1]) - expect[0, :1]).abs().max() < 1e-4
        emb.logits_table_rows = type(emb).logits_table_rows
        emb.materialize()
        assert (emb.compute_logits(hidden) - expect).abs().max() < 1e-4
        assert torch.allclose(emb.embed(ids), dense[ids])
        emb.materialize(False)
    assert emb.logits_cost()["cheaper"] in ("factored", "dense (materialize)")


def test_select_exact_ids_specials_then_most_frequent():
    counts = torch.tensor([5, 0, 9, 9, 1, 7, 0, 0])
    assert select_exact_ids(8, 4, counts, special_ids=[6, 6, 99]).tolist() == [2, 3, 5, 6]  # 99 >= V is ignored
    assert select_exact_ids(8, 2, counts).tolist() == [2, 3]
    assert select_exact_ids(8, 3, None, special_ids=[7]).tolist() == [0, 1, 7]  # no counts: lowest ids
    with pytest.raises(ValueError, match="shape"):
        select_exact_ids(8, 2, torch.ones(9))


def test_exact_rows_verbatim_in_lookup_logits_and_reload(tmp_path):
    model = _tiny_llama()
    E = model.get_input_embeddings().weight.detach().clone()
    counts = torch.zeros(1000, dtype=torch.int64)
    hot = torch.tensor([3, 17, 250, 999, 640, 41, 42, 43])
    counts[hot] = torch.arange(100, 108)
    comp = hf_embcomp.compress(model, "lighttoken", 10, rank=4, exact_rows=8, token_counts=counts, **FAST)
    emb = comp.get_compressed_embedding()
    assert emb.exact_ids.tolist() == sorted(hot.tolist())
    assert comp.compression_report["token_counts_source"] == "token_counts given by the caller"
    ids = torch.tensor([[3, 4, 999, 998, 250, 0]])
    with torch.no_grad():
        looked = emb(ids)[0]
        dense = emb.reconstruct()
        exact = torch.tensor([True, False, True, False, True, False])
        assert torch.allclose(looked[exact], E[ids[0][exact]], atol=2e-3)  # verbatim up to float16 rounding
        assert (looked[~exact] - E[ids[0][~exact]]).abs().max() > 1e-2  # the others are decoded (lossy)
        assert torch.allclose(looked, dense[ids[0]], atol=1e-6)
        out = comp(input_ids=ids, output_hidden_states=True)
        assert (out.logits - out.hidden_states[-1] @ dense.T).abs().max() < 1e-4
    comp.save_pretrained(tmp_path / "m")
    again = type(comp).from_pretrained(tmp_path / "m", trust_remote_code=True)
    assert torch.equal(again.get_compressed_embedding().exact_ids, emb.exact_ids)
    with torch.no_grad():
        assert (again(input_ids=ids).logits - out.logits).abs().max() < 1e-5


def test_weighted_refit_equals_repeated_rows():
    from hf_embcomp.losses import lighttoken_loss
    from hf_embcomp.methods.lighttoken import _lstsq

    g = torch.Generator().manual_seed(0)
    codes = (torch.rand(40, 6, generator=g) > 0.5).float()
    target = torch.randn(40, 5, generator=g)
    w = torch.randint(1, 4, (40,), generator=g)
    W1, c1 = _lstsq(codes, target, weight=w.float())
    W2, c2 = _lstsq(codes.repeat_interleave(w, 0), target.repeat_interleave(w, 0))
    assert torch.allclose(W1, W2, atol=1e-4) and torch.allclose(c1, c2, atol=1e-4)
    e, e_hat = torch.randn(40, 5, generator=g), torch.randn(40, 5, generator=g)
    assert torch.allclose(lighttoken_loss(e, e_hat, weight=w.float()),
                          lighttoken_loss(e.repeat_interleave(w, 0), e_hat.repeat_interleave(w, 0)), atol=1e-5)
    with pytest.raises(ValueError, match="freq_power"):
        LightTokenConfig(freq_power=2.0)


def test_corpus_picks_the_exact_rows(tmp_path, minilm_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=64)).eval()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("zebra zebra zebra giraffe giraffe okapi\n" * 50, encoding="utf-8")
    comp = hf_embcomp.compress(model, "lighttoken", 10, tokenizer=tok, corpus=str(corpus), exact_rows=16, **FAST)
    ids = set(comp.get_compressed_embedding().exact_ids.tolist())
    words = set(tok("zebra giraffe okapi", add_special_tokens=False)["input_ids"])
    assert len(words) + len(tok.all_special_ids) <= 16
    assert set(tok.all_special_ids) <= ids and words <= ids
    assert "corpus.txt" in comp.compression_report["token_counts_source"]
    with pytest.raises(ValueError, match="needs a tokenizer"):
        hf_embcomp.compress(model, "lighttoken", 10, corpus=str(corpus), **FAST)


def test_metric_fit_lowers_the_calibrated_error_and_folds_back_exactly():
    """With a calibration H that ignores half the directions, the metric fit (run on E A, A^-1 folded into the
    decoder) has a far lower H-weighted error than the Euclidean fit, measured on the rows as stored."""
    from hf_embcomp.calibration import Calibration
    from hf_embcomp.methods.lighttoken import LightTokenMethod

    g = torch.Generator().manual_seed(0)
    V, d, m = 3000, 32, 24
    E = torch.randn(V, d, generator=g)
    U = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    lam = torch.cat([torch.ones(d // 2), torch.full((d // 2,), 1e-3)]).double()
    H = (U * lam) @ U.T
    cal = Calibration(None, None, None, input_sensitivity=H)

    def h_error(metric: str) -> float:
        cfg = LightTokenConfig(bits=(m,), rank=0, exact_rows=0, dtype="float32", metric=metric, **FAST)
        st = LightTokenMethod().fit(E, cfg, calibration=cal)
        B = unpack_bits(st["codes"], m, torch.float32)
        delta = (E - (B @ st["decoder"].T + st["decoder_bias"])).double()
        return float(((delta @ H) * delta).sum() / ((E.double() @ H) * E.double()).sum())

    euclid, metric = h_error("euclidean"), h_error("calibration")
    assert metric < 0.75 * euclid, (metric, euclid)  # 0.41 against 0.64 here
    with pytest.raises(ValueError, match="metric must be"):
        LightTokenConfig(bits=8, metric="cosine")
    from hf_embcomp.methods.lighttoken import metric_factors  # a tied head's Sigma alone leaves the fit Euclidean

    cfg = LightTokenConfig(bits=8)
    assert metric_factors(d, Calibration(None, H, None), cfg)[0] is None
    A, A_inv, _ = metric_factors(d, cal, cfg)
    assert torch.allclose(A @ A_inv, torch.eye(d, dtype=torch.float64), atol=1e-8)
