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
``text-classification``, [batch_size, sequence_length, V] for ``text-generation``).

``text-generation-with-past`` (the default for a causal LM, as in optimum) adds the key/value cache, named as optimum
names it so that ``optimum.onnxruntime.ORTModelForCausalLM`` runs it: inputs ``input_ids`` and ``position_ids``
int64 [batch_size, sequence_length], ``attention_mask`` int64 [batch_size, past_sequence_length + sequence_length],
``past_key_values.{i}.key`` / ``.value`` float [batch_size, num_key_value_heads, past_sequence_length, head_dim] for
every layer i (past_sequence_length 0 on the first step); outputs ``logits`` float [batch_size, sequence_length, V]
and ``present.{i}.key`` / ``.value`` float [batch_size, num_key_value_heads, past_sequence_length + sequence_length,
head_dim]. :func:`ort_greedy_generate` decodes with it in plain onnxruntime. ``text-generation`` is the graph without
a cache (every step re-reads the whole sequence).

Out-of-range token ids are not checked inside the graph (eager mode raises IndexError).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported inside the functions: `hf-embcomp --help` imports this module
    import torch

logger = logging.getLogger(__name__)

TASKS = {
    "feature-extraction": ("AutoModel", "last_hidden_state"),
    "text-classification": ("AutoModelForSequenceClassification", "logits"),
    "text-generation": ("AutoModelForCausalLM", "logits"),
    "text-generation-with-past": ("AutoModelForCausalLM", "logits"),
}
"""Exportable tasks: the Auto class the model is loaded with, and the graph's (first) output name."""

WITH_PAST = "text-generation-with-past"

_ARCH_TASKS = {
    "EmbCompForCausalLM": WITH_PAST,
    "EmbCompForSequenceClassification": "text-classification",
}

DEFAULT_OPSET = 18

FOLD_LIMIT = 1024
"""Largest constant (elements) the graph optimiser may fold; larger ones stay computed from the initializers."""


class ExportError(ValueError):
    """A model cannot be exported as asked (the message says why and what to do)."""


