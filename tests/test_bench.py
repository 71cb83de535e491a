"""Smoke test of the benchmark scripts (issue 8): each runs with ``--quick`` and writes JSON of the expected shape.

Benchmarks are not tests: this only checks that the scripts run and that what they write is consistent (schema,
ratios >= requested, bytes accounted == bytes stored). To stay within a few minutes on 2 cores it restricts the
registry-driven scripts to ``svd`` and two peers; the scripts themselves iterate ``hf_embcomp.METHODS``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hf_embcomp

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
pytestmark = pytest.mark.slow


def run(script: str, *args: str, timeout: int = 600) -> None:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env,
                         timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-results")


def _has_faiss() -> bool:
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


def test_quality_quick(results):
    out = results / "quality.json"
    peers = "int8-row,faiss-pq" if _has_faiss() else "int8-row"  # faiss-cpu comes with the bench extra
    run("quality.py", "--quick", "--methods", "svd", "--peers", peers, "--out", str(out))
    q = json.loads(out.read_text())
    assert q["finished"] and q["quick"] and q["models"] == ["minilm"] and q["ratios"] == [25, 100]
    assert {"environment", "baselines", "settings", "rows", "plots"} <= set(q)
    assert q["baselines"]["minilm"]["V"] == 30522 and q["baselines"]["minilm"]["d"] == 384
    ok = [r for r in q["rows"] if r["status"] == "ok"]
    assert {(r["method"], r["ratio_requested"]) for r in ok if r["kind"] == "ours"} == {("svd", 25), ("svd", 100)}
    assert any(r["method"] == "int8-row" for r in ok)
    assert any(r.get("peer") == "faiss-pq" for r in ok) or not _has_faiss()
    fp32 = 30522 * 384 * 4
    for r in ok:
        for k in ("ratio", "stored_bytes", "accounted_bytes", "row_cosine_mean", "relative_frobenius_error",
                  "sentence_cosine", "fit_seconds"):
            assert isinstance(r[k], (int, float)), (r["method"], k)
        assert r["stored_bytes"] == r["accounted_bytes"]
        assert r["ratio"] == pytest.approx(fp32 / r["stored_bytes"])
        if r["ratio_requested"] is not None:
            assert r["ratio"] >= r["ratio_requested"]
        assert -1.0 <= r["sentence_cosine"] <= 1.0 + 1e-6 and 0 < r["row_cosine_mean"] <= 1.0 + 1e-6
    assert (out.parent / "quality_minilm.png").is_file()


def test_speed_quick(results):
    out = results / "speed.json"
    run("speed.py", "--quick", "--methods", "svd", "--out", str(out))
    s = json.loads(out.read_text())
    assert s["finished"] and s["batch"] == "4x32"
    assert [(r["method"], r["status"]) for r in s["fit"]] == [("svd", "ok")]
    assert all(r["ratio"] >= r["ratio_requested"] for r in s["fit"])
    for name, m in s["models"].items():
        assert m["stored_bytes"] == m["accounted_bytes"] and m["bytes_match"] is True, name
    assert s["models"]["svd"]["ratio"] >= 25
    names = {r["name"] for r in s["lookup"]}
    assert {"nn.Embedding", "svd on the fly", "svd cached"} <= names
    assert {r["name"] for r in s["forward"]} == {"stock MiniLM", "svd"}
    assert all(r["vs_stock"] > 0 for r in s["forward"])
    assert all(r["status"] == "ok" and r["peak_rss_after_forward_mb"] > 0 for r in s["load"])
    assert (out.parent / "speed.png").is_file()


def test_scale_quick(results):
    out = results / "scale.json"
    run("scale.py", "--quick", "--out", str(out))
    c = json.loads(out.read_text())
    assert c["finished"] and c["methods"] == ["svd"]
    assert [r["status"] for r in c["rows"]] == ["ok"] * 3
    assert all(r["ratio"] >= c["ratio"] and r["fit_seconds"] > 0 for r in c["rows"])
    targets = {t["target"] for p in c["projection"] for t in p["targets"]}
    assert len(targets) == 2 and all(t["fit_seconds"] > 0 for p in c["projection"] for t in p["targets"])
    assert all(r["peak_vs_fp32"] == pytest.approx(r["fit_peak_growth_mb"] / r["input_mb"]) and r["threads"] == 2
               for r in c["rows"])


def test_deploy_quick(results):
    pytest.importorskip("torchao")
    out = results / "deploy.json"
    run("deploy.py", "--quick", "--threads", "1", "--out", str(out))
    d = json.loads(out.read_text())
    assert d["finished"] and d["quick"] and d["models"] == ["minilm"] and d["method"] == "svd"
    assert [(r["variant"], r["status"]) for r in d["rows"]] == [
        ("stock", "ok"), ("body-int8", "ok"), ("body-nf4", "ok"), ("embedding", "ok"), ("both", "ok"),
        ("both-nf4", "ok"), ("onnx", "ok"), ("stock-onnx", "ok")]
    b = {r["variant"]: r["bytes"] for r in d["rows"]}
    assert b["stock"] > b["body-int8"] > b["both"] and b["stock"] > b["embedding"] > b["both"] > b["both-nf4"]
    assert b["body-int8"] > b["body-nf4"]
    assert d["rows"][3]["compression_report"]["compression_ratio"] >= 25
    assert all(r["ratio_vs_stock"] == pytest.approx(b["stock"] / r["bytes"], rel=1e-2) for r in d["rows"])
    measured = [r for r in d["rows"] if "onnx" not in r["variant"]]
    assert d["settings"]["minilm"]["pairs"] == 200 and all(-100 <= r["quality"] <= 100 for r in measured)
    (onnx,) = [r for r in d["rows"] if r["variant"] == "onnx"]  # the embedding folder exported, still compressed
    assert onnx["task"] == "feature-extraction" and onnx["bytes"] < 1.1 * onnx["safetensors_bytes"]
    assert onnx["ort_checks"][0]["max_abs_diff_real_tokens"] < 1e-4


def test_spectrum_matrix_has_the_resampled_spectrum(tmp_path, monkeypatch):
    """The Llama-3-8B-shaped matrix of bench/scale.py: random rows whose singular values follow the real
    matrix's, resampled to the new width, at the same mean squared entry."""
    sys.path.insert(0, str(BENCH))
    try:
        import scale
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(scale, "cache_dir", lambda: tmp_path)
    g = np.random.default_rng(0)
    like = (g.standard_normal((3000, 8)) * np.geomspace(4, 0.25, 8)).astype(np.float32)
    np.save(tmp_path / "like.npy", like)
    E = np.load(scale.spectrum_matrix(6000, 16, tmp_path / "like.npy"))
    assert E.shape == (6000, 16) and E.dtype == np.float32
    assert np.mean(E.astype(np.float64) ** 2) == pytest.approx(np.mean(like.astype(np.float64) ** 2), rel=0.05)
    s_src, s = np.linalg.svd(like, compute_uv=False), np.linalg.svd(E, compute_uv=False)
    assert s[0] / s[-1] == pytest.approx(s_src[0] / s_src[-1], rel=0.2)  # the same decay over the relative index


