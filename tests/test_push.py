"""`hf-embcomp push` / `hf_embcomp.push_to_hub` against a Hub API server on 127.0.0.1 (tests/support/fake_hub.py)
driven by the real huggingface_hub client; the pushed repo is loaded back where hf_embcomp cannot be imported."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers
from huggingface_hub import ModelCard

import hf_embcomp
from hf_embcomp import push as push_mod
from hf_embcomp.cards import ResultsError
from hf_embcomp.cli import main as cli_main
from tests.support.fake_hub import FakeHub
from tests.support.isolated import run_isolated

TOKEN = "hf_fakePushTokenDoNotLeak0123456789"


# ---- fixtures ---------------------------------------------------------------------------------------------------
def _tiny_tokenizer(folder: Path) -> transformers.BertTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(995)]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return transformers.BertTokenizer(vocab_file=str(folder / "vocab.txt"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """A tiny random BERT compressed with SVD 4x, saved as a complete repository folder."""
    tmp = tmp_path_factory.mktemp("tiny")
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    tok = _tiny_tokenizer(tmp / "tok")
    model = hf_embcomp.compress(transformers.BertModel(cfg).eval(), "svd", ratio=4, tokenizer=tok)
    return hf_embcomp.save_compressed(model, tmp / "model"), model, tok


def _results(report: dict, **over) -> dict:
    """A results file in the evaluate schema for the model of ``report`` (values arbitrary but distinct)."""
    res = {"schema_version": 1, "model": "local", "source_model": report["source_model"], "method": report["method"],
           "compression_ratio": report["compression_ratio"], "hyperparameters": report["hyperparameters"],
           "created": "2026-11-21T12:00:00Z", "environment": {"torch": torch.__version__},
           "results": [
               {"suite": "glue", "task": "sst2", "task_type": "text-classification",
                "dataset": {"id": "nyu-mll/glue", "name": "GLUE SST-2", "config": "sst2", "split": "validation", "n": 872},
                "metric": "accuracy", "baseline": 0.9128, "compressed": 0.8761, "drop": 0.0367,
                "higher_is_better": True, "settings": {"max_steps": 200, "seed": 0, "quick": False}},
               {"suite": "glue", "task": "stsb", "task_type": "text-classification",
                "dataset": {"id": "nyu-mll/glue", "name": "GLUE STS-B", "config": "stsb", "split": "validation", "n": 1500},
                "metric": "spearmanr", "baseline": 0.8412, "compressed": 0.7935, "drop": 0.0477,
                "higher_is_better": True, "settings": {"max_steps": 50, "seed": 1, "quick": True}, "extra": [1, 2]},
           ]}
    res.update(over)
    return res


@pytest.fixture
def hub():
    with FakeHub(token=TOKEN) as h:
        yield h


@pytest.fixture
def in_process_hub(hub, monkeypatch):
    """Point this process's huggingface_hub at the fake (constants are read at import time, so patch them)."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(push_mod, "RETRY_DELAY", 0.01)
    return hub


