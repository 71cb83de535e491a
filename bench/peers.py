"""The tools users would pick instead of hf-embcomp, as functions E -> reconstruction, with their bytes
counted the way design.md §4 counts ours: every byte needed to rebuild the matrix.

- per-row scalar quantisation (absmax, symmetric, one fp16 scale a row; 1 bit = sign with an fp16 mean and
  scale a row), in torch: codes V*d*b/8 + scales. Its ratio is fixed by the bit width (not solvable).
- faiss-cpu product quantisation (PQ, M sub-quantisers of 8 bits, trained on TRAIN_ROWS sampled rows): codes V*M + codebooks 2^8 * d at fp16
  (the codebooks are rounded to fp16 and the rebuild uses the rounded ones).
- faiss-cpu residual quantisation (RQ, M stages of 8 bits, beam search): codes V*M + M * 2^8 * d fp16.
- torchao (``quantize_`` with ``IntxWeightOnlyConfig`` on the ``nn.Embedding``, the recipe torchao documents for
  embeddings): int8 / int4 / int2 per row (its default symmetric mapping; it stores an fp32 scale and an int8
  zero point a row) and int4 in groups of 32. torchao 0.18 keeps int4 / int2 codes unpacked in int8; the ratio here counts them packed
  (bits * V * d / 8 + its scales and zero points at their own dtypes), the peer's best case; the bytes it
  really holds are recorded as ``in_memory_bytes``. (optimum-quanto installs too, but quantises only Linear,
  Conv2d and LayerNorm modules, not embeddings: nothing to compare.)
- llama.cpp's own quantisation formats (GGML_FORMATS: Q8_0, Q6_K, Q5_K, Q4_K, Q4_0, IQ4_XS, Q3_K, IQ3_XXS,
  Q2_K, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_M, IQ1_S), quantised by llama.cpp's code through ggml-python
  (``ggml_quantize_chunk``) and read back with ``gguf.quants.dequantize``; each without and with an importance
  matrix ("imatrix", ``ggml-Q4_K`` / ``ggml-Q4_K+imatrix``). Bytes: the format's blocks, ceil(V*d / block) *
  type size (``gguf.GGML_QUANT_SIZES``), so the ratio is fixed by the format (Q8_0 3.76x ... IQ1_S 20.5x).
  K- and I-quants work on super-blocks of 256 values; where d is not a multiple of the block size (SmolLM2
  576, MiniLM 384) E is flattened row-major and re-blocked (zero tail, not counted beyond the last real
  block), the imatrix weight of flattened position j being imatrix[j % d]. llama.cpp itself would fall back
  to another type for such a tensor: the re-blocked rows are the format's best case here. IQ2_XXS, IQ2_XS
  and IQ1_S are refused by llama.cpp without an imatrix (``ggml_quantize_requires_imatrix``): those rows
  are skipped. bench/quality.py computes the imatrix from ``hf_embcomp.calibration`` on a text disjoint
  from the evaluation text.

Each solver picks the largest size whose bytes meet the requested ratio (ratio >= requested).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (library missing) or cannot meet the ratio."""


@dataclass
class PeerResult:
    name: str
    library: str
    reconstruction: torch.Tensor
    stored_bytes: int
    fit_seconds: float
    params: dict[str, Any] = field(default_factory=dict)


# --- scalar quantisation ------------------------------------------------------------------------------

SCALAR_BITS = (8, 4, 2, 1)


def scalar_bytes(V: int, d: int, bits: int) -> int:
    per_row = 1 if bits == 8 else 2  # int8: one fp16 scale; int4 / int2 / sign: fp16 scale + fp16 offset
    return V * math.ceil(d * bits / 8) + 2 * per_row * V


CLIP_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


