"""The one switch of the library's own progress bars (the fit loops, token counting).

Every tqdm bar of a fit passes ``disable=progress.disabled()``; ``hf-embcomp compress --quiet`` turns
them off for the command with :func:`quiet`. From Python: ``hf_embcomp.progress.set_quiet(True)``.
transformers' GGUF de-quantisation bar follows it too, inside :func:`gguf_bar` (every GGUF load of the library).
"""

from __future__ import annotations

import contextlib
import functools
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


@contextlib.contextmanager
def gguf_bar() -> Iterator[None]:
    """Inside the block, transformers' GGUF de-quantisation bar is off while :func:`disabled` (it is a bare tqdm
    in ``transformers.modeling_gguf_pytorch_utils``, deaf to ``transformers.utils.logging.disable_progress_bar``).
    Swaps that module's ``tqdm`` for the block's length: not for concurrent use from several threads."""
    if not _quiet:
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