def test_report_renders(results):
    out = results / "results.md"
    run("report.py", "--results", str(results), "--out", str(out))
    text = out.read_text()
    assert text.startswith("## Results")
    for heading in ("### Quality at equal stored bytes", "### Cost", "### Scale", "### Deploy: whole-model size"):
        assert heading in text
    assert "quality_minilm.png" in text and "speed.png" in text and "scale.png" in text


def test_scripts_follow_the_registry():
    sys.path.insert(0, str(BENCH))
    try:
        import common
    finally:
        sys.path.remove(str(BENCH))
    assert common.registered_methods() == list(hf_embcomp.METHODS)
    assert common.registered_methods("svd,nonexistent") == ["svd"]


def test_sweep_cells_collected_and_rendered(tmp_path):
    """bench/collect_sweep.py copies finished cells (+ fit seconds) and the report renders their values."""
    from hf_embcomp.evaluation.results import new_results, result, write_results

    sweep = tmp_path / "sweep"
    for method, ratio, ppl, fit in (("svd", 10.2, 812.5, 3.25), ("lighttoken", 25.1, 47.25, 61.0)):
        cell = sweep / f"{method}-x{ratio:g}"
        (cell / "model").mkdir(parents=True)
        doc = new_results(str(cell / "model"), "src", {"method": method, "compression_ratio": ratio, "hyperparameters": {}}, "cpu")
        ds = {"id": "w", "name": "W", "n": 99}
        doc["results"] = [result("lm", "wikipedia", "text-generation", ds, "perplexity", 20.0, ppl, False, {"seed": 0, "quick": False})]
        write_results(doc, cell / "eval_results.json")
        (cell / "model" / "compression_report.json").write_text(json.dumps({"fit_seconds": fit, "stored_bytes": 7}))
    (sweep / "unfinished-x5" / "model").mkdir(parents=True)  # no eval_results.json: not copied
    results = tmp_path / "results"
    results.mkdir()
    sys.path.insert(0, str(BENCH))
    try:
        import collect_sweep
        import report
    finally:
        sys.path.remove(str(BENCH))
    paths = collect_sweep.collect(sweep, results / "sweep_toy")
    assert sorted(p.name for p in paths) == ["lighttoken-x25.1.json", "svd-x10.2.json"]
    assert json.loads(paths[1].read_text())["compression_report"] == {"fit_seconds": 3.25, "stored_bytes": 7}
    text = report.render(results, "")
    rows = [line for line in text.splitlines() if line.startswith("| svd ") or line.startswith("| lighttoken ")]
    assert rows == ["| lighttoken | 25.1 | 47.2 | 61 |", "| svd | 10.2 | 812.5 | 3 |"]
    assert "| uncompressed | 1 | 20.0 | – |" in text and "sweep_toy/pareto.png" in text
    with pytest.raises(SystemExit, match="no finished cell"):
        collect_sweep.collect(sweep / "unfinished-x5", results / "sweep_empty")