def scalar_quantise(E: torch.Tensor, bits: int) -> PeerResult:
    """Per-row scalar quantisation, the usual recipes:

    - 8 bits: symmetric absmax, one fp16 scale a row (torch / bitsandbytes / torchao / quanto int8);
    - 4 and 2 bits: affine (asymmetric) with an fp16 scale and an fp16 offset a row, the clipping range
      picked per row from a small grid by squared error (as llama.cpp / HQQ-style quantisers search it);
    - 1 bit: sign codes with an fp16 row mean and an fp16 scale (mean absolute deviation).
    """
    t0 = time.perf_counter()
    V, d = E.shape
    if bits == 1:
        mean = E.mean(1, keepdim=True).half().float()
        c = E - mean
        scale = c.abs().mean(1, keepdim=True).half().float()
        rec = torch.where(c >= 0, scale, -scale) + mean
        how = "sign, fp16 mean + fp16 scale per row"
    elif bits == 8:
        qmax = 2 ** (bits - 1) - 1
        scale = (E.abs().amax(1, keepdim=True) / qmax).clamp(min=1e-12).half().float()
        rec = torch.clamp(torch.round(E / scale), -qmax - 1, qmax) * scale
        how = "symmetric absmax, fp16 scale per row"
    else:
        levels = 2**bits - 1
        lo0, hi0 = E.amin(1, keepdim=True), E.amax(1, keepdim=True)
        mid = (lo0 + hi0) / 2
        best, best_err = None, None
        for c in CLIP_GRID:
            lo = (mid + (lo0 - mid) * c).half().float()
            scale = ((hi0 - lo0) * c / levels).clamp(min=1e-12).half().float()
            r = torch.clamp(torch.round((E - lo) / scale), 0, levels) * scale + lo
            err = ((r - E) ** 2).sum(1, keepdim=True)
            if best is None:
                best, best_err = r, err
            else:
                better = err < best_err
                best = torch.where(better, r, best)
                best_err = torch.minimum(err, best_err)
        rec = best
        how = "affine, fp16 scale + fp16 offset per row, clip searched per row"
    return PeerResult(f"int{bits}-row" if bits > 1 else "sign-row", "torch", rec, scalar_bytes(V, d, bits),
                      time.perf_counter() - t0, {"bits": bits, "scheme": how})


# --- faiss PQ / RQ ------------------------------------------------------------------------------------


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover
        raise PeerUnavailable("faiss-cpu is not installed (pip install 'hf-embcomp[bench]')") from e
    return faiss


def pq_bytes(V: int, d: int, M: int, nbits: int = 8) -> int:
    return V * math.ceil(M * nbits / 8) + (2**nbits) * d * 2


def solve_pq(V: int, d: int, ratio: float, nbits: int = 8) -> int:
    """Largest M (a divisor of d) whose PQ bytes meet ``ratio``."""
    budget = V * d * 4 / ratio
    ok = [M for M in range(1, d + 1) if d % M == 0 and pq_bytes(V, d, M, nbits) <= budget]
    if not ok:
        raise PeerUnavailable(f"PQ cannot reach {ratio:g}x on {V} x {d} (codebooks alone exceed the budget)")
    return max(ok)


def _train_sample(x: np.ndarray, train_rows: int | None) -> np.ndarray:
    if not train_rows or train_rows >= len(x):
        return x
    idx = np.random.default_rng(0).choice(len(x), train_rows, replace=False)
    return np.ascontiguousarray(x[np.sort(idx)])


TRAIN_ROWS = 16384
"""Rows (a fixed random sample) the faiss quantisers are trained on; every row is then encoded. faiss asks for
at least 39 points a centroid (9,984 for 256); the full matrix made PQ 192x8b take over 25 minutes here."""

_MEMO: dict[tuple, PeerResult] = {}


def _memo_key(E: torch.Tensor, *args: Any) -> tuple:
    return (E.data_ptr(), tuple(E.shape), *args)


