"""Fine-tuning and placement of compressed models (issue 7).

Tiny random models are compressed and saved here; every fine-tune, reload and placement check runs in a
fresh interpreter where hf_embcomp cannot be imported, i.e. on the repository's own runtime code only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hf_embcomp
from hf_embcomp.training.parts import stored_embedding
from tests.support.isolated import run_isolated
from tests.support.tiny import V, tiny_model

# A child-process helper: the stored embedding tensors of a saved folder, read from the safetensors header
# (dtype, shape, byte length and the raw bytes' sha256) - no hf_embcomp needed.
_STORED = '''
import hashlib, json, struct
def stored(folder, prefix):
    with open(folder + "/model.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        out = {}
        for k, v in sorted(header.items()):
            if k.startswith(prefix + "."):
                a, b = v["data_offsets"]
                f.seek(8 + n + a)
                out[k] = [v["dtype"], v["shape"], b - a, hashlib.sha256(f.read(b - a)).hexdigest()]
    return out
'''


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, Path]:
    """name -> saved compressed folder: tiny BERT (MaskedLM, tied decoder) and Llama (CausalLM, tied lm_head)
    with SVD; tiny BERT with LightToken (packed uint8 codes, float16 storage) when that method is registered."""
    root = tmp_path_factory.mktemp("ft_repos")
    out = {}
    for name, arch in (("bert", "bert"), ("llama", "llama")):
        comp = hf_embcomp.compress(tiny_model(arch), "svd", ratio=None, rank=4)
        out[name] = hf_embcomp.save_compressed(comp, root / name)
    if "lighttoken" in hf_embcomp.METHODS:
        comp = hf_embcomp.compress(tiny_model("bert"), "lighttoken", ratio=None, rank=2, bits=16, stages=1, epochs=1)
        out["bert_lt"] = hf_embcomp.save_compressed(comp, root / "bert_lt")
    return out


# case -> (repo, Auto class, how the embedding is set trainable or None, activation checkpointing)
CASES = {
    "sequence_classification": ("bert", "AutoModelForSequenceClassification", None, True),
    "token_classification": ("bert", "AutoModelForTokenClassification", None, False),
    "question_answering": ("bert", "AutoModelForQuestionAnswering", None, False),
    "masked_lm": ("bert", "AutoModelForMaskedLM", None, False),
    "causal_lm": ("llama", "AutoModelForCausalLM", None, True),
    "causal_lm_trainable": ("llama", "AutoModelForCausalLM", "method", True),
    "masked_lm_lighttoken_trainable_by_config": ("bert_lt", "AutoModelForMaskedLM", "config", False),
}


def _trainer_code(repos: dict[str, Path], tmp: Path) -> str:
    """Child code running every case of CASES: load without the package, 2 Trainer steps (use_cpu=True),
    trainer.save_model, reload; sets TRAINED to what changed."""
    cases = {k: v for k, v in CASES.items() if v[0] in repos}
    return _STORED + f"""
import time
T0 = time.time()
import torch, transformers
from transformers import AutoConfig, Trainer, TrainingArguments
from transformers.modeling_layers import GradientCheckpointingLayer
repos = json.loads({json.dumps({k: str(v) for k, v in repos.items()})!r})
cases = json.loads({json.dumps(cases)!r})
out_root = {str(tmp)!r}
L, N = 12, 8
gen = torch.Generator().manual_seed(0)
ids = torch.randint(4, {V}, (N, L), generator=gen)

def examples(kind):
    rows = []
    for i in range(N):
        r = {{"input_ids": ids[i], "attention_mask": torch.ones(L, dtype=torch.long)}}
        if kind == "AutoModelForSequenceClassification":
            r["labels"] = torch.tensor(i % 3)
        elif kind == "AutoModelForTokenClassification":
            r["labels"] = torch.randint(0, 3, (L,), generator=gen)
        elif kind == "AutoModelForQuestionAnswering":
            r["start_positions"], r["end_positions"] = torch.tensor(2), torch.tensor(5)
        elif kind == "AutoModelForMaskedLM":
            r["labels"] = torch.where(torch.rand(L, generator=gen) < 0.5, ids[i], torch.full((L,), -100))
        else:
            r["labels"] = ids[i].clone()
        rows.append(r)
    return rows

def scores(model):
    model.eval()
    with torch.no_grad():
        o = model(input_ids=ids[:2])
    return o.logits if getattr(o, "logits", None) is not None else o.start_logits

