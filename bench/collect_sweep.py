"""Copy a finished `hf-embcomp sweep` folder's results into the repository (bench/results/sweep_<NAME>/).

Each cell's ``eval_results.json`` is copied as ``<method>-x<ratio>.json`` with the cell's
``compression_report.json`` fields that the README table needs (``fit_seconds``, ``stored_bytes``,
``hyperparameters``) added under ``"compression_report"``; the sweep's ``pareto.png`` is copied beside them.
The cells' model folders (megabytes each) are not copied.

    python bench/collect_sweep.py /work/runs/sweep-minilm minilm
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

REPORT_FIELDS = ("fit_seconds", "stored_bytes", "compression_ratio", "hyperparameters", "token_counts_source")


def collect(sweep: Path, dest: Path) -> list[Path]:
    """Copy every finished cell of ``sweep`` into ``dest`` (created); returns the written JSON paths.

    Raises:
        SystemExit: ``sweep`` has no finished cell.
    """
    cells = sorted(p for p in sweep.iterdir() if (p / "eval_results.json").is_file())
    if not cells:
        raise SystemExit(f"{sweep}: no finished cell (no */eval_results.json); run hf-embcomp sweep first")
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for cell in cells:
        doc = json.loads((cell / "eval_results.json").read_text())
        rep_path = cell / "model" / "compression_report.json"
        if rep_path.is_file():
            rep = json.loads(rep_path.read_text())
            doc["compression_report"] = {k: rep[k] for k in REPORT_FIELDS if k in rep}
        path = dest / f"{cell.name}.json"
        path.write_text(json.dumps(doc, indent=1) + "\n")
        out.append(path)
    if (sweep / "pareto.png").is_file():
        shutil.copy2(sweep / "pareto.png", dest / "pareto.png")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path, help="the folder given to hf-embcomp sweep -o")
    ap.add_argument("name", help="results go to bench/results/sweep_NAME/")
    args = ap.parse_args(argv)
    paths = collect(args.sweep, common.RESULTS / f"sweep_{args.name}")
    print(f"copied {len(paths)} cells to {paths[0].parent}")


if __name__ == "__main__":
    main()
