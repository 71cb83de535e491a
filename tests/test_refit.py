"""The head-side refit (hf_embcomp.training.refit) on tiny random models: what it may change, what it must not,
and that a refit that does not help is undone."""

from __future__ import annotations

import pytest
import torch
from support.tiny import tiny_model
from transformers import AutoModelForCausalLM

import hf_embcomp
from hf_embcomp.calibration import Calibration, collect
from hf_embcomp.training.refit import _objective, head_refit


def _calibration(m) -> Calibration:
    ids = torch.randint(0, 1000, (3000,), generator=torch.Generator().manual_seed(1))
    st = collect(m, ids, window=60, quiet=True, keep_head_inputs=3000)
    return Calibration(torch.bincount(ids, minlength=1000), st["sigma"], st["gain"], st["tokens"], "test", None, None,
                       st["head_inputs"], st["head_input_ids"])


def _sharp(m):
    """A tiny llama whose head is confident (the random one, embedding std 0.02, predicts nearly uniform logits:
    nothing for the KL to see)."""
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(50.0)
    return m


def test_refit_lowers_the_heldout_objective_and_changes_only_real_valued_tensors(tmp_path):
    m = _sharp(tiny_model("llama"))
    cal = _calibration(m)
    a = hf_embcomp.compress(m, "gptq", 12, calibration=cal, refit_steps=0)
    b = hf_embcomp.compress(m, "gptq", 12, calibration=cal, refit_steps=150)
    assert "head_refit" not in a.compression_report
    r = b.compression_report["head_refit"]
    assert r["kept"] and r["heldout_after"] < r["heldout_before"] and r["kl_after"] < r["kl_before"]
    # the objective it reports is the one of the model it returns, on the held-out positions (the last eighth)
    emb_a, emb_b = a.get_compressed_embedding(), b.get_compressed_embedding()
    W = m.get_input_embeddings().weight.detach()
    n = r["heldout_positions"]
    held = (cal.head_inputs[-n:], cal.head_input_ids[-n:])
    assert abs(_objective(emb_a, W, *held, r["input_weight"])[0] - r["heldout_before"]) < 1e-5
    assert abs(_objective(emb_b, W, *held, r["input_weight"])[0] - r["heldout_after"]) < 1e-5
    sa, sb = emb_a.state_dict(), emb_b.state_dict()
    changed = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert changed and all(sa[k].is_floating_point() for k in changed)  # codes and tier layout untouched
    assert a.compression_report["stored_bytes"] == b.compression_report["stored_bytes"]
    for p in emb_b.parameters():  # in memory exactly what the storage dtype holds
        assert torch.equal(p, p.to(emb_b.storage_dtype).to(p.dtype))
    b.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    x = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, b(input_ids=x).logits)


def test_a_refit_that_does_not_help_is_undone_bit_for_bit():
    m = _sharp(tiny_model("llama"))
    cal = _calibration(m)
    comp = hf_embcomp.compress(m, "gptq", 12, calibration=cal, refit_steps=0)
    emb = comp.get_compressed_embedding()
    before = {k: v.clone() for k, v in emb.state_dict().items()}
    W = m.get_input_embeddings().weight.detach()
    r = head_refit(emb, W, cal.head_inputs, cal.head_input_ids, steps=20,
                   lr=1e3)  # steps a thousand times each tensor's size: worse
    assert r.steps == 20 and not r.kept and r.heldout_after > r.heldout_before
    assert all(torch.equal(v, emb.state_dict()[k]) for k, v in before.items())
    # below min_kl nothing runs (a well-fitted model: the refit would cost minutes for nothing)
    r = head_refit(emb, W, cal.head_inputs, cal.head_input_ids, steps=20, min_kl=r.kl_before * 1.01)
    assert r.steps == 0 and not r.kept and r.heldout_after == r.heldout_before
    assert all(torch.equal(v, emb.state_dict()[k]) for k, v in before.items())


