"""Issue 18: a fast command line (no torch for --help or argument errors), --quiet, output folder
permissions, the source name of a model loaded with load_model, the downstream check after compress."""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import hf_embcomp
from hf_embcomp import cli, progress
from hf_embcomp.evaluation import evaluate
from hf_embcomp.evaluation.check import describe
from hf_embcomp.io import DEFAULT_MODEL, atomic_output_dir, load_model, read_report

REPO = Path(__file__).resolve().parents[1]
NOT_YET_REGISTERED = {"auto"}  # a selector over the registered methods, not a storage format


def test_method_table_matches_the_registry_and_default_dtypes():
    table = {m.name: m for m in cli.METHOD_TABLE}
    assert len(table) == len(cli.METHOD_TABLE), "a method is listed twice"
    assert set(hf_embcomp.METHODS) <= set(table), f"not in cli.METHOD_TABLE: {set(hf_embcomp.METHODS) - set(table)}"
    assert set(table) - set(hf_embcomp.METHODS) <= NOT_YET_REGISTERED, set(table) - set(hf_embcomp.METHODS)
    assert cli.DEFAULT_METHOD == "auto" or cli.DEFAULT_METHOD in hf_embcomp.METHODS
    for name in hf_embcomp.METHODS:
        entry = table[name]
        assert entry.summary and "\n" not in entry.summary
        if entry.dtype is None and name == "auto":  # the dtype of the method it keeps
            continue
        fields = {f.name: f for f in dataclasses.fields(hf_embcomp.get_method(name).config_class)}
        assert entry.dtype == fields["dtype"].default, f"{name}: table {entry.dtype}, config {fields['dtype'].default}"


