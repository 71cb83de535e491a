"""The ``hf-embcomp`` command line.

Each sub-command lives in a module exposing ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed args; returns an exit code). User errors raise :class:`UserError` (or
one of the documented ValueError subclasses) and print one line, exit code 2, no traceback.

Building the parser imports neither torch nor transformers (nor do the modules of
``_COMMAND_MODULES`` at import time): ``--help`` and argument errors answer at once, and the heavy
imports happen inside the command functions.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import shutil
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from hf_embcomp.training.refit import DEFAULT_COMPRESS_STEPS, REFIT_STEPS

logger = logging.getLogger("hf_embcomp")

# Modules that register further sub-commands (each exposes ``register(subparsers)``).
_COMMAND_MODULES = ("hf_embcomp.evaluation.cli", "hf_embcomp.push", "hf_embcomp.training.cli", "hf_embcomp.export")


class MethodInfo(NamedTuple):
    """A line of ``compress --help``'s method list (static: the list must not import torch)."""

    name: str
    dtype: str | None
    """The default ``dtype`` of the method's config (None, shown as "varies": that of the method ``auto`` keeps)."""
    summary: str


METHOD_TABLE: tuple[MethodInfo, ...] = (
    MethodInfo("svd", "float32", "truncated SVD, the low-rank baseline: E ~ A B (Eckart & Young)"),
    MethodInfo("lighttoken", "float16", "low-rank part + residual binary-autoencoder codes + frequent rows kept "
                                        "exactly (Wang et al. 2023)"),
    MethodInfo("direction", "float32", "direction-aware autoencoder: latent codes + linear decoder, cosine-weighted "
                                       "loss (Balazy et al. 2021)"),
    MethodInfo("distilled", "float32", "low-rank factors + a non-linear decoder path, made for a KD fine-tune with "
                                       "`hf-embcomp distill` (Lioutas et al. 2020)"),
    MethodInfo("dccl", "float32", "compositional codes: M bit-packed codes per token into M codebooks, learned with "
                                  "Gumbel-softmax (Shu & Nakayama 2018)"),
    MethodInfo("gptq", "float16", "rotated group-wise scalar quantisation, GPTQ error feedback under the calibration "
                                  "Hessian, mixed bits per row (float16 scales)"),
    MethodInfo("auto", None, "fits the candidate methods for the ratio and keeps the best on a calibration probe"),
)
"""Every method ``compress --help`` lists; tests/test_cli.py checks it against ``hf_embcomp.METHODS`` and
each config class's default ``dtype``."""

DEFAULT_METHOD = "auto"
"""``--method`` when none is given."""


def methods_help(width: int | None = None) -> str:
    """The method list of ``compress --help``: name, default storage dtype and a one-line description,
    wrapped to ``width`` columns (default: as argparse, the terminal's width - 2, here at most 120)."""
    width = width or min(shutil.get_terminal_size().columns - 2, 120)
    dtypes = [m.dtype or "varies" for m in METHOD_TABLE]
    name_w = max(len(m.name) for m in METHOD_TABLE) + 2
    dtype_w = max(map(len, dtypes)) + 2
    lines = [textwrap.fill("methods (--method NAME), with the default storage dtype of their real-valued parts "
                           "(--dtype):", width)]
    for m, dtype in zip(METHOD_TABLE, dtypes):
        text = m.summary + (" (default)" if m.name == DEFAULT_METHOD else "")
        lead = f"  {m.name:<{name_w}}{dtype:<{dtype_w}}"
        lines.append(textwrap.fill(text, width, initial_indent=lead, subsequent_indent=" " * len(lead)))
    return "\n".join(lines)


class UserError(ValueError):
    """A mistake in the command line or its inputs; printed as one line, exit code 2."""


def _nonnegative_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {s!r}")
    return v


def _float_ratio(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratio must be a number, e.g. 8 (got {s!r})") from None


def _hp_args(values: Sequence[str] | None) -> dict:
    hp = {}
    for item in values or []:
        if "=" not in item:
            raise UserError(f"--hp expects KEY=VALUE (got {item!r}), e.g. --hp lam=4")
        k, v = item.split("=", 1)
        try:
            hp[k] = json.loads(v)
        except json.JSONDecodeError:
            hp[k] = v
    return hp


class _Steps:
    """A progress bar over the named steps of a command (each step may be long)."""

    def __init__(self, names: list[str], quiet: bool = False) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(names), disable=quiet, unit="step", bar_format="{l_bar}{bar:20}| {n}/{total} {postfix}")
        self.t = {}

    def step(self, name: str, fn: Callable):
        self.bar.set_description(name)
        t0 = time.perf_counter()
        out = fn()
        self.t[name] = time.perf_counter() - t0
        self.bar.update(1)
        return out

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def _quiet(on: bool) -> Iterator[None]:
    """``--quiet`` for the length of a command: no progress bars (the library's, transformers') and no warnings
    from torch and transformers (nor from what they import while loading, e.g. torchao), only errors. Entered
    before the command's heavy imports; the previous settings are restored after."""
    if not on:
        yield
        return
    import torch  # noqa: F401  (torch resets its logger's level when it is imported: set it after)
    import transformers

    from hf_embcomp import progress

    tlog = transformers.utils.logging
    torch_logger = logging.getLogger("torch")
    before = torch_logger.level, tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    torch_logger.setLevel(logging.ERROR)
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with progress.quiet():
            yield
    finally:
        torch_logger.setLevel(before[0])
        tlog.set_verbosity(before[1])
        if before[2]:
            tlog.enable_progress_bar()


