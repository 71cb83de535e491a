"""The examples/ scripts, each run end to end on the real offline models and data with a tiny budget.

They run in this process through their ``main(argv)`` (the same code path as ``python examples/X.py``), so
the heavy imports are paid once.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.slow


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compress_and_evaluate(tmp_path, capsys):
    out = tmp_path / "minilm-svd"
    res = _example("compress_and_evaluate").main(
        ["--method", "svd", "--ratio", "8", "--n-train", "64", "--n-test", "32", "--output-dir", str(out)])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "embcomp" and cfg["embedding_compression"]["method"] == "svd"
    assert res["compression_ratio"] >= 8
    assert 0.5 < res["fidelity"]["row_cosine_mean"] < 1.0
    # the compressed model embeds a sentence closer to the original's embedding of it than to another sentence's
    assert res["different_sentence_cosine"] < res["sentence_cosine"] <= 1.0 + 1e-6
    for k in ("probe_accuracy_uncompressed", "probe_accuracy_compressed"):
        assert 0.0 <= res[k] <= 1.0
    printed = capsys.readouterr().out
    assert "linear probe" in printed and "compressed" in printed


def test_finetune_glue_with_trainer(tmp_path, capsys):
    out = tmp_path / "sst2"
    res = _example("finetune_glue_with_trainer").main(
        ["--method", "svd", "--steps", "2", "--batch-size", "8", "--train-limit", "16", "--eval-limit", "24",
         "--output-dir", str(out)])
    assert res["steps"] == 2 and res["train_examples"] == 16 and res["dev_examples"] == 24
    assert res["compression_ratio"] >= 25
    for k in ("accuracy_uncompressed", "accuracy_compressed"):
        assert 0.0 <= res[k] <= 1.0
    # the fine-tuned checkpoint is still compressed and stores the very same embedding bytes
    assert res["embedding_layout_unchanged"] and res["embedding_bytes_unchanged"]
    cfg = json.loads((Path(res["finetuned_dir"]) / "config.json").read_text())
    assert cfg["model_type"] == "embcomp" and cfg["architectures"] == ["EmbCompForSequenceClassification"]
    assert json.loads((out / "results.json").read_text()) == res
    assert "SST-2 dev accuracy after 2 steps" in capsys.readouterr().out


def test_causal_lm_generate(tmp_path, smollm_gguf, capsys):
    res = _example("causal_lm_generate").main(
        ["--model", str(smollm_gguf), "--max-new-tokens", "3", "--prompt", "What is the capital of France?",
         "--output-dir", str(tmp_path / "smol")])
    assert res["compression_ratio"] >= 8
    (gen,) = res["generations"]
    assert 1 <= gen["new_tokens"] <= 3 and gen["compressed"]
    assert 0 <= gen["identical_prefix"] <= gen["new_tokens"]
    assert "compressed:" in capsys.readouterr().out


def test_push_variant_dry_run(tmp_path, capsys):
    dry = tmp_path / "dry"
    out = _example("push_variant").main(["--repo-id", "someone/minilm-svd-8x", "--dry-run-dir", str(dry)])
    assert Path(out) == dry
    plan = json.loads((dry / "commit.json").read_text())
    paths = {op["path_in_repo"] for op in plan["operations"]}
    assert {"config.json", "model.safetensors", "modeling_embcomp.py", "README.md", "compression_report.json"} <= paths
    assert plan["repo_id"] == "someone/minilm-svd-8x"
    assert all((dry / "files" / p).is_file() for p in paths)
    assert "nothing was pushed" in capsys.readouterr().out
