"""Fit memory (issue 16 item 4): the fits compute their V-sized products a chunk of rows at a time, and the
chunked paths give the whole-matrix results bit for bit.

A chunk size at least V is the whole-matrix computation (one chunk); a tiny one (a few dozen rows, with a
shorter last chunk) exercises every chunked pass. The peak memory itself is measured by ``bench/scale.py``
(``peak_vs_fp32``), not here: these tests check that the chunking changes no result.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from hf_embcomp.methods import get_method
from hf_embcomp.methods import gptq as gptq_mod
from hf_embcomp.methods import lighttoken as lt
from hf_embcomp.methods.base import rows_of
from hf_embcomp.methods.dccl import pack_codes, refit_codebooks
from hf_embcomp.methods.gptq import GPTQConfig
from hf_embcomp.methods.lighttoken import LightTokenConfig
from hf_embcomp.training.rows import train_rows


def _matrix(V: int, d: int, seed: int = 0) -> torch.Tensor:
    """Rows with a decaying spectrum (not white noise), float32 [V, d]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(V, d, generator=g) * torch.logspace(0, -1.5, d)) @ torch.linalg.qr(torch.randn(d, d, generator=g))[0]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("rank,freq", [(0, 0.0), (4, 0.5)])
def test_lighttoken_chunked_fit_equals_whole_matrix(monkeypatch, rank, freq):
    V, d = 600, 32  # 600 = 9 x 64 + 24: a short last chunk too
    E = _matrix(V, d)
    counts = torch.randint(0, 50, (V,), generator=torch.Generator().manual_seed(1))
    cfg = dataclasses.replace(LightTokenConfig.from_ratio(V, d, 8, rank=rank), epochs=1, batch_size=128,
                              exact_rows=16, freq_power=freq)
    fit = lambda: get_method("lighttoken").fit(E, cfg, token_counts=counts, special_ids=[0, 1])  # noqa: E731
    monkeypatch.setattr(lt, "ROW_CHUNK", 1 << 20)
    whole, st_whole = fit(), lt.LightTokenMethod.last_stats
    monkeypatch.setattr(lt, "ROW_CHUNK", 64)
    chunked, st_chunked = fit(), lt.LightTokenMethod.last_stats
    _equal(whole, chunked)
    assert ("lowrank_p" in whole) == (rank > 0)
    # the statistics add their chunks in float64: equal up to rounding
    for key in ("before_refit", "after_refit", "with_exact_rows"):
        for name, v in st_whole[key].items():
            assert v == pytest.approx(st_chunked[key][name], rel=1e-5, abs=1e-6), (key, name)


def test_train_rows_sequence_equals_concatenated_rows():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 6, generator=g), torch.randn(300, 3, generator=g)

    def run(rows) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = nn.Linear(6, 3)
        step = lambda m, batch, p: ((m(batch[:, :6]) - batch[:, 6:]) ** 2).mean()  # noqa: E731
        train_rows(net, rows, step, epochs=2, batch_size=64, lr=1e-2, seed=3)
        return [p.detach().clone() for p in net.parameters()]

    for x, y in zip(run(torch.cat([a, b], 1)), run((a, b))):
        assert torch.equal(x, y)


def test_gptq_chunked_fit_equals_whole_matrix(monkeypatch):
    V, d = 300, 32  # 300 = 4 x 64 + 44
    E = _matrix(V, d, seed=2)
    cfg = dataclasses.replace(GPTQConfig.from_ratio(V, d, 10), bits=(1, 3), tier_rows=(200, 100),
                              group_size=16)  # calibrated allocation over two widths
    monkeypatch.setattr(gptq_mod, "ROW_CHUNK", 1 << 20)
    whole = get_method("gptq").fit(E, cfg)
    monkeypatch.setattr(gptq_mod, "ROW_CHUNK", 64)
    _equal(whole, get_method("gptq").fit(E, cfg))


def test_dccl_chunked_packing_and_narrow_codes():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (101, 7), generator=g)
    assert torch.equal(pack_codes(codes, 4, chunk=8), pack_codes(codes, 4, chunk=1 << 20))
    assert torch.equal(pack_codes(codes.to(torch.uint8), 4), pack_codes(codes, 4))
    e = torch.randn(101, 5, generator=g)
    assert torch.equal(refit_codebooks(e, codes.to(torch.uint8), 16, chunk=16), refit_codebooks(e, codes, 16, chunk=16))


def test_rows_of_computes_short_ranges_as_the_tail_of_a_longer_one():
    seen = []

    def f(i: int, j: int) -> torch.Tensor:
        seen.append((i, j))
        return torch.arange(i, j)

    assert torch.equal(rows_of(f, 90, 100, min_rows=32), torch.arange(90, 100)) and seen[-1] == (68, 100)
    assert torch.equal(rows_of(f, 0, 5, min_rows=32), torch.arange(0, 5)) and seen[-1] == (0, 5)
    assert torch.equal(rows_of(torch.arange(10), 2, 4), torch.tensor([2, 3]))
