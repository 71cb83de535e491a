"""``python -m hf_embcomp ...`` runs the ``hf-embcomp`` command line (also under ``accelerate launch -m``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
