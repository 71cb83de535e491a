"""Issue 16: the fast runtime paths (byte tables read by ``embedding_bag``, table unpacking of the codes) give the
same tied logits, lookups and reconstructions as reference paths written here from the stored format. Timing is in
bench/speed.py, not here."""

from __future__ import annotations

import pytest
import torch

from hf_embcomp.hub_code.embcomp_base import unpack_bits
from hf_embcomp.hub_code.embcomp_gptq import hadamard_matrix, unpack_codes
from hf_embcomp.hub_code.embcomp_layers import build_compressed_embedding


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal up to float32 rounding: max error <= 1e-6 of the largest magnitude."""
    got, ref = got.double(), ref.double()
    return float((got - ref).abs().max()) <= 1e-6 * float(ref.abs().max()) + 1e-7


def _random(block: dict, seed: int = 0):
    emb = build_compressed_embedding(block)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(emb.named_parameters(recurse=False)) + list(emb.named_buffers(recurse=False)):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.startswith("codes"):
                t.copy_(torch.randint(0, 256, t.shape, generator=g, dtype=torch.uint8))
    return emb.eval()


def _gptq(V: int = 300, d: int = 96, bits=(1, 2, 3, 4, 5, 8), rows=(60, 50, 50, 40, 50, 50), group=64,
          vq=((9, 8, 0), (6, 2, 0)), center: bool = True):
    """Random tensors in the gptq format; ``vq``: (index bits, k, rows) of the vector tiers; ``center``: with a
    mean row."""
    V = V + sum(n for _, _, n in vq)
    block = {"method": "gptq", "num_embeddings": V, "embedding_dim": d, "padding_idx": None, "embed_scale": None,
             "storage_dtype": "float32", "hyperparameters": {"bits": list(bits), "tier_rows": list(rows),
                                                             "vq_bits": [b for b, _, _ in vq],
                                                             "vq_dims": [k for _, k, _ in vq],
                                                             "vq_rows": [n for _, _, n in vq],
                                                             "group_size": group, "rotation_block": 32,
                                                             "center": center}}
    emb = _random(block)
    rb = torch.cat([torch.full((n,), b, dtype=torch.uint8) for b, n in zip(bits, rows)]
                   + [torch.full((n,), 128 + t, dtype=torch.uint8) for t, (_, _, n) in enumerate(vq)])
    with torch.no_grad():
        emb.row_bits.copy_(rb[torch.randperm(V, generator=torch.Generator().manual_seed(1))])
        emb.rotation_signs.copy_(torch.randint(0, 256, emb.rotation_signs.shape, dtype=torch.uint8))
    return emb


def _gptq_reference(emb) -> torch.Tensor:
    """float64 [V, d] from the stored format: bit stream -> codes -> q * scale + min per group -> x' R^T."""
    d, g = emb.embedding_dim, emb.group_size
    tiers = []
    for b, n in emb.tiers:
        stream = unpack_bits(getattr(emb, f"codes_b{b}"), d * b, torch.int64).view(n, d, b)
        q = (stream * (2 ** torch.arange(b - 1, -1, -1))).sum(-1).double()
        s = getattr(emb, f"scales_b{b}").double().repeat_interleave(g, 1)[:, :d]
        m = getattr(emb, f"mins_b{b}").double().repeat_interleave(g, 1)[:, :d]
        tiers.append(q * s + m)
    for t, b, k, n in emb.vq_tiers:  # indices -> codebook vectors times the row's scale
        stream = unpack_bits(getattr(emb, f"codes_v{t}"), d // k * b, torch.int64).view(n, d // k, b)
        c = (stream * (2 ** torch.arange(b - 1, -1, -1))).sum(-1)
        tiers.append(getattr(emb, f"codebook_v{t}").double()[c].reshape(n, d) * getattr(emb, f"scales_v{t}").double())
    x = torch.cat(tiers)[emb._index()[1]]
    if emb.hparams.get("center"):  # the stored rows are centred: the mean row comes back before the rotation
        x = x + emb.row_mean.double()
    B = emb.rotation_block
    signs = 1 - 2 * unpack_bits(emb.rotation_signs, d, torch.float64)
    return (x.view(-1, d // B, B) @ hadamard_matrix(B, torch.float64)).view(-1, d) * signs


def test_unpack_codes_float_paths_match_the_integer_path():
    g = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        packed = torch.randint(0, 256, (7, (37 * bits + 7) // 8), generator=g, dtype=torch.uint8)
        ref = unpack_codes(packed, bits, 37)  # int32
        stream = unpack_bits(packed, 37 * bits, torch.int64).view(7, 37, bits)
        assert torch.equal(ref.long(), (stream * (2 ** torch.arange(bits - 1, -1, -1))).sum(-1)), bits
        assert torch.equal(unpack_codes(packed, bits, 37, torch.float32), ref.float()), bits


@pytest.mark.parametrize("group,vq,center", [(64, (), False), (48, ((9, 8, 40), (6, 2, 30), (5, 4, 20)), True)])
def test_gptq_tables_and_decode_match_the_reference(group, vq, center):  # 64: the last group of 96 is half empty
    emb = _gptq(group=group, vq=vq, center=center)  # (padding); 48: full, + vector tiers (k = 8: rows gathered by
    E = _gptq_reference(emb)  # F.embedding; k = 2, 4: as one int64 / complex128 element) and a mean row
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for use in (0.0, type(emb).logits_table_use):  # 0: every tier that may read tables does (these tiers are
            for n in (1, 3, 4, 5, 40):  # too small to pay for them under the default); <= 4 rows: byte tables; more:
                # tables for the cheap tiers (1-2 bits, k = 8), decoded chunks for the others; 40 rows with
                # logits_table_rows 32: two table passes
                emb.logits_table_use = use
                h = torch.randn(2, n, emb.embedding_dim, generator=g)
                got = emb(logits_from=h)
                assert got.shape == (2, n, emb.num_embeddings)
                assert _close(got.double(), h.double() @ E.T), (use, n)
        del emb.logits_table_use
        emb.logits_table_rows = 0  # the decode path at one row gives the same logits as the tables
        h = torch.randn(1, emb.embedding_dim, generator=g)
        ref = emb.compute_logits(h)
        del emb.logits_table_rows
        assert _close(emb.compute_logits(h), ref)
        ids = torch.randint(0, emb.num_embeddings, (3, 11), generator=g)
        assert _close(emb(ids).double(), E[ids])
        assert _close(emb.reconstruct().double(), E)


def test_gptq_table_cache_follows_the_codes():
    emb = _gptq()
    h = torch.randn(1, emb.embedding_dim)
    with torch.no_grad():
        emb.compute_logits(h)  # builds the byte index
        emb.codes_b1.copy_(torch.randint(0, 256, emb.codes_b1.shape, dtype=torch.uint8))
        assert _close(emb.compute_logits(h).double(), h.double() @ _gptq_reference(emb).T)


def test_lighttoken_tables_match_unpacked_codes():
    V, d = 500, 48
    block = {"method": "lighttoken", "num_embeddings": V, "embedding_dim": d, "padding_idx": None,
             "embed_scale": None, "storage_dtype": "float32",
             "hyperparameters": {"rank": 4, "bits": [37, 30], "stages": 2, "exact_rows": 5}}
    emb = _random(block)
    with torch.no_grad():
        emb.exact_ids.copy_(torch.tensor([0, 7, 99, 250, 499], dtype=torch.int32))
        E = emb.reconstruct().double()
        for n in (1, 4):
            h = torch.randn(n, d)
            fast = emb.compute_logits(h)
            emb.logits_byte_tables = False
            slow = emb.compute_logits(h)
            del emb.logits_byte_tables
            assert _close(fast, slow)
            assert _close(fast.double(), h.double() @ E.T)


@pytest.mark.parametrize("method", ["lighttoken", "gptq"])
def test_compiles_fullgraph_and_keeps_the_eager_range_check(method):
    """torch.compile(fullgraph=True) traces the compressed runtime (no data-dependent guard: the id range check is
    skipped while compiling) and gives the eager logits; eager still raises a clear IndexError."""
    import hf_embcomp
    from tests.support.tiny import V, tiny_model

    extra = {"lighttoken": {"token_counts": torch.arange(V).flip(0)}, "gptq": {"calibration": None}}[method]
    comp = hf_embcomp.compress(tiny_model("llama"), method, 8, **extra).eval()
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(comp, fullgraph=True, backend="eager")  # tracing is what is tested; eager keeps it short
    with torch.no_grad():
        ref = comp(input_ids=ids, use_cache=False).logits
        got = compiled(input_ids=ids, use_cache=False).logits
        assert _close(got, ref)
        with pytest.raises(IndexError, match="out of range"):
            comp(input_ids=torch.tensor([[1, V]]))
    torch._dynamo.reset()


def test_gptq_traced_lookup_equals_eager_for_few_and_many_ids():
    """The graph-friendly lookup of gptq (every tier decodes every id, or - for many ids under torch.compile - the
    tiers with at most that many rows are decoded whole and gathered) gives the eager rows bit for bit."""
    import hf_embcomp
    from tests.support.tiny import V, tiny_model

    emb = hf_embcomp.compress(tiny_model("llama"), "gptq", 8, calibration=None).get_compressed_embedding()
    assert len(emb.all_tiers) > 1 and min(n for _, _, n in emb.all_tiers) < 300 < max(n for _, _, n in emb.all_tiers)
    pos, _ = emb._index()
    for n in (3, 300):
        ids = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n))
        got = emb._unrotate_rows(emb._embed_traced(emb.row_bits[ids], pos[ids]))
        assert torch.equal(got, emb.embed(ids))
