"""Export a compressed model to ONNX with the token embedding kept compressed.

``hf-embcomp export onnx DIR OUT`` loads the compressed repository ``DIR`` (its own runtime code, with
``trust_remote_code=True``), traces it with ``torch.onnx.export`` (the ``torch.export``-based exporter) and writes
``OUT``: ``model.onnx``, the backbone's stock ``config.json`` (plus the ``embedding_compression`` block, for the
record), the tokenizer and sentence-transformers files of ``DIR``, and ``export_report.json``. The graph holds the
compressed tensors as initializers (integer codes stay uint8 / int32) and decodes rows in the graph, so the file
is about as small as ``model.safetensors``; a stock export stores the dense V x d matrix.

Inputs and outputs follow optimum's ONNX names: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where
the backbone takes them), int64 [batch_size, sequence_length]; output ``last_hidden_state`` float
[batch_size, sequence_length, d] (``feature-extraction``) or ``logits`` ([batch_size, num_labels] for
``text-classification``, [batch_size, sequence_length, V] for ``text-generation``). Causal LMs are exported
without a key/value cache (every step re-reads the whole sequence); see the README, "Deploy".

Out-of-range token ids are not checked inside the graph (eager mode raises IndexError).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported inside the functions: `hf-embcomp --help` imports this module
    import torch

logger = logging.getLogger(__name__)

TASKS = {
    "feature-extraction": ("AutoModel", "last_hidden_state"),
    "text-classification": ("AutoModelForSequenceClassification", "logits"),
    "text-generation": ("AutoModelForCausalLM", "logits"),
}
"""Exportable tasks: the Auto class the model is loaded with, and the graph's output name."""

_ARCH_TASKS = {
    "EmbCompForCausalLM": "text-generation",
    "EmbCompForSequenceClassification": "text-classification",
}

DEFAULT_OPSET = 18

FOLD_LIMIT = 1024
"""Largest constant (elements) the graph optimiser may fold; larger ones stay computed from the initializers."""


class ExportError(ValueError):
    """A model cannot be exported as asked (the message says why and what to do)."""


def default_task(config: Any) -> str:
    """The task a compressed config exports for by default: from its ``architectures`` (causal LM ->
    ``text-generation``, sequence classification -> ``text-classification``), else ``feature-extraction``."""
    for arch in getattr(config, "architectures", None) or []:
        if arch in _ARCH_TASKS:
            return _ARCH_TASKS[arch]
    return "feature-extraction"


def _make_wrapper(model: torch.nn.Module, task: str, input_names: list[str]) -> torch.nn.Module:
    import torch

    output = TASKS[task][1]
    causal = task == "text-generation"

    class OnnxWrapper(torch.nn.Module):
        """The graph's inputs (``token_type_ids`` only where ``input_names`` has it) -> the task's one output."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
            kw = {"input_ids": input_ids, "attention_mask": attention_mask}
            if "token_type_ids" in input_names:
                kw["token_type_ids"] = token_type_ids
            if causal:
                kw["use_cache"] = False
            return getattr(self.model(**kw, return_dict=True), output)

    return OnnxWrapper().eval()


def model_input_names(model: torch.nn.Module) -> list[str]:
    """``input_ids``, ``attention_mask`` and, where the model's forward takes them, ``token_type_ids``."""
    import inspect

    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in inspect.signature(model.forward).parameters:
        names.append("token_type_ids")
    return names