def _client_env(hub: FakeHub, tmp: Path) -> dict[str, str]:
    (tmp / "hf_home").mkdir(parents=True, exist_ok=True)
    return {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp / "hf_home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _card_table(readme: str) -> dict[str, list[str]]:
    """Rows of the card's results table: task -> [metric, baseline, compressed, drop]."""
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and re.fullmatch(r"-?\d+\.\d{4}", cells[3]):
            rows[cells[0].replace(" (quick)", "")] = [cells[2], cells[3], cells[4], cells[5]]
    return rows


def _check_card(readme: str, results: dict, repo_id: str, source: str | None) -> None:
    """The card's metadata parses and its numbers are those of ``results``."""
    card = ModelCard(readme)
    assert card.data.library_name == "transformers"
    assert {"embedding-compression", results["method"]} <= set(card.data.tags)
    assert card.data.base_model == source
    got = [(e.task_name, e.dataset_type, e.dataset_name, e.dataset_config, e.dataset_split, e.metric_type,
            e.metric_value) for e in card.data.eval_results]
    want = [(r["task"], r["dataset"]["id"], r["dataset"]["name"], r["dataset"]["config"], r["dataset"]["split"],
             r["metric"], r["compressed"]) for r in results["results"]]
    assert got == want
    assert card.data.model_name == repo_id
    assert _card_table(readme) == {r["task"]: [r["metric"]] + [f"{r[k]:.4f}" for k in ("baseline", "compressed", "drop")]
                                   for r in results["results"]}
    assert f'from_pretrained("{repo_id}", trust_remote_code=True)' in readme


_LOAD_BACK = """
import json, sys, torch
from transformers import AutoModel, AutoTokenizer
repo, inputs = {repo!r}, json.load(open({inputs!r}))
model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
with torch.no_grad():
    out = model(input_ids=torch.tensor(inputs["input_ids"]), attention_mask=torch.tensor(inputs["attention_mask"]))
expected = torch.tensor(inputs["expected"])
tok = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
print(json.dumps({{"max_abs_diff": (out.last_hidden_state - expected).abs().max().item(),
                  "module": type(model).__module__, "tokens": tok(inputs["text"])["input_ids"],
                  "hf_embcomp_imported": any(m.startswith("hf_embcomp") for m in sys.modules)}}))
"""


def _roundtrip(folder: Path, model, tok, hub: FakeHub, tmp: Path, repo_id: str, text: str,
               base_model: str | None, capsys, caplog) -> None:
    """Push ``folder`` with the CLI, check the remote repo and card, load it back in a fresh process."""
    results = _results(json.loads((folder / "compression_report.json").read_text()))
    (tmp / "results.json").write_text(json.dumps(results))
    caplog.set_level("DEBUG")
    rc = cli_main(["-v", "push", str(folder), repo_id, "--results", str(tmp / "results.json")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "committing" in caplog.text  # the log is there, and holds no token:
    assert TOKEN not in out.out + out.err + caplog.text
    assert hub.head(repo_id) in out.out

    remote = hub.files(repo_id)
    local = _local_files(folder)
    assert set(remote) == set(local) | {".gitattributes", "eval_results.json"}
    assert all(remote[p] == data for p, data in local.items() if p != "README.md")
    assert json.loads(remote["eval_results.json"]) == results
    assert not hub.unauthorized and ("POST", f"/api/models/{repo_id}/commit/main") in hub.requests
    assert sum(1 for m, p in hub.requests if p.endswith("/commit/main")) == 1  # one atomic commit
    assert not any(TOKEN.encode() in data for data in remote.values())
    _check_card(remote["README.md"].decode(), results, repo_id, base_model)

    enc = tok([text, text + " " + text], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**enc).last_hidden_state
    inputs = {"input_ids": enc["input_ids"].tolist(), "attention_mask": enc["attention_mask"].tolist(),
              "expected": expected.tolist(), "text": text}
    iso = tmp / "isolated"
    iso.mkdir()
    (iso / "inputs.json").write_text(json.dumps(inputs))
    out = run_isolated(_LOAD_BACK.format(repo=repo_id, inputs=str(iso / "inputs.json")), iso,
                       env=_client_env(hub, iso), timeout=300)
    assert out["max_abs_diff"] < 1e-5
    assert out["module"].startswith("transformers_modules.") and not out["hf_embcomp_imported"]
    assert out["tokens"] == tok(text)["input_ids"]
    assert ("GET", f"/{repo_id}/resolve/{hub.head(repo_id)}/model.safetensors") in hub.requests


# ---- tests ------------------------------------------------------------------------------------------------------
def test_push_roundtrip_tiny(tiny, in_process_hub, tmp_path, capsys, caplog):
    folder, model, tok = tiny
    _roundtrip(folder, model, tok, in_process_hub, tmp_path, "tester/tiny-bert-svd-4x", "w1 w2 w17 w999", None,
               capsys, caplog)


def test_push_roundtrip_tiny_lighttoken(tiny, in_process_hub, tmp_path, capsys, caplog):
    """A LightToken model (fp16 factors, bit-packed uint8 codes) round-trips through the Hub too."""
    _, svd_model, tok = tiny
    stock = hf_embcomp.decompress(svd_model)
    model = hf_embcomp.compress(stock, "lighttoken", ratio=4, tokenizer=tok, epochs=2)
    folder = hf_embcomp.save_compressed(model, tmp_path / "lt")
    _roundtrip(folder, model, tok, in_process_hub, tmp_path, "tester/tiny-bert-lighttoken-4x", "w3 w4 w500",
               None, capsys, caplog)


@pytest.mark.slow
def test_push_roundtrip_minilm_svd(minilm_path, in_process_hub, tmp_path, capsys, caplog):
    src = hf_embcomp.load_model(minilm_path)
    model = hf_embcomp.compress(src.model, "svd", ratio=8, source="sentence-transformers/all-MiniLM-L6-v2",
                                tokenizer=src.tokenizer, source_folder=str(minilm_path))
    folder = hf_embcomp.save_compressed(model, tmp_path / "minilm-svd-8x")
    _roundtrip(folder, model, src.tokenizer, in_process_hub, tmp_path, "tester/all-MiniLM-L6-v2-svd-8x",
               "A compressed embedding still loads from the Hub.", "sentence-transformers/all-MiniLM-L6-v2",
               capsys, caplog)
    card = ModelCard(in_process_hub.files("tester/all-MiniLM-L6-v2-svd-8x")["README.md"].decode())
    assert card.data.license == ModelCard.load(minilm_path / "README.md").data.license == "apache-2.0"


def test_python_api_pushes_model_private_to_branch(tiny, in_process_hub):
    _, model, _ = tiny
    hub = in_process_hub
    results = _results(model.compression_report)
    info = hf_embcomp.push_to_hub(model, "tester/tiny-dev", results=results, private=True, revision="dev")
    assert hub.repos["tester/tiny-dev"].private
    assert info.oid == hub.head("tester/tiny-dev", "dev")
    assert set(hub.files("tester/tiny-dev", "main")) == {".gitattributes"}  # main untouched
    files = hub.files("tester/tiny-dev", "dev")
    assert {"config.json", "model.safetensors", "modeling_embcomp.py", "tokenizer_config.json", "README.md"} <= set(files)
    assert json.loads(files["eval_results.json"]) == results
    _check_card(files["README.md"].decode(), results, "tester/tiny-dev", None)
    commit = hub.repos["tester/tiny-dev"].commits[info.oid]
    assert "svd" in commit.message and f"{model.compression_report['compression_ratio']:.1f}x" in commit.message


def test_dry_run_writes_plan_and_card_without_network(tiny, in_process_hub, tmp_path, monkeypatch):
    folder, _, _ = tiny
    hub = in_process_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the dry run opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    results = _results(json.loads((folder / "compression_report.json").read_text()))
    (tmp_path / "r.json").write_text(json.dumps(results))
    rc = cli_main(["push", str(folder), "tester/dry", "--results", str(tmp_path / "r.json"),
                   "--dry-run", str(tmp_path / "plan")])
    assert rc == 0 and hub.requests == []
    written = _local_files(tmp_path / "plan" / "files")
    local = _local_files(folder)
    assert set(written) == set(local) | {"eval_results.json"}
    assert all(written[p] == d for p, d in local.items() if p != "README.md")
    plan = json.loads((tmp_path / "plan" / "commit.json").read_text())
    assert plan["repo_id"] == "tester/dry" and plan["revision"] == "main"
    assert {op["path_in_repo"]: op["size"] for op in plan["operations"]} == {p: len(d) for p, d in written.items()}
    _check_card(written["README.md"].decode(), results, "tester/dry", None)

    # Without results the card says so, and has no model-index.
    out = hf_embcomp.push_to_hub(folder, "tester/dry", dry_run=tmp_path / "plain")
    readme = (out / "files" / "README.md").read_text()
    assert "No downstream evaluation results were measured" in readme
    assert ModelCard(readme).data.eval_results is None and "eval_results.json" not in _local_files(out / "files")
    assert not any(TOKEN in p.read_text(errors="ignore") for p in (tmp_path).rglob("*") if p.is_file())
    assert hub.requests == []


def test_transient_commit_errors_are_retried(tiny, in_process_hub):
    folder, _, _ = tiny
    hub = in_process_hub
    hub.fail("commit", times=push_mod.RETRIES - 1)
    info = hf_embcomp.push_to_hub(folder, "tester/flaky")
    assert info.oid == hub.head("tester/flaky")
    assert sum(1 for m, p in hub.requests if p == "/api/models/tester/flaky/commit/main") == push_mod.RETRIES
    assert "model.safetensors" in hub.files("tester/flaky")


def test_failed_push_leaves_remote_as_it_was(tiny, in_process_hub, capsys, caplog):
    folder, _, _ = tiny
    hub = in_process_hub
    caplog.set_level("DEBUG")
    hf_embcomp.push_to_hub(folder, "tester/existing", commit_message="first")
    head, before = hub.head("tester/existing"), hub.files("tester/existing")

    # An existing repo: every commit attempt fails -> a clear error, the repo unchanged.
    hub.fail("commit", times=push_mod.RETRIES)
    with pytest.raises(push_mod.PushError, match="HTTP 500 on POST .*commit/main.*injected.*nothing was committed, the repo is unchanged") as exc:
        hf_embcomp.push_to_hub(folder, "tester/existing", results=_results(json.loads(before["compression_report.json"])))
    assert hub.head("tester/existing") == head and hub.files("tester/existing") == before
    chain = [exc.value, exc.value.__cause__]
    assert not any(TOKEN in str(e) or TOKEN in repr(e) for e in chain)

    # A new branch of it: the branch is deleted again.
    hub.fail("commit", times=push_mod.RETRIES)
    with pytest.raises(push_mod.PushError, match="the branch created for it was deleted again"):
        hf_embcomp.push_to_hub(folder, "tester/existing", revision="feature")
    assert set(hub.repos["tester/existing"].refs) == {"main"} and hub.head("tester/existing") == head

    # A new repo: the CLI exits 1 with one line, and no (empty) repo is left behind.
    hub.fail("commit", times=push_mod.RETRIES)
    rc = cli_main(["push", str(folder), "tester/fresh"])
    err = capsys.readouterr().err
    assert rc == 1 and "tester/fresh" not in hub.repos
    last = err.strip().splitlines()[-1]  # (after huggingface_hub's upload progress bar)
    assert last.startswith("hf-embcomp: error: push to tester/fresh@main failed: HTTP 500 on POST") and "deleted again" in last
    assert TOKEN not in err
    assert TOKEN not in caplog.text and "retrying" in caplog.text


def test_bad_inputs_are_user_errors(tiny, tmp_path, capsys):
    folder, model, _ = tiny
    assert cli_main(["push", str(tmp_path), "tester/x", "--dry-run", str(tmp_path / "p")]) == 2
    assert "not a compressed model folder" in capsys.readouterr().err
    other = _results(model.compression_report, method="lighttoken")
    with pytest.raises(ValueError, match="results are for method 'lighttoken'"):
        hf_embcomp.push_to_hub(folder, "tester/x", results=other, dry_run=tmp_path / "p1")
    broken = _results(model.compression_report)
    del broken["results"][1]["dataset"]["id"]
    with pytest.raises(ResultsError, match=r"results\[1\] \(stsb\) needs dataset.id"):
        hf_embcomp.push_to_hub(folder, "tester/x", results=broken, dry_run=tmp_path / "p2")
    assert not (tmp_path / "p1").exists() and not (tmp_path / "p2").exists()
