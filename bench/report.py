"""Write the README "Results" section (markdown tables + PNG links) from
bench/results/{quality,speed,scale,deploy}.json
into docs/results.md. Missing files are noted, not fatal.

    python bench/report.py                                  # -> docs/results.md
    python bench/report.py --out - --link-prefix bench/results/   # print, with links for the README
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _f(v: Any, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{nd}f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _refit_cell(r: dict) -> str:
    """The head-side refit's seconds and whether it was kept (quality rows), or –."""
    h = r.get("head_refit")
    return "–" if not h else f"{_f(h.get('seconds'), 0)} ({'kept' if h.get('kept') else 'undone'})"


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def bucket(ratio: float, ratios: list[float]) -> float:
    """The requested ratio nearest (in log) to a fixed-ratio peer's own ratio."""
    return min(ratios, key=lambda r: abs(math.log(ratio / r)))


def row_name(r: dict) -> str:
    """A row's name in the tables: the peer's key for a ratio-driven peer (its columns give the ratio), the method's
    own name otherwise (fixed-ratio formats such as ``ggml-Q4_K+imatrix``, and ours)."""
    if r["kind"] == "peer" and r.get("ratio_requested") is None:
        return r["method"]
    return r.get("peer") or r["method"]


def best_at_equal_bytes(rows: list[dict], metric: str, lower_is_better: bool,
                        ratios: list[float]) -> list[tuple[float, dict | None, dict | None, dict | None]]:
    """Per requested ratio: our best post-training row, our best recovered row, and the best peer that stores at most
    as many bytes as that post-training row (actual ratio >= its actual ratio; fixed-ratio formats included
    wherever they qualify). Rows without a finite ``metric`` are left out.

    Returns:
        [(requested ratio, ours, ours recovered, best peer)], None where there is none.
    """
    def ok(r: dict) -> bool:
        v = r.get(metric)
        return r.get("status") == "ok" and isinstance(v, (int, float)) and math.isfinite(v)

    def best(rs: list[dict]) -> dict | None:
        return (min if lower_is_better else max)(rs, key=lambda r: r[metric]) if rs else None

    out = []
    for c in ratios:
        here = [r for r in rows if ok(r) and r["kind"] == "ours" and r.get("ratio_requested") is not None
                and float(r["ratio_requested"]) == c]
        ours = best([r for r in here if not r.get("recovery")])
        if ours is None:
            continue
        rec = best([r for r in here if r.get("recovery")])
        peer = best([r for r in rows if ok(r) and r["kind"] == "peer" and r["ratio"] >= ours["ratio"] * (1 - 1e-9)])
        out.append((c, ours, rec, peer))
    return out


def best_section(rows: list[dict], base: dict, metric: str, ratios: list[float]) -> list[str]:
    """The table of :func:`best_at_equal_bytes`, with the change against the uncompressed model."""
    lower = metric == "perplexity"
    ref = base.get("perplexity") if lower else base.get(metric)

    def cell(r: dict | None) -> str:
        if r is None:
            return "–"
        name = row_name(r)
        v, nd = r[metric], 4 if metric == "sentence_cosine" else 2
        if ref is None:
            change = ""
        elif lower:
            change = f" ({100 * (v / ref - 1):+,.1f} %)"
        else:
            change = f" ({v - ref:+.{nd}f})"
        return f"{name} {r['ratio']:.1f}x: {_f(float(v), nd)}{change}"

    body = []
    for c, ours, rec, peer in best_at_equal_bytes(rows, metric, lower, ratios):
        wins = peer is None or (ours[metric] <= peer[metric] if lower else ours[metric] >= peer[metric])
        body.append([f"{c:g}x", cell(ours), cell(rec) if rec else "", cell(peer), "yes" if wins else "**no**"])
    if not body:
        return []
    what = "perplexity, lower is better" if lower else metric.replace("_", " ") + ", higher is better"
    return ["", f"Best at equal or fewer bytes ({what}; the best peer among those whose actual ratio is at least our "
                "post-training row's):", "",
            md_table(["ratio", "hf-embcomp, post-training", "hf-embcomp, recovered", "best peer, <= bytes",
                      "ours at least as good"], body)]