def sample_inputs(input_names: list[str], vocab_size: int, batch: int = 2, seq: int = 7, seed: int = 0,
                  pad_last: bool = True) -> dict[str, torch.Tensor]:
    """Example inputs of the graph: random ids int64 [batch, seq] in [0, V), an attention mask with the last
    row's final tokens masked (``pad_last``), zero token types."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    if pad_last and batch > 1 and seq > 2:
        mask[-1, -2:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in input_names:
        out["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.int64)
    return out


def export_model_onnx(model: torch.nn.Module, path: str | os.PathLike, task: str, *,
                      opset: int = DEFAULT_OPSET) -> list[str]:
    """Trace ``model`` (compressed or stock, in eval mode) into the ONNX file ``path`` with ``torch.onnx.export``.

    The weights are stored inside the file (no external data; models up to 2 GB). Batch and sequence axes are
    dynamic.

    Returns:
        The graph's input names.

    Raises:
        ExportError: unknown task.
    """
    import torch

    if task not in TASKS:
        raise ExportError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}.")
    names = model_input_names(model)
    wrapper = _make_wrapper(model, task, names)
    example = sample_inputs(names, int(model.config.vocab_size))
    out_name = TASKS[task][1]
    # torch.export's structured trace log ("torch.__trace") propagates DEBUG records to the root logger: under a
    # root handler (the CLI's, pytest's) every graph is formatted as text, which multiplies the export time.
    trace_log = logging.getLogger("torch.__trace")
    propagate, trace_log.propagate = trace_log.propagate, False
    try:
        with torch.no_grad():
            program = _torch_export(wrapper, example, names, out_name, opset)
    finally:
        trace_log.propagate = propagate
    # torch's own optimize() folds every op whose inputs are initializers below 8192 elements; folding the
    # decode of the compressed tensors would store dense copies (transposed factors, unpacked codes). Fold
    # only small constants.
    import onnxscript.optimizer

    program.model = onnxscript.optimizer.optimize(program.model, input_size_limit=FOLD_LIMIT,
                                                  output_size_limit=FOLD_LIMIT)
    program.save(str(path), external_data=False)
    return names


def _torch_export(wrapper: torch.nn.Module, example: dict[str, torch.Tensor], names: list[str], out_name: str,
                  opset: int) -> Any:
    import torch

    batch, seq = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    return torch.onnx.export(
        wrapper, tuple(example[n] for n in names), input_names=names, output_names=[out_name],
        dynamic_shapes={n: {0: batch, 1: seq} for n in names}, opset_version=opset, dynamo=True,
        external_data=False, optimize=False,
    )


def ort_outputs(path: str | os.PathLike, inputs: dict[str, Any]) -> Any:
    """Run the ONNX file with onnxruntime (CPU) on numpy-convertible ``inputs``; returns the first output."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: np.asarray(inputs[i.name]) for i in sess.get_inputs()}
    return sess.run(None, feed)[0]


def _copy_side_files(src: Path, out: Path) -> list[str]:
    from .io import side_files

    files = side_files(src)
    if (src / "compression_report.json").is_file():
        files["compression_report.json"] = (src / "compression_report.json").read_bytes()
    for rel, data in files.items():
        p = out.joinpath(*rel.split("/"))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return sorted(files)


def export_onnx(model_dir: str | os.PathLike, output: str | os.PathLike, *, task: str | None = None,
                opset: int = DEFAULT_OPSET, overwrite: bool = False, check: bool = True) -> dict[str, Any]:
    """Export the compressed repository ``model_dir`` to an ONNX folder ``output`` (module docstring).

    Args:
        model_dir: a folder written by ``hf-embcomp compress`` (or ``save_pretrained`` of a compressed model).
        output: the folder to write (atomically: nothing is left there on failure).
        task: one of :data:`TASKS`; default :func:`default_task` of the checkpoint.
        opset: ONNX opset.
        overwrite: replace a non-empty ``output``.
        check: run the file with onnxruntime on sample inputs and record the max abs difference to torch.

    Returns:
        The export report (also written to ``export_report.json``): ``task``, ``inputs``, ``output``,
        ``onnx_bytes`` (size of ``model.onnx``), ``safetensors_bytes`` (of ``model_dir``),
        ``initializers`` (count and bytes per dtype) and, with ``check``, ``ort_max_abs_diff``.

    Raises:
        ExportError: ``model_dir`` is not a compressed repository, or the task is unknown or has no head.
        FileExistsError: ``output`` is a non-empty folder and ``overwrite`` is False.
    """
    import torch
    import transformers
    from transformers import AutoConfig

    from .io import atomic_output_dir

    src = Path(model_dir)
    if not (src / "config.json").is_file():
        raise ExportError(f"{src} has no config.json; pass a folder written by hf-embcomp compress.")
    raw = json.loads((src / "config.json").read_text())
    if raw.get("model_type") != "embcomp":
        raise ExportError(f"{src} is not an hf-embcomp checkpoint (model_type {raw.get('model_type')!r}); "
                          "compress it first, or export a stock model with optimum-cli export onnx.")
    config = AutoConfig.from_pretrained(src, trust_remote_code=True)
    task = task or default_task(config)
    if task not in TASKS:
        raise ExportError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}.")
    auto = TASKS[task][0]
    if auto not in (raw.get("auto_map") or {}):
        raise ExportError(f"{src} has no {auto} head for task {task}; choose another --task.")
    model = getattr(transformers, auto).from_pretrained(src, trust_remote_code=True, dtype=torch.float32).eval()
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        names = export_model_onnx(model, tmp / "model.onnx", task, opset=opset)
        stock = model.config.to_backbone_config()
        stock.embedding_compression = dict(model.config.embedding_compression)
        stock.architectures = [model._embcomp_stock_class.__name__]
        stock.save_pretrained(tmp)
        copied = _copy_side_files(src, tmp)
        report: dict[str, Any] = {
            "task": task,
            "inputs": names,
            "output": TASKS[task][1],
            "opset": opset,
            "onnx_bytes": (tmp / "model.onnx").stat().st_size,
            "safetensors_bytes": sum(p.stat().st_size for p in src.glob("*.safetensors")),
            "initializers": initializer_summary(tmp / "model.onnx"),
            "files": ["model.onnx", "config.json", *copied],
        }
        if check:
            report["ort_max_abs_diff"] = compare_with_torch(model, tmp / "model.onnx", task, names)
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def compare_with_torch(model: torch.nn.Module, path: str | os.PathLike, task: str, input_names: list[str],
                       inputs: dict[str, torch.Tensor] | None = None) -> float:
    """Max abs difference between ``model`` in torch and the ONNX file in onnxruntime on ``inputs`` (default:
    :func:`sample_inputs` of another shape than the traced one, so the dynamic axes are exercised)."""
    import torch

    inputs = inputs or sample_inputs(input_names, int(model.config.vocab_size), batch=3, seq=11, seed=1)
    wrapper = _make_wrapper(model, task, input_names)
    with torch.no_grad():
        ref = wrapper(*(inputs[n] for n in input_names)).float().numpy()
    got = ort_outputs(path, {n: inputs[n].numpy() for n in input_names})
    return float(abs(got - ref).max())


