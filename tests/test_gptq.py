"""GPTQ method, calibration statistics and method="auto", on tiny random models (no downloads).

Each check compares against a hand computation or a simpler reference that gives the same answer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_embcomp
from hf_embcomp.calibration import (Calibration, CalibrationError, calibration_text, collect, input_sensitivity,
                                    max_positions)
from hf_embcomp.methods.gptq import (GPTQConfig, allocate_bits, dequantise, gptq_rows, h_error, pack_codes, refine_rows,
                                     refit_scales, rotation_matrix)
from hf_embcomp.hub_code.embcomp_gptq import unpack_codes

from support.tiny import tiny_model


class WordTokenizer:
    """Splits on spaces; token id = hash of the word mod V (stable), no special tokens."""

    all_special_ids: list[int] = []
    bos_token_id = None

    def __init__(self, V: int = 1000) -> None:
        self.V = V

    def save_pretrained(self, folder):  # nothing to save
        return ()

    def __call__(self, text, add_special_tokens=False, verbose=False, **kw):
        return {"input_ids": [sum(map(ord, w)) * 7 % self.V for w in text.split()]}


def test_collect_matches_a_hand_computed_second_moment_and_gain():
    m = tiny_model("llama")
    ids = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(0))
    got = collect(m, ids, window=16, quiet=True, keep_head_inputs=20)
    sigma, gain, run = got["sigma"], got["gain"], got["tokens"]
    assert run == 40
    hs, xs, ys = [], [], []
    with torch.no_grad():
        for i in range(0, 40, 16):
            x = ids[i : i + 16][None]
            hs.append(m.model(input_ids=x).last_hidden_state[0].double())  # after the final norm: the head's input
            e = m.model.embed_tokens(x)[0].double()
            xs.append(e)
            ys.append(m.model.layers[0].input_layernorm(e.float()).double())
    h = torch.cat(hs)
    assert torch.allclose(sigma, h.T @ h / h.shape[0], rtol=1e-5, atol=1e-8)
    # the first 20 head inputs are kept as they were seen, with the token fed at each position
    assert got["head_inputs"].dtype == torch.float32 and got["head_inputs"].shape == (20, h.shape[1])
    assert torch.allclose(got["head_inputs"].double(), h[:20], rtol=1e-5, atol=1e-6)
    assert torch.equal(got["head_input_ids"], ids[:20])
    x, y = torch.cat(xs), torch.cat(ys)
    assert torch.allclose(gain, (y * y).sum(0) / (x * x).sum(0), rtol=1e-5)
    cal = Calibration(None, sigma, gain)
    assert torch.allclose(cal.importance_matrix(), torch.diagonal(sigma))
    assert abs(float(cal.column_weights().mean()) - 1) < 1e-9


def test_input_sensitivity_matches_the_jacobians_of_the_pooled_output():
    """With d orthonormal probes, S = sum_t J_t^T J_t / tokens exactly; J_t from full Jacobians, one window at a time."""
    from transformers import BertModel

    m = BertModel(tiny_model("bert").config).eval()
    d = m.config.hidden_size
    ids = torch.randint(5, 1000, (21,), generator=torch.Generator().manual_seed(0))
    S, run = input_sensitivity(m, ids, window=10, probes=d, special=([101 % 1000], [102 % 1000]), quiet=True)
    assert run == 21 + 2 * 3  # windows of 8 ids + CLS + SEP: 8, 8, 5
    ref = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, 21, 8):
        x = torch.cat([torch.tensor([101]), ids[i : i + 8], torch.tensor([102])])
        e0 = m.get_input_embeddings()(x[None]).detach()

        def pooled(e):
            h = m(inputs_embeds=e).last_hidden_state[0]
            return torch.nn.functional.normalize(h.mean(0), dim=-1)

        J = torch.autograd.functional.jacobian(pooled, e0)[:, 0]  # [d out, n, d in]
        for t in range(x.numel()):
            ref += J[:, t].double().T @ J[:, t].double()
    ref /= run
    assert torch.allclose(S, ref, rtol=1e-3, atol=1e-6 * float(ref.abs().max()))
    few, _ = input_sensitivity(m, ids, window=10, probes=4, special=([101], [102]), quiet=True)
    assert few.shape == (d, d) and torch.allclose(few, few.T)  # an estimate of the same matrix, symmetric
    assert float(torch.linalg.eigvalsh(few).min()) > -1e-9 * float(few.abs().max())


def test_calibration_windows_fit_the_model_positions():
    """Windows never exceed the position table (RoBERTa's positions start after its padding index)."""
    assert max_positions(tiny_model("bert"), 512) == 64
    assert max_positions(tiny_model("roberta"), 512) == 64  # 66 positions, offset 2
    m = tiny_model("roberta").roberta
    ids = torch.randint(5, 1000, (150,), generator=torch.Generator().manual_seed(0))
    assert collect(m, ids, window=512, quiet=True)["tokens"] == 150
    assert input_sensitivity(m, ids, window=512, probes=2, special=([0], [2]), quiet=True)[1] == 150 + 2 * 3


def test_calibration_text_errors_are_one_line(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        calibration_text(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf-8 \xc3")
    with pytest.raises(CalibrationError, match="not UTF-8"):
        calibration_text(bad)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(CalibrationError, match="at least a few"):
        calibration_text(short)


def _assert_reload_equal(comp, folder) -> None:
    """Saved and reloaded through trust_remote_code, the model gives the same logits bit for bit."""
    comp.save_pretrained(folder)
    back = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    x = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        assert torch.equal(back(x).logits, comp(x).logits)


def test_codes_pack_and_unpack_for_every_width():
    g = torch.Generator().manual_seed(1)
    for bits in range(1, 9):
        q = torch.randint(0, 1 << bits, (5, 23), generator=g)
        assert torch.equal(unpack_codes(pack_codes(q, bits), bits, 23), q.to(torch.int32)), bits


def test_gptq_beats_round_to_nearest_under_its_hessian():
    """GPTQ's error feedback lowers the H-weighted error against plain rounding with the same scales search."""
    g = torch.Generator().manual_seed(0)
    d = 32
    A = torch.randn(d, 4, generator=g, dtype=torch.float64)
    H = A @ A.T + 0.05 * torch.eye(d, dtype=torch.float64)  # strongly correlated inputs (a few directions)
    W = torch.randn(400, d, generator=g)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    colw = torch.diagonal(H).float()
    Q, S, M = gptq_rows(W, hinv, 2, 16, colw, "float32")
    eye = torch.eye(d).float()  # identity factor: no error is fed back = round to nearest
    Q0, S0, M0 = gptq_rows(W, eye, 2, 16, colw, "float32")
    err = lambda Wh: float((((W - Wh).double() @ H) * (W - Wh).double()).sum())  # noqa: E731
    assert err(dequantise(Q, S, M, 16)) < 0.9 * err(dequantise(Q0, S0, M0, 16))


def test_allocation_meets_the_budget_and_favours_heavy_rows():
    err = torch.tensor([[4.0, 1.0, 0.25]] * 6, dtype=torch.float64)
    weights = torch.tensor([100, 1, 1, 1, 1, 50], dtype=torch.float64)
    row_bytes = torch.tensor([1.0, 2.0, 3.0])
    j = allocate_bits(err, weights, row_bytes, budget=10)
    assert float(row_bytes[j].sum()) <= 10
    assert j[0] == 2 and j[5] >= 1 and int(j[1:5].max()) <= j[5]


def test_rotation_is_orthogonal():
    R, neg = rotation_matrix(48, 16, 0)
    assert torch.allclose(R.T @ R, torch.eye(48, dtype=torch.float64), atol=1e-12)
    assert neg.dtype == torch.uint8 and set(neg.tolist()) <= {0, 1}


def test_gptq_model_meets_its_ratio_decodes_consistently_and_reloads(tmp_path):
    m = tiny_model("llama")
    cal = Calibration(torch.arange(1000), torch.eye(32, dtype=torch.float64) + 0.5, None, 0, "test")
    comp = hf_embcomp.compress(m, "gptq", 6, calibration=cal, vq_bits=())  # scalar tiers (vector ones: below)
    rep = comp.compression_report
    assert rep["compression_ratio"] >= 6 and rep["calibration"]["source"] == "test"
    hp = rep["hyperparameters"]
    assert sum(hp["tier_rows"]) == 1000 and len([n for n in hp["tier_rows"] if n]) >= 2  # mixed widths
    emb = comp.get_compressed_embedding()
    E = emb.reconstruct()
    ids = torch.randint(0, 1000, (2, 9))
    h = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(emb(ids), E[ids])
        assert torch.allclose(emb(logits_from=h), h @ E.T, atol=1e-4)
    # the most frequent rows (high ids here) got at least as many bits as the rarest
    rb = emb.row_bits.long()
    assert rb[-100:].float().mean() >= rb[:100].float().mean()
    _assert_reload_equal(comp, tmp_path)


def test_explicit_tier_rows_are_kept():
    m = tiny_model("llama")
    comp = hf_embcomp.compress(m, "gptq", None, tier_rows=[0, 0, 0, 900, 0, 0, 100], calibration=None)
    assert comp.compression_report["hyperparameters"]["tier_rows"] == [0, 0, 0, 900, 0, 0, 100]
    assert int((comp.get_compressed_embedding().row_bits == 8).sum()) == 100


def test_auto_keeps_the_better_of_two_candidates(monkeypatch, tmp_path):
    """Two candidates of very different rank: auto keeps the one with the lower probe perplexity, whichever
    order they are tried in, and the probe scores it reports are those of the models themselves."""
    import hf_embcomp.auto as auto

    text = tmp_path / "cal.txt"
    text.write_text(" ".join(f"w{i % 97} x{i % 13}" for i in range(30000)))
    monkeypatch.setattr(auto, "PROBE_TOKENS", 256)
    m = tiny_model("llama")
    chosen = []
    for order in ([1, 12], [12, 1]):
        monkeypatch.setattr(auto, "candidates", lambda ratio, o=order: [("svd", {"rank": r}) for r in o])
        comp = hf_embcomp.compress(m, "auto", 2.0, tokenizer=WordTokenizer(), calibration=str(text))
        rep = comp.compression_report
        scores = {c["overrides"]["rank"]: c["probe_perplexity"] for c in rep["auto"]["candidates"]}
        assert scores[1] != scores[12]
        assert rep["hyperparameters"]["rank"] == min(scores, key=scores.get)
        assert "best probe perplexity" in rep["auto"]["why"]
        probe = auto.Probe(m, WordTokenizer(), hf_embcomp.calibration.calibrate(m, WordTokenizer(), text, max_tokens=0))
        assert abs(probe.score(comp) - scores[rep["hyperparameters"]["rank"]]) < 1e-6 * scores[1]
        chosen.append(rep["hyperparameters"]["rank"])
    assert chosen[0] == chosen[1]


def test_auto_refuses_method_hyperparameters():
    with pytest.raises(ValueError, match="belong to one method"):
        hf_embcomp.compress(tiny_model("llama"), "auto", 4.0, tokenizer=WordTokenizer(), rank=3)


def test_refit_is_the_least_squares_optimum_and_refine_never_worsens_a_row():
    g = torch.Generator().manual_seed(3)
    n, d, gs = 64, 32, 8
    x = torch.randn(n, d, generator=g)
    A = torch.randn(d, d, generator=g)
    H = (A @ A.T / d + 0.1 * torch.eye(d)).float()
    hinv_u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H.double())), upper=True).float()
    colw = torch.diagonal(H)
    Q, S, M = gptq_rows(x, hinv_u, 2, gs, colw, "float32")
    S2, M2 = refit_scales(x, Q, H, gs, "float32")
    e0, e1 = h_error(x, dequantise(Q, S, M, gs), H), h_error(x, dequantise(Q, S2, M2, gs), H)
    assert (e1 <= e0 * (1 + 1e-5)).all() and e1.sum() < 0.99 * e0.sum()
    # row 0 by hand: the normal equations of x ~ A theta under H
    gid = torch.arange(d) // gs
    Arow = torch.cat([Q[0].float()[:, None] * torch.nn.functional.one_hot(gid).float(),
                      torch.nn.functional.one_hot(gid).float()], 1).double()
    theta = torch.linalg.solve(Arow.T @ H.double() @ Arow, Arow.T @ H.double() @ x[0].double())
    assert torch.allclose(torch.cat([S2[0], M2[0]]).double(), theta, atol=1e-4)
    Qr, Sr, Mr = refine_rows(x, hinv_u, H, 2, gs, colw, "float32", rounds=1)
    er = h_error(x, dequantise(Qr, Sr, Mr, gs), H)
    assert (er <= e0 * (1 + 1e-5)).all() and er.sum() <= e1.sum() * (1 + 1e-5)
    assert Qr.min() >= 0 and Qr.max() <= 3