def quality_section(q: dict, link: str, source: str = "quality.json", title: str = "Quality at equal stored bytes") -> list[str]:
    out = [f"### {title}", "", f"From `bench/results/{source}`.", ""]
    env = q.get("environment", {})
    out.append(f"`python bench/quality.py{' --quick' if q.get('quick') else ''}` · torch {env.get('torch')} · "
               f"{env.get('date_utc')} · ratio = fp32 bytes / every stored byte (codes, codebooks, scales, factors), "
               "peers counted the same way. Ours are evaluated through the compressed model (on-the-fly decode); "
               "peers by swapping their reconstruction into the stock model.")
    if q.get("quick"):
        out.append("\n**Quick smoke run (1 training epoch, tiny slices): not the published numbers.**")
    if not q.get("finished"):
        out.append("\n**Run not finished: the tables hold the rows measured so far.**")
    ratios = sorted({float(r["ratio_requested"]) for r in q["rows"] if r.get("ratio_requested") is not None}
                    | {float(r) for r in q["ratios"]})
    for model in q["models"]:
        rows = [r for r in q["rows"] if r["model"] == model]
        if not rows:
            continue
        base = q["baselines"].get(model, {})
        down = "perplexity" if "perplexity" in base else "sentence_cosine"
        st = q.get("settings", {}).get(model, {})
        what = (f"perplexity on the first {st.get('tokens')} tokens of the gensim Wikipedia text (uncompressed: "
                f"{_f(base.get('perplexity'), 2)}; lower is better)") if down == "perplexity" else \
            f"sentence cosine to the uncompressed model on {st.get('sentences')} Rotten Tomatoes sentences (higher is better)"
        out += ["", f"#### {model} ({base.get('V')} x {base.get('d')}): {what}", ""]
        # compact pivot: downstream metric, method x requested ratio (fixed-ratio peers in their nearest column)
        names: list[str] = []
        cell: dict[tuple[str, float], dict] = {}
        for r in rows:
            if r["status"] != "ok":
                continue
            name = row_name(r)
            col = float(r["ratio_requested"]) if r.get("ratio_requested") is not None else bucket(r["ratio"], ratios)
            if name not in names:
                names.append(name)
            cell[(name, col)] = r
        ours = [n for n in names if any(r["kind"] == "ours" and r["method"] == n for r in rows)]
        order = ours + [n for n in names if n not in ours]
        body = []
        for n in order:
            line = [("**" + n + "**") if n in ours else n]
            for c in ratios:
                r = cell.get((n, c))
                if r is None:
                    line.append("")
                elif down == "perplexity" and base.get("perplexity"):
                    rel = 100 * (r[down] / base["perplexity"] - 1)
                    line.append(f"{_f(r.get(down), 2 if r[down] < 100 else 1)} ({rel:+.1f} %, {r['ratio']:.1f}x)")
                else:
                    line.append(f"{_f(r.get(down), 3)} ({r['ratio']:.1f}x)")
            body.append(line)
        out.append(md_table(["method (bold: hf-embcomp)"] + [f"{c:g}x" for c in ratios], body))
        out.append("")
        out.append(f"Cells: {down.replace('_', ' ')} ({'change vs uncompressed, ' if down == 'perplexity' else ''}actual ratio). Scalar quantisers have a fixed ratio and sit in the "
                   "nearest column.")
        rec = [r for r in rows if r["status"] == "ok" and r.get("recovery")]
        if rec:
            st_ = rec[0]["recovery"].get("settings", {})
            out.append(f"`<method>+recover` rows: the post-training model of the row above it after `hf-embcomp recover` "
                       f"(knowledge distillation from the uncompressed model, at most {_f(st_.get('max_seconds', 0) / 60, 0)} "
                       f"minutes / {st_.get('max_steps')} steps, LoRA rank {st_.get('lora_rank', 0)}; stored bytes unchanged; "
                       "recovery time in the details).")
        if base.get("stsb_spearman") is not None:
            body2 = []
            for n in order:
                line = [("**" + n + "**") if n in ours else n]
                for c in ratios:
                    r = cell.get((n, c))
                    v = None if r is None else r.get("stsb_spearman")
                    line.append("" if v is None else f"{v:.2f} ({v - base['stsb_spearman']:+.2f}, {r['ratio']:.1f}x)")
                body2.append(line)
            out += ["", f"STS-B dev Spearman x100 (zero-shot, cosine, mean pooling; uncompressed "
                        f"{base['stsb_spearman']:.2f}; cells: score (change, actual ratio)):", "",
                    md_table(["method (bold: hf-embcomp)"] + [f"{c:g}x" for c in ratios], body2)]
        out += best_section(rows, base, down, ratios)
        if base.get("stsb_spearman") is not None:
            out += best_section(rows, base, "stsb_spearman", ratios)
        out += ["", "<details><summary>all rows (row cosine, relative Frobenius error, fit time)</summary>", ""]
        det = []
        for r in sorted((r for r in rows if r["status"] == "ok"), key=lambda r: (r["ratio"], r["kind"] != "ours")):
            det.append([r["method"], r["kind"], _f(r.get("ratio_requested"), 0) if r.get("ratio_requested") else "fixed",
                        f"{r['ratio']:.2f}", _f(r.get("row_cosine_mean"), 4), _f(r.get("row_cosine_p01"), 4),
                        _f(r.get("relative_frobenius_error"), 4), _f(r.get(down), 4 if down != "perplexity" else 2),
                        _f(r.get("fit_seconds"), 1), _refit_cell(r), _f(r.get("recovery_seconds"), 0),
                        f"{r.get('stored_bytes'):,}"])
        out.append(md_table(["method", "kind", "requested", "ratio", "row cos", "row cos p01", "rel. Frobenius",
                             down.replace("_", " "), "fit s", "head refit s", "recovery s", "stored bytes"], det))
        if any(r.get("head_refit") for r in rows):
            out.append("")
            out.append("`head refit s`: the head-side refit that `hf-embcomp compress` runs after the fit of a tied "
                       "causal LM (`hf_embcomp/training/refit.py`; kept or undone by its held-out positions); "
                       "– where the row predates it or it does not apply.")
        bad = [r for r in rows if r["status"] != "ok"]
        if bad:
            out += ["", "Not measured: " + "; ".join(
                f"{r['method']} @ {_f(r.get('ratio_requested'), 0)}x ({r['status']}: {str(r.get('error', ''))[:100]})" for r in bad)]
        out += ["", "</details>", ""]
        for p in q.get("plots", []):
            if p == f"quality_{model}.png":
                out.append(f"![quality on {model}]({link}{p})")
    return out


