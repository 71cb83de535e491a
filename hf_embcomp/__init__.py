"""hf-embcomp: compress the token-embedding matrix of Hugging Face transformers models.

Public API::

    import hf_embcomp
    small = hf_embcomp.compress(model, method="svd", ratio=8)   # returns a new model
    small.save_pretrained("out")                                # loads with trust_remote_code=True
    dense = hf_embcomp.decompress(small)                        # the stock class again
    hf_embcomp.trainable_parts(small, "real")                   # fine-tune the embedding too (default: frozen)
    hf_embcomp.push_to_hub(small, "user/name", results="results.json")  # one commit, with a model card
"""

from .core import CompressionError, compress, decompress, fidelity, is_compressed
from .finetune import TrainableParts, trainable_parts
from .methods import METHODS, RatioError, get_method
from .io import load_model, save_compressed
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