def test_gptvq_beats_nearest_codeword_under_its_hessian():
    """GPTVQ's error feedback lowers the H-weighted error against plain nearest-codeword rounding (same codebook)."""
    from hf_embcomp.methods.gptq import gptvq_rows, train_codebook
    g = torch.Generator().manual_seed(0)
    d = 32
    A = torch.randn(d, 4, generator=g, dtype=torch.float64)
    H = A @ A.T + 0.05 * torch.eye(d, dtype=torch.float64)
    W = torch.randn(400, d, generator=g)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    book = train_codebook(W, 6, 4, 10, 0, "float32")
    assert book.shape == (64, 4)
    idx, Q = gptvq_rows(W, hinv, book, 4)
    assert torch.equal(Q, book[idx].flatten(1))  # the rounded rows are codewords
    near = torch.cdist(W.reshape(-1, 4), book).argmin(1)
    err = lambda Wh: float((((W - Wh).double() @ H) * (W - Wh).double()).sum())  # noqa: E731
    assert err(Q) < 0.9 * err(book[near].reshape(W.shape))
    # with H = I nothing is fed back: GPTVQ is nearest-codeword rounding
    idx0, _ = gptvq_rows(W, torch.eye(d), book, 4)
    d0 = (W.reshape(-1, 4) - book[idx0.reshape(-1)]).pow(2).sum(1)
    assert torch.allclose(d0, (W.reshape(-1, 4) - book[near]).pow(2).sum(1), atol=1e-5)


