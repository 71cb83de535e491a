"""Evaluation: each metric against a hand-computed case, the results schema against its documentation,
the lm suite end to end on tiny random models, and `hf-embcomp evaluate` on the compressed MiniLM."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import hf_embcomp
from hf_embcomp.cli import main
from hf_embcomp.evaluation import evaluate, glue, lm, results, sentence, squad
from hf_embcomp.evaluation.results import (
    SCHEMA_VERSION,
    load_results,
    new_results,
    result,
    validate_results,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]


def tiny_llama(vocab: int = 64) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert_mlm(vocab: int = 64) -> transformers.BertForMaskedLM:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, max_position_embeddings=64)
    return transformers.BertForMaskedLM(cfg).eval()


# ---- metrics against hand-computed cases -------------------------------------------------------------

def test_fidelity_metrics_hand_computed():
    """Row cosine, its 1st percentile, relative Frobenius error and the frequency buckets on a 4 x 2 case."""
    from hf_embcomp.core import fidelity
    from hf_embcomp.evaluation.fidelity import cosine_by_bucket

    E = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [1.0, 1.0]])
    E_hat = torch.tensor([[1.0, 1.0], [0.0, 1.0], [3.0, 4.0], [-1.0, -1.0]])
    # cosines: 1/sqrt(2), 1, 1, -1; squared errors 1 + 1 + 0 + 8 = 10; ||E||^2 = 1 + 4 + 25 + 2 = 32
    cos = [1 / math.sqrt(2), 1.0, 1.0, -1.0]
    fid = fidelity(E, E_hat)
    assert fid["row_cosine_mean"] == pytest.approx(sum(cos) / 4)
    assert fid["row_cosine_p01"] == pytest.approx(np.quantile(cos, 0.01))  # linear interpolation, like torch
    assert fid["relative_frobenius_error"] == pytest.approx(math.sqrt(10 / 32))
    assert fidelity(E, E, chunk=3) == {"row_cosine_mean": pytest.approx(1.0), "row_cosine_p01": pytest.approx(1.0),
                                       "relative_frobenius_error": 0.0}
    buckets = cosine_by_bucket(E, E_hat, torch.tensor([0, 5, 9, 1500]))
    assert buckets == {"unseen": (pytest.approx(cos[0]), 1), "1-9": (pytest.approx(1.0), 2),
                       "1000+": (pytest.approx(-1.0), 1)}  # empty buckets are left out


def test_squad_official_normalisation_and_scores():
    assert squad.normalize_answer("The Cat.") == "cat"
    assert squad.exact_match("The Cat.", "cat") == 1.0
    assert squad.exact_match("a cat", "dog") == 0.0
    # "the cat sat" -> [cat, sat]; "cat sat down" -> [cat, sat, down]: P = 1, R = 2/3, F1 = 0.8
    assert squad.f1("the cat sat", "cat sat down") == pytest.approx(0.8)
    # max over the gold answers, averaged over questions, in 0-100
    s = squad.squad_scores({"q1": "Denver Broncos", "q2": "x"}, {"q1": ["Broncos", "the Denver Broncos"], "q2": ["y"]})
    assert s == {"exact_match": pytest.approx(50.0), "f1": pytest.approx(50.0)}


def test_extract_answers_picks_best_valid_span():
    import datasets

    ex = datasets.Dataset.from_list([{"id": "q", "context": "abc def ghi"}])
    feats = datasets.Dataset.from_list([{"example_id": "q", "offset_mapping": [None, [0, 3], [4, 7], [8, 11]]}])
    start = np.array([[9.0, 1.0, 5.0, 0.0]])  # position 0 is the question (no offsets): not allowed
    end = np.array([[9.0, 0.0, 1.0, 4.0]])  # best valid pair: start 2 + end 3 = 9 ("def ghi")
    assert squad.extract_answers(ex, feats, start, end) == {"q": "def ghi"}


def test_glue_metrics_hand_computed():
    y = np.array([1, 0, 1, 1, 0])
    logits = np.array([[0, 1], [1, 0], [1, 0], [0, 1], [0, 1]], dtype=float)  # predictions 1 0 0 1 1
    # TP=2, FP=1, FN=1 -> F1 = 2/3; accuracy 3/5
    assert glue.score("mrpc", y, logits) == {"f1": pytest.approx(2 / 3), "accuracy": pytest.approx(0.6)}
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3*3*2*2) = 1/6
    assert glue.score("cola", y, logits)["matthews_correlation"] == pytest.approx(1 / 6)
    s = glue.score("stsb", np.array([0.0, 1.0, 2.0, 3.0]), np.array([[1.0], [3.0], [5.0], [4.0]]))
    assert s["spearmanr"] == pytest.approx(0.8)  # ranks 1 2 4 3 vs 1 2 3 4
    assert s["pearson"] == pytest.approx(np.corrcoef([0, 1, 2, 3], [1, 3, 5, 4])[0, 1])


def _nll_by_hand(model, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """Each token k scored in the first window [b, b + window) that holds it with context before it (if any)."""
    total, n = 0.0, 0
    for k in range(1, len(ids)):
        b = next((b for b in range(0, len(ids), stride) if b < k < b + window), None)
        if b is None:
            continue
        logp = torch.log_softmax(model(input_ids=ids[None, b:k]).logits[0, -1], -1)  # predicts ids[k]
        total -= float(logp[ids[k]])
        n += 1
    return total, n


@torch.no_grad()
def test_perplexity_is_exp_of_mean_nll():
    model = tiny_llama()
    ids = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(1))
    # one window: the model's own mean loss over the N-1 next-token predictions
    ppl, nll, n = lm.perplexity(model, ids, window=64, stride=32)
    assert n == 39
    assert ppl == pytest.approx(math.exp(float(model(input_ids=ids[None], labels=ids[None]).loss)), rel=1e-5)
    # strided windows: every token once, with the context of the window that first holds it
    ppl, nll, n = lm.perplexity(model, ids, window=16, stride=6)
    hand, hand_n = _nll_by_hand(model, ids, 16, 6)
    assert n == hand_n == 39
    assert nll == pytest.approx(hand, rel=1e-5)
    assert ppl == pytest.approx(math.exp(hand / hand_n), rel=1e-5)
    # <bos> first: the first token is scored too
    x = torch.cat([torch.tensor([0]), ids])
    ppl, _, n = lm.perplexity(model, ids, window=64, stride=32, bos_id=0)
    assert n == 40
    assert ppl == pytest.approx(math.exp(float(model(input_ids=x[None], labels=x[None]).loss)), rel=1e-5)
    # non-overlapping windows: the first token of each window has no context and is not scored
    ppl, nll, n = lm.perplexity(model, ids, window=16, stride=16)
    hand, hand_n = _nll_by_hand(model, ids, 16, 16)
    assert n == hand_n == 40 - 3
    assert nll == pytest.approx(hand, rel=1e-5)
    with pytest.raises(ValueError):
        lm.perplexity(model, ids, window=16, stride=17)  # would skip tokens


@torch.no_grad()
def test_pseudo_perplexity_masks_each_token():
    model = tiny_bert_mlm()
    ids = torch.randint(5, 64, (10,), generator=torch.Generator().manual_seed(2))
    ppl, nll, n = lm.pseudo_perplexity(model, ids, mask_id=4, window=4, prefix=(1,), suffix=(2,), batch_size=3)
    hand = 0.0
    for b in range(0, 10, 4):
        seq = torch.cat([torch.tensor([1]), ids[b : b + 4], torch.tensor([2])])
        for j in range(1, len(seq) - 1):
            masked = seq.clone()
            masked[j] = 4
            hand -= float(torch.log_softmax(model(input_ids=masked[None]).logits[0, j], -1)[seq[j]])
    assert n == 10
    assert nll == pytest.approx(hand, rel=1e-5)
    assert ppl == pytest.approx(math.exp(hand / 10), rel=1e-5)


def test_sentence_probe_accuracy_learns_separable_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = (x[:, 0] > 0).astype(int).tolist()
    assert sentence.probe_accuracy(x[:150], y[:150], x[150:], y[150:]) > 0.9
    assert sentence.probe_accuracy(x[:150], y[:150], x[150:], [1 - v for v in y[150:]]) < 0.1


# ---- results schema ----------------------------------------------------------------------------------

def _doc() -> dict:
    doc = new_results("m", "src", {"method": "svd", "compression_ratio": 8.0, "hyperparameters": {"rank": 4}}, "cpu")
    ds = {"id": "x", "name": "X", "n": 3}
    doc["results"] = [result("glue", "sst2", "text-classification", ds, "accuracy", 0.9, 0.8, True, {"seed": 0, "quick": True}),
                      result("lm", "wikipedia", "text-generation", ds, "perplexity", 20.0, 25.0, False, {"seed": 0, "quick": True})]
    return doc


def test_results_roundtrip_and_drop_sign(tmp_path):
    doc = _doc()
    assert [r["drop"] for r in doc["results"]] == [pytest.approx(0.1), pytest.approx(5.0)]
    back = load_results(write_results(doc, tmp_path / "r.json"))
    assert back == json.loads(json.dumps(doc))
    assert back["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("breaks, message", [
    ("newer", rf"schema_version {SCHEMA_VERSION + 1} is newer than this hf-embcomp reads \({SCHEMA_VERSION}\); upgrade"),
    ("missing", r"results\[0\]\.dataset lacks 'n'"),
    ("drop", r"results\[1\]\.drop does not equal its definition"),
    ("type", r"results\[0\]\.higher_is_better has type str"),
    ("nan", r"results\[0\]\.compressed is not finite"),
])
def test_bad_results_are_refused(tmp_path, breaks, message):
    doc = _doc()
    if breaks == "newer":
        doc["schema_version"] = SCHEMA_VERSION + 1
    elif breaks == "missing":
        del doc["results"][0]["dataset"]["n"]
    elif breaks == "drop":
        doc["results"][1]["drop"] = -5.0
    elif breaks == "type":
        doc["results"][0]["higher_is_better"] = "yes"
    else:
        doc["results"][0]["compressed"] = float("nan")
    p = tmp_path / "r.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        load_results(p)


def test_documented_example_validates():
    text = (REPO / "docs" / "results-schema.md").read_text()
    example = json.loads(re.search(r"```json\n(.*?)```", text, re.DOTALL).group(1))
    validate_results(example)
    cells = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `")]
    documented = {name for c in cells for name in re.findall(r"`([a-z_.0-9]+)`", c)}
    documented |= {part for n in documented if n.startswith("dataset.") for part in n.split(".")}
    result0 = example["results"][0]
    for keys in (example, result0, result0["dataset"], results._TOP, results._RESULT, results._DATASET):
        assert set(keys) <= documented, set(keys) - documented


# ---- the lm suite end to end on tiny compressed models -------------------------------------------------

@pytest.fixture(scope="module")
def bert_tokenizer(minilm_path):
    return transformers.AutoTokenizer.from_pretrained(minilm_path)


@pytest.mark.parametrize("head", ["causal", "masked"])
def test_lm_suite_on_tiny_compressed_models(tmp_path, monkeypatch, bert_tokenizer, head):
    V = len(bert_tokenizer)
    model = tiny_llama(V) if head == "causal" else tiny_bert_mlm(V)
    src = tmp_path / "src"
    model.save_pretrained(src)
    bert_tokenizer.save_pretrained(src)
    small = hf_embcomp.compress(model, "svd", 4, source=str(src), tokenizer=bert_tokenizer, source_folder=str(src))
    hf_embcomp.save_compressed(small, tmp_path / "c")
    monkeypatch.setattr(lm, "QUICK_LM_TOKENS", 300)
    monkeypatch.setattr(lm, "QUICK_MLM_TOKENS", 40)
    doc, skipped = evaluate(str(tmp_path / "c"), suites=("lm",), quick=True, device="cpu")
    assert skipped == {}
    rows = {r["task"]: r for r in doc["results"]}
    assert set(rows) == {"wikipedia", "ptb"}
    for r in rows.values():
        assert r["metric"] == ("perplexity" if head == "causal" else "pseudo_perplexity")
        # non-overlapping 512-token windows: 300 tokens fit in one, its first token has no context
        assert r["dataset"]["n"] == (299 if head == "causal" else 40)
        assert r["settings"]["tokens"] == (300 if head == "causal" else 40)
        assert r["higher_is_better"] is False and r["drop"] == pytest.approx(r["compressed"] - r["baseline"])
        # a random tiny model is near-uniform over the vocabulary; compression changes the value
        assert 0.2 * V < r["baseline"] < 5 * V and r["compressed"] != r["baseline"]

    # a second compressed model of the same source (what a sweep does): the baseline's perplexities are
    # memoised for the process, so the baseline model is not loaded again and its values are identical
    from hf_embcomp.evaluation.context import EvalContext

    smaller = hf_embcomp.compress(model, "svd", 8, source=str(src), tokenizer=bert_tokenizer, source_folder=str(src))
    hf_embcomp.save_compressed(smaller, tmp_path / "c8")
    loaded, real_load = [], EvalContext.load
    monkeypatch.setattr(EvalContext, "load", lambda self, which, *a, **k: loaded.append(which) or real_load(self, which, *a, **k))
    doc8, _ = evaluate(str(tmp_path / "c8"), suites=("lm",), quick=True, device="cpu")
    assert loaded == ["compressed"]
    rows8 = {r["task"]: r for r in doc8["results"]}
    for task, r in rows.items():
        assert rows8[task]["baseline"] == r["baseline"] and rows8[task]["compressed"] != r["compressed"]


# ---- the command line ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm8(minilm_path, tmp_path_factory):
    """all-MiniLM-L6-v2 compressed 8x with SVD, saved as `hf-embcomp compress` does."""
    out = tmp_path_factory.mktemp("eval") / "minilm8"
    assert main(["compress", "--method", "svd", "--ratio", "8", "--output", str(out), "--quiet"]) == 0
    return out


@pytest.mark.parametrize("argv", [
    ["evaluate", "/nonexistent/model"],
    ["evaluate", "{dir}", "--suite", "fidelity,bogus"],
    ["evaluate", "{dir}", "--max-steps", "0"],
    ["evaluate", "{dir}", "--data-dir", "/nonexistent/data"],
    ["evaluate", "{dir}", "--suite", "glue", "--tasks", "mnli"],
    ["evaluate", "{dir}", "--baseline", "/nonexistent/base", "--suite", "fidelity"],
    ["evaluate", "{src}"],
    ["sweep", "--methods", "svd,nope", "-o", "{dir}/sweep"],
    ["sweep", "--ratios", "5,x", "-o", "{dir}/sweep"],
    ["sweep", "--ratios", "0.5", "-o", "{dir}/sweep"],
    ["sweep", "--suite", "bogus", "-o", "{dir}/sweep"],
])
def test_bad_inputs_exit_2_with_one_line(argv, minilm8, minilm_path, capsys):
    rc = main([a.format(dir=minilm8, src=minilm_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("hf-embcomp: error:"), err


@pytest.mark.slow
def test_quick_evaluate_minilm_writes_valid_results(minilm8, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sentence, "QUICK_SPLIT", (80, 40))
    monkeypatch.setattr(sentence, "QUICK_COSINE_SENTENCES", 40)
    monkeypatch.setattr(sentence, "QUICK_STSB_PAIRS", 40)
    monkeypatch.setattr(glue, "QUICK_EVAL", 32)
    out = tmp_path / "r.json"
    rc = main(["evaluate", str(minilm8), "--suite", "fidelity,sentence,glue", "--tasks", "sst2", "--quick",
               "--max-steps", "2", "--output", str(out)])
    assert rc == 0
    doc = load_results(out)
    assert doc["method"] == "svd" and doc["compression_ratio"] == pytest.approx(8.07, abs=0.01)
    assert doc["source_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    by = {(r["suite"], r["task"], r["metric"]): r for r in doc["results"]}
    for r in doc["results"]:
        assert r["drop"] == pytest.approx(r["baseline"] - r["compressed"] if r["higher_is_better"]
                                          else r["compressed"] - r["baseline"])
    fid = by[("fidelity", "embedding", "row_cosine_mean")]
    assert fid["dataset"]["n"] == 30522
    assert fid["compressed"] == pytest.approx(json.loads((minilm8 / "compression_report.json").read_text())
                                              ["fidelity"]["row_cosine_mean"], abs=1e-6)
    assert sum(r["dataset"]["n"] for r in doc["results"] if r["task"].startswith("frequency_")) == 30522
    cos = by[("sentence", "embedding_cosine", "cosine_to_uncompressed")]
    assert cos["dataset"]["n"] == 40 and 0 < cos["compressed"] < 1
    sst2 = by[("glue", "sst2", "accuracy")]
    assert sst2["dataset"]["n"] == 32 and sst2["settings"]["max_steps"] == 2
    # zero-shot STS-B: the stock model's score is what sentence-transformers computes on the same pairs
    sts = by[("sentence", "stsb_zero_shot", "spearman_x100")]
    assert sts["dataset"]["n"] == 40
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    from hf_embcomp.io import default_model_path

    s1, s2, gold = sentence.stsb_pairs(quick=True)
    st = SentenceTransformer(str(default_model_path()), device="cpu")
    a, b = st.encode(s1, normalize_embeddings=True), st.encode(s2, normalize_embeddings=True)
    assert sts["baseline"] == pytest.approx(100 * spearmanr((a * b).sum(1), gold).correlation, abs=0.05)
    assert sts["compressed"] != sts["baseline"]
    table = capsys.readouterr().out
    assert "sst2" in table and "embedding_cosine" in table and str(out) in table


@pytest.mark.slow
def test_sweep_resumes_and_plots(tmp_path, monkeypatch, capsys):
    argv = ["sweep", "--methods", "svd", "--ratios", "20,50", "--suite", "fidelity", "--quick", "-o", str(tmp_path)]
    assert main(argv) == 0
    docs = [load_results(tmp_path / f"svd-x{r}" / "eval_results.json") for r in (20, 50)]
    assert [d["compression_ratio"] for d in docs] == [pytest.approx(20, rel=0.1), pytest.approx(50, rel=0.1)]
    cos = [next(r["compressed"] for r in d["results"] if r["metric"] == "row_cosine_mean" and r["task"] == "embedding")
           for d in docs]
    assert 0 < cos[1] < cos[0] < 1  # more compression, less fidelity
    png = tmp_path / "pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamp = png.stat().st_mtime_ns

    def no_compress(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(hf_embcomp, "compress", no_compress)
    assert main(argv) == 0
    assert png.stat().st_mtime_ns >= stamp
    assert "svd" in capsys.readouterr().out


def test_sweep_hyperparameters_must_belong_to_a_method(tmp_path):
    from hf_embcomp.evaluation.sweep import run_sweep

    def never():
        raise AssertionError("the model must not be loaded before the arguments are checked")

    with pytest.raises(ValueError, match="epochs"):
        run_sweep(never, ["svd"], [10.0], tmp_path, ("fidelity",), hyperparameters={"epochs": 2})