def product_quantise(E: torch.Tensor, ratio: float, nbits: int = 8, threads: int | None = None,
                     train_rows: int | None = TRAIN_ROWS) -> PeerResult:
    faiss = _faiss()
    faiss.omp_set_num_threads(threads or 1)  # OpenMP spin-waits badly on an oversubscribed machine
    V, d = E.shape
    M = solve_pq(V, d, ratio, nbits)
    key = _memo_key(E, "pq", M, nbits, train_rows)
    if key in _MEMO:  # two ratios that solve to the same M (e.g. 4x and 8x: the largest divisor of d)
        return _MEMO[key]
    x = np.ascontiguousarray(E.numpy().astype(np.float32))
    t0 = time.perf_counter()
    pq = faiss.ProductQuantizer(d, M, nbits)
    pq.train(_train_sample(x, train_rows))
    codes = pq.compute_codes(x)
    fit = time.perf_counter() - t0
    cent = faiss.vector_to_array(pq.centroids).reshape(M, 2**nbits, d // M).astype(np.float16).astype(np.float32)
    if nbits != 8:
        raise PeerUnavailable("only 8-bit PQ codes are decoded here")
    idx = codes.astype(np.int64)  # [V, M]
    rec = np.concatenate([cent[m][idx[:, m]] for m in range(M)], axis=1)
    _MEMO[key] = PeerResult(f"faiss-PQ {M}x{nbits}b", "faiss-cpu " + faiss.__version__, torch.from_numpy(rec),
                            pq_bytes(V, d, M, nbits), fit, {"M": M, "nbits": nbits, "codebooks": "fp16",
                                                            "train_rows": min(train_rows or V, V)})
    return _MEMO[key]


def rq_bytes(V: int, d: int, M: int, nbits: int = 8) -> int:
    return V * math.ceil(M * nbits / 8) + M * (2**nbits) * d * 2


def solve_rq(V: int, d: int, ratio: float, nbits: int = 8) -> int:
    budget = V * d * 4 / ratio
    M = 0
    while rq_bytes(V, d, M + 1, nbits) <= budget:
        M += 1
    if M < 1:
        raise PeerUnavailable(f"RQ cannot reach {ratio:g}x on {V} x {d}")
    return M


def residual_quantise(E: torch.Tensor, ratio: float, nbits: int = 8, max_stages: int = 16, beam: int = 1,
                      threads: int | None = None, train_rows: int | None = TRAIN_ROWS) -> PeerResult:
    """faiss ResidualQuantizer (additive codebooks trained stage by stage, beam search encoding)."""
    faiss = _faiss()
    faiss.omp_set_num_threads(threads or 1)
    V, d = E.shape
    M = solve_rq(V, d, ratio, nbits)
    if M > max_stages:
        raise PeerUnavailable(f"RQ needs {M} stages at {ratio:g}x; over --rq-max-stages {max_stages} (training too slow here)")
    x = np.ascontiguousarray(E.numpy().astype(np.float32))
    t0 = time.perf_counter()
    rq = faiss.ResidualQuantizer(d, M, nbits)
    rq.max_beam_size = beam
    rq.train(_train_sample(x, train_rows))
    codes = rq.compute_codes(x)  # packed; with nbits = 8 one byte per stage
    fit = time.perf_counter() - t0
    cb = faiss.vector_to_array(rq.codebooks).reshape(M, 2**nbits, d).astype(np.float16).astype(np.float32)
    idx = codes.astype(np.int64)[:, :M]
    rec = np.zeros((V, d), dtype=np.float32)
    for m in range(M):
        rec += cb[m][idx[:, m]]
    return PeerResult(f"faiss-RQ {M}x{nbits}b", "faiss-cpu " + faiss.__version__, torch.from_numpy(rec),
                      rq_bytes(V, d, M, nbits), fit, {"M": M, "nbits": nbits, "beam": beam, "codebooks": "fp16",
                                                           "train_rows": min(train_rows or V, V)})


# --- torchao -------------------------------------------------------------------------------------------

def torchao_quantise(E: torch.Tensor, bits: int, group_size: int | None = None) -> PeerResult:
    """torchao weight-only integer quantisation of an ``nn.Embedding`` holding E (float32 [V, d]).

    Raises:
        PeerUnavailable: torchao is not installed.
    """
    try:
        import logging

        logging.getLogger("torchao").setLevel(logging.ERROR)  # its CUDA-only extensions fail to load on CPU
        from torchao.quantization import IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup
    except ImportError as e:
        raise PeerUnavailable(f"torchao not installed ({e}); pip install torchao") from None
    t0 = time.perf_counter()
    V, d = E.shape
    module = torch.nn.Sequential(torch.nn.Embedding.from_pretrained(E.detach().float().clone()))
    cfg = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"),
                               granularity=PerAxis(0) if group_size is None else PerGroup(group_size))
    quantize_(module, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Embedding))
    w = module[0].weight
    with torch.no_grad():
        rec = module[0](torch.arange(V)).float()
    parts = {n: getattr(w, n) for n in w.__tensor_flatten__()[0]}
    in_memory = sum(t.nbytes for t in parts.values())
    packed = math.ceil(V * d * bits / 8) + sum(t.nbytes for n, t in parts.items() if n != "qdata")
    return PeerResult(f"torchao int{bits}" + (f" g{group_size}" if group_size else " row"), "torchao", rec, packed,
                      time.perf_counter() - t0, {"bits": bits, "group_size": group_size, "granularity": type(cfg.granularity).__name__,
                                                 "tensor": type(w).__name__, "in_memory_bytes": in_memory,
                                                 "stored_dtypes": {n: str(t.dtype) for n, t in parts.items()}})