def test_vector_tiers_decode_consistently_meet_the_ratio_and_reload(tmp_path):
    m = tiny_model("llama")
    cal = Calibration(torch.arange(1000), torch.eye(32, dtype=torch.float64) + 0.5, None, 0, "test")
    comp = hf_embcomp.compress(m, "gptq", 9, calibration=cal, vq_bits=[6, 8], vq_dims=[4, 4])
    rep = comp.compression_report
    hp = rep["hyperparameters"]
    assert rep["compression_ratio"] >= 9 and sum(hp["tier_rows"]) + sum(hp["vq_rows"]) == 1000
    assert min(hp["vq_rows"]) > 0  # both vector tiers hold rows at this budget
    emb = comp.get_compressed_embedding()
    cfg = GPTQConfig(**{k: v for k, v in hp.items() if k in {f.name for f in dataclasses.fields(GPTQConfig)}})
    stored = sum(t.numel() * t.element_size() for t in emb.state_dict().values())
    assert stored == cfg.stored_bytes(1000, 32)
    assert emb.codebook_v1.shape == (256, 4) and emb.scales_v0.shape == (hp["vq_rows"][0], 1)
    E = emb.reconstruct()
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        assert torch.equal(emb(ids), E[ids])
        for n in (1, 3, 9):  # codebook tables (<= 4 rows) and decoded chunks
            h = torch.randn(n, 32)
            assert torch.allclose(emb(logits_from=h), h @ E.T, atol=1e-4)
    _assert_reload_equal(comp, tmp_path)