def test_refit_runs_only_for_a_tied_head_with_head_inputs():
    tied = _sharp(tiny_model("llama"))
    untied = tiny_model("qwen2")
    assert not untied.config.tie_word_embeddings
    assert "head_refit" not in hf_embcomp.compress(untied, "gptq", 6, calibration=_calibration(untied),
                                                   refit_steps=50).compression_report
    cal = _calibration(tied)
    no_inputs = Calibration(cal.token_counts, cal.head_second_moment, cal.input_column_gain, cal.tokens, "test")
    assert "head_refit" not in hf_embcomp.compress(tied, "gptq", 6, calibration=no_inputs,
                                                   refit_steps=50).compression_report
    assert "head_refit" not in hf_embcomp.compress(tied, "svd", 6, refit_steps=50).compression_report


def test_refit_rejects_mismatched_inputs():
    m = tiny_model("llama")
    comp = hf_embcomp.compress(m, "gptq", 6, calibration=None, refit_steps=0)
    emb = comp.get_compressed_embedding()
    W = m.get_input_embeddings().weight.detach()
    with pytest.raises(ValueError, match="hidden"):
        head_refit(emb, W, torch.randn(100, 31), torch.zeros(100, dtype=torch.long))
    with pytest.raises(ValueError, match="at least"):
        head_refit(emb, W, torch.randn(4, 32), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("probe_says_better", [True, False])
def test_auto_refits_the_kept_candidate_and_undoes_it_when_the_probe_disagrees(monkeypatch, tmp_path, probe_says_better):
    from test_gptq import WordTokenizer

    from hf_embcomp import auto

    text = tmp_path / "cal.txt"
    # ~1,000 distinct words: a next-token distribution the 12x model gets measurably wrong (KL above MIN_KL)
    text.write_text(" ".join(f"{chr(97 + i % 26)}{chr(97 + i * 7 % 23)}{i * 31 % 101}" for i in range(30000)))
    monkeypatch.setattr(auto, "PROBE_TOKENS", 256)
    monkeypatch.setattr(auto, "candidates", lambda ratio: [("gptq", {})])
    m = _sharp(tiny_model("llama"))
    plain = hf_embcomp.compress(m, "gptq", 12, tokenizer=WordTokenizer(), calibration=str(text), refit_steps=0)
    if not probe_says_better:  # one candidate: the probe scores it, then judges the refit (before, after)
        score, calls = auto.Probe.score, []

        def worse_after_refit(self, model):
            calls.append(1)
            return float("inf") if len(calls) == 3 else score(self, model)

        monkeypatch.setattr(auto.Probe, "score", worse_after_refit)
    comp = hf_embcomp.compress(m, "auto", 12, tokenizer=WordTokenizer(), calibration=str(text), refit_steps=40)
    rep = comp.compression_report
    refit = rep["auto"]["refit"]
    assert refit["kept"] == probe_says_better and rep["head_refit"]["steps"] == 40
    assert refit["before"] == pytest.approx(rep["auto"]["candidates"][0]["probe_perplexity"], rel=1e-6)
    assert (refit["after"] < refit["before"]) == probe_says_better
    sp, sc = plain.get_compressed_embedding().state_dict(), comp.get_compressed_embedding().state_dict()
    same = all(torch.equal(sp[k], sc[k]) for k in sp)
    assert same != probe_says_better  # undone bit for bit, or refitted
    if not probe_says_better:
        assert rep["head_refit"]["kept"] is False and rep["fidelity"] == plain.compression_report["fidelity"]
    else:  # compress with the method named refits the same way, judged by the same probe perplexity
        direct = hf_embcomp.compress(m, "gptq", 12, tokenizer=WordTokenizer(), calibration=str(text), refit_steps=40)
        assert direct.compression_report["head_refit"]["judge_after"] == pytest.approx(refit["after"], rel=1e-6)
        sd = direct.get_compressed_embedding().state_dict()
        assert all(torch.equal(sd[k], sc[k]) for k in sd)