# --- llama.cpp formats (ggml-python) --------------------------------------------------------------------

GGML_FORMATS = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0", "IQ4_XS", "Q3_K", "IQ3_XXS", "Q2_K", "IQ2_S", "IQ2_XS",
                "IQ2_XXS", "IQ1_M", "IQ1_S")
"""The llama.cpp formats run as peers, from the most bytes to the fewest (Q8_0 8.5 bits a weight ... IQ1_S 1.56)."""


def _ggml():
    try:
        import ggml
        import gguf
        from gguf.quants import dequantize
    except (ImportError, OSError, RuntimeError, FileNotFoundError) as e:  # the shared library may fail to load
        raise PeerUnavailable(f"ggml-python / gguf not usable ({e}); pip install 'hf-embcomp[bench]'") from None
    return ggml, gguf, dequantize


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def ggml_bytes(V: int, d: int, type_name: str) -> int:
    """Bytes of the llama.cpp format on V x d values: ceil(V*d / block size) blocks of its type size."""
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return math.ceil(V * d / block) * type_size


def ggml_quantise(E: torch.Tensor, type_name: str, imatrix: Any = None, threads: int | None = None) -> PeerResult:
    """Quantise E (float [V, d]) to a llama.cpp format with llama.cpp's own quantiser and read it back.

    Rows of ``n_per_row`` values are quantised: d itself when it is a multiple of the format's block size
    (llama.cpp's layout), else lcm(d, block) values of the flattened (row-major, zero-padded) matrix -- the
    same super-blocks as rows of 256, with whole rows of E in each, so the importance weight of flattened
    position j is imatrix[j % d]. Stored bytes count the real blocks only (module docstring).

    Args:
        E: float [V, d].
        type_name: a ``GGML_FORMATS`` name (any ``gguf.GGMLQuantizationType`` ggml can quantise).
        imatrix: None, or per-column importance [d] (llama.cpp's imatrix: mean h^2 of the inputs the row is
            multiplied with; only relative values matter).
        threads: quantise in that many row chunks at once (ctypes releases the GIL); default 1.

    Raises:
        PeerUnavailable: ggml-python is not importable, the format is unknown to it, or llama.cpp refuses the
            format without an importance matrix (its ``ggml_quantize_chunk`` would abort the process).
        ValueError: ``imatrix`` is not d finite non-negative values with a positive sum.
    """
    import ctypes
    from concurrent.futures import ThreadPoolExecutor

    ggml, gguf, dequantize = _ggml()
    try:
        qtype = gguf.GGMLQuantizationType[type_name]
        gtype = getattr(ggml, f"GGML_TYPE_{type_name}")
    except (KeyError, AttributeError):
        raise PeerUnavailable(f"{type_name} is not a ggml quantisation type known to ggml-python / gguf") from None
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if (ggml.ggml_blck_size(gtype), ggml.ggml_type_size(gtype)) != (block, type_size):
        raise PeerUnavailable(f"{type_name}: ggml's block layout {ggml.ggml_blck_size(gtype)}/"
                              f"{ggml.ggml_type_size(gtype)} differs from gguf's {block}/{type_size}")
    if imatrix is None and ggml.ggml_quantize_requires_imatrix(gtype):
        raise PeerUnavailable(f"llama.cpp refuses {type_name} without an importance matrix "
                              "(ggml_quantize_requires_imatrix)")
    V, d = E.shape
    x = E.detach().float().cpu().numpy().reshape(-1)
    n = V * d
    n_per_row = d if d % block == 0 else math.lcm(d, block)
    rows = math.ceil(n / n_per_row)
    src = np.zeros(rows * n_per_row, dtype=np.float32)
    src[:n] = x
    qw = None
    if imatrix is not None:
        w = np.asarray(imatrix.detach().cpu().numpy() if isinstance(imatrix, torch.Tensor) else imatrix, dtype=np.float64)
        if w.shape != (d,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"imatrix must be {d} finite non-negative values with a positive sum, got shape {w.shape}")
        qw = np.ascontiguousarray(np.tile(w.astype(np.float32), n_per_row // d))
    row_size = ggml.ggml_row_size(gtype, n_per_row)
    assert row_size == n_per_row // block * type_size
    dst = np.zeros(rows * row_size, dtype=np.uint8)
    fptr = ctypes.POINTER(ctypes.c_float)
    src_p = src.ctypes.data_as(fptr)
    qw_p = None if qw is None else qw.ctypes.data_as(fptr)
    t0 = time.perf_counter()
    ggml.ggml_quantize_init(gtype)  # its grids (IQ types) once, before any thread starts
    workers = max(1, min(threads or 1, rows))
    bounds = np.linspace(0, rows, workers + 1).astype(int)

    def chunk(i: int) -> int:
        r0, r1 = int(bounds[i]), int(bounds[i + 1])
        if r1 <= r0:
            return 0
        return ggml.ggml_quantize_chunk(gtype, src_p, dst.ctypes.data, r0 * n_per_row, r1 - r0, n_per_row, qw_p)

    if workers == 1:
        written = chunk(0)
    else:
        with ThreadPoolExecutor(workers) as pool:
            written = sum(pool.map(chunk, range(workers)))
    fit = time.perf_counter() - t0
    if written != dst.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {dst.nbytes}")
    rec = np.asarray(dequantize(dst.reshape(rows, row_size), qtype), dtype=np.float32).reshape(-1)[:n].reshape(V, d)
    stored = math.ceil(n / block) * type_size
    name = f"ggml-{type_name}" + ("+imatrix" if imatrix is not None else "")
    return PeerResult(name, f"ggml-python {_version('ggml-python')} (llama.cpp quantisers), gguf {_version('gguf')}",
                      torch.from_numpy(np.ascontiguousarray(rec)), stored, fit,
                      {"format": type_name, "block_size": block, "type_size": type_size,
                       "bits_per_weight": round(type_size * 8 / block, 4), "n_per_row": n_per_row,
                       "reblocked": n_per_row != d, "padded_values": rows * n_per_row - n, "imatrix": imatrix is not None,
                       "requires_imatrix": bool(ggml.ggml_quantize_requires_imatrix(gtype))})


def _ggml_peer(type_name: str, with_imatrix: bool) -> Callable[..., PeerResult]:
    def run(E: torch.Tensor, r: float | None, **kw: Any) -> PeerResult:
        imatrix = kw.get("imatrix") if with_imatrix else None
        if with_imatrix and imatrix is None:
            raise PeerUnavailable("no importance matrix given (pass imatrix=)")
        return ggml_quantise(E, type_name, imatrix, threads=kw.get("threads"))

    return run


# --- registry -----------------------------------------------------------------------------------------

# name -> (kind, function). kind "fixed": one point at the bit width's own ratio; "ratio": solved per ratio.
PEERS: dict[str, tuple[str, Callable[..., PeerResult]]] = {
    "int8-row": ("fixed", lambda E, r, **kw: scalar_quantise(E, 8)),
    "int4-row": ("fixed", lambda E, r, **kw: scalar_quantise(E, 4)),
    "int2-row": ("fixed", lambda E, r, **kw: scalar_quantise(E, 2)),
    "sign-row": ("fixed", lambda E, r, **kw: scalar_quantise(E, 1)),
    "torchao-int8": ("fixed", lambda E, r, **kw: torchao_quantise(E, 8)),
    "torchao-int4": ("fixed", lambda E, r, **kw: torchao_quantise(E, 4)),
    "torchao-int4-g32": ("fixed", lambda E, r, **kw: torchao_quantise(E, 4, 32)),
    "torchao-int2": ("fixed", lambda E, r, **kw: torchao_quantise(E, 2)),
    "faiss-pq": ("ratio", lambda E, r, **kw: product_quantise(E, r, threads=kw.get("threads"),
                                                              train_rows=kw.get("train_rows") or TRAIN_ROWS)),
    "faiss-rq": ("ratio", lambda E, r, **kw: residual_quantise(E, r, max_stages=kw.get("rq_max_stages", 16),
                                                               threads=kw.get("threads"), train_rows=kw.get("train_rows") or TRAIN_ROWS)),
}
for _fmt in GGML_FORMATS:
    PEERS[f"ggml-{_fmt}"] = ("fixed", _ggml_peer(_fmt, False))
    PEERS[f"ggml-{_fmt}+imatrix"] = ("fixed", _ggml_peer(_fmt, True))
del _fmt

IMATRIX_PEERS = frozenset(p for p in PEERS if p.endswith("+imatrix"))
"""Peers that take ``imatrix=`` (per-column importance [d]); the caller computes it (bench/quality.py)."""

PEER_GROUPS: dict[str, list[str]] = {
    "ggml": [p for p in PEERS if p.startswith("ggml-")],
    "ggml+imatrix": [p for p in PEERS if p.startswith("ggml-") and p in IMATRIX_PEERS],
    "ggml-noimatrix": [p for p in PEERS if p.startswith("ggml-") and p not in IMATRIX_PEERS],
}
"""Shorthands of ``--peers``: ``ggml`` is every llama.cpp format with and without imatrix."""


def select_peers(spec: str) -> list[str]:
    """Peer names of a comma list of names and PEER_GROUPS shorthands, in PEERS order ('' for none).

    Raises:
        KeyError: a name is neither a peer nor a group (the message lists both).
    """
    want: set[str] = set()
    for item in (p.strip() for p in spec.split(",")):
        if not item:
            continue
        if item in PEER_GROUPS:
            want.update(PEER_GROUPS[item])
        elif item in PEERS:
            want.add(item)
        else:
            raise KeyError(f"unknown peer {item!r}; peers: {', '.join(PEERS)}; groups: {', '.join(PEER_GROUPS)}")
    return [p for p in PEERS if p in want]
