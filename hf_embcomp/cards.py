"""Model cards of compressed repositories."""

from __future__ import annotations

from typing import Any


def render_card(config: Any, report: dict[str, Any], results: dict[str, Any] | None = None) -> str:
    """A model card (``README.md``) for a compressed model.

    Args:
        config: the compressed model's config (``embedding_compression`` block).
        report: the compression report (``compression_report.json``).
        results: evaluation results (optional); without them the card says none were measured.
    """
    block = config.embedding_compression
    src = report.get("source_model") or "unknown"
    fid = report["fidelity"]
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- embedding-compression",
        f"- {report['method']}",
        "---",
        "",
        f"# {src} with a {report['method']}-compressed token embedding ({report['compression_ratio']:.1f}x)",
        "",
        f"The token-embedding matrix ({report['num_embeddings']} x {report['embedding_dim']}) of `{src}` is stored "
        f"compressed with `{report['method']}` by [hf-embcomp](https://pypi.org/project/hf-embcomp/): "
        f"{report['stored_bytes']:,} bytes instead of {report['fp32_bytes']:,} in fp32 "
        f"(ratio {report['compression_ratio']:.2f}x vs fp32, {report['compression_ratio_vs_source']:.2f}x vs the "
        f"source's {report['source_dtype']}).",
        "",
        f"Embedding fidelity: mean row cosine {fid['row_cosine_mean']:.4f}, 1st percentile "
        f"{fid['row_cosine_p01']:.4f}, relative Frobenius error {fid['relative_frobenius_error']:.4f}.",
        "",
        "No downstream evaluation results were measured for this model yet." if not results else "",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModel",
        f"model = AutoModel.from_pretrained(\"<this repo>\", trust_remote_code=True)  # {block['backbone_model_type'] if 'backbone_model_type' in block else config.backbone_model_type} backbone",
        "```",
        "",
        "Load with the Auto classes and `trust_remote_code=True`: a stock class loaded directly "
        "(e.g. `BertModel.from_pretrained`) ignores the compressed embedding and gets a random one.",
        "",
    ]
    return "\n".join(lines)