def initializer_summary(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Initializers of an ONNX file grouped by element type: ``{dtype: {"count", "bytes"}}``."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    out: dict[str, dict[str, int]] = {}
    for init in model.graph.initializer:
        name = helper.tensor_dtype_to_np_dtype(init.data_type).name
        row = out.setdefault(name, {"count": 0, "bytes": 0})
        row["count"] += 1
        row["bytes"] += len(init.raw_data)
    return out


# --- CLI -----------------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    """``hf-embcomp export onnx DIR OUT``."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install onnx onnxscript onnxruntime") from None
    rep = export_onnx(args.model, args.output, task=args.task, opset=args.opset, overwrite=args.overwrite,
                      check=not args.no_check)
    lines = [
        f"hf-embcomp export onnx: {args.model} -> {args.output}",
        f"  task              {rep['task']}  (inputs {', '.join(rep['inputs'])}; output {rep['output']})",
        f"  model.onnx        {rep['onnx_bytes']:,} bytes  (model.safetensors {rep['safetensors_bytes']:,})",
        "  initializers      " + ", ".join(f"{k} {v['count']} ({v['bytes']:,} B)" for k, v in rep["initializers"].items()),
    ]
    if "ort_max_abs_diff" in rep:
        lines.append(f"  onnxruntime       max abs diff to torch {rep['ort_max_abs_diff']:.2e}")
    print("\n".join(lines))
    return 0


def register(subparsers: Any) -> None:
    """Add the ``export`` sub-command (``export onnx``)."""
    p = subparsers.add_parser("export", help="export a compressed model (ONNX), keeping its embedding compressed")
    fmt = p.add_subparsers(dest="format", required=True)
    o = fmt.add_parser("onnx", help="ONNX via torch.onnx; runs with onnxruntime",
                       description=__doc__.split("\n\n")[0])
    o.add_argument("model", help="compressed model folder (from hf-embcomp compress)")
    o.add_argument("output", help="output folder (model.onnx, config.json, tokenizer files, export_report.json)")
    o.add_argument("--task", choices=sorted(TASKS), default=None,
                   help="default: text-generation for a causal LM, text-classification for a sequence classifier, "
                        "else feature-extraction")
    o.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    o.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    o.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs torch comparison")
    o.set_defaults(func=cmd_export)


__all__ = ["TASKS", "ExportError", "compare_with_torch", "default_task", "export_model_onnx", "export_onnx",
           "initializer_summary", "ort_outputs", "register", "sample_inputs"]