def speed_section(s: dict, link: str) -> list[str]:
    out = ["", "### Cost", "", f"`python bench/speed.py{' --quick' if s.get('quick') else ''}` · models at "
           f"{s['ratio']:g}x · batch {s['batch']} token ids · {s['threads']} torch thread(s) · {s['reps']} interleaved "
           "repetitions, medians, every ratio measured side by side in one run on a shared 2-core machine."]
    if s.get("quick"):
        out.append("\n**Quick smoke run: not the published numbers.**")
    out += ["", "Fit time (MiniLM 30522 x 384; rows marked 1 epoch were fitted short with `--fast-fit`, so they are "
            "not real fit times: the quality table has those, for every method and ratio):", ""]
    out.append(md_table(["method", "requested", "ratio", "fit s", "fit"],
                        [[r["method"], _f(r["ratio_requested"], 0), _f(r.get("ratio"), 1),
                          _f(r.get("fit_seconds"), 1) if r["status"] == "ok" else r["status"],
                          "1 epoch" if r.get("fast_fit") else "default"] for r in s.get("fit", [])]))
    out += ["", "Embedding lookup (on the fly = decode the rows asked for; cached = E_hat decoded once, then a gather):", ""]
    out.append(md_table(["lookup", "median ms", "× nn.Embedding", "one-off decode ms"],
                        [[r["name"], _f(r["median_ms"], 2), _f(r["vs_nn_embedding"], 2), _f(r.get("one_off_decode_ms"), 1)]
                         for r in s.get("lookup", [])]))
    out += ["", "Full MiniLM forward (goal: on-the-fly decode adds at most 5 %):", ""]
    out.append(md_table(["model", "median ms", "× stock (median)", "× stock (min)"],
                        [[r["name"], _f(r["median_ms"], 1), _f(r["vs_stock"], 3), _f(r["vs_stock_min"], 3)]
                         for r in s.get("forward", [])]))
    if s.get("tied_head"):
        out += ["", f"Tied-head logits, SmolLM2 shape 49152 x 576 ({s.get('head_source')} for the dense matmul; "
                "runtime modules with random tensors):", ""]
        out.append(md_table(["logits", "hidden states", "median ms", "× dense"],
                            [[r["name"], str(r.get("tokens", "")), _f(r.get("median_ms"), 2), _f(r.get("vs_dense"), 2)]
                             for r in s["tied_head"] if r.get("status") == "ok"]))
    out += ["", "Load + one forward in a fresh process (`AutoModel.from_pretrained(dir, trust_remote_code=True)`):", ""]
    if s.get("load_note"):
        out += [f"_{s['load_note']}_", ""]
    out.append(md_table(["model", "load s", "peak RSS MiB", "RSS over imports MiB"],
                        [[r["name"], _f(r.get("load_seconds"), 2), _f(r.get("peak_rss_after_forward_mb"), 0),
                          _f(r.get("model_rss_mb"), 0)] if r["status"] == "ok" else [r["name"], r["status"], "", ""]
                         for r in s.get("load", [])]))
    out += ["", "Bytes of the embedding tensors in `model.safetensors` (read from its header) vs the bytes accounted:", ""]
    out.append(md_table(["model", "ratio", "stored bytes", "accounted bytes", "equal"],
                        [[n, _f(v["ratio"], 2), f"{v['stored_bytes']:,}", f"{v['accounted_bytes']:,}", _f(v.get("bytes_match"))]
                         for n, v in s.get("models", {}).items()]))
    if s.get("unpack"):
        out += ["", "Bit unpacking (hot path of the binary-code methods):", ""]
        out.append(md_table(["unpack", "rows x bits", "median ms"],
                            [[r["name"], f"{r['rows']} x {r['bits']}", _f(r["median_ms"], 3)] for r in s["unpack"]]))
    for p in s.get("plots", []):
        out += ["", f"![cost]({link}{p})"]
    return out + runtime_section(s.get("runtime", {}))