def cmd_compress(args: argparse.Namespace) -> int:
    with _quiet(args.quiet):
        return _compress(args)


def _compress(args: argparse.Namespace) -> int:
    import hf_embcomp
    from hf_embcomp.io import atomic_output_dir, load_model
    from hf_embcomp.methods.base import check_ratio

    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise UserError(f"output folder {out} exists and is not empty; choose another --output or pass --overwrite.")
    hp = _hp_args(args.hp)
    for k in ("rank", "dtype", "seed", "bits", "stages"):
        v = getattr(args, k, None)
        if v is not None:
            hp[k] = v
    if args.method != "auto" and args.method not in hf_embcomp.METHODS:
        raise UserError(f"unknown method {args.method!r}; choose one of: auto, {', '.join(sorted(hf_embcomp.METHODS))}.")
    calibration = "default" if args.calibration is None else (None if args.calibration == "none" else args.calibration)
    if isinstance(calibration, str) and calibration != "default" and not Path(calibration).is_file():
        raise UserError(f"--calibration {calibration} is not a file; pass a UTF-8 text file, or --calibration none.")
    if args.method == "auto" and calibration is None:
        raise UserError("--method auto scores its candidates on calibration text; drop --calibration none or choose a --method.")
    if args.ratio is not None:
        check_ratio(args.ratio)  # cheap checks before the model is loaded
    if args.corpus is not None and not Path(args.corpus).is_file():
        raise UserError(f"--corpus {args.corpus} is not a file; pass a UTF-8 text file (or leave --corpus out).")
    steps = _Steps(["load", "fit", "save"] + ([] if args.no_check else ["check"]), quiet=args.quiet)
    try:
        src = steps.step("load", lambda: load_model(args.model, gguf_file=args.gguf_file, revision=args.revision))
        ratio = None if hp.get("rank") is not None and args.ratio is None else (args.ratio or 8.0)
        model = steps.step(
            "fit",
            lambda: hf_embcomp.compress(
                src.model,
                args.method,
                ratio,
                source=src.label,
                source_revision=src.revision,
                source_dtype=src.embedding_dtype,
                source_embedding_bytes=src.embedding_bytes,
                tokenizer=src.tokenizer,
                source_folder=str(src.folder) if src.folder and not src.gguf_file else None,
                device=args.device,
                corpus=args.corpus,
                calibration=calibration,
                body_dtype=args.body_dtype,
                refit_steps=args.refit_steps,
                **hp,
            ),
        )

        def _save():
            with atomic_output_dir(out, overwrite=args.overwrite) as tmp:
                model.save_pretrained(tmp)

        steps.step("save", _save)
        if not args.no_check:
            from hf_embcomp.evaluation.check import REPORT_KEY, quick_check
            from hf_embcomp.io import update_report

            try:
                check = steps.step("check", lambda: quick_check(out, device=args.device, baseline_model=src.model))
            except KeyboardInterrupt:
                print(f"hf-embcomp: check interrupted; the model is written to {out} (its report has no check).",
                      file=sys.stderr)
                return 130
            except Exception as e:  # noqa: BLE001 - the model is written; a failed check must not hide that
                why = f"the check failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); run " \
                      f"hf-embcomp evaluate {out} --quick to see why"
                logger.warning("%s", why)
                check = {"skipped": why}
            model.compression_report = update_report(out, **{REPORT_KEY: check})
    finally:
        steps.close()
    rep = model.compression_report
    fid = rep["fidelity"]
    stored = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    lines = [
        f"hf-embcomp compress: {rep['source_model']} -> {out}",
        f"  method            {rep['method']}  {json.dumps(rep['hyperparameters'])}",
        f"  token embedding   {rep['num_embeddings']} x {rep['embedding_dim']}  (source dtype {rep['source_dtype']})",
        f"  stored bytes      {rep['stored_bytes']:,}  (fp32 {rep['fp32_bytes']:,}; source {rep['source_bytes']:,})",
        f"  compression ratio {rep['compression_ratio']:.2f}x vs fp32, {rep['compression_ratio_vs_source']:.2f}x vs source",
        f"  row cosine        mean {fid['row_cosine_mean']:.4f}, 1st percentile {fid['row_cosine_p01']:.4f}",
        f"  rel. Frobenius    {fid['relative_frobenius_error']:.4f}",
        f"  whole model       {rep['model_bytes']:,} bytes (body {rep.get('body_format') or rep['body_dtype']}), source {rep['source_model_bytes']:,}: "
        f"{rep['model_compression_ratio']:.2f}x",
        f"  time              load {steps.t['load']:.1f}s, fit {steps.t['fit']:.1f}s"
        + (f" (calibration and every candidate; the kept method's own fit {rep['fit_seconds']:.1f}s)" if "auto" in rep else "")
        + f", save {steps.t['save']:.1f}s",
        f"  repository        {stored / 1e6:.1f} MB on disk; load with "
        f"AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True)",
    ]
    if "auto" in rep:
        a = rep["auto"]
        lines.insert(2, f"  chosen by auto    {a['chosen']}: {a['why']}")
        for i, c in enumerate(a["candidates"]):
            score = {k: v for k, v in c.items() if k.startswith("probe_")}
            lines.insert(3 + i, f"    candidate       {c['method']} {c['status']} {json.dumps(score)}")
    if rep.get("calibration"):
        lines.insert(len(lines) - 2, f"  calibration       {rep['calibration']['source']}")
    if rep.get("head_refit"):
        r = rep["head_refit"]
        judged = (f"probe perplexity {r['judge_before']:.4g} -> {r['judge_after']:.4g}" if r.get("judge_before") is not None
                  else f"held-out objective {r['heldout_before']:.4g} -> {r['heldout_after']:.4g}")
        lines.insert(len(lines) - 2, f"  head refit        {r['steps']} steps, {r['seconds']:.1f}s, {judged}: "
                     f"{'kept' if r['kept'] else 'undone'}"
                     if r["steps"] else f"  head refit        not needed: held-out KL {r['kl_before']:.3g} nats")
    if "check" in rep:
        from hf_embcomp.evaluation.check import describe

        lines.insert(len(lines) - 2, f"  check             {describe(rep['check'])}")
    print("\n".join(lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-embcomp", description="Compress the token embedding of Hugging Face models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress a model's token embedding and write a Hub repository",
                       description="Compress a model's token embedding and write a Hub repository.\n\n" + methods_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="local folder, Hub id, or .gguf file (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--method", default=DEFAULT_METHOD, help=f"compression method (default: {DEFAULT_METHOD})")
    p.add_argument("--ratio", type=_float_ratio, default=None,
                   help="compression ratio vs fp32 bytes of the token embedding (default 8)")
    p.add_argument("--rank", type=int, default=None, help="set the rank directly (low-rank methods)")
    p.add_argument("--bits", type=int, default=None, help="code bits per stage (code methods)")
    p.add_argument("--stages", type=int, default=None, help="residual stages (LightToken)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="storage dtype of the real-valued parts (default: the method's own (see the list above))")
    p.add_argument("--body-dtype", choices=["auto", "gguf", "float32", "bfloat16", "float16"], default="auto",
                   help="dtype of every weight but the token embedding (default auto: the source checkpoint's "
                        "precision class; a GGUF file whose matrices are Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q6_K keeps them as its own "
                        "blocks (gguf: lossless, float32 compute), other quantised GGUF files become bfloat16)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the fit (default 0)")
    p.add_argument("--hp", action="append", metavar="KEY=VALUE", help="any other method hyper-parameter")
    p.add_argument("--corpus", default=None,
                   help="UTF-8 text file for token frequencies (LightToken's exact rows); default: the built-in "
                        "Wikipedia text when hf-embcomp[eval] is installed")
    p.add_argument("--calibration", default=None, metavar="FILE|none",
                   help="UTF-8 text the calibration runs the source model on (token counts, the second moment of the "
                        "tied head's inputs); default: the built-in Wikipedia text past the evaluation slices; none: off")
    p.add_argument("--refit-steps", type=_nonnegative_int, default=DEFAULT_COMPRESS_STEPS, metavar="N",
                   help=f"steps of the head-side refit of a causal LM whose head is tied to the embedding (KL of the "
                        f"next-token distribution on the calibration's hidden states; kept only if the probe "
                        f"perplexity says it is better; default {DEFAULT_COMPRESS_STEPS}: off; {REFIT_STEPS} turns it on)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside MODEL (or a path to it)")
    p.add_argument("--revision", default=None, help="Hub revision of MODEL")
    p.add_argument("--device", default=None, help="device of the fit (e.g. cuda); default the model's")
    p.add_argument("--output", "-o", required=True, help="output folder (a complete Hub model repository)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars (only the summary, and errors)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the downstream check of the written model (sentence cosine for encoders, perplexity "
                        "for causal LMs, beside the uncompressed model's: the row `hf-embcomp evaluate --quick` gives)")
    p.set_defaults(func=cmd_compress)

    for mod in _COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-embcomp``. Returns the exit code (0 ok, 2 user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.INFO if args.verbose else logging.ERROR if getattr(args, "quiet", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # UserError and the library's CompressionError, SourceError, RatioError and ResultsError are ValueErrors:
    # catching the base class keeps torch out of this module's imports
    try:
        return int(args.func(args) or 0)
    except (FileExistsError, ValueError) as e:
        print(f"hf-embcomp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hf-embcomp: interrupted; nothing was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
