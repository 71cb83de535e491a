"""Publish a compressed model to the Hugging Face Hub in one atomic commit, with its model card.

``hf-embcomp push DIR REPO_ID`` / :func:`push_to_hub`: the weights, config, runtime code, tokenizer files,
``compression_report.json``, the results file and a ``README.md`` rendered by :mod:`hf_embcomp.cards`
go up in a single ``HfApi.create_commit``; the repo is created if needed. The token comes from ``token=``,
``HF_TOKEN`` or the huggingface_hub login and is never logged or written. ``dry_run`` writes the exact file
set and the planned commit to a local folder and makes no network call.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .evaluation.results import RESULTS_FILE

if TYPE_CHECKING:  # the imports of the functions below are local: `hf-embcomp --help` imports this module
    from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRIES = 4
"""Attempts of each Hub call that fails with a transient HTTP status (500, 502, 503, 504)."""
RETRY_DELAY = 2.0
"""Seconds before the first retry; doubled at each further attempt."""
_TRANSIENT = frozenset({500, 502, 503, 504})


class PushError(RuntimeError):
    """The Hub refused or failed the push; the message says why. The remote repo is left as it was."""


@dataclass(frozen=True)
class PushPlan:
    """What a push commits: ``files`` maps each path in the repo to a local file or to bytes."""

    repo_id: str
    revision: str | None
    private: bool
    commit_message: str
    files: dict[str, Path | bytes]

    def operations(self) -> list[CommitOperationAdd]:
        """Fresh commit operations (huggingface_hub mutates them, so each attempt needs new ones)."""
        from huggingface_hub import CommitOperationAdd

        return [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(s) if isinstance(s, Path) else s)
                for p, s in sorted(self.files.items())]

    def describe(self) -> dict[str, Any]:
        """The plan as JSON-able data: repo, revision, message and one entry per operation."""
        ops = [{"operation": "add", "path_in_repo": p, "size": _size(s), "sha256": _sha256(s)}
               for p, s in sorted(self.files.items())]
        return {"repo_id": self.repo_id, "revision": self.revision or "main", "private": self.private,
                "create_repo": "if missing (exist_ok)", "commit_message": self.commit_message, "operations": ops}


def _size(src: Path | bytes) -> int:
    return len(src) if isinstance(src, bytes) else src.stat().st_size


def _sha256(src: Path | bytes) -> str:
    if isinstance(src, bytes):
        return hashlib.sha256(src).hexdigest()
    h = hashlib.sha256()
    with src.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _repo_files(folder: Path) -> dict[str, Path]:
    """The files of a local repository (relative posix path -> path), without hidden files and caches."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            out[rel.as_posix()] = p
    return out


def plan_push(
    folder: str | os.PathLike,
    repo_id: str,
    results: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    license: str | None = None,
) -> PushPlan:
    """Build the file set of a push from a compressed repository folder (no network).

    The card (``README.md``) is rendered anew for ``repo_id`` with the results; the license is ``license``,
    else the one in the folder's current card (which ``compress`` took from the source model).

    Args:
        folder: a folder written by ``save_pretrained`` of a compressed model.
        repo_id: the target Hub repo, ``"user/name"``.
        results: a results file of ``hf-embcomp evaluate`` (path or parsed); default ``folder/eval_results.json``
            if present, else the card says no results were measured.
        private, revision, commit_message: as for :func:`push_to_hub`.
        license: override the license id of the card.

    Raises:
        ValueError: ``folder`` is not a compressed model repository, or the results are for another
            method or ratio.
        ResultsError: the results file is malformed (a ValueError).
        FileNotFoundError: an explicit results path does not exist.
    """
    from huggingface_hub import ModelCard

    from .cards import build_card, has_tokenizer_files, read_results

    root = Path(folder)
    config_path, report_path = root / "config.json", root / "compression_report.json"
    if not config_path.is_file() or not report_path.is_file():
        raise ValueError(f"{root} is not a compressed model folder (needs config.json and compression_report.json); "
                         "write one with `hf-embcomp compress` or hf_embcomp.save_compressed.")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") != "embcomp":
        raise ValueError(f"{root}/config.json has model_type {config.get('model_type')!r}, not 'embcomp': "
                         "compress the model first.")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    files: dict[str, Path | bytes] = dict(_repo_files(root))
    if results is None and (root / RESULTS_FILE).is_file():
        results = root / RESULTS_FILE
    checked = read_results(results) if results is not None else None
    if checked is not None:
        _check_results_match(checked, report)
        files[RESULTS_FILE] = (json.dumps(checked, indent=2) + "\n").encode() if isinstance(results, Mapping) \
            else Path(results)
    if license is None and (root / "README.md").is_file():
        license = ModelCard.load(root / "README.md").data.get("license")
    card = build_card(config, report, checked, repo_id=repo_id, license=license,
                      has_tokenizer=has_tokenizer_files(files))
    files["README.md"] = str(card).encode()
    from . import __version__

    message = commit_message or (
        f"Upload {report.get('source_model') or 'model'} with a {report['method']}-compressed token embedding "
        f"({report['compression_ratio']:.1f}x, hf-embcomp {__version__})")
    return PushPlan(repo_id, revision, private, message, files)


