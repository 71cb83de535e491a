"""The evaluation results file (JSON, ``schema_version`` 1): write, read, validate.

It is what model cards and the Hub ``model-index`` are written from. Layout (docs/results-schema.md)::

    {
      "schema_version": 1,
      "model": "<compressed DIR or Hub id>",
      "source_model": "<uncompressed model evaluated as the baseline>",
      "method": "svd",
      "compression_ratio": 8.07,                 # vs fp32 bytes of the token embedding
      "hyperparameters": {"rank": 47, ...},
      "created": "2026-11-21T23:50:00+00:00",     # ISO 8601, UTC
      "environment": {"torch": "2.13.0", "transformers": "5.23.0", "hf_embcomp": "0.1.0",
                      "python": "3.11.9", "device": "cpu"},
      "results": [
        {"suite": "glue", "task": "sst2", "task_type": "text-classification",
         "dataset": {"id": "nyu-mll/glue", "name": "GLUE SST-2", "config": "sst2",
                     "split": "validation", "n": 872},
         "metric": "accuracy", "baseline": 0.91, "compressed": 0.90, "drop": 0.01,
         "higher_is_better": true,
         "settings": {"max_steps": 200, "seed": 0, "quick": false}},
        ...
      ]
    }

``drop`` = baseline - compressed when ``higher_is_better``, else compressed - baseline: a positive drop
is always a loss. ``dataset.n`` counts evaluated examples (tokens for perplexity, vocabulary rows for
fidelity). ``dataset.config`` and ``dataset.split`` may be null; ``settings`` always has ``seed`` and
``quick`` and may carry suite-specific keys (``max_steps``, ``window``, ``stride``, ...).
"""

from __future__ import annotations

import json
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
"""Version of the results layout written by this hf-embcomp; readers refuse newer files."""

RESULTS_FILE = "eval_results.json"
"""Default name of the results file, written inside the evaluated model folder (and read by ``hf-embcomp push``)."""

_TOP = {
    "schema_version": int,
    "model": str,
    "source_model": str,
    "method": str,
    "compression_ratio": (int, float),
    "hyperparameters": dict,
    "created": str,
    "environment": dict,
    "results": list,
}
_RESULT = {
    "suite": str,
    "task": str,
    "task_type": str,
    "dataset": dict,
    "metric": str,
    "baseline": (int, float),
    "compressed": (int, float),
    "drop": (int, float),
    "higher_is_better": bool,
    "settings": dict,
}
_DATASET = {"id": str, "name": str, "config": (str, type(None)), "split": (str, type(None)), "n": int}
_ENV = ("torch", "transformers", "device")


def drop_of(baseline: float, compressed: float, higher_is_better: bool) -> float:
    """The loss from compression: baseline - compressed if higher is better, else compressed - baseline."""
    return baseline - compressed if higher_is_better else compressed - baseline


def result(
    suite: str,
    task: str,
    task_type: str,
    dataset: dict[str, Any],
    metric: str,
    baseline: float,
    compressed: float,
    higher_is_better: bool,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """One entry of ``results`` with its ``drop`` computed (values as Python floats)."""
    b, c = float(baseline), float(compressed)
    return {
        "suite": suite,
        "task": task,
        "task_type": task_type,
        "dataset": {"config": None, "split": None, **dataset},
        "metric": metric,
        "baseline": b,
        "compressed": c,
        "drop": drop_of(b, c, higher_is_better),
        "higher_is_better": higher_is_better,
        "settings": settings,
    }


def environment(device: str) -> dict[str, str]:
    """Versions of torch, transformers, hf_embcomp and Python, and the evaluation device."""
    import torch
    import transformers

    import hf_embcomp

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_embcomp": hf_embcomp.__version__,
        "python": platform.python_version(),
        "device": device,
    }


def new_results(model: str, source_model: str, block: dict[str, Any], device: str) -> dict[str, Any]:
    """A results document with no entries yet, for the compressed ``model`` described by its
    ``embedding_compression`` config ``block``."""
    return {
        "schema_version": SCHEMA_VERSION,
        "model": model,
        "source_model": source_model,
        "method": block["method"],
        "compression_ratio": float(block["compression_ratio"]),
        "hyperparameters": dict(block.get("hyperparameters") or {}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "results": [],
    }


def _check(obj: Any, spec: dict[str, Any], where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be an object")
    for key, typ in spec.items():
        if key not in obj:
            raise ValueError(f"{where} lacks {key!r}")
        val = obj[key]
        if not isinstance(val, typ) or (typ in (int, (int, float)) and isinstance(val, bool)):
            raise ValueError(f"{where}.{key} has type {type(val).__name__}")


def validate_results(doc: dict[str, Any]) -> None:
    """Check a results document against schema version 1.

    Raises:
        ValueError: a missing key, a wrong type, a non-finite value, a ``drop`` that does not equal its
            definition, or a ``schema_version`` other than :data:`SCHEMA_VERSION` (newer: "upgrade hf-embcomp").
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("schema_version"), int):
        raise ValueError("not an hf-embcomp results file: no integer schema_version")
    if doc["schema_version"] > SCHEMA_VERSION:
        raise ValueError(f"results schema_version {doc['schema_version']} is newer than this hf-embcomp reads "
                         f"({SCHEMA_VERSION}); upgrade hf-embcomp")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"unknown results schema_version {doc['schema_version']}")
    _check(doc, _TOP, "results file")
    for key in _ENV:
        if not isinstance(doc["environment"].get(key), str):
            raise ValueError(f"environment lacks {key!r}")
    for i, r in enumerate(doc["results"]):
        where = f"results[{i}]"
        _check(r, _RESULT, where)
        _check(r["dataset"], _DATASET, f"{where}.dataset")
        for k in ("baseline", "compressed", "drop"):
            if not math.isfinite(r[k]):
                raise ValueError(f"{where}.{k} is not finite")
        if not math.isclose(r["drop"], drop_of(r["baseline"], r["compressed"], r["higher_is_better"]), abs_tol=1e-9):
            raise ValueError(f"{where}.drop does not equal its definition")
        for k in ("seed", "quick"):
            if k not in r["settings"]:
                raise ValueError(f"{where}.settings lacks {k!r}")


def write_results(doc: dict[str, Any], path: str | os.PathLike) -> Path:
    """Validate ``doc`` and write it as indented JSON (atomically: a temporary file, then a rename).

    Raises:
        ValueError: ``doc`` does not validate.
    """
    validate_results(doc)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a results file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or not a valid results document of a schema version this package reads.
    """
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    validate_results(doc)
    return doc


__all__ = ["SCHEMA_VERSION", "drop_of", "environment", "load_results", "new_results", "result", "validate_results",
           "write_results"]
