"""Tiny random models of eight architectures, built in-process (no downloads)."""

from __future__ import annotations

import torch
import transformers

V = 1000

# arch -> (config class name, config kwargs, richest head class name)
ARCHS: dict[str, tuple[str, dict, str]] = {
    "bert": ("BertConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=64, pad_token_id=0), "BertForMaskedLM"),
    "roberta": ("RobertaConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                      max_position_embeddings=66, pad_token_id=1), "RobertaForMaskedLM"),
    "distilbert": ("DistilBertConfig", dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64,
                                            pad_token_id=0), "DistilBertForMaskedLM"),
    "mpnet": ("MPNetConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=66, pad_token_id=1), "MPNetForMaskedLM"),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=2, eos_token_id=3),
             "GPT2LMHeadModel"),
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
                                  pad_token_id=0, bos_token_id=2, eos_token_id=3), "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                                  eos_token_id=3), "Qwen2ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                             max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                                             eos_token_id=3), "Gemma3ForCausalLM"),
}


def tiny_model(arch: str, seed: int = 0):
    """A random stock model of ``arch`` (its richest head), float32, eval mode, vocabulary 1000."""
    cfg_name, kw, head = ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(vocab_size=V, **kw)
    torch.manual_seed(seed)
    return getattr(transformers, head)(cfg).eval()