def test_from_ratio_offers_vector_tiers_near_the_budget_and_counts_their_codebooks():
    from hf_embcomp.methods.gptq import VQ_GRID, VQ_SPAN
    V, d = 49152, 576
    low = GPTQConfig.from_ratio(V, d, 25)  # 1.28 bits a weight: vectors of 8 and 4 coordinates, 1 to 2 bits
    mid = GPTQConfig.from_ratio(V, d, 8)  # 4 bits a weight: vectors of 4 and 2 coordinates, 2 to 4 bits
    for cfg, ratio in ((low, 25), (mid, 8)):
        offered = set(zip(cfg.vq_bits, cfg.vq_dims))
        near = {(b, k) for b, k in VQ_GRID if VQ_SPAN[0] <= b / k / (32 / ratio) <= VQ_SPAN[1]}
        assert offered == near and offered
    assert 8 in low.vq_dims and 2 in mid.vq_dims and 8 not in mid.vq_dims
    assert set(GPTQConfig.from_ratio(V, 100, 8).vq_dims) == {4, 2}  # 8 does not divide 100
    assert GPTQConfig.from_ratio(V, d, 8, vq_bits=()).vq_bits == ()
    for cfg in (low, mid):  # the data-free split is within the budget, codebooks included
        assert cfg.stored_bytes(V, d) <= cfg.target_bytes
        books = sum((1 << b) * k * 2 for b, k, n in zip(cfg.vq_bits, cfg.vq_dims, cfg.vq_rows) if n)
        assert cfg.fixed_bytes(V, d, used_only=True) == V + d // 8 + books + 2 * d  # + the fp16 mean row


def test_mean_row_is_stored_and_lowers_the_error_of_rows_that_share_it():
    m = tiny_model("llama")
    with torch.no_grad():  # rows = a common pattern (3x their own spread) + their own part
        w = m.get_input_embeddings().weight
        w += 3 * w.std() * torch.randn(w.shape[1], generator=torch.Generator().manual_seed(5))
    E = m.get_input_embeddings().weight.detach().clone()
    cal = Calibration(torch.arange(1000), torch.eye(32, dtype=torch.float64) + 0.5, None, 0, "test")
    errors = {}
    for center in (True, False):
        comp = hf_embcomp.compress(m, "gptq", 8, calibration=cal, center=center)
        emb = comp.get_compressed_embedding()
        hp = comp.compression_report["hyperparameters"]
        cfg = GPTQConfig(**{k: v for k, v in hp.items() if k in {f.name for f in dataclasses.fields(GPTQConfig)}})
        stored = sum(t.numel() * t.element_size() for t in emb.state_dict().values())
        assert stored == cfg.stored_bytes(1000, 32) and comp.compression_report["compression_ratio"] >= 8
        assert hasattr(emb, "row_mean") == center
        errors[center] = float((emb.reconstruct() - E).norm() / E.norm())
        h = torch.randn(3, 32)
        with torch.no_grad():  # the mean row enters lookups and tied logits alike
            assert torch.allclose(emb(logits_from=h), h @ emb.reconstruct().T, atol=1e-4)
    assert errors[True] < 0.7 * errors[False], errors