def runtime_section(rt: dict) -> list[str]:
    """The issue-16 runtime tables of speed.json (``python bench/speed.py --runtime-only``), one column per torch
    thread count."""
    if not rt:
        return []
    threads = sorted(rt, key=int)
    cols = [f"{t} thread{'s' if t != '1' else ''}" for t in threads]
    out = ["", "### Runtime of the default method", "",
           f"`python bench/speed.py --runtime-only` · gptq (what `auto` picks at 8x and 25x) fitted on SmolLM2-135M "
           f"({rt[threads[0]].get('fit', 'calibration none')}; body fp32 like the stock model it is timed against) and MiniLM "
           f"· contenders interleaved in one run, medians · torch threads: "
           f"{', '.join(threads)} (2 is torch's default here) · "
           + "; ".join(f"{t} thread(s): {rt[t]['environment'].get('date_utc', '')}" for t in threads) + ".", ""]

    def grid(section: str, value: str, label: Any, nd: int) -> list[list[str]]:
        names = []
        for t in threads:
            for r in rt[t][section]:
                k = (r["name"], r.get("tokens"))
                if k not in names:
                    names.append(k)
        vals = {t: {(r["name"], r.get("tokens")): r[value] for r in rt[t][section]} for t in threads}
        return [label(k) + [_f(vals[t].get(k), nd) for t in threads] for k in names]

    out += ["Greedy generation, SmolLM2-135M, 16-token prompt, 32 new tokens, KV cache (goal: >= 1.0 x stock):", ""]
    out.append(md_table(["model"] + [f"x stock tokens/s, {c}" for c in cols],
                        grid("generation", "vs_stock_tokens_per_s", lambda k: [k[0]], 2)))
    out += ["", "Tied-head logits `compute_logits(h)` vs the dense `h @ E.T` (goal at 25x: <= 0.5 at 1 row, <= 1.0 at 128):", ""]
    out.append(md_table(["logits", "hidden rows"] + [f"x dense, {c}" for c in cols],
                        grid("tied_logits", "vs_dense", lambda k: [k[0], str(k[1])], 2)))
    out += ["", "Lookup of 32 x 128 token ids, SmolLM2 (goal: <= 2 x nn.Embedding):", ""]
    out.append(md_table(["lookup"] + [f"x nn.Embedding, {c}" for c in cols],
                        grid("lookup_smollm2", "vs_nn_embedding", lambda k: [k[0]], 2)))
    out += ["", "MiniLM forward, 8 x 128 tokens, eager and `torch.compile(model, fullgraph=True)` (goal: <= 1.02 eager, "
            "<= 1.05 compiled):", ""]
    out.append(md_table(["model"] + [f"median ms, {c}" for c in cols], grid("minilm", "median_ms", lambda k: [k[0]], 1)))
    out += [""]
    out.append(md_table(["ratio"] + cols, [[k.replace("_", " "), *[_f(rt[t]["minilm_ratios"][k], 3) for t in threads]]
                                            for k in ("eager_vs_stock", "compiled_vs_compiled_stock")]))
    return out