def test_torchao_peer_bytes_and_error():
    """The torchao peer: packed bytes = codes at their bit width + torchao's own scales / zero points, and its
    per-row int8 reconstruction is within half a quantisation step of E (torchao's default int8 is symmetric:
    step = 2 * max|row| / 255)."""
    pytest.importorskip("torchao")
    import torch

    sys.path.insert(0, str(BENCH))
    try:
        import peers
    finally:
        sys.path.remove(str(BENCH))
    g = torch.Generator().manual_seed(0)
    E = torch.randn(200, 64, generator=g)
    r8 = peers.torchao_quantise(E, 8)
    scales = r8.stored_bytes - 200 * 64  # fp32 scale + int8 zero point a row
    assert scales == 200 * (4 + 1)
    step = 2 * E.abs().amax(1) / 255
    assert ((r8.reconstruction - E).abs().amax(1) <= step * 0.51 + 1e-6).all()
    r4 = peers.torchao_quantise(E, 4, 32)
    assert r4.stored_bytes == 200 * 64 // 2 + 200 * 2 * (4 + 1) and r4.params["in_memory_bytes"] > r4.stored_bytes
    err = [float((r.reconstruction - E).norm() / E.norm()) for r in (r8, r4, peers.torchao_quantise(E, 2))]
    assert err[0] < err[1] < err[2] < 1


def test_best_at_equal_bytes_takes_only_peers_with_fewer_bytes():
    """The generated "best at equal or fewer bytes" table compares our row with peers whose actual ratio is at least
    ours: a better peer with more bytes is not taken, nor a row without a finite score; recovered rows stand apart."""
    sys.path.insert(0, str(BENCH))
    try:
        import report
    finally:
        sys.path.remove(str(BENCH))
    rows = [
        {"kind": "ours", "method": "gptq", "ratio_requested": 8, "ratio": 8.0, "perplexity": 23.0, "status": "ok"},
        {"kind": "ours", "method": "lighttoken", "ratio_requested": 8, "ratio": 8.01, "perplexity": 26.0, "status": "ok"},
        {"kind": "ours", "method": "gptq+recover", "ratio_requested": 8, "ratio": 8.0, "perplexity": 22.5,
         "status": "ok", "recovery": {"steps": 3}},
        {"kind": "peer", "method": "Q4_K", "peer": "ggml-Q4_K", "ratio_requested": None, "ratio": 7.1,
         "perplexity": 22.9, "status": "ok"},  # better, but more bytes
        {"kind": "peer", "method": "Q3_K", "peer": "ggml-Q3_K", "ratio_requested": None, "ratio": 9.3,
         "perplexity": 27.0, "status": "ok"},
        {"kind": "peer", "method": "PQ", "peer": "faiss-pq", "ratio_requested": 8, "ratio": 8.0,
         "perplexity": 24.0, "status": "ok"},  # equal bytes count
        {"kind": "peer", "method": "broken", "peer": "x", "ratio_requested": None, "ratio": 9.0,
         "perplexity": float("nan"), "status": "ok"},
        {"kind": "peer", "method": "failed", "peer": "y", "ratio_requested": None, "ratio": 9.0, "status": "failed"},
    ]
    ((c, ours, rec, peer),) = report.best_at_equal_bytes(rows, "perplexity", True, [8.0, 16.0])
    assert (c, ours["method"], rec["method"], peer["method"]) == (8.0, "gptq", "gptq+recover", "PQ")
    rows[5]["perplexity"] = 22.0  # a peer at equal bytes that is better: the table says we lose
    text = "\n".join(report.best_section(rows, {"perplexity": 20.0}, "perplexity", [8.0]))
    assert "| 8x | gptq 8.0x: 23.00 (+15.0 %) | gptq+recover 8.0x: 22.50 (+12.5 %) | faiss-pq 8.0x: 22.00 (+10.0 %) | **no** |" in text
    assert report.best_at_equal_bytes(rows, "stsb_spearman", False, [8.0]) == []  # no row has that metric
