"""Model cards of compressed repositories, rendered with huggingface_hub's ``ModelCard`` from the
template in ``hf_embcomp/model_cards/``.

The metadata (``library_name``, ``base_model``, ``tags``, ``license``, ``pipeline_tag`` and a ``model-index``
of ``EvalResult``s) and the results table are built from the model's config, its compression report and
the results file written by ``hf-embcomp evaluate`` - never typed by hand.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .hub_code.modeling_embcomp import ENTRY_AUTO_CLASSES, MIN_TRANSFORMERS_VERSION, stock_class_for

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).parent / "model_cards" / "compressed_model.md"
"""The Jinja template of the card body (its YAML header is ``{{ card_data }}``)."""

RESULTS_SCHEMA_VERSION = 1

_PIPELINE_TAGS = {
    "AutoModel": "feature-extraction",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
}


class ResultsError(ValueError):
    """A results file is missing a field the card needs, or has a wrong type (the message names it)."""


def read_results(results: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read and check a results file of ``hf-embcomp evaluate`` (schema version 1).

    Only the fields the card uses are checked; extra fields are kept and ignored.

    Args:
        results: a path to the JSON file, or its already-parsed content.

    Returns:
        The parsed results (a dict).

    Raises:
        ResultsError: the file is not valid JSON, has another ``schema_version``, or a result lacks
            ``task``, ``task_type``, ``dataset.id``/``dataset.name``, ``metric`` or a numeric
            ``baseline``/``compressed``/``drop``.
        FileNotFoundError: the path does not exist.
    """
    if isinstance(results, Mapping):
        data, where = dict(results), "results"
    else:
        where = str(results)
        try:
            data = json.loads(Path(results).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ResultsError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("schema_version") != RESULTS_SCHEMA_VERSION:
        raise ResultsError(f"{where}: expected a results object with schema_version {RESULTS_SCHEMA_VERSION}, "
                           f"got {data.get('schema_version') if isinstance(data, dict) else type(data).__name__!r}.")
    rows = data.get("results")
    if not isinstance(rows, list):
        raise ResultsError(f"{where}: 'results' must be a list of measured tasks.")
    for i, r in enumerate(rows):
        for key in ("task", "task_type", "metric"):
            if not isinstance(r.get(key), str) or not r[key]:
                raise ResultsError(f"{where}: results[{i}] lacks the text field {key!r}.")
        ds = r.get("dataset")
        if not isinstance(ds, dict) or not all(isinstance(ds.get(k), str) and ds[k] for k in ("id", "name")):
            raise ResultsError(f"{where}: results[{i}] ({r['task']}) needs dataset.id and dataset.name.")
        for key in ("baseline", "compressed", "drop"):
            v = r.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ResultsError(f"{where}: results[{i}] ({r['task']}) needs a finite number {key!r}, got {v!r}.")
    return data


def source_license(source: str | None, folder: str | os.PathLike | None = None) -> str | None:
    """The ``license`` in the source model's card: ``folder/README.md`` if there is one, else the card of
    the Hub repo ``source`` (only when online; failures to fetch it give None with a log line)."""
    if folder is not None and (Path(folder) / "README.md").is_file():
        return ModelCard.load(Path(folder) / "README.md").data.get("license")
    repo = _hub_id(source)
    if repo is None:
        return None
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        return ModelCard.load(repo).data.get("license")
    except (OSError, ValueError) as e:  # HfHubHTTPError is an OSError
        logger.info("no license found in the card of %s: %s", repo, str(e).splitlines()[0] if str(e) else e)
        return None


def _hub_id(source: str | None) -> str | None:
    """``source`` without a ``::file.gguf`` suffix when it is a Hub repo id (not a local path), else None."""
    if not source:
        return None
    repo = source.split("::", 1)[0]
    if Path(repo).expanduser().exists() or repo.startswith((".", "/", "~")):
        return None
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return None
    return repo


def eval_results(results: Mapping[str, Any]) -> list[EvalResult]:
    """One ``EvalResult`` per measured task: the compressed model's value (checked results, see
    :func:`read_results`)."""
    out = []
    for r in results["results"]:
        ds = r["dataset"]
        out.append(EvalResult(
            task_type=r["task_type"],
            task_name=r["task"],
            dataset_type=ds["id"],
            dataset_name=ds["name"],
            dataset_config=ds.get("config"),
            dataset_split=ds.get("split"),
            metric_type=r["metric"],
            metric_value=r["compressed"],
        ))
    return out


def build_card(
    config: Any,
    report: Mapping[str, Any],
    results: Mapping[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    license: str | None = None,
    has_tokenizer: bool = True,
) -> ModelCard:
    """The model card of a compressed model.

    Args:
        config: the compressed model's config (an ``EmbCompConfig`` or the ``config.json`` dict).
        report: the compression report (``compression_report.json``).
        results: checked evaluation results (:func:`read_results`); None for a card that says no
            downstream results were measured.
        repo_id: the Hub repo the card is for (used in the snippets and as the model-index name).
        license: the source model's license id (see :func:`source_license`).
        has_tokenizer: whether the repository carries tokenizer files (the usage snippet uses them).

    Returns:
        A ``huggingface_hub.ModelCard``.

    Raises:
        KeyError: ``config`` or ``report`` lack a field written by hf-embcomp (not a compressed model).
    """
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    block = cfg["embedding_compression"]
    backbone = cfg["backbone_model_type"]
    auto_map = cfg.get("auto_map") or {}
    auto_class = next((ENTRY_AUTO_CLASSES[a] for a in cfg.get("architectures") or [] if a in ENTRY_AUTO_CLASSES),
                      "AutoModel")
    finetune_class = "AutoModelForSequenceClassification" if "AutoModelForSequenceClassification" in auto_map else auto_class
    stock = stock_class_for(auto_class, backbone)
    method = report["method"]
    source = report.get("source_model") or block.get("source_model") or "unknown source"
    base = _hub_id(report.get("source_model"))
    name = repo_id or f"{Path(source.split('::')[0]).name}-{method}-{report['compression_ratio']:.0f}x"

    rows = list(results["results"]) if results else []
    data = ModelCardData(
        model_name=name,
        base_model=base,
        library_name="transformers",
        license=license,
        pipeline_tag=_PIPELINE_TAGS.get(auto_class),
        tags=["embedding-compression", method, backbone, "hf-embcomp"],
        eval_results=eval_results(results) if rows else None,
    )
    table = [{
        "task": r["task"],
        "dataset_name": r["dataset"]["name"],
        "split": r["dataset"].get("split", "?"),
        "n": r["dataset"].get("n", "?"),
        "metric": r["metric"],
        "baseline": r["baseline"],
        "compressed": r["compressed"],
        "drop": r["drop"],
        "quick": bool((r.get("settings") or {}).get("quick")),
    } for r in rows]
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE_PATH),
        title=name,
        source=source,
        source_url=f"https://huggingface.co/{base}" if base else None,
        repo_id=repo_id or "REPO_ID",
        method=method,
        hyperparameters=f"`{json.dumps(report.get('hyperparameters', {}), sort_keys=True)}`",
        backbone=backbone,
        num_embeddings=report["num_embeddings"],
        embedding_dim=report["embedding_dim"],
        source_dtype=report["source_dtype"],
        stored_bytes=report["stored_bytes"],
        fp32_bytes=report["fp32_bytes"],
        source_bytes=report["source_bytes"],
        ratio=report["compression_ratio"],
        ratio_vs_source=report["compression_ratio_vs_source"],
        fidelity=report["fidelity"],
        body_dtype=report.get("body_format") or report.get("body_dtype"),
        body_blocks=bool(report.get("body_format")),
        min_transformers=MIN_TRANSFORMERS_VERSION,
        model_bytes=report.get("model_bytes"),
        source_model_bytes=report.get("source_model_bytes"),
        model_ratio=report.get("model_compression_ratio"),
        results=table,
        any_quick=any(r["quick"] for r in table),
        results_created=(results or {}).get("created"),
        auto_class=auto_class,
        finetune_class=finetune_class,
        stock_class=stock.__name__ if stock is not None else f"the stock {backbone} class",
        has_tokenizer=has_tokenizer,
        paper=report.get("paper") or f"(no reference recorded for {method})",
    )


def render_card(
    config: Any,
    report: Mapping[str, Any],
    results: Mapping[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    license: str | None = None,
    has_tokenizer: bool = True,
) -> str:
    """The model card (``README.md`` text) of a compressed model; see :func:`build_card`."""
    return str(build_card(config, report, results, repo_id=repo_id, license=license, has_tokenizer=has_tokenizer))


def has_tokenizer_files(paths: Iterable[str]) -> bool:
    """Whether a repository's file list (relative paths) includes tokenizer files."""
    return any(Path(p).name.startswith(("tokenizer", "vocab")) for p in paths)
