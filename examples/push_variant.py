"""Compress a model and publish the variant to the Hugging Face Hub in one commit, with its model card.

By default this is a dry run: the exact files (weights, config, runtime code, tokenizer, card,
compression report) and the planned commit are written to a local folder and nothing is sent.
Pass ``--push`` (with ``HF_TOKEN`` set or ``huggingface-cli login`` done) to really create the commit.

    python examples/push_variant.py --repo-id you/all-MiniLM-L6-v2-svd-8x               # dry run
    python examples/push_variant.py --repo-id you/all-MiniLM-L6-v2-svd-8x --push --private
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import hf_embcomp


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local folder or Hub id (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--method", default="svd")
    p.add_argument("--ratio", type=float, default=8.0)
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="method hyper-parameter (JSON value)")
    p.add_argument("--repo-id", required=True, help="target repo, e.g. you/all-MiniLM-L6-v2-svd-8x")
    p.add_argument("--results", default=None, help="results.json of `hf-embcomp evaluate` for the card (optional)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--push", action="store_true", help="really push (default: dry run)")
    p.add_argument("--dry-run-dir", default="push-dry-run", help="where a dry run writes the files and commit.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    hp = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.hp)}
    src = hf_embcomp.load_model(args.model)
    small = hf_embcomp.compress(src.model, args.method, args.ratio, tokenizer=src.tokenizer,
                                source_folder=str(src.folder) if src.folder else None, **hp)
    rep = small.compression_report
    print(f"{rep['source_model']}: {args.method} {rep['compression_ratio']:.2f}x, "
          f"row cosine {rep['fidelity']['row_cosine_mean']:.4f}")
    out = hf_embcomp.push_to_hub(small, args.repo_id, results=args.results, private=args.private,
                                 dry_run=False if args.push else Path(args.dry_run_dir))
    if args.push:
        print(f"pushed: {out.commit_url}")
        print(f"load with AutoModel.from_pretrained({args.repo_id!r}, trust_remote_code=True)")
        return out
    plan = json.loads((out / "commit.json").read_text())
    print(f"dry run: one commit to {plan['repo_id']}@{plan['revision']}: {plan['commit_message']}")
    for op in plan["operations"]:
        print(f"  add {op['size']:>12,}  {op['path_in_repo']}")
    print(f"files written to {out / 'files'}; nothing was pushed (pass --push to publish).")
    return out


if __name__ == "__main__":
    main()