def scale_section(c: dict, link: str) -> list[str]:
    out = ["", "### Scale", "", f"`python bench/scale.py{' --quick' if c.get('quick') else ''}` · fit at {c['ratio']:g}x · "
           f"threads per row · each point in a fresh process (fit peak = RSS sampled every 5 ms during the fit minus the RSS before it; "
           f"peak / fp32 E = that over the V x d x 4 bytes of the matrix; the target is <= 3)."]
    if c.get("quick"):
        out.append("\n**Quick smoke run: not the published numbers.**")
    mats = c.get("matrices", {})
    out += ["", "Matrices: " + "; ".join(f"{k}: {v['source']}" for k, v in mats.items()), ""]
    out.append(md_table(["method", "matrix", "V", "d", "ratio", "threads", "fit s", "fit peak MiB", "peak / fp32 E", "status"],
                        [[r["method"] + "".join(f" ({k}={v})" for k, v in r.get("hyperparameters", {}).items()),
                          r["name"] + (" (random)" if r.get("random") else ""), f"{r['V']:,}", str(r["d"]),
                          _f(r.get("ratio"), 1), str(r.get("threads", c["threads"])), _f(r.get("fit_seconds"), 2),
                          _f(r.get("fit_peak_growth_mb"), 0),
                          _f(r["fit_peak_growth_mb"] / r["input_mb"] if r.get("input_mb") else None, 2), r["status"]]
                         for r in c.get("rows", [])]))
    if c.get("projection"):
        out += ["", "Projection (t = c·V^a·d^b with the method's known cost: a = 1, b = 2 for svd, 1 otherwise; c from "
                "the largest point; the V exponents fitted on the Gemma row sweep are shown beside; memory ∝ V·d from "
                "the largest point):", ""]
        out.append(md_table(["method", "target", "a", "b", "a fitted (time)", "a fitted (memory)", "fit s",
                             "fit peak MiB", "E fp32 MiB"],
                            [[p["method"], t["target"], _f(p["V_exponent_time"], 2), _f(p["d_exponent_time"], 1),
                              _f(p.get("V_exponent_time_fitted"), 2), _f(p.get("V_exponent_memory_fitted"), 2),
                              _f(t["fit_seconds"], 0), _f(t["fit_peak_growth_mb"], 0), _f(t["input_fp32_mb"], 0)]
                             for p in c["projection"] for t in p["targets"]]))
    for p in c.get("plots", []):
        out += ["", f"![scale]({link}{p})"]
    return out