def _run(args: list[str], code: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_help_and_argument_errors_import_neither_torch_nor_transformers():
    probe = ("import sys\n"
             "from hf_embcomp import cli\n"
             "for argv in (['--help'], ['compress', '--help'], ['compress', '--ratio', '25'], ['push', '--help'],\n"
             "             ['evaluate', '--help'], ['distill', '--help'], ['sweep', '--help']):\n"
             "    try:\n"
             "        cli.main(argv)\n"
             "    except SystemExit as e:\n"
             "        print('exit', argv, e.code)\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'accelerate', 'tqdm', 'huggingface_hub.hf_api')\n"
             "               if m in sys.modules)\n"
             "print('heavy', heavy)\n")
    r = _run(["-c", probe])
    assert r.returncode == 0, r.stderr
    assert "heavy []" in r.stdout, r.stdout
    assert "exit ['compress', '--ratio', '25'] 2" in r.stdout
    assert "the following arguments are required: --output" in r.stderr
    assert "Traceback" not in r.stderr

    r = _run(["-m", "hf_embcomp", "compress", "--help"])
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for m in cli.METHOD_TABLE:
        assert f"{m.name} {m.dtype or 'varies'} {' '.join(m.summary.split()[:3])}" in text, m.name
    assert "(default: the method's own (see the list above))" in text and "(default float32)" not in text


def test_package_names_resolve_lazily():
    assert hf_embcomp.compress is hf_embcomp.core.compress
    assert hf_embcomp.RatioError is hf_embcomp.methods.RatioError and "svd" in hf_embcomp.METHODS
    assert set(hf_embcomp.__all__) == set(hf_embcomp._EXPORTS) and set(hf_embcomp.__all__) <= set(dir(hf_embcomp))
    for name in hf_embcomp.__all__:
        assert getattr(hf_embcomp, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        hf_embcomp.nope  # noqa: B018


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory, minilm_path) -> Path:
    """A tiny BERT with MiniLM's tokenizer (30522 x 16), saved as a source folder."""
    root = tmp_path_factory.mktemp("tiny_src")
    tok = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).eval().save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_prints_only_the_summary(tiny_source, tmp_path, capfd, quiet):
    """The fit's bars (token counting for LightToken's exact rows, the training loop) obey --quiet."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    tlog = transformers.utils.logging
    before = tlog.get_verbosity(), tlog.is_progress_bar_enabled(), progress.disabled()
    capfd.readouterr()
    code = cli.main(["compress", str(tiny_source), "--method", "lighttoken", "--ratio", "8", "--corpus", str(corpus),
                     "--hp", "epochs=1", "--output", str(tmp_path / "out"), *(["--quiet"] if quiet else [])])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "compression ratio" in out
    if quiet:
        assert err == ""
    else:  # the bars this switch turns off exist
        assert "counting tokens" in err and "lighttoken" in err
    assert (tlog.get_verbosity(), tlog.is_progress_bar_enabled(), progress.disabled()) == before  # restored


def test_output_folder_gets_save_pretrained_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "config.json").write_text("{}")
        with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "config.json").write_text("{}")
        reference = tmp_path / "reference"
        BertModel(BertConfig(vocab_size=10, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                             intermediate_size=4)).save_pretrained(reference)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE(reference.stat().st_mode) == 0o755  # what a stock save_pretrained gives


def test_compress_records_the_name_load_model_loaded(tiny_source):
    src = load_model(None)
    comp = hf_embcomp.compress(src.model, "svd", 8)
    assert comp.compression_report["source_model"] == DEFAULT_MODEL == "sentence-transformers/all-MiniLM-L6-v2"
    assert comp.config.embedding_compression["source_model"] == DEFAULT_MODEL
    assert "site-packages" not in comp.compression_report["source_model"]
    tiny = load_model(str(tiny_source)).model
    assert hf_embcomp.compress(tiny, "svd", 8).compression_report["source_model"] == str(tiny_source)
    named = hf_embcomp.compress(tiny, "svd", 8, source="me/my-tiny", source_revision="abc")  # given: it wins
    assert named.config.embedding_compression["source_model"] == "me/my-tiny"
    assert named.config.embedding_compression["source_revision"] == "abc"


@pytest.fixture(scope="module")
def tiny_sources(tiny_source, tmp_path_factory) -> dict[str, Path]:
    """The tiny BERT as a sentence-transformers folder (modules.json: evaluate runs its sentence suite), and a
    tiny tied Llama with the same tokenizer (a causal LM: the check is a perplexity)."""
    root = tmp_path_factory.mktemp("tiny_srcs")
    st = root / "encoder"
    shutil.copytree(tiny_source, st)
    (st / "modules.json").write_text('[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.'
                                     'Transformer"}]')
    tok = AutoTokenizer.from_pretrained(tiny_source)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      tie_word_embeddings=True, pad_token_id=0)
    LlamaForCausalLM(cfg).eval().save_pretrained(root / "causal")
    tok.save_pretrained(root / "causal")
    return {"encoder": st, "causal": root / "causal"}


@pytest.mark.parametrize("kind", ["encoder", "causal"])
def test_compress_prints_and_records_the_check_evaluate_quick_gives(kind, tiny_sources, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["compress", str(tiny_sources[kind]), "--method", "svd", "--ratio", "4", "--output", str(out),
                     "--quiet"]) == 0
    summary = capsys.readouterr().out
    check = read_report(out)["check"]
    suite, metric = ("sentence", "cosine_to_uncompressed") if kind == "encoder" else ("lm", "perplexity")
    assert (check["suite"], check["metric"]) == (suite, metric)
    assert check["compressed"] != check["baseline"]  # a real measurement of both models, not a placeholder
    assert f"  check             {describe(check)}" in summary.splitlines()
    doc, skipped = evaluate(str(out), suites=(suite,), quick=True, device="cpu",
                            tasks=("wikipedia",) if kind == "causal" else None)
    assert skipped == {}
    row = next(r for r in doc["results"] if r["metric"] == metric)
    assert check["same_as"] and check["same_as"].startswith(f"hf-embcomp evaluate DIR --quick --suite {suite}")
    assert row["dataset"] == check["dataset"]
    assert check["baseline"] == pytest.approx(row["baseline"], abs=1e-6)
    assert check["compressed"] == pytest.approx(row["compressed"], abs=1e-6)  # issue 18: within 0.01


def test_no_check_skips_the_check(tiny_source, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["compress", str(tiny_source), "--method", "svd", "--ratio", "4", "--output", str(out),
                     "--no-check", "--quiet"]) == 0
    assert "check" not in read_report(out)
    assert " check " not in capsys.readouterr().out


def test_gguf_dequantisation_bar_follows_quiet():
    """transformers' GGUF loader draws a bare tqdm bar (deaf to its own disable_progress_bar)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    with progress.gguf_bar():
        assert gguf_utils.tqdm is original  # not quiet: the bar is drawn
    with progress.quiet(), progress.gguf_bar():
        bar = gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")
        assert bar.disable
        bar.close()
    assert gguf_utils.tqdm is original


def test_source_label_of_a_gguf_path_names_the_file_once(tmp_path):
    from hf_embcomp.io import Source

    gguf = tmp_path / "m.Q4_1.gguf"
    assert Source(None, None, str(gguf), tmp_path, gguf.name).label == str(gguf)
    assert Source(None, None, "org/repo-GGUF", None, "m.Q4_1.gguf").label == "org/repo-GGUF::m.Q4_1.gguf"
    assert Source(None, None, str(tmp_path), tmp_path, "m.Q4_1.gguf").label == f"{tmp_path}::m.Q4_1.gguf"


def test_a_failing_check_keeps_the_written_model(tiny_source, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("index out of range in self")

    monkeypatch.setattr("hf_embcomp.evaluation.check.quick_check", broken)
    out = tmp_path / "out"
    assert cli.main(["compress", str(tiny_source), "--method", "svd", "--ratio", "4", "--output", str(out),
                     "--quiet"]) == 0
    check = read_report(out)["check"]
    assert check["skipped"].startswith("the check failed (RuntimeError: index out of range in self)")
    assert f"  check             skipped: {check['skipped']}" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file()
