"""hf-embcomp: compress the token-embedding matrix of Hugging Face transformers models.

Public API::

    import hf_embcomp
    small = hf_embcomp.compress(model, method="svd", ratio=8)   # returns a new model
    small.save_pretrained("out")                                # loads with trust_remote_code=True
    dense = hf_embcomp.decompress(small)                        # the stock class again
    hf_embcomp.trainable_parts(small, "real")                   # fine-tune the embedding too (default: frozen)
    hf_embcomp.push_to_hub(small, "user/name", results="results.json")  # one commit, with a model card

The names are resolved on first use (module ``__getattr__``), so ``import hf_embcomp`` and the command
line's ``--help`` do not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the submodule that defines it
_EXPORTS = {
    "CompressionError": ".core",
    "compress": ".core",
    "decompress": ".core",
    "fidelity": ".core",
    "is_compressed": ".core",
    "TrainableParts": ".training.parts",
    "trainable_parts": ".training.parts",
    "METHODS": ".methods",
    "RatioError": ".methods",
    "get_method": ".methods",
    "load_model": ".io",
    "save_compressed": ".io",
    "push_to_hub": ".push",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from .core import CompressionError, compress, decompress, fidelity, is_compressed
    from .training.parts import TrainableParts, trainable_parts
    from .io import load_model, save_compressed
    from .methods import METHODS, RatioError, get_method
    from .push import push_to_hub

__all__ = [
    "METHODS",
    "CompressionError",
    "RatioError",
    "TrainableParts",
    "compress",
    "decompress",
    "fidelity",
    "get_method",
    "is_compressed",
    "load_model",
    "push_to_hub",
    "save_compressed",
    "trainable_parts",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import the submodule of a public name on first access and cache the name in this module."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
