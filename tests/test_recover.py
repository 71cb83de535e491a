"""Recovery (``hf-embcomp recover``, :mod:`hf_embcomp.training.recover`) on tiny models with a real tokenizer and
real text: stored bytes never change, a worse fine-tune is never saved, LoRA is merged back, encoders work too.
Quality is measured in bench/quality.py (``--recover``), not here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import hf_embcomp
from hf_embcomp import data
from hf_embcomp.io import default_model_path
from hf_embcomp.cli import main as cli_main
from hf_embcomp.training.distill import load_compressed
from hf_embcomp.training.parts import stored_embedding
from hf_embcomp.training.recover import lora_targets, recover

PREFIX = "model.embed_tokens"


def _tokenizer():
    return transformers.AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny tied Llama (MiniLM's tokenizer), compressed with gptq at 2 bits per coordinate, both saved, and a text file."""
    root = tmp_path_factory.mktemp("recover")
    tok = _tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                   tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(cfg).eval()
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    comp = hf_embcomp.compress(teacher, "gptq", 9, tokenizer=tok, calibration=None, rotation_block=0, bits=[2],
                               tier_rows=[len(tok)])
    hf_embcomp.save_compressed(comp, root / "student")
    (root / "text.txt").write_text(data.wiki_text()[100_000:110_000])
    return root


def _args(root: Path, out: str, *extra: str) -> list[str]:
    return ["recover", str(root / "student"), "--teacher", str(root / "teacher"), "--data", str(root / "text.txt"),
            "--output", str(root / out), "--max-steps", "6", "--seq-len", "32", "--batch-size", "2",
            "--heldout-tokens", "256", "--eval-window", "64", "--quiet", *extra]


def _body(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if not k.startswith(PREFIX)}


def test_a_worse_fine_tune_is_not_saved(tiny_lm, capsys):
    assert cli_main(_args(tiny_lm, "worse", "--lr", "50")) == 0
    assert "ORIGINAL weights were saved unchanged" in capsys.readouterr().out
    rec = json.loads((tiny_lm / "worse" / "compression_report.json").read_text())["recovery"]
    assert rec["kept"] == "original" and not rec["after"] < rec["before"]
    # bit for bit the input's embedding
    assert stored_embedding(tiny_lm / "worse", PREFIX) == stored_embedding(tiny_lm / "student", PREFIX)


def test_lora_recovery_merges_and_keeps_stored_bytes(tiny_lm):
    assert cli_main(_args(tiny_lm, "lora", "--lora-rank", "4", "--lr", "3e-2", "--lora-lr", "3e-3")) == 0
    rec = json.loads((tiny_lm / "lora" / "compression_report.json").read_text())["recovery"]
    assert rec["kept"] == "recovered" and rec["after"] < rec["before"] and rec["lora_rank"] == 4
    new, old = stored_embedding(tiny_lm / "lora", PREFIX), stored_embedding(tiny_lm / "student", PREFIX)
    assert {k: v[:3] for k, v in new.items()} == {k: v[:3] for k, v in old.items()}  # names, dtypes, shapes, bytes
    codes = [k for k in new if k.startswith("codes_") or k == "row_bits"]
    scales = [k for k in new if k.startswith(("scales_", "mins_"))]
    assert codes and all(new[k] == old[k] for k in codes)  # integer codes are fixed
    assert scales and any(new[k] != old[k] for k in scales)  # group scales / minimums trained
    body, body0 = _body(tiny_lm / "lora"), _body(tiny_lm / "student")
    assert set(body) == set(body0)  # merged: no adapter tensors, the source's layout
    assert any(not torch.equal(body[k], body0[k]) for k in body)
    # the saved model reloads and scores what the report says
    m = load_compressed(tiny_lm / "lora")
    assert not any("lora" in n for n, _ in m.named_parameters())


def test_encoder_recovery_scores_sentence_cosine(tmp_path):
    tok = _tokenizer()
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    teacher = transformers.BertModel(cfg).eval()
    student = hf_embcomp.compress(teacher, "svd", 8, calibration=None).float()
    ids = torch.tensor(tok(data.wiki_text()[100_000:110_000], add_special_tokens=False)["input_ids"])
    held, blocks = ids[:256], ids[256 : 256 + 32 * 16].reshape(16, 32)
    factors0 = {k: v.clone() for k, v in student.get_compressed_embedding().state_dict().items()}
    res = recover(student, teacher, blocks, held, max_steps=6, batch_size=2, lr=3e-3, quiet=True)
    assert res.metric == "held-out sentence cosine" and -1 <= res.before <= 1 and res.teacher == pytest.approx(1.0)
    changed = any(not torch.equal(v, factors0[k]) for k, v in student.get_compressed_embedding().state_dict().items())
    assert changed == (res.kept == "recovered")
    assert (res.after > res.before) == (res.kept == "recovered")
    assert lora_targets(student) and all("word_embeddings" not in n for n in lora_targets(student))