def default_task(config: Any) -> str:
    """The task a compressed config exports for by default: from its ``architectures`` (causal LM ->
    ``text-generation-with-past``, sequence classification -> ``text-classification``), else
    ``feature-extraction``."""
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
        ExportError: unknown task, or a floating-point weight of ``model`` is not float32 (onnxruntime's CPU kernels
            reject the bfloat16 graph that, e.g., an in-memory model compressed from a GGUF file would give).
    """
    import torch

    if task not in TASKS:
        raise ExportError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}.")
    wide = sorted({str(t.dtype).removeprefix("torch.") for t in [*model.parameters(), *model.buffers()]
                   if t.is_floating_point() and t.dtype != torch.float32})
    if wide:
        raise ExportError(f"the model has {'/'.join(wide)} weights; the ONNX graph is float32: save it and run "
                          "`hf-embcomp export onnx DIR OUT` (it loads in float32), or pass a float32 model.")
    # torch.export's structured trace log ("torch.__trace") propagates DEBUG records to the root logger: under a
    # root handler (the CLI's, pytest's) every graph is formatted as text, which multiplies the export time.
    trace_log = logging.getLogger("torch.__trace")
    propagate, trace_log.propagate = trace_log.propagate, False
    try:
        with torch.no_grad():
            if task == WITH_PAST:
                program, names = _torch_export_with_past(model, opset)
            else:
                names = model_input_names(model)
                wrapper = _make_wrapper(model, task, names)
                example = sample_inputs(names, int(model.config.vocab_size))
                program = _torch_export(wrapper, example, names, TASKS[task][1], opset)
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


def _make_past_wrapper(model: torch.nn.Module) -> torch.nn.Module:
    """The module traced for ``text-generation-with-past``: ``(input_ids, attention_mask, position_ids, ((key, value)
    per layer)) -> (logits, key 0, value 0, key 1, ...)``."""
    import torch
    from transformers import DynamicCache

    cache_arg = cache_argument(model)

    class WithPast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...]) -> tuple[torch.Tensor, ...]:
            # A cache without the config: every layer a plain (full) one, whatever the model's sliding windows
            # (their attention masks still apply the window), so the graph's present = past + new tokens.
            cache = DynamicCache(ddp_cache_data=list(past_key_values))
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             **{cache_arg: cache}, use_cache=True, return_dict=True)
            return (out.logits, *cache_tensors(output_cache(out)))

    return WithPast().eval()


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword a model's forward takes its key/value cache by: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (earlier)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The key/value cache of a model output: ``output.cache`` (transformers >= 5.24), else ``past_key_values``."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def cache_tensors(cache: Any) -> list[torch.Tensor]:
    """The tensors of a transformers cache in optimum's order: key 0, value 0, key 1, value 1, ...; each float
    [batch, num_key_value_heads, length, head_dim]."""
    out = []
    for layer in cache.layers:
        out += [layer.keys, layer.values]
    return out


def past_names(num_layers: int, prefix: str = "past_key_values") -> list[str]:
    """optimum's cache names: ``{prefix}.{i}.key``, ``{prefix}.{i}.value`` for i < ``num_layers`` (``prefix``
    ``present`` for the outputs)."""
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def _torch_export_with_past(model: torch.nn.Module, opset: int) -> tuple[Any, list[str]]:
    """Trace the with-past graph (module docstring). The example has a past of 3 tokens, 2 new ones and batch 2,
    so no axis is specialised to 0 or 1; the graph runs with any past length, 0 included."""
    import torch

    batch, past, seq = 2, 3, 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(model.config.vocab_size), (batch, past + seq), generator=g)
    kv = cache_tensors(output_cache(model(input_ids=ids[:, :past], use_cache=True, return_dict=True)))
    if not kv:
        raise ExportError(f"{type(model).__name__} returned no key/value cache; export it with --task text-generation.")
    pairs = tuple((kv[i], kv[i + 1]) for i in range(0, len(kv), 2))
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    n = len(pairs)
    names = ["input_ids", "attention_mask", "position_ids", *past_names(n)]
    outputs = ["logits", *past_names(n, "present")]
    # Axis names as optimum writes them; torch.onnx makes each named axis dynamic and infers the relations (the
    # mask's length is past + new tokens).
    b, s, p, total = "batch_size", "sequence_length", "past_sequence_length", "past_sequence_length + sequence_length"
    dynamic = {
        "input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: total}, "position_ids": {0: b, 1: s},
        "past_key_values": tuple(({0: b, 2: p}, {0: b, 2: p}) for _ in pairs),
    }
    with warnings.catch_warnings():  # one per cache tensor: "The axis name: batch_size will not be used, since it
        warnings.filterwarnings("ignore", message="# The axis name")  # shares ... batch_size" (the same name)
        program = torch.onnx.export(
            _make_past_wrapper(model), (ids[:, past:].contiguous(), mask, pos, pairs), input_names=names,
            output_names=outputs, dynamic_shapes=dynamic, opset_version=opset, dynamo=True, external_data=False,
            optimize=False,
        )
    return program, names


def ort_greedy_generate(path: str | os.PathLike, input_ids: Any, max_new_tokens: int) -> tuple[Any, Any]:
    """Greedy decoding with a ``text-generation-with-past`` ONNX file in onnxruntime (CPU), reusing the cache.

    Args:
        path: the ``model.onnx`` of :func:`export_onnx` with that task.
        input_ids: int64 [batch, prompt_len] (numpy-convertible), no padding.
        max_new_tokens: tokens to generate (no stop token).

    Returns:
        ``(new_ids, logits)``: int64 numpy [batch, max_new_tokens], and float32 [batch, prompt_len + max_new_tokens
        - 1, V], the logits of every position fed (the prompt's in one step, then one token a step from the cache).

    Raises:
        ExportError: the file has no ``past_key_values`` inputs.
    """
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ins = {i.name: i for i in sess.get_inputs()}
    keys = [n for n in ins if n.startswith("past_key_values.")]
    if not keys:
        raise ExportError(f"{path} has no past_key_values inputs; export it with --task {WITH_PAST}.")
    ids = np.asarray(input_ids, dtype=np.int64)
    batch = ids.shape[0]
    shape0 = ins[keys[0]].shape  # [batch_size, heads, past_sequence_length, head_dim]
    feed = {n: np.zeros((batch, int(shape0[1]), 0, int(shape0[3])), dtype=np.float32) for n in keys}
    step, past, new, logits = ids, 0, [], []
    for _ in range(max_new_tokens):
        seq = step.shape[1]
        feed.update(input_ids=step, attention_mask=np.ones((batch, past + seq), dtype=np.int64),
                    position_ids=np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq)).copy())
        out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
        logits.append(out["logits"])
        step = out["logits"][:, -1].argmax(-1).astype(np.int64)[:, None]
        new.append(step)
        feed.update({n: out["present" + n[len("past_key_values"):]] for n in keys})
        past += seq
    return np.concatenate(new, axis=1), np.concatenate(logits, axis=1)


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
        ``initializers`` (count and bytes per dtype) and, with ``check``, ``ort_max_abs_diff`` (and, with the cache,
        ``ort_greedy_equal``: :func:`compare_with_past`).

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
        if check and task == WITH_PAST:
            report["ort_max_abs_diff"], report["ort_greedy_equal"] = compare_with_past(model, tmp / "model.onnx")
        elif check:
            report["ort_max_abs_diff"] = compare_with_torch(model, tmp / "model.onnx", task, names)
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def compare_with_torch(model: torch.nn.Module, path: str | os.PathLike, task: str, input_names: list[str],
                       inputs: dict[str, torch.Tensor] | None = None) -> float:
    """Max abs difference between ``model`` in torch and the ONNX file in onnxruntime on ``inputs`` (default:
    :func:`sample_inputs` of another shape than the traced one, so the dynamic axes are exercised)."""
    import torch

    if task == WITH_PAST:
        return compare_with_past(model, path)[0]
    inputs = inputs or sample_inputs(input_names, int(model.config.vocab_size), batch=3, seq=11, seed=1)
    wrapper = _make_wrapper(model, task, input_names)
    with torch.no_grad():
        ref = wrapper(*(inputs[n] for n in input_names)).float().numpy()
    got = ort_outputs(path, {n: inputs[n].numpy() for n in input_names})
    return float(abs(got - ref).max())


def compare_with_past(model: torch.nn.Module, path: str | os.PathLike, input_ids: torch.Tensor | None = None,
                      max_new_tokens: int = 4) -> tuple[float, bool]:
    """Greedy decoding with the cache in onnxruntime (:func:`ort_greedy_generate`) vs torch.

    Args:
        model: the causal LM that was exported (eval mode).
        path: its ``text-generation-with-past`` ONNX file.
        input_ids: int64 [batch, prompt_len] prompts without padding (default: 2 random ones of 7 tokens).
        max_new_tokens: tokens to generate.

    Returns:
        ``(max_abs_diff, same_tokens)``: the largest difference between the ONNX logits of every fed position
        (prompt, then one token a step from the cache) and torch's logits of the whole sequence in one forward, and
        whether the greedy tokens equal ``model.generate(do_sample=False)``'s.
    """
    import torch

    if input_ids is None:
        g = torch.Generator().manual_seed(1)
        input_ids = torch.randint(0, int(model.config.vocab_size), (2, 7), generator=g)
    new, got = ort_greedy_generate(path, input_ids.numpy(), max_new_tokens)
    with torch.no_grad():
        ref = model(input_ids=torch.cat([input_ids, torch.from_numpy(new)], 1)[:, :-1]).logits.float().numpy()
        gen = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False)[:, input_ids.shape[1]:].numpy()
    return float(abs(got - ref).max()), bool((gen == new).all())


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
        f"  task              {rep['task']}  (inputs {_names_summary(rep['inputs'])}; output {rep['output']})",
        f"  model.onnx        {rep['onnx_bytes']:,} bytes  (model.safetensors {rep['safetensors_bytes']:,})",
        "  initializers      " + ", ".join(f"{k} {v['count']} ({v['bytes']:,} B)" for k, v in rep["initializers"].items()),
    ]
    if "ort_max_abs_diff" in rep:
        lines.append(f"  onnxruntime       max abs diff to torch {rep['ort_max_abs_diff']:.2e}")
    if "ort_greedy_equal" in rep:
        lines.append(f"  greedy decoding   with the cache {'equals' if rep['ort_greedy_equal'] else 'DIFFERS from'} torch's")
    print("\n".join(lines))
    return 0


def _names_summary(names: list[str]) -> str:
    plain = [n for n in names if not n.startswith("past_key_values.")]
    layers = (len(names) - len(plain)) // 2
    return ", ".join(plain + ([f"past_key_values.{{0..{layers - 1}}}.key/value"] if layers else []))


def register(subparsers: Any) -> None:
    """Add the ``export`` sub-command (``export onnx``)."""
    p = subparsers.add_parser("export", help="export a compressed model (ONNX), keeping its embedding compressed")
    fmt = p.add_subparsers(dest="format", required=True)
    o = fmt.add_parser("onnx", help="ONNX via torch.onnx; runs with onnxruntime",
                       description=__doc__.split("\n\n")[0])
    o.add_argument("model", help="compressed model folder (from hf-embcomp compress)")
    o.add_argument("output", help="output folder (model.onnx, config.json, tokenizer files, export_report.json)")
    o.add_argument("--task", choices=sorted(TASKS), default=None,
                   help=f"default: {WITH_PAST} (key/value cache, optimum's names) for a causal LM, "
                        "text-classification for a sequence classifier, else feature-extraction")
    o.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    o.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    o.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs torch comparison")
    o.set_defaults(func=cmd_export)


__all__ = ["TASKS", "WITH_PAST", "ExportError", "cache_argument", "cache_tensors", "compare_with_past",
           "compare_with_torch", "default_task", "export_model_onnx", "export_onnx", "initializer_summary",
           "ort_greedy_generate", "ort_outputs", "output_cache", "past_names", "register", "sample_inputs"]