def emb_state(model):
    return {{k: v.detach().clone() for k, v in model.get_compressed_embedding().state_dict().items()}}

report = {{"import_seconds": round(time.time() - T0, 2)}}
for case, (repo, auto_name, trainable, ckpt) in cases.items():
    t0 = time.time()
    auto = getattr(transformers, auto_name)
    kw = {{"num_labels": 3}} if "Classification" in auto_name else {{}}
    if trainable == "config":
        cfg = AutoConfig.from_pretrained(repos[repo], trust_remote_code=True, **kw)
        cfg.embedding_compression["trainable"] = True
        kw = {{"config": cfg}}
    transformers.set_seed(0)
    model = auto.from_pretrained(repos[repo], trust_remote_code=True, **kw)
    emb = model.get_compressed_embedding()
    prefix = model._embcomp_embedding_names[0]
    grad_at_load = {{n: p.requires_grad for n, p in emb.named_parameters()}}
    if trainable == "method":
        model.set_embedding_trainable(True)
    before = emb_state(model)
    body_before = {{n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(prefix + ".")}}
    # a sub-module of the first checkpointed layer: it runs again in backward when the layer is recomputed
    inner = next(next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)).children())
    calls = []
    inner.register_forward_hook(lambda *a: calls.append(1))
    out_dir = out_root + "/" + case
    args = TrainingArguments(output_dir=out_dir, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no", seed=0,
                             activation_checkpointing=ckpt, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=examples(auto_name))
    result = trainer.train()
    train_calls = len(calls)
    ckpt_on = bool(model.is_activation_checkpointing)
    trainer.save_model(out_dir)
    after = emb_state(model)
    body_changed = sum(not torch.equal(p, model.get_parameter(n)) for n, p in body_before.items())
    with torch.no_grad():  # what the checkpoint holds: the embedding rounded to its storage dtype
        for p in emb.parameters():
            p.copy_(p.to(emb.storage_dtype).to(p.dtype))
    ref = scores(model)
    again = auto.from_pretrained(out_dir, trust_remote_code=True)
    again_emb = again.get_compressed_embedding()
    report[case] = {{
        "loss": float(result.training_loss),
        "grad_at_load": grad_at_load,
        "grad_after_reload": {{n: p.requires_grad for n, p in again_emb.named_parameters()}},
        "emb_changed": sorted(k for k in before if not torch.equal(before[k], after[k])),
        "emb_tensors": sorted(before),
        "int_buffers": {{n: str(b.dtype) for n, b in emb.named_buffers() if not b.is_floating_point()}},
        "body_changed": body_changed,
        "layer_calls": train_calls,
        "ckpt_on": ckpt_on,
        "reload_diff": float((scores(again) - ref).abs().max()),
        "reload_class_ok": isinstance(again, type(model)._embcomp_stock_class) and type(again).__name__ == type(model).__name__,
        "seconds": round(time.time() - t0, 2),
        "py_files_saved": sorted(p for p in __import__("os").listdir(out_dir) if p.endswith(".py")),
        "stored_before": stored(repos[repo], prefix),
        "stored_after": stored(out_dir, prefix),
        "model_type": json.load(open(out_dir + "/config.json"))["model_type"],
        "config_dtype": json.load(open(out_dir + "/config.json"))["dtype"],
        "param_dtypes": sorted({{str(p.dtype) for p in model.parameters()}}),
    }}