def _check_results_match(results: Mapping[str, Any], report: Mapping[str, Any]) -> None:
    method = results.get("method")
    if method is not None and method != report["method"]:
        raise ValueError(f"the results are for method {method!r} but the model was compressed with "
                         f"{report['method']!r}; pass the results of this model (--results).")
    ratio = results.get("compression_ratio")
    if isinstance(ratio, (int, float)) and abs(ratio - report["compression_ratio"]) > 0.02 * report["compression_ratio"]:
        raise ValueError(f"the results are for a {ratio:.2f}x model but this model is "
                         f"{report['compression_ratio']:.2f}x; pass the results of this model (--results).")


def _retry(what: str, fn: Callable[[], T]) -> T:
    """``fn()``, retried with exponential backoff while it fails with a transient HTTP status."""
    from huggingface_hub.errors import HfHubHTTPError

    attempt = 1
    while True:
        try:
            return fn()
        except HfHubHTTPError as e:
            status = getattr(e.response, "status_code", None)
            if status not in _TRANSIENT or attempt >= RETRIES:
                raise
            delay = RETRY_DELAY * 2 ** (attempt - 1)
            logger.warning("%s failed with HTTP %s (attempt %d of %d); retrying in %.1f s",
                           what, status, attempt, RETRIES, delay)
            time.sleep(delay)
            attempt += 1


def _first_line(e: BaseException) -> str:
    """A one-line description of ``e``: HTTP status, method and path, and the server's message if any."""
    from huggingface_hub.errors import HfHubHTTPError

    response = getattr(e, "response", None)
    if isinstance(e, HfHubHTTPError) and response is not None:
        msg = f"HTTP {response.status_code} on {response.request.method} {response.request.url.path}"
        return f"{msg} ({e.server_message.strip()})" if e.server_message else msg
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def execute_plan(plan: PushPlan, token: str | None = None) -> CommitInfo:
    """Create the repo if needed and make the plan's single commit.

    If the commit fails, the repo or branch created by this call is deleted again, so a failed push leaves
    the Hub as it was (a commit itself is atomic on the Hub).

    Raises:
        PushError: the Hub refused a call (bad token, no permission) or kept failing after the retries.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        _retry("create_repo", lambda: api.create_repo(plan.repo_id, private=plan.private))
        created = True
        logger.info("created %s repo %s", "private" if plan.private else "public", plan.repo_id)
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        # 409: it exists; 401/402/403: no right to create, which is fine if it exists and we may write to it.
        if status != 409 and not (status in (401, 402, 403) and api.repo_exists(plan.repo_id)):
            raise PushError(f"cannot create {plan.repo_id}: {_first_line(e)}") from e
        created = False
        logger.info("repo %s exists; committing to it", plan.repo_id)
    new_branch = False
    try:
        if plan.revision not in (None, "main"):
            new_branch = _create_branch(api, plan.repo_id, plan.revision)
        size = sum(_size(s) for s in plan.files.values())
        logger.info("committing %d files (%.1f MB) to %s@%s", len(plan.files), size / 1e6, plan.repo_id,
                    plan.revision or "main")
        info = _retry("commit", lambda: api.create_commit(
            plan.repo_id, plan.operations(), commit_message=plan.commit_message, revision=plan.revision))
    except Exception as e:
        where = f"{plan.repo_id}@{plan.revision or 'main'}"
        what = "repo" if created else "branch" if new_branch else None
        state = "the repo is unchanged"
        if what is not None:
            try:
                if created:
                    api.delete_repo(plan.repo_id, missing_ok=True)
                else:
                    api.delete_branch(plan.repo_id, branch=plan.revision)
                state = f"the {what} created for it was deleted again"
            except HfHubHTTPError as de:
                state = f"the {what} created for it is unchanged and could not be deleted ({_first_line(de)})"
        raise PushError(f"push to {where} failed: {_first_line(e)}; nothing was committed, {state}.") from e
    logger.info("pushed %s", info.commit_url)
    return info


def _create_branch(api: HfApi, repo_id: str, branch: str) -> bool:
    """Create ``branch`` from main; returns False if it already exists."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        _retry("create_branch", lambda: api.create_branch(repo_id, branch=branch))
    except HfHubHTTPError as e:
        if getattr(e.response, "status_code", None) != 409:
            raise
        return False
    logger.info("created branch %s of %s", branch, repo_id)
    return True


