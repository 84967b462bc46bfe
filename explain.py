"""``python explain.py ...``: the same as ``saliency-lab explain ...`` (a thin wrapper kept so that the documented commands work
from the checkout; the code lives in ``saliency_lab.cli.explain``)."""
import sys

from saliency_lab.cli.explain import main

if __name__ == "__main__":
    main(sys.argv[1:])