TRAINED = report
"""


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_two_steps_save_and_reload_without_package(case, trained, repos):
    repo, _, trainable, ckpt = CASES[case]
    if repo not in repos:
        pytest.skip(f"{repo} needs the lighttoken method, which is not registered")
    r = trained[case]
    assert r["loss"] == r["loss"] and r["loss"] > 0  # finite, positive
    assert r["body_changed"] > 0, "the Trainer did not update the model"
    # loaded without the package: frozen by default, trainable only by the config flag
    assert r["grad_at_load"] and all(g == (trainable == "config") for g in r["grad_at_load"].values()), r["grad_at_load"]
    # the saved result is still a compressed repository, reloaded with the same class and the same outputs
    assert r["model_type"] == "embcomp" and "modeling_embcomp.py" in r["py_files_saved"]
    # the embedding computes in the model's dtype whatever its storage dtype, so a re-save keeps config.dtype
    assert r["param_dtypes"] == ["torch.float32"] and r["config_dtype"] == "float32"
    assert r["reload_class_ok"]
    assert r["reload_diff"] < 1e-5, r["reload_diff"]
    # stored embedding: same tensor names, dtypes, shapes and byte lengths in the fine-tuned checkpoint
    before, after = r["stored_before"], r["stored_after"]
    assert before and sorted(before) == sorted(after)
    assert {k: v[:3] for k, v in before.items()} == {k: v[:3] for k, v in after.items()}
    changed_bytes = sorted(k for k in before if before[k][3] != after[k][3])
    floats = [n for n in r["emb_tensors"] if n not in r["int_buffers"]]
    if trainable is None:
        assert r["emb_changed"] == [] and changed_bytes == []  # bit-identical embedding
        assert all(not g for g in r["grad_after_reload"].values())
    else:
        assert sorted(r["emb_changed"]) == sorted(floats), r["emb_changed"]  # every real-valued part trained
        assert changed_bytes == sorted(k for k in before if k.rsplit(".", 1)[1] in floats)
    for name, dtype in r["int_buffers"].items():  # codes: still integer, never trained, same bytes
        assert dtype == "torch.uint8" and name not in r["emb_changed"]
        assert not any(k.endswith("." + name) for k in changed_bytes)
    # activation checkpointing: enabled, and the layer was recomputed in each backward pass (2 steps)
    assert r["ckpt_on"] == ckpt
    assert r["layer_calls"] == (4 if ckpt else 2), r["layer_calls"]


def test_lighttoken_case_ran(repos, trained):
    """The integer-code case is the one that exercises codes; make its absence visible."""
    if "lighttoken" not in hf_embcomp.METHODS:
        pytest.skip("lighttoken not registered")
    r = trained["masked_lm_lighttoken_trainable_by_config"]
    assert r["int_buffers"] == {"codes": "torch.uint8"}
    # float16 storage: the fine-tuned float32 tensors are written back as float16 (same byte size)
    assert {v[0] for k, v in r["stored_after"].items() if not k.endswith(".codes")} == {"F16"}


def _placement_code(repos: dict[str, Path], tmp: Path) -> str:
    """Child code of the placement, dtype and resize checks of every repo; sets PLACED."""
    return f"""
import json, os, torch, transformers
from transformers import AutoConfig
repos = json.loads({json.dumps({k: str(v) for k, v in repos.items()})!r})
tmp = {str(tmp)!r}
ids = torch.randint(4, {V}, (2, 9), generator=torch.Generator().manual_seed(1))

def split_map(model, target):
    # a complete, non-overlapping device map: ``target`` on disk, every other branch on cpu
    # (accelerate does not support a map whose keys overlap, e.g. {{target: "disk", "": "cpu"}}, in stock either)
    out = {{}}
    def walk(mod, prefix):
        for name, child in mod.named_children():
            full = prefix + name
            if full == target:
                out[full] = "disk"
            elif target.startswith(full + "."):
                walk(child, full + ".")
            else:
                out[full] = "cpu"
    walk(model, "")
    return out

def tensors(mod):
    return {{n: [str(t.device), str(t.dtype)] for n, t in list(mod.named_parameters()) + list(mod.named_buffers())}}

