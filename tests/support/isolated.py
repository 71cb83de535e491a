"""Run Python code in a fresh interpreter where ``hf_embcomp`` cannot be imported.

The child process installs a meta-path finder that refuses every ``hf_embcomp`` import, so what it
loads can only come from the saved repository's own code (``trust_remote_code=True``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

_PRELUDE = '''
import sys, json as _json
def emit(obj):
    """Report the result object to the parent process."""
    print("\\n@@RESULT@@" + _json.dumps(obj), flush=True)
class _BlockHfEmbcomp:
    def find_spec(self, name, path=None, target=None):
        if name == "hf_embcomp" or name.startswith("hf_embcomp."):
            raise ImportError("hf_embcomp is blocked in this process")
sys.meta_path.insert(0, _BlockHfEmbcomp())
'''


def run_isolated(code: str, tmp_path: Path, timeout: float = 600, env: dict | None = None) -> dict:
    """Run ``code`` without hf_embcomp; the code reports one JSON object with ``emit(obj)`` (or prints it
    as its last stdout line).

    Returns that object. Raises AssertionError with the child's stderr if it fails.
    """
    script = tmp_path / "isolated_check.py"
    script.write_text(_PRELUDE + textwrap.dedent(code))
    e = dict(os.environ)
    e.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
              "HF_MODULES_CACHE": str(tmp_path / "modules_cache"), "TOKENIZERS_PARALLELISM": "false"})
    e.update(env or {})
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, env=e,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, f"isolated run failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    if "@@RESULT@@" in proc.stdout:
        return json.loads(proc.stdout.rsplit("@@RESULT@@", 1)[1].strip().splitlines()[0])
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    return json.loads(lines[-1])