def deploy_section(d: dict, link: str) -> list[str]:
    """Whole-model size and quality of stock / int8 and NF4 bodies / compressed embedding / both (bench/deploy.py)."""
    env = d.get("environment", {})
    out = ["", "### Deploy: whole-model size", "", "From `bench/results/deploy.json`.", "",
           f"`python bench/deploy.py{' --quick' if d.get('quick') else ''}` · torch {env.get('torch')} · "
           f"{env.get('torch_threads')} torch thread(s) · {env.get('date_utc')} · embedding: `{d['method']}` at "
           f"{d['ratio']:g}x (default calibration and body dtype) · int8 body: {d.get('int8')} (README, \"torchao "
           f"bodies\") · NF4 body: {d.get('nf4', 'not measured')} (README, \"4-bit bodies\"). Stored MB = the "
           "folder's `*.safetensors` files (stock SmolLM2: its GGUF file); every variant is saved, then measured "
           "after `from_pretrained(dir, trust_remote_code=True)`. Fit s = `compress` with its calibration; build s = the quantised load + save."]
    if d.get("earlier_environments"):
        dates = [e.get("date_utc") for e in d["earlier_environments"] if e] + [env.get("date_utc")]
        out.append(f"\nRows from {len(dates)} runs (`--resume` keeps the ok rows of the file; started "
                   f"{', '.join(dates)}; rerun rows carry `measured_utc`).")
    if d.get("quick"):
        out.append("\n**Quick smoke run (fewer STS-B pairs, another method): not the published numbers.**")
    if not d.get("finished"):
        out.append("\n**Run not finished: the table holds the rows measured so far.**")
    body = []
    for model in d["models"]:
        st = d.get("settings", {}).get(model, {})
        if st.get("metric") == "perplexity":
            what = f"perplexity, first {st.get('tokens'):,} Wikipedia tokens (lower is better)"
        else:
            what = f"STS-B dev Spearman x100, {st.get('pairs', 0):,} pairs (higher is better)"
        first = f"{model}: {what}"
        for r in (r for r in d["rows"] if r["model"] == model and r["variant"] not in ("onnx", "stock-onnx")):
            if r["status"] != "ok":
                body.append([first, r["label"], "", "", "", r["status"], "", "", "", ""])
                first = ""
                continue
            body.append([first, r["label"], _f(r["bytes"] / 1e6, 1), _f(r.get("ratio_vs_stock"), 2),
                         r.get("dtype", "–"), _f(r["quality"], 2), r.get("delta", "–"), _f(r.get("fit_seconds"), 0),
                         _f(r.get("build_seconds"), 1), _f(r.get("eval_seconds"), 0)])
            first = ""  # the model and its metric once
    out += ["", md_table(["model: metric", "variant", "stored MB", "× smaller than stock", "dtype as loaded", "quality",
                          "change vs stock", "fit s", "build s", "eval s"], body)]
    out += ["", "× smaller than stock below 1 means the variant is bigger than the stock file (a 4-bit GGUF file "
            "against 16-bit or int8 weights); quality change is in points (STS-B) or percent (perplexity).", ""]
    onnx = [r for r in d["rows"] if r["variant"] in ("onnx", "stock-onnx")]
    if onnx:
        rows = []
        for r in onnx:
            if r["status"] != "ok":
                rows.append([r["model"], r["label"], "", "", "", "", r["status"], ""])
                continue
            checks = r.get("ort_checks", [])
            if r.get("task") == "text-generation-with-past":
                diff = " / ".join(f"{c['max_abs_diff']:.1e}" for c in checks) + " (logits, 2 prompts x 20 greedy tokens)"
                same = "yes" if all(c["greedy_20_equal"] for c in checks) else "no"
            else:
                diff = " / ".join(f"{c['max_abs_diff_real_tokens']:.1e} real tokens, {c['max_abs_diff_all_positions']:.1e} "
                                  f"all positions ({c['sentences']} STS-B sentences, one padded batch)" for c in checks)
                same = "–"
            st = r.get("safetensors_bytes")
            rows.append([r["model"], r["label"], r.get("task", ""), _f(r["bytes"] / 1e6, 1), _f(st and st / 1e6, 1),
                         _f(st and r["bytes"] / st, 2), diff, same])
        out += ["", f"`hf-embcomp export onnx` of the embedding {d['ratio']:g}x folder (fp32 graph), and the stock model "
                "through the same exporter (`hf_embcomp.export.export_model_onnx`), onnxruntime vs torch on real inputs:",
                "", md_table(["model", "variant", "task", "model.onnx MB", "model.safetensors MB", "onnx / safetensors",
                          "onnxruntime vs torch, max abs diff", "greedy tokens equal"], rows), ""]
    return out


SWEEP_COLUMNS = (
    (("fidelity", "embedding", "row_cosine_mean"), "row cos", 3),
    (("fidelity", "embedding", "row_cosine_p01"), "p01", 3),
    (("fidelity", "embedding", "relative_frobenius_error"), "rel frob", 3),
    (("fidelity", "frequency_1-9", "row_cosine_mean"), "row cos, tokens seen 1-9x", 3),
    (("sentence", "embedding_cosine", "cosine_to_uncompressed"), "sentence cos", 3),
    (("sentence", "sentiment_probe", "accuracy"), "probe acc", 3),
    (("lm", "wikipedia", "perplexity"), "ppl (Wikipedia)", 1),
)
"""(suite, task, metric) -> column of the sweep tables; columns no cell has are left out."""


