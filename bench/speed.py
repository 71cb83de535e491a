"""Cost of the compressed embedding: fit time, lookup latency, full-model forward overhead, tied-head logits,
peak RAM and load time of a saved model, and stored vs accounted bytes - every registered method
(``hf_embcomp.METHODS``) at one ratio, all timings of one table measured side by side in one run
(repetitions interleaved a, b, c, a, b, c, ...; medians reported; the machine is shared, so compare ratios,
not absolute times).

1. fit: ``hf_embcomp.compress`` on all-MiniLM-L6-v2 (30522 x 384) at ``--fit-ratios``; the model at
   ``--ratio`` is saved and used below.
2. lookup: 32 x 128 token ids through ``nn.Embedding`` (dense fp32) vs each compressed embedding decoding on
   the fly, and "cached" (the dense E_hat decoded once by ``reconstruct()``, then ``F.embedding``; its one-off
   decode time is reported too).
3. forward: the full MiniLM forward on the same 32 x 128 batch, stock vs compressed (goal: <= 5 % overhead).
4. tied head (SmolLM2-135M, 49152 x 576): ``compute_logits(h)`` of each runtime module vs the dense
   ``h @ E.T``, for 1 and 128 hidden states. The runtime modules are built from each method's config with
   random tensors (cost does not depend on the values; no SmolLM2 fit is needed).
5. load + RAM: a fresh subprocess per saved model loads it with ``AutoModel.from_pretrained(dir,
   trust_remote_code=True)`` and runs one forward; it reports load seconds and peak RSS (/proc VmHWM).
6. bytes: the embedding tensors' bytes in the saved ``model.safetensors`` (read from its header) vs the
   bytes the method config accounts (``stored_bytes``).
7. bit unpacking (the hot path of the binary-code methods): the current ``unpack_bits`` (a 256 x 8 table
   ``index_select``) vs the previous shift-and-cast version, side by side.

    HF_HUB_OFFLINE=1 python bench/speed.py             # ratio 25, fits at 8,25,100
    HF_HUB_OFFLINE=1 python bench/speed.py --quick     # ratio 25, small batch, few reps, no SmolLM2
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402

logger = logging.getLogger("bench.speed")

_CHILD = r"""
import json, os, resource, sys, time
os.environ["TQDM_DISABLE"] = "1"
def hwm():  # peak RSS of this process in MiB: VmHWM starts afresh at exec (ru_maxrss is inherited from the parent)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
import torch
torch.set_num_threads(int(sys.argv[3]))
from transformers import AutoModel
rss0 = hwm()
t0 = time.perf_counter()
m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
load = time.perf_counter() - t0
rss1 = hwm()
b, t = map(int, sys.argv[2].split("x"))
ids = torch.randint(0, m.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    m(input_ids=ids, attention_mask=torch.ones_like(ids))
rss2 = hwm()
print(json.dumps({"load_seconds": load, "rss_after_imports_mb": rss0, "peak_rss_after_load_mb": rss1,
                  "peak_rss_after_forward_mb": rss2}))
"""


def child_load(folder: Path, batch: str, threads: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), batch, str(threads)], capture_output=True,
                         text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"}, timeout=600)
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def random_runtime_module(method: str, V: int, d: int, ratio: float):
    """The runtime module of ``method`` for a V x d embedding at ``ratio``, filled with random values."""
    from hf_embcomp.core import method_config
    from hf_embcomp.hub_code.embcomp_layers import build_compressed_embedding

    cfg = method_config(method, V, d, ratio)
    block = {"method": method, "num_embeddings": V, "embedding_dim": d, "padding_idx": None, "embed_scale": None,
             "storage_dtype": cfg.dtype, "hyperparameters": cfg.hyperparameters()}
    emb = build_compressed_embedding(block)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, t in list(emb.named_parameters(recurse=False)) + list(emb.named_buffers(recurse=False)):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
            elif t.dtype == torch.uint8:  # packed codes: every byte value, as a fitted model has
                t.copy_(torch.randint(0, 256, t.shape, generator=g, dtype=torch.uint8))
            elif t.ndim == 1:  # sorted unique ids (LightToken's exact rows)
                t.copy_(torch.arange(t.numel(), dtype=t.dtype) * (V // max(t.numel(), 1)))
            else:
                t.zero_()
        if hasattr(emb, "tiers"):  # gptq: every row in one tier, the tier sizes of the config, rows shuffled
            rb = torch.cat([torch.full((n,), b, dtype=torch.uint8) for b, n in emb.tiers])
            emb.row_bits.copy_(rb[torch.randperm(V, generator=g)])
    return emb.eval()


def unpack_shifts(packed: torch.Tensor, num_bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The previous ``unpack_bits`` of hub_code/embcomp_base.py (shifts, mask, cast), kept as the "before"."""
    from hf_embcomp.hub_code.embcomp_base import _BIT_SHIFTS

    bits = (packed.unsqueeze(-1) >> _BIT_SHIFTS.to(packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :num_bits].to(dtype)


def _logits_unpacked(mod: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Tied logits with the byte tables switched off (every code unpacked): the path before them."""
    mod.logits_byte_tables = False
    try:
        return mod.compute_logits(h)
    finally:
        del mod.logits_byte_tables  # back to the class default


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small batch, few repetitions, no SmolLM2 head (CI smoke)")
    ap.add_argument("--ratio", type=float, default=25.0, help="ratio of the saved models used for latency / RAM")
    ap.add_argument("--fit-ratios", default=None, help="comma list of ratios to time the fit at (default 8,25,100; "
                    "--quick: the --ratio only)")
    ap.add_argument("--methods", default=None, help="comma list of registered methods (default: all registered)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 30; --quick 3)")
    ap.add_argument("--batch", default=None, help="BxT token ids (default 32x128; --quick 4x32)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every timing (default 1)")
    ap.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 tied-head timings")
    ap.add_argument("--fast-fit", action="store_true", help="fit the models with 1 training epoch (methods that "
                    "train): lookup / forward / RAM / bytes do not depend on the fitted values; the fit times are "
                    "then marked fast_fit and are not the real ones (bench/quality.py records those)")
    ap.add_argument("--load-runs", type=int, default=None, help="fresh-process load runs per model (default 2; --quick 1)")
    ap.add_argument("--out", type=Path, default=common.RESULTS / "speed.json")
    ap.add_argument("--runtime-only", action="store_true", help="only the issue-16 sections (generation, default-method "
                    "logits and lookups on the fitted SmolLM2, compiled MiniLM); merged into --out")
    ap.add_argument("--runtime-threads", default="1,2", help="torch thread counts of the --runtime-only sections "
                    "(default 1,2: one thread, and torch's default on this 2-core machine)")
    args = ap.parse_args(argv)
    if args.runtime_only:
        payload = json.loads(args.out.read_text()) if args.out.exists() else {"benchmark": "speed"}
        runtime_sections(payload, args.reps or 5, [int(t) for t in args.runtime_threads.split(",")],
                         save=lambda: common.write_json(args.out, payload))
        return payload
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    quick = args.quick
    reps = args.reps or (3 if quick else 30)
    batch = args.batch or ("4x32" if quick else "32x128")
    B, T = map(int, batch.split("x"))
    fit_ratios = common.parse_ratios(args.fit_ratios, False) if args.fit_ratios else \
        ((args.ratio,) if quick else (8.0, args.ratio, 100.0))
    methods = common.registered_methods(args.methods)

    import hf_embcomp
    from hf_embcomp.core import embedding_weight
    from hf_embcomp.io import default_model_path, load_model, save_compressed

    payload: dict[str, Any] = {"benchmark": "speed", "quick": quick, "ratio": args.ratio, "batch": batch,
                               "reps": reps, "threads": args.threads, "methods": methods,
                               "environment": common.environment(), "fit": [], "models": {}}
    src = load_model(None)
    stock = src.model.eval()
    E = embedding_weight(stock)
    V, d = E.shape
    tmp = Path(tempfile.mkdtemp(prefix="embcomp-speed-"))

    # 1. fit (+ save the model at --ratio) -------------------------------------------------------------
    comps: dict[str, Any] = {}
    for method in methods:
        for ratio in sorted(set(fit_ratios) | {args.ratio}):
            row: dict[str, Any] = {"model": "minilm", "method": method, "ratio_requested": ratio}
            try:
                over = {}
                if quick or args.fast_fit:
                    from quality import quick_overrides

                    over = quick_overrides(method)
                comp = hf_embcomp.compress(stock, method, ratio, **over)
                rep = comp.compression_report
                row |= {"status": "ok", "ratio": rep["compression_ratio"], "fit_seconds": rep["fit_seconds"],
                        "accounted_bytes": rep["stored_bytes"], "fast_fit": bool(over), "overrides": over}
                if ratio == args.ratio:
                    folder = tmp / method
                    save_compressed(comp, folder)
                    prefix = comp._embcomp_embedding_names[0]
                    comps[method] = comp.eval()
                    payload["models"][method] = {
                        "ratio": rep["compression_ratio"], "accounted_bytes": rep["stored_bytes"],
                        "stored_bytes": common.embedding_tensor_bytes(folder, prefix),
                        "safetensors_file_bytes": (folder / "model.safetensors").stat().st_size,
                        "folder": str(folder)}
                else:
                    del comp
            except hf_embcomp.RatioError as e:
                row |= {"status": "skipped", "error": str(e)}
            except Exception as e:  # noqa: BLE001
                row |= {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
            if ratio in fit_ratios:
                payload["fit"].append(row)
            print(f"fit {method:<11} {ratio:>5g}x: {row['status']} {common.fmt(row.get('fit_seconds'))} s", flush=True)
            gc.collect()
    stock_dir = tmp / "stock"
    stock.save_pretrained(stock_dir)
    payload["models"]["nn.Embedding (stock)"] = {"ratio": 1.0, "accounted_bytes": V * d * 4, "folder": str(stock_dir),
                                                 "stored_bytes": common.embedding_tensor_bytes(
                                                     stock_dir, next(k for k, _ in stock.named_modules()
                                                                     if _ is stock.get_input_embeddings()))}
    common.write_json(args.out, payload)

    # 2. lookups ---------------------------------------------------------------------------------------
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g)
    dense = torch.nn.Embedding.from_pretrained(E.clone())
    fns: dict[str, Any] = {"nn.Embedding": lambda: dense(ids)}
    decode_ms: dict[str, float] = {}
    with torch.no_grad():
        for m, comp in comps.items():
            emb = comp.get_compressed_embedding()
            t0 = time.perf_counter()
            cached = emb.reconstruct().detach().contiguous()
            decode_ms[m] = (time.perf_counter() - t0) * 1e3
            fns[f"{m} on the fly"] = (lambda e: lambda: e(ids))(emb)
            fns[f"{m} cached"] = (lambda c: lambda: F.embedding(ids, c))(cached)
        lookup = common.interleaved(fns, reps * 5)
    base = lookup["nn.Embedding"]["median_ms"]
    payload["lookup"] = [{"name": k, **v, "vs_nn_embedding": v["median_ms"] / base,
                          "one_off_decode_ms": decode_ms.get(k.rsplit(" ", 1)[0]) if k.endswith("cached") else None}
                         for k, v in lookup.items()]

    # 3. full forward ----------------------------------------------------------------------------------
    batch_in = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    fns = {"stock MiniLM": lambda: stock(**batch_in)}
    for m, comp in comps.items():
        fns[f"{m}"] = (lambda c: lambda: c(**batch_in))(comp)
    with torch.no_grad():
        fwd = common.interleaved(fns, reps, warmup=1)
    base_f = fwd["stock MiniLM"]
    payload["forward"] = [{"name": k, **v, "vs_stock": v["median_ms"] / base_f["median_ms"],
                           "vs_stock_min": v["min_ms"] / base_f["min_ms"]} for k, v in fwd.items()]
    common.write_json(args.out, payload)

    # 4. tied head (SmolLM2 shape) ------------------------------------------------------------------------
    head: list[dict] = []
    if not (quick or args.no_smollm2):
        Vs, ds = 49152, 576
        gguf = common.smollm2_gguf()
        if gguf is not None:
            from gguf import GGUFReader
            from gguf.quants import dequantize

            t = next(t for t in GGUFReader(str(gguf)).tensors if t.name == "token_embd.weight")
            Es = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(Vs, ds).copy()).float()
            head_src = "SmolLM2-135M token_embd (dequantised)"
        else:
            Es = torch.randn(Vs, ds) * 0.02
            head_src = "random 49152 x 576"
        mods = {}
        for m in methods:
            try:
                mods[m] = random_runtime_module(m, Vs, ds, args.ratio)
            except Exception as e:  # noqa: BLE001
                head.append({"name": m, "status": "skipped", "error": f"{type(e).__name__}: {e}"})
        for n_tok in (1, 4, 128):
            h = torch.randn(n_tok, ds, generator=g)
            fns = {"dense h @ E.T": (lambda h: lambda: h @ Es.T)(h)}
            for m, mod in mods.items():
                fns[m] = (lambda mod, h: lambda: mod.compute_logits(h))(mod, h)
                if getattr(mod, "logits_byte_tables", False) and mod.logits_table_rows >= n_tok:  # before/after of the byte tables, same run
                    fns[f"{m} (unpacked codes)"] = (lambda mod, h: lambda: _logits_unpacked(mod, h))(mod, h)
            with torch.no_grad():
                res = common.interleaved(fns, reps)
            b = res["dense h @ E.T"]["median_ms"]
            head += [{"name": k, "tokens": n_tok, "status": "ok", **v, "vs_dense": v["median_ms"] / b} for k, v in res.items()]
        payload["head_source"] = head_src
        del Es, mods
    payload["tied_head"] = head
    common.write_json(args.out, payload)

    # 5. load + peak RAM (fresh subprocess each; alternating order, median of 2 or 1) -------------------
    load_rows = []
    names = list(payload["models"])
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(args.load_runs or (1 if quick else 2)):
        for n in names:
            try:
                runs[n].append(child_load(Path(payload["models"][n]["folder"]), batch, args.threads))
            except Exception as e:  # noqa: BLE001
                runs[n].append({"error": str(e)})
    for n, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            load_rows.append({"name": n, "status": "failed", "error": rs[0]["error"]})
            continue
        med = {k: statistics.median(r[k] for r in ok) for k in ok[0]}
        load_rows.append({"name": n, "status": "ok", **med,
                          "model_rss_mb": med["peak_rss_after_forward_mb"] - med["rss_after_imports_mb"]})
    payload["load"] = load_rows

    # 6. unpack micro-benchmark -------------------------------------------------------------------------
    from hf_embcomp.hub_code.embcomp_base import unpack_bits

    unpack_rows = []
    for nbytes in (16, 96):  # 125 and 765 code bits a row (as dccl / lighttoken at high and low ratios)
        packed = torch.randint(0, 256, (B * T, nbytes), dtype=torch.uint8, generator=g)
        nb = nbytes * 8 - 3
        assert torch.equal(unpack_bits(packed, nb), unpack_shifts(packed, nb))
        res = common.interleaved({"before: shifts + cast": lambda: unpack_shifts(packed, nb),
                                  "after: table index_select (unpack_bits)": lambda: unpack_bits(packed, nb)}, reps * 5)
        unpack_rows += [{"name": k, "rows": B * T, "bits": nb, **v} for k, v in res.items()]
    payload["unpack"] = unpack_rows

    for n, info in payload["models"].items():
        info["bytes_match"] = info["stored_bytes"] == info["accounted_bytes"]
        info.pop("folder", None)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    payload["plots"] = plot(payload, args.out)
    payload["finished"] = True
    common.write_json(args.out, payload)
    print_tables(payload)
    print(f"\nwrote {args.out} and {', '.join(payload['plots'])}")
    return payload


def _gen_fn(model, ids: torch.Tensor, new_tokens: int):
    def run():
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                           pad_token_id=0)
    return run


FIT = "default calibration, as hf-embcomp compress fits it"
"""How the runtime section's gptq models are fitted (recorded with every thread count's results)."""


def runtime_sections(payload: dict, reps: int, threads: list[int], save: Any = None, new_tokens: int = 32) -> None:
    """Issue 16, at each torch thread count of ``threads`` (the models are fitted once): generation tokens/s (SmolLM2,
    ``auto``'s default method gptq at 8x and 25x vs stock, greedy, KV cache; fitted with the default calibration, as
    ``hf-embcomp compress`` fits it (its tiers set the runtime's cost); the body kept in the stock model's fp32, so
    that only the embedding differs), tied logits of gptq 8x / 25x vs dense
    at 1 / 4 / 128 rows, lookups vs nn.Embedding, and the MiniLM forward of gptq 25x (``auto``'s pick at 25x) vs
    stock, eager and compiled (fullgraph). Every table interleaves its contenders in one run. Results go to
    ``payload["runtime"][str(threads)]``; ``save()`` (if given) is called after each thread count."""
    import hf_embcomp
    from hf_embcomp.core import embedding_weight
    from hf_embcomp.io import load_model

    for key in ("generation", "tied_head_default", "lookup_smollm2", "compiled_minilm", "compiled_minilm_ratios",
                "runtime_environment"):
        payload.pop(key, None)  # the single-thread layout of 2026-12-01, superseded
    g = torch.Generator().manual_seed(0)
    src = load_model(str(common.smollm2_gguf()))
    stock = src.model.eval()
    E = embedding_weight(stock).detach().float()
    V, d = E.shape
    comps = {}
    for ratio in (8.0, 25.0):
        t0 = time.perf_counter()
        comps[ratio] = hf_embcomp.compress(stock, "gptq", ratio, tokenizer=src.tokenizer, body_dtype="float32").eval()
        print(f"gptq {ratio:g}x fit {time.perf_counter() - t0:.0f} s", flush=True)
    mini_src = load_model(None)
    mini = mini_src.model.eval()
    mini_comp = hf_embcomp.compress(mini, "gptq", 25.0, tokenizer=mini_src.tokenizer).eval()
    prompt = torch.randint(0, V, (1, 16), generator=g)
    ids = torch.randint(0, V, (32, 128), generator=g)
    batch = {"input_ids": torch.randint(0, mini.config.vocab_size, (8, 128), generator=g)}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        out: dict[str, Any] = {"environment": common.environment(), "fit": FIT}
        fns = {"stock": _gen_fn(stock, prompt, new_tokens)}
        fns.update({f"gptq {r:g}x": _gen_fn(c, prompt, new_tokens) for r, c in comps.items()})
        res = common.interleaved(fns, reps, warmup=1)
        base = res["stock"]["median_ms"]
        out["generation"] = [{"name": k, **v, "new_tokens": new_tokens, "tokens_per_s": new_tokens / (v["median_ms"] / 1e3),
                              "vs_stock_tokens_per_s": base / v["median_ms"]} for k, v in res.items()]
        rows = []
        for n_tok in (1, 4, 128):
            h = torch.randn(n_tok, d, generator=g)
            fns = {"dense h @ E.T": lambda h=h: h @ E.T}
            fns.update({f"gptq {r:g}x": (lambda e, h=h: lambda: e.compute_logits(h))(c.get_compressed_embedding())
                        for r, c in comps.items()})
            with torch.no_grad():
                r = common.interleaved(fns, reps * 3)
            b = r["dense h @ E.T"]["median_ms"]
            rows += [{"name": k, "tokens": n_tok, **v, "vs_dense": v["median_ms"] / b} for k, v in r.items()]
        out["tied_logits"] = rows
        dense = torch.nn.Embedding.from_pretrained(E)
        lk = {"nn.Embedding": lambda: dense(ids)}
        lk.update({f"gptq {r:g}x": (lambda e: lambda: e(ids))(c.get_compressed_embedding()) for r, c in comps.items()})
        with torch.no_grad():
            r = common.interleaved(lk, reps * 3)
        out["lookup_smollm2"] = [{"name": k, **v, "vs_nn_embedding": v["median_ms"] / r["nn.Embedding"]["median_ms"]}
                                 for k, v in r.items()]
        fns = {"stock MiniLM eager": (lambda: mini(**batch)), "gptq 25x eager": (lambda: mini_comp(**batch))}
        torch._dynamo.reset()  # compiled CPU kernels are generated for the thread count at compile time
        for name, m in (("stock MiniLM compiled", mini), ("gptq 25x compiled", mini_comp)):
            t0 = time.perf_counter()
            cm = torch.compile(m, fullgraph=True)
            with torch.no_grad():
                cm(**batch)
            print(f"compile {name} ({n_threads} threads): {time.perf_counter() - t0:.0f} s", flush=True)
            fns[name] = (lambda m: lambda: m(**batch))(cm)
        with torch.no_grad():
            r = common.interleaved(fns, reps * 2)
        out["minilm"] = [{"name": k, **v} for k, v in r.items()]
        out["minilm_ratios"] = {
            "eager_vs_stock": r["gptq 25x eager"]["median_ms"] / r["stock MiniLM eager"]["median_ms"],
            "compiled_vs_compiled_stock": r["gptq 25x compiled"]["median_ms"] / r["stock MiniLM compiled"]["median_ms"]}
        payload.setdefault("runtime", {})[str(n_threads)] = out
        if save is not None:
            save()
        print_runtime(payload, str(n_threads))


def print_tables(p: dict) -> None:
    print(f"\n(threads {p['threads']}, batch {p['batch']}, {p['reps']} interleaved reps, medians; shared machine)")
    print("\nfit (MiniLM 30522 x 384):")
    print(common.table(p["fit"], [("method", "method"), ("ratio_requested", "req"), ("ratio", "ratio"),
                                  ("fit_seconds", "fit s"), ("status", "status")]))
    print("\nlookup of a batch of token ids:")
    print(common.table(p["lookup"], [("name", "lookup"), ("median_ms", "median ms"), ("min_ms", "min ms"),
                                     ("vs_nn_embedding", "x nn.Embedding"), ("one_off_decode_ms", "decode once ms")]))
    print("\nfull MiniLM forward:")
    print(common.table(p["forward"], [("name", "model"), ("median_ms", "median ms"), ("min_ms", "min ms"),
                                      ("vs_stock", "x stock (median)"), ("vs_stock_min", "x stock (min)")]))
    if p.get("tied_head"):
        print(f"\ntied-head logits ({p.get('head_source')}):")
        print(common.table(p["tied_head"], [("name", "logits"), ("tokens", "tokens"), ("median_ms", "median ms"),
                                            ("vs_dense", "x dense"), ("status", "status")]))
    print("\nload + one forward in a fresh process:")
    print(common.table(p["load"], [("name", "model"), ("load_seconds", "load s"), ("peak_rss_after_forward_mb", "peak RSS MiB"),
                                   ("model_rss_mb", "RSS over imports MiB"), ("status", "status")]))
    rows = [{"name": n, **v} for n, v in p["models"].items()]
    print("\nbytes of the embedding in model.safetensors:")
    print(common.table(rows, [("name", "model"), ("ratio", "ratio"), ("stored_bytes", "stored"),
                              ("accounted_bytes", "accounted"), ("bytes_match", "equal")]))
    print("\nbit unpacking:")
    print(common.table(p["unpack"], [("name", "unpack"), ("rows", "rows"), ("bits", "bits"), ("median_ms", "median ms")]))


def print_runtime(p: dict, threads: str) -> None:
    rt = p["runtime"][threads]
    print(f"\n== {threads} torch thread(s) ==\ngeneration (SmolLM2-135M, greedy, KV cache):")
    print(common.table(rt["generation"], [("name", "model"), ("median_ms", "median ms"), ("tokens_per_s", "tokens/s"),
                                          ("vs_stock_tokens_per_s", "x stock tokens/s")]))
    print("\ntied logits, default method (gptq), fitted SmolLM2:")
    print(common.table(rt["tied_logits"], [("name", "logits"), ("tokens", "rows"), ("median_ms", "median ms"),
                                           ("vs_dense", "x dense")]))
    print("\nlookup 32 x 128 ids, SmolLM2:")
    print(common.table(rt["lookup_smollm2"], [("name", "lookup"), ("median_ms", "median ms"), ("vs_nn_embedding", "x nn.Embedding")]))
    print("\nMiniLM forward 8 x 128, eager and torch.compile(fullgraph=True):")
    print(common.table(rt["minilm"], [("name", "model"), ("median_ms", "median ms"), ("min_ms", "min ms")]))
    print(rt["minilm_ratios"])


def plot(p: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, ref, title in ((axes[0], "lookup", "vs_nn_embedding", f"lookup {p['batch']} ids (x nn.Embedding)"),
                                (axes[1], "forward", "vs_stock", "MiniLM forward (x stock)")):
        rows = p.get(key, [])
        ax.barh([r["name"] for r in rows], [r[ref] for r in rows])
        ax.axvline(1.0, color="k", lw=0.8)
        if key == "forward":
            ax.axvline(1.05, color="r", lw=0.8, ls="--", label="+5 % goal")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    rows = [r for r in p.get("load", []) if r["status"] == "ok"]
    axes[2].barh([r["name"] for r in rows], [r["peak_rss_after_forward_mb"] for r in rows])
    axes[2].set_title("peak RSS of load + forward (MiB)", fontsize=9)
    axes[2].tick_params(labelsize=7)
    fig.tight_layout()
    path = out.parent / f"{out.stem}.png"  # speed.json -> speed.png
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]


if __name__ == "__main__":
    main()