report = {{}}
for name, d in repos.items():
    auto = getattr(transformers, "AutoModelFor" + ("CausalLM" if "llama" in name else "MaskedLM"))
    plain = auto.from_pretrained(d, trust_remote_code=True)
    emb_name = plain._embcomp_embedding_names[0]
    with torch.no_grad():
        ref = plain(input_ids=ids).logits
    codes_ref = {{n: b.clone() for n, b in plain.get_compressed_embedding().named_buffers()}}
    r = {{"diffs": {{}}, "devices": {{}}, "at_rest": {{}}, "at_forward": {{}}}}
    placements = {{
        "cpu": dict(device_map={{"": "cpu"}}),
        "auto": dict(device_map="auto"),
        "disk_all": dict(device_map="auto", max_memory={{"cpu": "20KB"}}, offload_folder=tmp + "/" + name + "_all"),
        "disk_embedding": dict(device_map=split_map(plain, emb_name), offload_folder=tmp + "/" + name + "_emb"),
    }}
    for key, kw in placements.items():
        m = auto.from_pretrained(d, trust_remote_code=True, **kw)
        e = m.get_compressed_embedding()
        r["devices"][key] = sorted({{str(v) for v in (getattr(m, "hf_device_map", None) or {{}}).values()}})
        r["at_rest"][key] = tensors(e)
        seen = {{}}
        embed = e.embed  # record what the lookup computes with, once accelerate has loaded the weights
        e.embed = lambda x, _embed=embed: (seen.update(tensors(e)), _embed(x))[1]
        with torch.no_grad():
            r["diffs"][key] = float((m(input_ids=ids).logits - ref).abs().max())
        r["at_forward"][key] = seen
    # reduced-precision loads: floats follow dtype, codes stay integer and identical
    r["dtypes"] = {{}}
    for dt in (torch.bfloat16, torch.float16):
        m = auto.from_pretrained(d, trust_remote_code=True, dtype=dt)
        e = m.get_compressed_embedding()
        with torch.no_grad():
            lo = m(input_ids=ids).logits.float()
        r["dtypes"][str(dt)] = {{
            "params": sorted({{str(p.dtype) for p in m.parameters()}}),
            "buffers": {{n: str(b.dtype) for n, b in e.named_buffers()}},
            "codes_equal": all(torch.equal(b, codes_ref[n]) for n, b in e.named_buffers()),
            "finite": bool(torch.isfinite(lo).all()),
            "rel_err": float((lo - ref).norm() / ref.norm()),
        }}
    # resize raises a clear error; the trainable flag can be set at load time
    try:
        plain.resize_token_embeddings({V} + 8)
        r["resize"] = None
    except NotImplementedError as e:
        r["resize"] = str(e)
    r["grad_default"] = sorted({{p.requires_grad for p in plain.get_compressed_embedding().parameters()}})
    cfg = AutoConfig.from_pretrained(d, trust_remote_code=True)
    cfg.embedding_compression["trainable"] = True
    m = auto.from_pretrained(d, trust_remote_code=True, config=cfg)
    r["grad_config"] = sorted({{p.requires_grad for p in m.get_compressed_embedding().parameters()}})
    m.set_embedding_trainable(False)
    r["grad_method_off"] = sorted({{p.requires_grad for p in m.get_compressed_embedding().parameters()}})
    report[name] = r