def push_to_hub(
    model_or_dir: PreTrainedModel | str | os.PathLike,
    repo_id: str,
    results: str | os.PathLike | Mapping[str, Any] | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool | str | os.PathLike = False,
    token: str | None = None,
    *,
    license: str | None = None,
) -> CommitInfo | Path:
    """Publish a compressed model to the Hub in one atomic commit, with a model card and its results.

    Args:
        model_or_dir: a compressed model (from :func:`hf_embcomp.compress`) or a folder it was saved to.
        repo_id: ``"user/name"``; created if missing.
        results: results of ``hf-embcomp evaluate`` (path or parsed); default ``DIR/eval_results.json`` if present.
            They fill the card's ``model-index`` and results table and are pushed as ``eval_results.json``.
        private: create the repo private (an existing repo keeps its visibility).
        revision: the branch to commit to (created from main if missing); default main.
        commit_message: default names the source, method and ratio.
        dry_run: True or a folder path: write the exact file set (``files/``, card included) and the
            planned commit (``commit.json``) there instead of pushing; True picks a new temporary folder.
            No network call is made.
        token: Hub token; default ``HF_TOKEN`` or the stored login. Never logged or written.
        license: override the card's license id (default: the source model's, as found by ``compress``).

    Returns:
        The ``CommitInfo`` of the commit, or the dry-run folder.

    Raises:
        ValueError: not a compressed model or folder; malformed or mismatching results (ResultsError).
        FileExistsError: the dry-run folder exists and is not empty.
        PushError: the Hub refused or kept failing; the remote repo is left as it was.
    """
    from transformers import PreTrainedModel

    from .core import is_compressed
    from .io import prepare_for_save

    with tempfile.TemporaryDirectory(prefix="hf-embcomp-push-") as tmp:
        if isinstance(model_or_dir, PreTrainedModel):
            if not is_compressed(model_or_dir):
                raise ValueError("push_to_hub expects a model compressed by hf-embcomp (hf_embcomp.compress).")
            folder = Path(tmp) / "model"
            prepare_for_save(model_or_dir)
            model_or_dir.save_pretrained(folder)
        else:
            folder = Path(model_or_dir)
        plan = plan_push(folder, repo_id, results, private=private, revision=revision,
                         commit_message=commit_message, license=license)
        if dry_run is False:
            return execute_plan(plan, token=token)
        out = Path(tempfile.mkdtemp(prefix="hf-embcomp-dry-run-")) if dry_run is True else Path(dry_run)
        write_dry_run(plan, out)
        return out


def write_dry_run(plan: PushPlan, out: Path) -> None:
    """Write ``out/files/<path in repo>`` for every file of the plan and ``out/commit.json`` (atomically).

    Raises:
        FileExistsError: ``out`` exists and is not empty.
    """
    from .io import atomic_output_dir

    with atomic_output_dir(out) as tmp:
        for rel, src in plan.files.items():
            dest = tmp / "files" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, Path):
                shutil.copyfile(src, dest)
            else:
                dest.write_bytes(src)
        (tmp / "commit.json").write_text(json.dumps(plan.describe(), indent=2) + "\n", encoding="utf-8")
    logger.info("dry run: wrote %d files and commit.json to %s", len(plan.files), out)


def cmd_push(args: argparse.Namespace) -> int:
    """``hf-embcomp push``: print the plan (dry run) or the commit URL."""
    from .cli import UserError

    folder = Path(args.dir)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; pass the --output folder of `hf-embcomp compress`.")
    if args.results is not None and not Path(args.results).is_file():
        raise UserError(f"results file {args.results} does not exist; write it with `hf-embcomp evaluate`.")
    dry = False if args.dry_run is None else (args.dry_run or folder.with_name(folder.name + ".dry-run"))
    try:
        out = push_to_hub(folder, args.repo_id, results=args.results, private=args.private, revision=args.revision,
                          commit_message=args.commit_message, dry_run=dry, license=args.license)
    except PushError as e:
        print(f"hf-embcomp: error: {e}", file=sys.stderr)
        return 1
    if isinstance(out, Path):
        plan = json.loads((out / "commit.json").read_text(encoding="utf-8"))
        lines = [(f"hf-embcomp push --dry-run: one commit to {plan['repo_id']}@{plan['revision']} "
                  f"({'private' if plan['private'] else 'public'} if created): {plan['commit_message']}")]
        lines += [f"  add {op['size']:>12,}  {op['path_in_repo']}" for op in plan["operations"]]
        lines.append(f"files and card written to {out / 'files'}; operations in {out / 'commit.json'}; nothing pushed.")
    else:
        lines = [f"hf-embcomp push: {args.repo_id}@{args.revision or 'main'} commit {out.oid[:12]}", f"  {out.commit_url}",
                 f"  load with AutoModel.from_pretrained({args.repo_id!r}, trust_remote_code=True)"]
    print("\n".join(lines))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``push`` sub-command."""
    p = subparsers.add_parser("push", help="publish a compressed model folder to the Hub with its model card")
    p.add_argument("dir", help="the compressed model folder (the --output of `hf-embcomp compress`)")
    p.add_argument("repo_id", help="target Hub repo, e.g. user/bert-svd-8x (created if missing)")
    p.add_argument("--results", default=None,
                   help="results file of `hf-embcomp evaluate` (default: DIR/eval_results.json if present)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    p.add_argument("--commit-message", default=None, help="commit summary")
    p.add_argument("--license", default=None, help="license id for the card (default: the source model's)")
    p.add_argument("--dry-run", nargs="?", const="", default=None, metavar="FOLDER",
                   help="write the files, card and commit plan to FOLDER (default DIR.dry-run) without a network")
    p.set_defaults(func=cmd_push)