def sweep_section(name: str, docs: list[dict], link: str) -> list[str]:
    """Table of one sweep folder (bench/results/sweep_NAME/*.json, see bench/collect_sweep.py) + its plot."""
    docs = sorted(docs, key=lambda d: (d["method"], d["compression_ratio"]))
    vals = [{(r["suite"], r["task"], r["metric"]): r for r in d["results"]} for d in docs]
    cols = [c for c in SWEEP_COLUMNS if any(c[0] in v for v in vals)]
    first = next(iter(vals[0].values()))
    quick = first.get("settings", {}).get("quick")
    src = docs[0]["source_model"].split("::")[-1]  # a GGUF source is "path::file"
    src = Path(src).name if Path(src).suffix == ".gguf" else src
    out = ["", f"### Sweep: {src}", "",
           f"`hf-embcomp sweep` ({'--quick, ' if quick else ''}cells in `bench/results/sweep_{name}/`; every metric "
           "computed by `hf-embcomp evaluate`, numbers of examples in the cell files; fit s = compression time of the "
           "cell, token counting included):", ""]
    base = {c[0]: next((v[c[0]]["baseline"] for v in vals if c[0] in v), None) for c in cols}
    rows = [["uncompressed", "1", *[_f(base[c[0]], c[2]) for c in cols], "–"]]
    for d, v in zip(docs, vals):
        rows.append([d["method"], _f(d["compression_ratio"], 1),
                     *[_f(v[c[0]]["compressed"], c[2]) if c[0] in v else "–" for c in cols],
                     _f(d.get("compression_report", {}).get("fit_seconds"), 0)])
    out.append(md_table(["method", "ratio", *[c[1] for c in cols], "fit s"], rows))
    out += ["", f"![sweep {name}]({link}sweep_{name}/pareto.png)"]
    return out


START, END = "<!-- results:start (bench/report.py --readme) -->", "<!-- results:end -->"


def render(results: Path, link: str) -> str:
    lines = ["## Results", "",
             "Generated by `python bench/report.py` from `bench/results/*.json`; rerun the benchmarks with the "
             "commands shown. Timings come from a shared 2-core CPU machine: compare the ratios within a table, "
             "not absolute times across tables.", ""]
    q, s, c, d = (_load(results / f"{n}.json") for n in ("quality", "speed", "scale", "deploy"))
    for data, fn, name in ((q, quality_section, "quality"), (s, speed_section, "speed"), (c, scale_section, "scale"),
                           (d, deploy_section, "deploy")):
        if data is None:
            lines += ["", f"_No {name}.json yet: run `python bench/{name}.py`._", ""]
        else:
            lines += fn(data, link)
    for path in sorted(results.glob("quality_*_vs_*.json")):
        extra = _load(path)
        if extra and extra.get("benchmark") == "quality":
            vs = path.stem.split("_vs_", 1)[1].replace("llamacpp", "llama.cpp's formats and the other peers")
            lines += quality_section(extra, link, path.name, f"Quality at equal stored bytes against {vs} "
                                                             f"({', '.join(extra['models'])})")
    for folder in sorted(results.glob("sweep_*")):
        docs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        if docs:
            lines += sweep_section(folder.name.removeprefix("sweep_"), docs, link)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=common.RESULTS)
    ap.add_argument("--out", default=str(common.ROOT / "docs" / "results.md"), help="file, or - for stdout")
    ap.add_argument("--link-prefix", default="../bench/results/", help="prefix of the PNG links")
    ap.add_argument("--readme", action="store_true", help="also replace the README's generated Results section "
                                                          f"(between {START} and {END})")
    args = ap.parse_args(argv)
    text = render(args.results, args.link_prefix)
    if args.readme:
        readme = common.ROOT / "README.md"
        cur = readme.read_text()
        if START not in cur or END not in cur:
            raise SystemExit(f"README.md has no {START} ... {END} markers; add them where the Results go.")
        section = render(args.results, "bench/results/").replace("## Results", "### Benchmarks (generated)", 1)
        head, rest = cur.split(START, 1)
        readme.write_text(head + START + "\n" + section + END + rest.split(END, 1)[1])
        print(f"wrote the generated section of {readme}")
    if args.out == "-":
        print(text)
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    return text


if __name__ == "__main__":
    main()