PLACED = report
"""


@pytest.fixture(scope="module")
def child(repos, tmp_path_factory) -> dict:
    """Every check that needs a process without hf_embcomp, in ONE such process (imports dominate the time)."""
    tmp = tmp_path_factory.mktemp("ft_child")
    code = _trainer_code(repos, tmp) + _placement_code(repos, tmp) + "\nemit({'trained': TRAINED, 'placed': PLACED})\n"
    return run_isolated(code, tmp)


@pytest.fixture(scope="module")
def trained(child) -> dict:
    return child["trained"]


@pytest.fixture(scope="module")
def placed(child) -> dict:
    return child["placed"]


def test_device_maps_keep_outputs_exact(placed):
    for name, r in placed.items():
        assert set(r["diffs"]) == {"cpu", "auto", "disk_all", "disk_embedding"}
        for key, diff in r["diffs"].items():
            assert diff == 0.0, (name, key, diff)
        for key in ("cpu", "auto"):  # no offload: everything in memory on the CPU
            assert all(dev == "cpu" for dev, _ in r["at_rest"][key].values()), (name, key, r["at_rest"][key])
        for key in ("disk_all", "disk_embedding"):
            assert "disk" in r["devices"][key], (name, key, r["devices"])
            rest, fwd = r["at_rest"][key], r["at_forward"][key]
            floats = [n for n, (_, dt) in rest.items() if "int" not in dt]
            # the embedding's real-valued tensors really live on disk between calls, and are loaded for the lookup
            assert floats and all(rest[n][0] == "meta" for n in floats), (name, key, rest)
            assert all(fwd[n] == ["cpu", "torch.float32"] for n in floats), (name, key, fwd)


def test_offload_keeps_integer_codes(placed):
    if "bert_lt" not in placed:
        pytest.skip("lighttoken not registered")
    for key in ("cpu", "auto", "disk_all", "disk_embedding"):
        assert placed["bert_lt"]["at_forward"][key]["codes"] == ["cpu", "torch.uint8"], key


def test_reduced_precision_loads(placed):
    for name, r in placed.items():
        for dt, d in r["dtypes"].items():
            assert d["params"] == [dt], (name, d)
            assert d["finite"] and d["rel_err"] < 0.05, (name, dt, d)
            assert d["codes_equal"] and all(v == "torch.uint8" for v in d["buffers"].values()), (name, d)
    if "bert_lt" in placed:
        assert placed["bert_lt"]["dtypes"]["torch.bfloat16"]["buffers"] == {"codes": "torch.uint8"}


def test_resize_raises_clear_error_and_trainable_flags(placed):
    for r in placed.values():
        assert r["resize"] and "decompress" in r["resize"] and "resize" in r["resize"], r["resize"]
        assert r["grad_default"] == [False]
        assert r["grad_config"] == [True]
        assert r["grad_method_off"] == [False]


# --- the tooling helper, in process ------------------------------------------------------------------


def test_trainable_parts_presets_and_names(repos):
    if "lighttoken" not in hf_embcomp.METHODS:
        pytest.skip("lighttoken not registered")
    comp = hf_embcomp.compress(tiny_model("bert"), "lighttoken", ratio=None, rank=2, bits=16, stages=1, epochs=1)
    emb = comp.get_compressed_embedding()
    body = [p for n, p in comp.named_parameters() if not n.startswith(comp._embcomp_embedding_names[0] + ".")]
    assert all(not p.requires_grad for p in emb.parameters()), "compress() must return a frozen embedding"
    assert all(p.requires_grad for p in body)

    r = hf_embcomp.trainable_parts(comp, "real")
    assert r.trainable == ("decoder", "decoder_bias", "lowrank_p", "lowrank_q") and r.fixed == ("codes",)
    assert all(p.requires_grad for p in emb.parameters()) and r.model_trainable == r.model_total

    r = hf_embcomp.trainable_parts(comp, ["decoder"])
    assert r.trainable == ("decoder",) and emb.decoder.requires_grad and not emb.lowrank_p.requires_grad

    r = hf_embcomp.trainable_parts(comp, "embedding_only")
    assert all(not p.requires_grad for p in body) and all(p.requires_grad for p in emb.parameters())
    assert r.model_trainable == sum(p.numel() for p in emb.parameters())

    r = hf_embcomp.trainable_parts(comp, "none")
    assert r.trainable == () and all(not p.requires_grad for p in emb.parameters())
    assert all(not p.requires_grad for p in body)  # "none" leaves the rest as it was (frozen just above)

    r = hf_embcomp.trainable_parts(comp, "all")
    assert r.model_trainable == r.model_total

    for bad, match in (("codes", "buffers"), ("nope", "no parameter")):
        with pytest.raises(ValueError, match=match):
            hf_embcomp.trainable_parts(comp, [bad])
    with pytest.raises(ValueError, match="unknown parts"):
        hf_embcomp.trainable_parts(comp, "everything")
    with pytest.raises(ValueError, match="compressed"):
        hf_embcomp.trainable_parts(tiny_model("bert"), "real")


def test_trainable_flag_survives_reregistration_and_stored_embedding(repos, tmp_path):
    """A parameter replaced after set_trainable (as from_pretrained and accelerate do) follows the module
    flag; stored_embedding reads the same bytes back from a re-saved model."""
    comp = hf_embcomp.compress(tiny_model("bert"), "svd", ratio=None, rank=4)
    first = stored_embedding(hf_embcomp.save_compressed(comp, tmp_path / "first"), comp)
    emb = comp.get_compressed_embedding()
    emb.lowrank_a = torch.nn.Parameter(emb.lowrank_a.detach().clone())
    assert not emb.lowrank_a.requires_grad
    comp.set_embedding_trainable(True)
    emb.lowrank_a = torch.nn.Parameter(emb.lowrank_a.detach().clone())
    assert emb.lowrank_a.requires_grad and emb.lowrank_b.requires_grad

    assert sorted(first) == ["lowrank_a", "lowrank_b"]
    assert all(v[0] == "F32" and v[2] == 4 * v[1][0] * v[1][1] for v in first.values())
    again = hf_embcomp.save_compressed(comp, tmp_path / "again")
    assert stored_embedding(again, comp) == first  # values untouched: the same bytes
    # a head checkpoint (bert.embeddings...) and a base checkpoint (embeddings...) compare by local names
    assert stored_embedding(again, "embeddings.word_embeddings") == first
    with pytest.raises(ValueError, match="no tensor"):
        stored_embedding(again, "nope.embeddings")
