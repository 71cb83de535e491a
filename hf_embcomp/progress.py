"""The one switch of the library's own progress bars (the fit loops, token counting).

Every tqdm bar of a fit passes ``disable=progress.disabled()``; ``hf-embcomp compress --quiet`` turns
them off for the command with :func:`quiet`. From Python: ``hf_embcomp.progress.set_quiet(True)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_quiet = False


def set_quiet(quiet: bool = True) -> None:
    """Turn the library's progress bars off (``True``) or back on (``False``); process-wide."""
    global _quiet
    _quiet = bool(quiet)


def disabled() -> bool:
    """Whether progress bars are off: the ``disable`` value every bar of the library passes to tqdm."""
    return _quiet


@contextlib.contextmanager
def quiet(on: bool = True) -> Iterator[None]:
    """Progress bars off inside the block when ``on`` (else unchanged); the previous state is restored after."""
    before = _quiet
    set_quiet(before or on)
    try:
        yield
    finally:
        set_quiet(before)
